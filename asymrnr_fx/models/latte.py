"""Latte: spatial and temporal blocks alternate (`transformer_blocks[j]`, then
`temporal_transformer_blocks[j]`), both diffusers `BasicTransformerBlock`. Spatial self-attention
`attn1` runs per frame (batch B * F, sequences over the H x W patches), with text only in the
cross-attention `attn2`; temporal `attn1` runs per patch position (batch B * H * W, sequences over
the F frames). Latent input (B, C, F, H, W), 2-D patches (Conv2d) applied per frame.

The spatial sequences carry almost all tokens (Latte-1: 1024 patches per frame against 16 frames),
so the reduction grid is the spatial one, (1, H/p, W/p); the temporal sites stay dense."""

from __future__ import annotations

from diffusers import LatteTransformer3DModel
from diffusers.models.attention import BasicTransformerBlock

from .adapter import Grid, ModelAdapter, UnsupportedModelError, register


def latte_grid(latent: tuple[int, ...], weight: tuple[int, ...]) -> Grid:
    """(B, C, F, H, W) latent and Conv2d patch weight (O, C, p, p) -> (F, H/p, W/p)."""
    if len(latent) != 5 or len(weight) != 4:
        raise UnsupportedModelError(
            f"latte: expected a (B, C, F, H, W) latent and a Conv2d patch weight, got {latent} and {weight}."
        )
    _, _, frames, height, width = latent
    return frames, height // weight[-2], width // weight[-1]


LATTE = register(
    ModelAdapter(
        family="latte",
        model_class=LatteTransformer3DModel,
        block_containers=(
            ("transformer_blocks", BasicTransformerBlock),
            ("temporal_transformer_blocks", BasicTransformerBlock),
        ),
        self_attention=("attn1",),
        text_first=False,  # no text in the self-attention: the layout has no text part
        patch_weight="pos_embed.proj.weight",
        grid=latte_grid,
        interleaved=True,
        sequence_axes=(("transformer_blocks", "hw"), ("temporal_transformer_blocks", "f")),
    )
)
