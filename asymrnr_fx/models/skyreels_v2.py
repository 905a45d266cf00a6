"""SkyReels-V2 (Wan-based): self-attention over video only (`attn1`), text (and, for I2V, image
tokens) in the cross-attention `attn2`. Diffusion forcing passes a per-frame timestep (B, F) and,
with `num_frame_per_block` > 1, a block-causal (N, N) mask on the self-attention, reduced along
both axes. Latent input (B, C, F, H, W), 3-D patches (Conv3d)."""

from __future__ import annotations

from diffusers import SkyReelsV2Transformer3DModel
from diffusers.models.transformers.transformer_skyreels_v2 import SkyReelsV2TransformerBlock

from .adapter import ModelAdapter, conv3d_grid, register

SKYREELS_V2 = register(
    ModelAdapter(
        family="skyreels_v2",
        model_class=SkyReelsV2Transformer3DModel,
        block_containers=(("blocks", SkyReelsV2TransformerBlock),),
        self_attention=("attn1",),
        text_first=False,  # no text in the self-attention
        patch_weight="patch_embedding.weight",
        grid=conv3d_grid,
    )
)
