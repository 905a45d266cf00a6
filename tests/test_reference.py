"""The compiled path against an independent eager reference, written plainly here.

The reference patches torch's SDPA during an eager run of the same model: at each video
self-attention it splits, matches, reduces, attends (explicit softmax) and restores with
Python loops over batch, head and token, sharing no code with asymrnr_fx.
"""

from __future__ import annotations

import contextlib
import itertools
import math

import pytest
import torch
from conftest import cogvideox_inputs, hunyuan_inputs, run, tiny_cogvideox, tiny_hunyuan

import asymrnr_fx

STRIDE = (2, 2, 2)


def ref_split(grid, stride):
    """Fixed split: the first token of every stride window is the destination."""
    f, h, w = grid
    dst = [a * h * w + b * w + c for a in range(0, f, stride[0]) for b in range(0, h, stride[1]) for c in range(0, w, stride[2])]
    src = [p for p in range(f * h * w) if p not in set(dst)]
    return dst, src


def ref_distance(a, b, metric):
    if metric == "cosine":
        return 1.0 - float(torch.dot(a, b) / (a.norm() * b.norm()))
    return float(((a - b) ** 2).sum())


def ref_match(x, dst, src, metric):
    """For one (batch, head): src sorted farthest first, and each src's nearest dst (list index)."""
    nearest, dist = {}, {}
    for s in src:
        d = [ref_distance(x[s], x[t], metric) for t in dst]
        nearest[s] = min(range(len(dst)), key=lambda j: d[j])
        dist[s] = d[nearest[s]]
    ranked = sorted(src, key=lambda s: -dist[s])
    return ranked, nearest


def ref_reduce(x, dst, ranked, nearest, n_keep, mode):
    """Rows of the reduced visual sequence, for each visual position the row it reads back, and
    the position each row stands for."""
    kept = ranked[: n_keep - len(dst)]
    dropped = ranked[n_keep - len(dst) :]
    rows, row_of = [], {}
    for j, t in enumerate(dst):
        members = [t] + ([s for s in dropped if nearest[s] == j] if mode == "mean" else [])
        rows.append(torch.stack([x[p] for p in members]).mean(0))
        row_of[t] = j
    for s in kept:
        row_of[s] = len(rows)
        rows.append(x[s])
    for s in dropped:
        row_of[s] = nearest[s]
    return rows, row_of, list(dst) + kept


def keep_count(n_visual, n_dst, ratio):
    return max(n_dst, int(n_visual * (1 - ratio))) if ratio > 0 else n_visual


def ref_site(q, k, v, mask, n_text, text_first, grid, q_ratio, kv_ratio, metric, mode):
    """Reduce-attend-restore of one site, (B, H, N, D) in, (B, H, N, D) out."""
    b_, h_, n, d_ = q.shape
    nv = n - n_text
    vis0 = n_text if text_first else 0
    text = list(range(n_text)) if text_first else list(range(nv, n))
    dst, src = ref_split(grid, STRIDE)
    out = torch.empty_like(q)
    for b, h in itertools.product(range(b_), range(h_)):
        qv, kv_, vv = (t[b, h, vis0 : vis0 + nv] for t in (q, k, v))
        q_rank, q_near = ref_match(qv, dst, src, metric)
        v_rank, v_near = ref_match(vv, dst, src, metric)
        q_rows, q_row_of, _ = ref_reduce(qv, dst, q_rank, q_near, keep_count(nv, len(dst), q_ratio), mode)
        k_rows, _, _ = ref_reduce(kv_, dst, v_rank, v_near, keep_count(nv, len(dst), kv_ratio), mode)
        v_rows, _, kv_positions = ref_reduce(vv, dst, v_rank, v_near, keep_count(nv, len(dst), kv_ratio), mode)
        keys = torch.stack([k[b, h, p] for p in text] + k_rows)
        vals = torch.stack([v[b, h, p] for p in text] + v_rows)
        allowed = torch.ones(keys.shape[0], dtype=torch.bool)
        if mask is not None:
            m = mask.expand(b_, 1, 1, n)[b, 0, 0]
            allowed = torch.tensor([bool(m[p]) for p in text] + [bool(m[vis0 + p]) for p in kv_positions])
        queries = torch.stack([q[b, h, p] for p in text] + q_rows)
        scores = queries @ keys.T / math.sqrt(d_)
        scores = scores.masked_fill(~allowed, float("-inf"))
        o = torch.softmax(scores, dim=-1) @ vals
        for i, p in enumerate(text):
            out[b, h, p] = o[i]
        for p in range(nv):
            out[b, h, vis0 + p] = o[len(text) + q_row_of[p]]
    return out


