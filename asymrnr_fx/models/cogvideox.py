"""CogVideoX 1.0 and 1.5: joint attention over [text, video] in every block, text first (226
tokens in the released models), RoPE on the video part. Latent input (B, F, C, H, W); 2-D patches
(1.0) or, with `patch_size_t` (1.5), spatio-temporal patches that also divide the frames.

The grid is read from the patch embedding's own reshapes in the traced graph: the 1.5 patch
weight (a Linear over C * pt * p * p values) does not tell pt from p."""

from __future__ import annotations

from diffusers import CogVideoXTransformer3DModel
from diffusers.models.embeddings import CogVideoXPatchEmbed
from diffusers.models.transformers.cogvideox_transformer_3d import CogVideoXBlock
from torch import fx

from .adapter import Grid, ModelAdapter, UnsupportedModelError, nodes_in, register


def cogvideox_grid(gm: fx.GraphModule) -> Grid:
    """(F/pt, H/p, W/p). 1.0 views the Conv2d output as (B, F, C', H/p, W/p); 1.5 splits the
    latent into patches as (B, F/pt, pt, H/p, p, W/p, p, C)."""
    for node in nodes_in(gm, CogVideoXPatchEmbed):
        if node.op != "call_method" or node.target not in ("view", "reshape"):
            continue
        shape = tuple(int(s) for s in node.meta["example_value"].shape)
        if len(shape) == 5:
            return shape[1], shape[3], shape[4]
        if len(shape) == 8:
            return shape[1], shape[3], shape[5]
    raise UnsupportedModelError("cogvideox: no patch grid in the traced patch embedding (a diffusers version this adapter does not know?).")


COGVIDEOX = register(
    ModelAdapter(
        family="cogvideox",
        model_class=CogVideoXTransformer3DModel,
        block_containers=(("transformer_blocks", CogVideoXBlock),),
        self_attention=("attn1",),
        text_first=True,
        graph_grid=cogvideox_grid,
    )
)
