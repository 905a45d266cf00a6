"""Allegro: self-attention over video only (`attn1`; RoPE tables come from the pipeline as an
input), text in the cross-attention `attn2` (with the text mask). Latent input (B, C, F, H, W),
2-D patches per frame (Conv2d), tokens in (frame, row, column) order."""

from __future__ import annotations

from diffusers import AllegroTransformer3DModel
from diffusers.models.transformers.transformer_allegro import AllegroTransformerBlock

from .adapter import Grid, ModelAdapter, register


def allegro_grid(latent: tuple[int, ...], weight: tuple[int, ...]) -> Grid:
    """(B, C, F, H, W) latent and Conv2d patch weight (O, C, p, p) -> (F, H/p, W/p)."""
    _, _, frames, height, width = latent
    return frames, height // weight[-2], width // weight[-1]


ALLEGRO = register(
    ModelAdapter(
        family="allegro",
        model_class=AllegroTransformer3DModel,
        block_containers=(("transformer_blocks", AllegroTransformerBlock),),
        self_attention=("attn1",),
        text_first=False,  # no text in the self-attention
        patch_weight="pos_embed.proj.weight",
        grid=allegro_grid,
    )
)
