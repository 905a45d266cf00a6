"""One attention site: dense SDPA vs reduce -> attend -> restore, at N visual tokens.

    python -m bench.site [--tokens 4096] [--heads 6] [--head-dim 64] [--reps 7]

Both sides are compiled with Inductor; the reduced side runs the same functions the backend
inserts (asymrnr_fx.tokens), with matching and plan building eager as in the backend.
FLOP-ideal speedup counts only the attention matmuls: N^2 / (Lq * Lkv).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from tabulate import tabulate

from asymrnr_fx import tokens

CASES = [(0.5, 0.5), (0.25, 0.5), (0.0, 0.5)]


def timed(fn: Callable[[], object], reps: int) -> tuple[float, float]:
    """Median and spread (max - min) of `reps` runs in seconds, after two warm-up runs."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), max(times) - min(times)


def reduced_attention(q, k, v, q_keep, kv_keep, restore):
    """What the rewritten graph computes; q_keep None: queries unreduced (no gathers), as there."""
    q_r = q if q_keep is None else tokens.gather_tokens(q, q_keep)
    out = torch.nn.functional.scaled_dot_product_attention(
        q_r, tokens.gather_tokens(k, kv_keep), tokens.gather_tokens(v, kv_keep)
    )
    return out if q_keep is None else tokens.gather_tokens(out, restore)


def grid_for(n: int) -> tuple[int, int, int]:
    side = round(n ** (1 / 3))
    if side**3 != n:
        raise SystemExit(f"--tokens must be a cube (e.g. 4096 = 16^3), got {n}")
    return side, side, side


def make_plans(q, v, grid, stride, n_q, n_kv):
    """Plans for queries (matched on q) and keys/values (matched on v); None where unreduced."""
    layout = tokens.Layout(0, q.shape[2], True)
    dst, src = tokens.window_split(grid, stride, generator=torch.Generator().manual_seed(0))
    plans = []
    for x, n in ((q, n_q), (v, n_kv)):
        reduce = n < q.shape[2]
        plans.append(tokens.make_plan(tokens.match_sources(x, dst, src), n, layout) if reduce else None)
    return plans



def measure(args: argparse.Namespace) -> list[dict]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(device=device).manual_seed(0)
    shape = (1, args.heads, args.tokens, args.head_dim)
    q, k, v = (torch.randn(shape, device=device, generator=g) for _ in range(3))
    grid, stride = grid_for(args.tokens), (2, 2, 2)
    n_dst = tokens.count_windows(grid, stride)
    dense = torch.compile(torch.nn.functional.scaled_dot_product_attention)
    reduced = torch.compile(reduced_attention)
    t_dense, s_dense = timed(lambda: dense(q, k, v), args.reps)
    rows = []
    for rq, rkv in CASES:
        n_q = tokens.reduced_length(args.tokens, n_dst, rq) if rq else args.tokens
        n_kv = tokens.reduced_length(args.tokens, n_dst, rkv) if rkv else args.tokens
        pq, pkv = make_plans(q, v, grid, stride, n_q, n_kv)
        q_keep, restore = (pq.keep, pq.restore) if pq else (None, None)
        t_attn, s_attn = timed(lambda a=(q, k, v, q_keep, pkv.keep, restore): reduced(*a), args.reps)
        t_match, _ = timed(lambda a=(q, v, grid, stride, n_q, n_kv): make_plans(*a), args.reps)
        ideal = args.tokens**2 / (n_q * n_kv)
        for every in (1, 5):
            t = t_attn + t_match / every
            rows.append(
                {
                    "q_ratio": rq, "kv_ratio": rkv, "Lq": n_q, "Lkv": n_kv, "matching_every": every,
                    "dense_ms": 1e3 * t_dense, "dense_spread_ms": 1e3 * s_dense, "reduced_attn_ms": 1e3 * t_attn,
                    "reduced_spread_ms": 1e3 * s_attn, "matching_ms": 1e3 * t_match, "total_ms": 1e3 * t,
                    "speedup": t_dense / t, "ideal": ideal, "efficiency": t_dense / t / ideal,
                    "target": 0.90 if every == 5 else 0.75,
                }
            )
    return rows


def match_peak_bytes(args: argparse.Namespace, max_elements: int = 1 << 20) -> int:
    """Peak extra bytes of one distance chunk (float32), the matching's memory bound."""
    n_dst = tokens.count_windows(grid_for(args.tokens), (2, 2, 2))
    per_src = args.heads * n_dst
    chunk = max(1, max_elements // per_src)
    return 4 * per_src * min(chunk, args.tokens - n_dst)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--reps", type=int, default=7)
    args = p.parse_args()
    rows = measure(args)
    cols = ["q_ratio", "kv_ratio", "Lq", "Lkv", "matching_every", "dense_ms", "reduced_attn_ms", "matching_ms",
            "total_ms", "speedup", "ideal", "efficiency", "target"]
    print(f"device={'cuda' if torch.cuda.is_available() else 'cpu'} threads={torch.get_num_threads()} "
          f"N={args.tokens} heads={args.heads}x{args.head_dim}")
    print(tabulate([[r[c] for c in cols] for r in rows], headers=cols, floatfmt=".3g", tablefmt="github"))
    full = 4 * args.heads * (args.tokens // 8) * (args.tokens * 7 // 8)
    print(f"matching peak (one distance chunk): {match_peak_bytes(args) / 2**20:.1f} MiB "
          f"(unchunked it would be {full / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
