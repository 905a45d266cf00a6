"""Mochi: joint attention over [video, text] in every block (`attn1`), text last. Video and text
streams have their own widths (3072 and 1536 in Mochi-1), projected to the same heads. Latent
input (B, C, F, H, W), 2-D patches (Conv2d) applied per frame.

diffusers' processor applies the text mask by *selecting* the valid text tokens (`torch.nonzero`,
per sample) before the attention, so the sequence length depends on the data and Dynamo breaks
the graph there. `MochiMaskedAttnProcessor` computes the same attention over the whole sequence
with the padded text keys masked out and the padded text rows zeroed, which is static:
`asymrnr_fx.compile` installs it (`prepare` for a plain `torch.compile`). Equal to diffusers'
output (to float precision) for masks whose valid text tokens come first, as MochiPipeline's
tokenizer pads; diffusers packs the valid tokens of any other mask to the front of the text
part, this keeps them where they were."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import MochiTransformer3DModel
from diffusers.models.transformers.transformer_mochi import MochiTransformerBlock

from .adapter import Grid, ModelAdapter, register


def mochi_grid(latent: tuple[int, ...], weight: tuple[int, ...]) -> Grid:
    """(B, C, F, H, W) latent and Conv2d patch weight (O, C, p, p) -> (F, H/p, W/p)."""
    _, _, frames, height, width = latent
    return frames, height // weight[-2], width // weight[-1]


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Mochi's RoPE on interleaved (even, odd) pairs of x (B, N, H, D), in float32."""
    even, odd = x[..., 0::2].float(), x[..., 1::2].float()
    return torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2).to(x.dtype)


def _heads(x: torch.Tensor, heads: int, norm) -> torch.Tensor:
    """(B, N, H * D) -> (B, N, H, D), normalised per head when the module has a norm."""
    x = x.unflatten(2, (heads, -1))
    return norm(x) if norm is not None else x


class MochiMaskedAttnProcessor:
    """Mochi's joint attention with a static sequence: [video, all text tokens], padded text keys
    masked, padded text rows zeroed (what diffusers' padding after the selected rows gives). The
    text part is taken from the end of the sequence, so a rewrite that drops video tokens keeps it."""

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                 attention_mask: torch.Tensor, image_rotary_emb: tuple | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        text_mask = attention_mask.bool()
        keys = torch.cat([text_mask.new_ones(text_mask.shape[0], hidden_states.shape[1]), text_mask], dim=1)[:, None, None]
        q = _heads(attn.to_q(hidden_states), attn.heads, attn.norm_q)
        k = _heads(attn.to_k(hidden_states), attn.heads, attn.norm_k)
        v = attn.to_v(hidden_states).unflatten(2, (attn.heads, -1))
        if image_rotary_emb is not None:
            q, k = _rotate(q, *image_rotary_emb), _rotate(k, *image_rotary_emb)
        tq = _heads(attn.add_q_proj(encoder_hidden_states), attn.heads, attn.norm_added_q)
        tk = _heads(attn.add_k_proj(encoder_hidden_states), attn.heads, attn.norm_added_k)
        tv = attn.add_v_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
        q, k, v = (torch.cat([a, b], dim=1).transpose(1, 2) for a, b in ((q, tq), (k, tk), (v, tv)))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keys, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).flatten(2, 3)
        n_text = encoder_hidden_states.shape[1]
        video, text = out[:, :-n_text], out[:, -n_text:] * text_mask[:, :, None].to(out.dtype)
        video = attn.to_out[1](attn.to_out[0](video))
        if hasattr(attn, "to_add_out"):
            text = attn.to_add_out(text)
        return video, text


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
