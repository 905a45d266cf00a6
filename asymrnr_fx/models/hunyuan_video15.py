"""HunyuanVideo 1.5: one kind of block (double-stream, `attn`) over [video, text] with text last;
the token refiner attends over text only (never reduced). Latent input (B, C, F, H, W), 3-D
patches (Conv3d).

diffusers' forward() branches on data (`if torch.all(image_embeds == 0)`) and reorders the
condition tokens (image, ByT5, MLLM: valid ones first, padding after) by boolean indexing in a
loop over the batch; its processor builds a square (B, 1, N, N) mask from the text mask. Dynamo
breaks the graph at both, and the blocks land in a graph without the timestep and the latent.
`prepare` (called by `asymrnr_fx.compile` and `export`) makes it static, with equal output:
- `static_forward`: the branch becomes a multiplication by 0 / 1, the reorder a stable sort of
  the tokens by validity (the same order: valid image, ByT5, MLLM, then the padding of each);
- `KeyMaskAttnProcessor`: masks padded text as keys only and zeroes the padded text rows after
  the attention (what diffusers' square mask gives them: SDPA returns zeros for a fully masked
  row), so a rewrite that drops video tokens reduces the mask like the keys."""

from __future__ import annotations

import types

import torch
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.transformers.transformer_hunyuan_video15 import (
    HunyuanVideo15Transformer3DModel,
    HunyuanVideo15TransformerBlock,
)
from diffusers.utils import apply_lora_scale

from .adapter import ModelAdapter, conv3d_grid, register
from .joint_attention import masked_joint_attention, take_rows, valid_first


class KeyMaskAttnProcessor:
    """HunyuanVideo 1.5's joint attention over [video, text] with padded text masked as keys and
    its rows zeroed after the attention: equal to diffusers' square mask, and static."""

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                 attention_mask: torch.Tensor, image_rotary_emb: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        rotate = None if image_rotary_emb is None else (lambda x: apply_rotary_emb(x, image_rotary_emb, sequence_dim=1))
        video, text = masked_joint_attention(attn, hidden_states, encoder_hidden_states, attention_mask, rotate)
        return attn.to_out[1](attn.to_out[0](video)), attn.to_add_out(text)


def condition_tokens(tokens: list[torch.Tensor], masks: list[torch.Tensor], zero_padding: list[bool]) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate token groups (B, Ni, D) and move each sample's valid tokens to the front, group
    order kept (a stable sort by validity), padding after; groups marked in `zero_padding` have
    their padded tokens zeroed. Returns (tokens, mask)."""
    valid = torch.cat([m.bool() for m in masks], dim=1)
    kept = [torch.where(m.bool()[..., None], t, 0) if zero else t for t, m, zero in zip(tokens, masks, zero_padding)]
    order = valid_first(valid)
    return take_rows(torch.cat(kept, dim=1), order), valid.gather(1, order)


def _conditions(model, timestep, text, text_mask, text_2, text_mask_2, image_embeds) -> tuple[torch.Tensor, torch.Tensor]:
    """The MLLM, ByT5 and image condition tokens, embedded and typed as diffusers does; the image
    tokens count (and are kept) only when `image_embeds` is not all zero (image-to-video)."""
    text = model.context_embedder(text, timestep, text_mask)
    text = text + model.cond_type_embed(torch.zeros_like(text[:, :, 0], dtype=torch.long))
    text_2 = model.context_embedder_2(text_2)
    text_2 = text_2 + model.cond_type_embed(torch.ones_like(text_2[:, :, 0], dtype=torch.long))
    image = model.image_embedder(image_embeds)
    with_image = (image_embeds != 0).any()
    image = image * with_image.to(image.dtype)
    image = image + model.cond_type_embed(2 * torch.ones_like(image[:, :, 0], dtype=torch.long))
    image_mask = with_image.expand(image.shape[0], image.shape[1])
    return condition_tokens([image, text_2, text], [image_mask, text_mask_2, text_mask], [False, True, True])


@apply_lora_scale("attention_kwargs")
def static_forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                   encoder_attention_mask: torch.Tensor, timestep_r: torch.Tensor | None = None,
                   encoder_hidden_states_2: torch.Tensor | None = None, encoder_attention_mask_2: torch.Tensor | None = None,
                   image_embeds: torch.Tensor | None = None, attention_kwargs: dict | None = None, return_dict: bool = True):
    """diffusers' HunyuanVideo15Transformer3DModel.forward (inference) without data-dependent
    control flow or shapes: same arguments, same output."""
    batch, _, frames, height, width = hidden_states.shape
    pt, p = self.config.patch_size_t, self.config.patch_size
    rope = self.rope(hidden_states)
    temb = self.time_embed(timestep, timestep_r=timestep_r)
    hidden_states = self.x_embedder(hidden_states)
    text, mask = _conditions(self, timestep, encoder_hidden_states, encoder_attention_mask,
                             encoder_hidden_states_2, encoder_attention_mask_2, image_embeds)
    for block in self.transformer_blocks:
        hidden_states, text = block(hidden_states, text, temb, mask, rope)
    out = self.proj_out(self.norm_out(hidden_states, temb))
    out = out.reshape(batch, frames // pt, height // p, width // p, -1, pt, p, p).permute(0, 4, 1, 5, 2, 6, 3, 7)
    out = out.flatten(6, 7).flatten(4, 5).flatten(2, 3)
    return Transformer2DModelOutput(sample=out) if return_dict else (out,)


def install_static_forward(model: HunyuanVideo15Transformer3DModel) -> int:
    """Give `model` the static forward and every block the key-mask processor; returns how many
    modules changed (0 when already prepared)."""
    if model.training and model.gradient_checkpointing:
        raise ValueError("asymrnr prepares HunyuanVideo 1.5 for inference: disable gradient checkpointing first.")
    count = 0
    if getattr(model.forward, "__func__", None) is not static_forward:
        model.forward = types.MethodType(static_forward, model)
        count += 1
    for block in model.transformer_blocks:
        if not isinstance(block.attn.processor, KeyMaskAttnProcessor):
            block.attn.processor = KeyMaskAttnProcessor()
            count += 1
    return count


HUNYUAN_VIDEO15 = register(
    ModelAdapter(
        family="hunyuan_video15",
        model_class=HunyuanVideo15Transformer3DModel,
        block_containers=(("transformer_blocks", HunyuanVideo15TransformerBlock),),
        self_attention=("attn",),
        text_first=False,
        patch_weight="x_embedder.proj.weight",
        grid=conv3d_grid,
        prepare=install_static_forward,
    )
)
