"""HunyuanVideo: double-stream then single-stream blocks, attention over [video, text] with text
last and a key mask for padded text; the token refiner attends over text only (never reduced).
Latent input (B, C, F, H, W), 3-D patches."""

from __future__ import annotations

from diffusers import HunyuanVideoTransformer3DModel
from diffusers.models.transformers.transformer_hunyuan_video import (
    HunyuanVideoSingleTransformerBlock,
    HunyuanVideoTransformerBlock,
)

from .adapter import ModelAdapter, conv3d_grid, register

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
        grid=conv3d_grid,
    )
)
