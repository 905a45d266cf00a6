"""CogVideoX: joint attention over [text, video] in every block, text first (226 tokens in the
released models), RoPE on the video part. Latent input (B, F, C, H, W), 2-D patches."""

from __future__ import annotations

from diffusers import CogVideoXTransformer3DModel
from diffusers.models.transformers.cogvideox_transformer_3d import CogVideoXBlock

from .adapter import Grid, ModelAdapter, UnsupportedModelError, register


def cogvideox_grid(latent: tuple[int, ...], weight: tuple[int, ...]) -> Grid:
    """(B, F, C, H, W) latent and Conv2d patch weight (O, C, p, p) -> (F, H/p, W/p)."""
    if len(weight) != 4:
        raise UnsupportedModelError(
            "CogVideoX with temporal patches (patch_size_t, CogVideoX 1.5) is not supported yet: "
            f"its patch embedding weight has shape {weight}, expected a Conv2d (O, C, p, p)."
        )
    _, frames, _, height, width = latent
    return frames, height // weight[-2], width // weight[-1]


COGVIDEOX = register(
    ModelAdapter(
        family="cogvideox",
        model_class=CogVideoXTransformer3DModel,
        block_containers=(("transformer_blocks", CogVideoXBlock),),
        self_attention=("attn1",),
        text_first=True,
        patch_weight="patch_embed.proj.weight",
        grid=cogvideox_grid,
    )
)
