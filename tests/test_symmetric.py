"""Symmetric mode (hidden state reduced before the projections, restored after the output
projection) against a plain eager attention processor written here."""

from __future__ import annotations

import math

import torch
from conftest import cogvideox_inputs, hunyuan_inputs, run, tiny_cogvideox, tiny_hunyuan
from diffusers.models.embeddings import apply_rotary_emb, get_3d_rotary_pos_embed
from test_reference import ref_match, ref_split

import asymrnr_fx
from asymrnr_fx import AsymRnRConfig, Schedule

GRID, STRIDE = (3, 8, 8), (2, 2, 2)


def ref_symmetric_plan(x_vis: torch.Tensor, n_keep: int):
    """Batch-shared matching on the batch mean: kept visual positions and each position's row."""
    dst, src = ref_split(GRID, STRIDE)
    ranked, nearest = ref_match(x_vis.mean(0), dst, src, "euclidean")
    kept = ranked[: n_keep - len(dst)]
    rows = list(dst) + kept
    row_of = {p: i for i, p in enumerate(rows)}
    for s in ranked[n_keep - len(dst) :]:
        row_of[s] = nearest[s]
    return rows, row_of


class RefSymmetricCogVideoX:
    """CogVideoX attention on the kept tokens only; outputs copied back after to_out."""

    def __init__(self, ratio: float):
        self.ratio = ratio

    def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask=None, image_rotary_emb=None):
        t = encoder_hidden_states.shape[1]
        x = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        n = hidden_states.shape[1]
        n_keep = max(2 * 4 * 4, int(n * (1 - self.ratio)))
        rows, row_of = ref_symmetric_plan(x[:, t:], n_keep)
        xr = torch.cat([x[:, :t], x[:, [t + p for p in rows]]], dim=1)
        b, heads = x.shape[0], attn.heads
        q, k, v = (f(xr).view(b, -1, heads, 16).transpose(1, 2) for f in (attn.to_q, attn.to_k, attn.to_v))
        q, k = attn.norm_q(q), attn.norm_k(k)
        cos, sin = (e[rows] for e in image_rotary_emb)
        q = torch.cat([q[:, :, :t], apply_rotary_emb(q[:, :, t:], (cos, sin))], dim=2)
        k = torch.cat([k[:, :, :t], apply_rotary_emb(k[:, :, t:], (cos, sin))], dim=2)
        o = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(16), dim=-1) @ v
        o = attn.to_out[0](o.transpose(1, 2).reshape(b, -1, heads * 16))
        video = torch.stack([o[:, t + row_of[p]] for p in range(n)], dim=1)
        return video, o[:, :t]


def rope():
    return get_3d_rotary_pos_embed(16, ((0, 0), (8, 8)), (8, 8), 3)


def test_symmetric_cogvideox_with_rope_matches_reference():
    model, inputs = tiny_cogvideox(), {**cogvideox_inputs(batch=2), "image_rotary_emb": rope()}
    cfg = AsymRnRConfig(q_ratio=0.0, kv_ratio=0.0, h_ratio=0.5, split="fixed", compiler="aot_eager")
    compiled = asymrnr_fx.compile(model, cfg)
    got = run(compiled, inputs, 900.0)
    rt = compiled.asymrnr
    for block in model.transformer_blocks:
        block.attn1.set_processor(RefSymmetricCogVideoX(0.5))
    want = run(model, inputs, 900.0)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert rt.rewrites["sites_reduced"] == 2 and rt.stats["matchings"] == 2
    # the projections really ran on fewer tokens: the baked RoPE reshape was rewritten too
    assert rt.rewrites["nodes_inserted"] > 2 * 3


def test_symmetric_hunyuan_double_and_single_blocks_run_and_reduce():
    model, inputs = tiny_hunyuan(), hunyuan_inputs(batch=2)
    dense = run(model, inputs, 900.0)
    cfg = AsymRnRConfig(q_ratio=0.0, kv_ratio=0.0, h_ratio=0.5, compiler="aot_eager", reduce_mode="mean")
    compiled = asymrnr_fx.compile(model, cfg)
    got = run(compiled, inputs, 900.0)
    rt = compiled.asymrnr
    assert rt.rewrites["sites_reduced"] == 2 and "sites_not_symmetric" not in rt.rewrites
    assert 1e-3 < (got - dense).abs().max() < 1.0
    tiny = AsymRnRConfig(q_ratio=0.0, kv_ratio=0.0, h_ratio=0.05, compiler="aot_eager")
    torch._dynamo.reset()
    close = run(asymrnr_fx.compile(tiny_hunyuan(), tiny), inputs, 900.0)
    assert (close - dense).abs().max() < (got - dense).abs().max()


def test_symmetric_dense_step_runs_the_unrewritten_segments():
    model, inputs = tiny_cogvideox(), cogvideox_inputs()
    table = torch.tensor([[0.0, 0.5], [0.0, 0.5]])  # step 0 dense, step 1 reduced
    compiled = asymrnr_fx.compile(model, AsymRnRConfig(schedule=Schedule(h=table), compiler="aot_eager"))
    torch.testing.assert_close(run(compiled, inputs, 900.0), run(model, inputs, 900.0), rtol=1e-5, atol=1e-5)
    rt = compiled.asymrnr
    assert rt.rewrites["nodes_inserted"] == 0 and rt.stats["matchings"] == 0 and rt.stats["segments"] == 3
    run(compiled, inputs, 890.0)
    assert rt.rewrites["nodes_inserted"] > 0 and rt.stats["matchings"] == 2
