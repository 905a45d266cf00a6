"""LTX-Video: self-attention over video only (`attn1`, 3-D RoPE inside the attention), text in
the cross-attention `attn2` (with the text mask). The latent arrives packed, (B, N, C) with
N = F * H * W in (frame, row, column) order, and the grid as the Python ints num_frames /
height / width, which Dynamo bakes into the graph: the grid is read from the graph."""

from __future__ import annotations

import torch
from diffusers import LTXVideoTransformer3DModel
from diffusers.models.transformers.transformer_ltx import LTXVideoRotaryPosEmbed, LTXVideoTransformerBlock
from torch import fx

from .adapter import Grid, ModelAdapter, UnsupportedModelError, nodes_in, register


def ltx_grid(gm: fx.GraphModule) -> Grid:
    """(F, H, W): the shape of each coordinate of the RoPE's meshgrid(arange(F), arange(H),
    arange(W)). Absent when the caller passes `video_coords` (the condition pipeline, whose
    tokens need not form one grid): then the model is not supported (fail closed)."""
    for node in nodes_in(gm, LTXVideoRotaryPosEmbed):
        if node.op == "call_function" and node.target is torch.meshgrid:
            frames, height, width = node.meta["example_value"][0].shape
            return int(frames), int(height), int(width)
    raise UnsupportedModelError(
        "ltx_video: no RoPE coordinate grid in the traced graph (forward() got video_coords?). "
        "Pass num_frames, height and width instead, as LTXPipeline does."
    )


LTX_VIDEO = register(
    ModelAdapter(
        family="ltx_video",
        model_class=LTXVideoTransformer3DModel,
        block_containers=(("transformer_blocks", LTXVideoTransformerBlock),),
        self_attention=("attn1",),
        text_first=False,  # no text in the self-attention
        graph_grid=ltx_grid,
    )
)
