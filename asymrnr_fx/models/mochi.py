"""Mochi: joint attention over [video, text] in every block (`attn1`), text last. Video and text
streams have their own widths (3072 and 1536 in Mochi-1), projected to the same heads. Latent
input (B, C, F, H, W), 2-D patches (Conv2d) applied per frame.

diffusers' processor applies the text mask by *selecting* the valid text tokens (`torch.nonzero`,
per sample) before the attention, so the sequence length depends on the data and Dynamo breaks
the graph there. `MochiMaskedAttnProcessor` computes the same attention over the whole sequence
with the padded text keys masked out and the padded text rows zeroed, which is static:
`asymrnr_fx.compile` installs it (`prepare` for a plain `torch.compile`). Equal to diffusers'
output (to float precision) for any text mask: diffusers returns the attention rows of the valid
text tokens packed to the front of the text part, zeros after, and this packs them the same way
with a stable sort by validity (the identity for the prefix masks MochiPipeline's tokenizer
gives)."""

from __future__ import annotations

import torch
from diffusers import MochiTransformer3DModel
from diffusers.models.transformers.transformer_mochi import MochiTransformerBlock

from .adapter import Grid, ModelAdapter, register
from .joint_attention import masked_joint_attention, take_rows, valid_first


def mochi_grid(latent: tuple[int, ...], weight: tuple[int, ...]) -> Grid:
    """(B, C, F, H, W) latent and Conv2d patch weight (O, C, p, p) -> (F, H/p, W/p)."""
    _, _, frames, height, width = latent
    return frames, height // weight[-2], width // weight[-1]


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Mochi's RoPE on interleaved (even, odd) pairs of x (B, N, H, D), in float32."""
    even, odd = x[..., 0::2].float(), x[..., 1::2].float()
    return torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2).to(x.dtype)


class MochiMaskedAttnProcessor:
    """Mochi's joint attention with a static sequence: [video, all text tokens], padded text keys
    masked, padded text rows zeroed and the valid ones packed first (what diffusers' padding after
    the selected rows gives)."""

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                 attention_mask: torch.Tensor, image_rotary_emb: tuple | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        rotate = None if image_rotary_emb is None else (lambda x: _rotate(x, *image_rotary_emb))
        video, text = masked_joint_attention(attn, hidden_states, encoder_hidden_states, attention_mask, rotate)
        video = attn.to_out[1](attn.to_out[0](video))
        text = take_rows(text, valid_first(attention_mask))
        return video, (attn.to_add_out(text) if hasattr(attn, "to_add_out") else text)


def install_masked_attention(model: torch.nn.Module) -> int:
    """Give every block's `attn1` the static processor; returns how many were replaced."""
    count = 0
    for block in model.transformer_blocks:
        if not isinstance(block.attn1.processor, MochiMaskedAttnProcessor):
            block.attn1.processor = MochiMaskedAttnProcessor()
            count += 1
    return count


MOCHI = register(
    ModelAdapter(
        family="mochi",
        model_class=MochiTransformer3DModel,
        block_containers=(("transformer_blocks", MochiTransformerBlock),),
        self_attention=("attn1",),
        text_first=False,
        patch_weight="patch_embed.proj.weight",
        grid=mochi_grid,
        prepare=install_masked_attention,
    )
)
