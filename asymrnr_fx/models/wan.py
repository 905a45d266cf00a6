"""Wan 2.1 / 2.2 (T2V, I2V, TI2V-5B): self-attention over video only (`attn1`, RoPE inside the
attention), text in the cross-attention `attn2`; Wan I2V adds image tokens to the
cross-attention context, attended by a second SDPA in `attn2` (never reduced). Latent input
(B, C, F, H, W), 3-D patches (Conv3d). Wan 2.2 TI2V-5B passes a per-token timestep (B, N)."""

from __future__ import annotations

from diffusers import WanTransformer3DModel
from diffusers.models.transformers.transformer_wan import WanTransformerBlock

from .adapter import ModelAdapter, conv3d_grid, register

WAN = register(
    ModelAdapter(
        family="wan",
        model_class=WanTransformer3DModel,
        block_containers=(("blocks", WanTransformerBlock),),
        self_attention=("attn1",),
        text_first=False,  # no text in the self-attention: the layout has no text part
        patch_weight="patch_embedding.weight",
        grid=conv3d_grid,
    )
)
