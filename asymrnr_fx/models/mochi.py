"""Mochi: joint attention over [video, valid text] in every block (`attn1`), text last. Video and
text streams have their own widths (3072 and 1536 in Mochi-1), projected to the same heads. The
text mask is applied by *selecting* the valid text tokens (`torch.nonzero`, per sample) before
the attention, so the sequence length depends on the data: Dynamo breaks the graph there unless
`torch._dynamo.config.capture_dynamic_output_shape_ops = True`, and even then the length is
symbolic, which keeps these sites dense (see `passes/sites.py`). Latent input (B, C, F, H, W),
2-D patches (Conv2d) applied per frame."""

from __future__ import annotations

from diffusers import MochiTransformer3DModel
from diffusers.models.transformers.transformer_mochi import MochiTransformerBlock

from .adapter import Grid, ModelAdapter, register


def mochi_grid(latent: tuple[int, ...], weight: tuple[int, ...]) -> Grid:
    """(B, C, F, H, W) latent and Conv2d patch weight (O, C, p, p) -> (F, H/p, W/p)."""
    _, _, frames, height, width = latent
    return frames, height // weight[-2], width // weight[-1]


MOCHI = register(
    ModelAdapter(
        family="mochi",
        model_class=MochiTransformer3DModel,
        block_containers=(("transformer_blocks", MochiTransformerBlock),),
        self_attention=("attn1",),
        text_first=False,
        patch_weight="patch_embed.proj.weight",
        grid=mochi_grid,
    )
)
