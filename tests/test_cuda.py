"""The same checks on a GPU; skipped where there is none."""

from __future__ import annotations

import pytest
import torch
from conftest import cogvideox_inputs, hunyuan_inputs, run, tiny_cogvideox, tiny_hunyuan

import asymrnr_fx
from asymrnr_fx import AsymRnRConfig

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _to(inputs: dict, device: str) -> dict:
    return {k: v.to(device) for k, v in inputs.items()}


@pytest.mark.parametrize("build,inputs", [(tiny_cogvideox, cogvideox_inputs), (tiny_hunyuan, hunyuan_inputs)])
def test_cuda_inductor_matches_cpu_cheap_path(build, inputs):
    cfg = {"q_ratio": 0.5, "kv_ratio": 0.3, "split": "fixed"}
    x = inputs(batch=2)
    want = run(asymrnr_fx.compile(build(), AsymRnRConfig(compiler="aot_eager", **cfg)), x, 900.0)
    torch._dynamo.reset()
    fast = asymrnr_fx.compile(build().cuda(), AsymRnRConfig(**cfg))
    got = run(fast, _to(x, "cuda"), 900.0)
    torch.testing.assert_close(got.cpu(), want, rtol=2e-3, atol=2e-3)
    assert fast.asymrnr.rewrites["sites_reduced"] >= 2


def test_cuda_graphs_do_not_overwrite_cached_tensors():
    """mode="reduce-overhead": segment outputs live in the CUDA-graph pool and are overwritten at
    the next replay; the cache must hold tensors of its own (residuals are computed, not aliased)."""
    from asymrnr_fx import BlockCache

    cfg = {"q_ratio": 0.0, "kv_ratio": 0.0, "cache": BlockCache(threshold=0.3, full_last=0)}
    x = cogvideox_inputs()
    ts = [900.0 - 40 * i for i in range(8)]
    cheap = asymrnr_fx.compile(tiny_cogvideox(num_layers=4), AsymRnRConfig(compiler="aot_eager", **cfg))
    want = [run(cheap, x, t) for t in ts]
    torch._dynamo.reset()
    fast = asymrnr_fx.compile(tiny_cogvideox(num_layers=4).cuda(), AsymRnRConfig(mode="reduce-overhead", **cfg))
    got = [run(fast, _to(x, "cuda"), t).clone() for t in ts]
    for g, w in zip(got, want):
        torch.testing.assert_close(g.cpu(), w, rtol=2e-3, atol=2e-3)
    assert fast.asymrnr.stats["cache_hits"] == cheap.asymrnr.stats["cache_hits"] > 0
