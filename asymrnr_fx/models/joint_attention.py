"""Joint attention over [video, text] with padded text masked as keys, shared by the processors
that `prepare` installs (Mochi, HunyuanVideo 1.5) in place of diffusers' data-dependent ones.

The mask is built before the projections and the text is taken from the end of the sequence, so
a rewrite that drops video tokens reduces the mask like the keys and keeps the text. Padded text
rows are zeroed after the attention: diffusers' processors give them zeros (Mochi pads after the
selected rows, HunyuanVideo 1.5's square mask leaves the row fully masked)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

Rotate = Callable[[torch.Tensor], torch.Tensor]  # RoPE on (B, N, heads, D) video queries / keys


def heads(x: torch.Tensor, n_heads: int, norm) -> torch.Tensor:
    """(B, N, H * D) -> (B, N, H, D), normalised per head when the module has a norm."""
    x = x.unflatten(2, (n_heads, -1))
    return norm(x) if norm is not None else x


def valid_first(valid: torch.Tensor) -> torch.Tensor:
    """Per sample, the order (B, N) that puts the valid positions of `valid` (B, N) first, each
    part in its own order (a stable sort): static-shape packing in place of boolean selection."""
    return torch.argsort((~valid.bool()).to(torch.int32), dim=1, stable=True)


def take_rows(x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Rows of x (B, N, C) in `order` (B, N)."""
    return x.gather(1, order[..., None].expand(-1, -1, x.shape[-1]))


def masked_joint_attention(attn, video: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor,
                           rotate: Rotate | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention outputs (B, Nv, H * D) and (B, Nt, H * D) before the output projections."""
    valid = text_mask.bool()
    keys = torch.cat([valid.new_ones(valid.shape[0], video.shape[1]), valid], dim=1)[:, None, None]
    q = heads(attn.to_q(video), attn.heads, attn.norm_q)
    k = heads(attn.to_k(video), attn.heads, attn.norm_k)
    v = attn.to_v(video).unflatten(2, (attn.heads, -1))
    if rotate is not None:
        q, k = rotate(q), rotate(k)
    tq = heads(attn.add_q_proj(text), attn.heads, attn.norm_added_q)
    tk = heads(attn.add_k_proj(text), attn.heads, attn.norm_added_k)
    tv = attn.add_v_proj(text).unflatten(2, (attn.heads, -1))
    q, k, v = (torch.cat([a, b], dim=1).transpose(1, 2) for a, b in ((q, tq), (k, tk), (v, tv)))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=keys, dropout_p=0.0, is_causal=False)
    out = out.transpose(1, 2).flatten(2, 3).to(q.dtype)
    n_text = text.shape[1]
    return out[:, :-n_text], out[:, -n_text:] * valid[:, :, None].to(out.dtype)
