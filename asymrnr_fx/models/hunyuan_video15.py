"""HunyuanVideo 1.5: one kind of block (double-stream, `attn`) over [video, text] with text last
and a square mask (B, 1, N, N) over padded text; the token refiner attends over text only (never
reduced). Latent input (B, C, F, H, W), 3-D patches (Conv3d).

Its forward() branches on data (`if torch.all(image_embeds == 0)`) and reorders text tokens by
boolean masks in a Python loop: Dynamo breaks the graph there, and the blocks land in a graph
without the timestep and latent inputs (a per-block graph unless nonzero is captured), which the
backend cannot place or grid yet: it fails closed (tests/test_models_mochi_latte_v15.py)."""

from __future__ import annotations

from diffusers.models.transformers.transformer_hunyuan_video15 import (
    HunyuanVideo15Transformer3DModel,
    HunyuanVideo15TransformerBlock,
)

from .adapter import ModelAdapter, conv3d_grid, register

HUNYUAN_VIDEO15 = register(
    ModelAdapter(
        family="hunyuan_video15",
        model_class=HunyuanVideo15Transformer3DModel,
        block_containers=(("transformer_blocks", HunyuanVideo15TransformerBlock),),
        self_attention=("attn",),
        text_first=False,
        patch_weight="x_embedder.proj.weight",
        grid=conv3d_grid,
    )
)
