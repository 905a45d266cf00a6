"""Symmetric mode (hidden state reduced before the projections, restored after the output
projection) against a plain eager attention processor written here."""

from __future__ import annotations

import inspect
import math

import torch
from conftest import cogvideox_inputs, hunyuan_inputs, run, tiny_cogvideox, tiny_hunyuan
from diffusers.models.embeddings import apply_rotary_emb, get_3d_rotary_pos_embed
from test_reference import ref_match, ref_split

import asymrnr_fx
from asymrnr_fx import AsymRnRConfig, Schedule

GRID, STRIDE = (3, 8, 8), (2, 2, 2)


def ref_symmetric_plan(x_vis: torch.Tensor, n_keep: int, grid: tuple[int, int, int] = GRID):
    """Batch-shared matching on the batch mean: kept visual positions and each position's row."""
    dst, src = ref_split(grid, STRIDE)
    ranked, nearest = ref_match(x_vis.mean(0), dst, src, "euclidean")
    kept = ranked[: n_keep - len(dst)]
    rows = list(dst) + kept
    row_of = {p: i for i, p in enumerate(rows)}
    for s in ranked[n_keep - len(dst) :]:
        row_of[s] = nearest[s]
    return rows, row_of


class RefSymmetric:
    """A model's own attention processor run on the kept tokens only (one matching on the batch
    mean of the projection input), its output copied back to every token. For self-attention over
    video alone: `grid_of` gives the sequence's grid by its length; `rope_arg` names the RoPE
    argument and `reduce_rope(rope, rows)` keeps its rows (written out per family by the caller).
    A processor returning (video, text) (Mochi's joint attention) has its video part restored."""

    def __init__(self, processor, ratio: float, rope_arg: str | None = None, reduce_rope=None, grid_of=None):
        self.processor, self.ratio, self.rope_arg, self.reduce_rope = processor, ratio, rope_arg, reduce_rope
        self.grid_of = grid_of or (lambda n: GRID)
        self.calls = 0

    def __call__(self, attn, hidden_states, *args, image_rotary_emb=None, **kwargs):
        """`image_rotary_emb` named: diffusers' Attention passes only the keywords its processor's
        signature names (Allegro); the others pass their RoPE by position."""
        if image_rotary_emb is not None:
            kwargs["image_rotary_emb"] = image_rotary_emb
        n, grid = hidden_states.shape[1], self.grid_of(hidden_states.shape[1])
        n_dst = math.prod(-(-g // s) for g, s in zip(grid, STRIDE))
        rows, row_of = ref_symmetric_plan(hidden_states, max(n_dst, int(n * (1 - self.ratio))), grid)
        bound = inspect.signature(self.processor.__call__).bind(attn, hidden_states[:, rows], *args, **kwargs)
        if self.rope_arg is not None:
            bound.arguments[self.rope_arg] = self.reduce_rope(bound.arguments[self.rope_arg], rows)
        out = self.processor(*bound.args, **bound.kwargs)
        self.calls += 1
        video = out[0] if isinstance(out, tuple) else out
        video = torch.stack([video[:, row_of[p]] for p in range(n)], dim=1)
        return (video, *out[1:]) if isinstance(out, tuple) else video


class RefSymmetricCogVideoX:
    """CogVideoX attention on the kept tokens only; outputs copied back after to_out."""

    def __init__(self, ratio: float, grid: tuple[int, int, int] = GRID):
        self.ratio, self.grid = ratio, grid

    def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask=None, image_rotary_emb=None):
        t = encoder_hidden_states.shape[1]
        x = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        n = hidden_states.shape[1]
        n_dst = math.prod(-(-g // s) for g, s in zip(self.grid, STRIDE))
        rows, row_of = ref_symmetric_plan(x[:, t:], max(n_dst, int(n * (1 - self.ratio))), self.grid)
        xr = torch.cat([x[:, :t], x[:, [t + p for p in rows]]], dim=1)
        b, heads = x.shape[0], attn.heads
        d = attn.to_q.out_features // heads
        q, k, v = (f(xr).view(b, -1, heads, d).transpose(1, 2) for f in (attn.to_q, attn.to_k, attn.to_v))
        q, k = attn.norm_q(q), attn.norm_k(k)
        if image_rotary_emb is not None:
            cos, sin = (e[rows] for e in image_rotary_emb)
            q = torch.cat([q[:, :, :t], apply_rotary_emb(q[:, :, t:], (cos, sin))], dim=2)
            k = torch.cat([k[:, :, :t], apply_rotary_emb(k[:, :, t:], (cos, sin))], dim=2)
        o = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1) @ v
        o = attn.to_out[0](o.transpose(1, 2).reshape(b, -1, heads * d))
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
