"""HunyuanDiT: an image DiT (grid (1, H, W)) with U-ViT style long skip branches: block
L - 1 - i fuses the output of block i (i < L/2 - 1). Self-attention `attn1` over image tokens
only (text enters through the cross-attention `attn2`), 2-D RoPE. Latent input (B, C, H, W)."""

from __future__ import annotations

from diffusers import HunyuanDiT2DModel
from diffusers.models.transformers.hunyuan_transformer_2d import HunyuanDiTBlock

from .adapter import Grid, ModelAdapter, register


def hunyuan_dit_grid(latent: tuple[int, ...], weight: tuple[int, ...]) -> Grid:
    """(B, C, H, W) latent and Conv2d patch weight (O, C, p, p) -> (1, H/p, W/p)."""
    _, _, height, width = latent
    return 1, height // weight[-2], width // weight[-1]


HUNYUAN_DIT = register(
    ModelAdapter(
        family="hunyuan_dit",
        model_class=HunyuanDiT2DModel,
        block_containers=(("blocks", HunyuanDiTBlock),),
        self_attention=("attn1",),
        text_first=False,
        patch_weight="pos_embed.proj.weight",
        grid=hunyuan_dit_grid,
        long_skips=True,
    )
)
