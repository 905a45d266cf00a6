"""CogVideoX 1.0 and 1.5: joint attention over [text, video] in every block, text first (226
tokens in the released models), RoPE on the video part. Latent input (B, F, C, H, W); 2-D patches
(1.0) or, with `patch_size_t` (1.5), spatio-temporal patches that also divide the frames."""

from __future__ import annotations

from diffusers import CogVideoXTransformer3DModel
from diffusers.models.transformers.cogvideox_transformer_3d import CogVideoXBlock

from .adapter import Grid, ModelAdapter, UnsupportedModelError, register


def cogvideox_grid(latent: tuple[int, ...], weight: tuple[int, ...]) -> Grid:
    """(B, F, C, H, W) latent and patch weight -> (F/pt, H/p, W/p).

    CogVideoX 1.0: Conv2d (O, C, p, p), pt = 1. CogVideoX 1.5 (`patch_size_t`): Linear
    (O, C * pt * p * p) over patches flattened as (pt, p, p), whose shape gives p * p * pt only:
    p is taken as the largest spatial patch that fits (released 1.5 models: p = pt = 2).
    """
    _, frames, channels, height, width = latent
    if len(weight) == 4:
        return frames, height // weight[-2], width // weight[-1]
    p, pt = _split_patch(weight[-1] // channels, (frames, height, width))
    return frames // pt, height // p, width // p


def _split_patch(volume: int, fhw: tuple[int, int, int]) -> tuple[int, int]:
    """(p, pt) with p * p * pt == volume, pt dividing F and p dividing H and W; largest p first."""
    frames, height, width = fhw
    for p in range(int(volume**0.5), 0, -1):
        pt, rest = divmod(volume, p * p)
        if not rest and not frames % pt and not height % p and not width % p:
            return p, pt
    raise UnsupportedModelError(
        f"CogVideoX: patches of {volume} latent pixels per channel do not tile the latent grid {fhw}."
    )


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
