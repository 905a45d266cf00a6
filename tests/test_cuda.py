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
