"""HunyuanVideo: double-stream then single-stream blocks, attention over [video, text] with text
last and a key mask for padded text; the token refiner attends over text only (never reduced).
Latent input (B, C, F, H, W), 3-D patches."""

from __future__ import annotations

from diffusers import HunyuanVideoTransformer3DModel
from diffusers.models.transformers.transformer_hunyuan_video import (
    HunyuanVideoSingleTransformerBlock,
    HunyuanVideoTransformerBlock,
)

from .adapter import Grid, ModelAdapter, register


def hunyuan_grid(latent: tuple[int, ...], weight: tuple[int, ...]) -> Grid:
    """(B, C, F, H, W) latent and Conv3d patch weight (O, C, pt, p, p) -> (F/pt, H/p, W/p)."""
    _, _, frames, height, width = latent
    return frames // weight[-3], height // weight[-2], width // weight[-1]


HUNYUAN_VIDEO = register(
    ModelAdapter(
        family="hunyuan_video",
        model_class=HunyuanVideoTransformer3DModel,
        block_containers=(
            ("transformer_blocks", HunyuanVideoTransformerBlock),
            ("single_transformer_blocks", HunyuanVideoSingleTransformerBlock),
        ),
        self_attention=("attn",),
        text_first=False,
        patch_weight="x_embedder.proj.weight",
        grid=hunyuan_grid,
    )
)