@contextlib.contextmanager
def reference_attention(n_total, n_text, text_first, grid, q_ratio, kv_ratio, metric, mode):
    original = torch.nn.functional.scaled_dot_product_attention
    calls = []

    def patched(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
        if query.shape[-2] != n_total:  # e.g. HunyuanVideo's text-only token refiner
            return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, **kw)
        calls.append(query.shape)
        return ref_site(query, key, value, attn_mask, n_text, text_first, grid, q_ratio, kv_ratio, metric, mode)

    torch.nn.functional.scaled_dot_product_attention = patched
    try:
        yield calls
    finally:
        torch.nn.functional.scaled_dot_product_attention = original


@contextlib.contextmanager
def reference_self_attention(grids: dict, q_ratio, kv_ratio, metric="euclidean", mode="replace"):
    """SDPA patched with the reference at self-attention over visual tokens only (no text in the
    sequence): a call whose query and key lengths are equal and a key of `grids` (length -> its
    (F, H, W) grid) runs the reference on that grid, recorded in the yielded list; every other
    call (cross-attention: queries are visual tokens there too) runs SDPA."""
    original = torch.nn.functional.scaled_dot_product_attention
    calls = []

    def patched(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
        n, grid = query.shape[-2], grids.get(query.shape[-2])
        if grid is None or key.shape[-2] != n:
            return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                            scale=scale, **kw)
        calls.append(grid)
        return ref_site(query, key, value, attn_mask, 0, False, grid, q_ratio, kv_ratio, metric, mode)

    torch.nn.functional.scaled_dot_product_attention = patched
    try:
        yield calls
    finally:
        torch.nn.functional.scaled_dot_product_attention = original


CASES = [
    (0.5, 0.0, "euclidean", "replace"),
    (0.0, 0.5, "euclidean", "replace"),
    (0.5, 0.3, "euclidean", "replace"),
    (0.5, 0.3, "euclidean", "mean"),
    (0.5, 0.3, "cosine", "replace"),
    (0.4, 0.6, "cosine", "mean"),
]


def _compiled(model, q, kv, metric, mode):
    cfg = asymrnr_fx.AsymRnRConfig(
        q_ratio=q, kv_ratio=kv, distance=metric, reduce_mode=mode, split="fixed", compiler="aot_eager"
    )
    return asymrnr_fx.compile(model, cfg)


@pytest.mark.parametrize("q,kv,metric,mode", CASES)
def test_cogvideox_matches_reference(q, kv, metric, mode):
    model, inputs = tiny_cogvideox(), cogvideox_inputs()
    compiled = _compiled(model, q, kv, metric, mode)
    got = run(compiled, inputs, 900.0)
    with reference_attention(4 + 192, 4, True, (3, 8, 8), q, kv, metric, mode) as calls:
        want = run(model, inputs, 900.0)
    assert len(calls) == 2  # the reference really ran at both blocks
    dense = run(model, inputs, 900.0)
    assert (got - dense).abs().max() > 1e-3  # reduction changed the output...
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)  # ...exactly as the reference
    assert compiled.asymrnr.rewrites["sites_reduced"] == 2


@pytest.mark.parametrize("q,kv,metric,mode", [CASES[2], CASES[3]])
def test_hunyuan_with_mask_matches_reference(q, kv, metric, mode):
    model, inputs = tiny_hunyuan(), hunyuan_inputs(n_text=6, n_valid=4)
    compiled = _compiled(model, q, kv, metric, mode)
    got = run(compiled, inputs, 900.0)
    with reference_attention(192 + 6, 6, False, (3, 8, 8), q, kv, metric, mode) as calls:
        want = run(model, inputs, 900.0)
    assert len(calls) == 2  # one double-stream and one single-stream block; the refiner is skipped
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    sites = compiled.asymrnr.info.sites
    assert [s.reducible for s in sites] == [False, True, True]
    assert "not inside a transformer block" in sites[0].reason

