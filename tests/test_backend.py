"""Backend behaviour with the cheap inner compiler: disabled-is-identical, step tracking,
matching cache, contexts, recompiles, and clear errors for bad input."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch
from conftest import cogvideox_inputs, dynamo_code, inner_compiled_code, run, tiny_cogvideox

import asymrnr_fx
from asymrnr_fx import AsymRnRConfig, Schedule, ScheduleError


def cheap(**kw) -> AsymRnRConfig:
    return AsymRnRConfig(compiler="aot_eager", **kw)


def steps(model, inputs, n, start=900.0, stride=10.0):
    return [run(model, inputs, start - i * stride) for i in range(n)]


def test_ratio_zero_is_untouched_and_equal_to_baseline(monkeypatch):
    model, inputs = tiny_cogvideox(), cogvideox_inputs()
    compiled_code = inner_compiled_code(monkeypatch)
    compiled = asymrnr_fx.compile(model, cheap(q_ratio=0.0, kv_ratio=0.0))
    baseline = torch.compile(model, backend="aot_eager")
    assert torch.equal(run(compiled, inputs, 900.0), run(baseline, inputs, 900.0))
    rt = compiled.asymrnr
    assert rt.stats["dense_graphs"] == 1 and rt.stats["compiles"] == 1
    assert rt.rewrites["nodes_inserted"] == 0 and rt.rewrites["sites_rewritten"] == 0 and rt.stats["matchings"] == 0
    # the inner compiler got Dynamo's own graph (of the model as asymrnr_fx.compile left it), not a cut one
    assert compiled_code == dynamo_code(model, inputs)


def test_reduction_rewrites_every_site_and_counts_it():
    model, inputs = tiny_cogvideox(num_layers=3), cogvideox_inputs()
    compiled = asymrnr_fx.compile(model, cheap(q_ratio=0.5, kv_ratio=0.3, segments="sites"))
    run(compiled, inputs, 900.0)
    rt = compiled.asymrnr
    assert rt.rewrites["sites_found"] == rt.rewrites["sites_reducible"] == rt.rewrites["sites_reduced"] == 3
    # first, middle (shared by blocks 0->1 and 1->2) and last segment: identical blocks compile once;
    # each matches inside itself on this first call of a window (no separate matching program)
    assert rt.stats["compiles"] == 3
    assert rt.used_lengths[(0, 0)] == {f"transformer_blocks.{i}.attn1": (96, 134) for i in range(3)}


def test_matching_runs_once_per_window_and_resets_with_new_generation():
    model, inputs = tiny_cogvideox(), cogvideox_inputs()
    compiled = asymrnr_fx.compile(model, cheap(q_ratio=0.5, kv_ratio=0.3, matching_every=5))
    rt = compiled.asymrnr
    counts = []
    for out in range(12):
        run(compiled, inputs, 900.0 - 10 * out)
        counts.append(rt.stats["matchings"])
    per_window = 2 * 2  # two sites x (q, v)
    assert counts == [per_window] * 5 + [2 * per_window] * 5 + [3 * per_window] * 2
    assert rt.step == 11
    run(compiled, inputs, 900.0)  # the timestep went back up: a new generation
    assert rt.step == 0 and rt.stats["matchings"] == 4 * per_window and rt.stats["generations"] == 2


def test_cached_matching_is_reused_not_recomputed():
    model, inputs = tiny_cogvideox(), cogvideox_inputs()
    other = cogvideox_inputs(seed=5)
    compiled = asymrnr_fx.compile(model, cheap(q_ratio=0.5, kv_ratio=0.5, matching_every=2))
    run(compiled, inputs, 900.0)
    reused = run(compiled, other, 890.0)  # step 1: matching of step 0's features
    fresh = asymrnr_fx.compile(tiny_cogvideox(), cheap(q_ratio=0.5, kv_ratio=0.5, matching_every=2))
    own = run(fresh, other, 890.0)  # a matching computed on `other` itself
    assert (reused - own).abs().max() > 1e-4


def test_explicit_step_api_and_callback():
    model, inputs = tiny_cogvideox(), cogvideox_inputs()
    table = torch.tensor([[0.0, 0.5, 0.0], [0.0, 0.5, 0.0]])
    compiled = asymrnr_fx.compile(model, cheap(schedule=Schedule(q=table)))
    rt = compiled.asymrnr
    rt.reset()
    run(compiled, inputs, 500.0)
    rt.callback_on_step_end(None, 0, 500.0, {})
    run(compiled, inputs, 500.0)  # same timestep, but the callback said step 1
    assert rt.step == 1 and rt.used_lengths[(1, 0)]["transformer_blocks.0.attn1"] == (96, 192)
    rt.set_step(2)
    run(compiled, inputs, 500.0)
    assert rt.used_lengths[(2, 0)]["transformer_blocks.0.attn1"] == (192, 192)


def test_cfg_batch_two_matches_per_sample():
    model = tiny_cogvideox()
    a, b = cogvideox_inputs(seed=1), cogvideox_inputs(seed=2)
    both = {k: torch.cat([a[k], b[k]]) for k in a}
    cfg = cheap(q_ratio=0.5, kv_ratio=0.5, matching_every=2)
    batched = steps(asymrnr_fx.compile(model, cfg), both, 3)
    alone_a = steps(asymrnr_fx.compile(tiny_cogvideox(), cfg), a, 3)
    alone_b = steps(asymrnr_fx.compile(tiny_cogvideox(), cfg), b, 3)
    for out, oa, ob in zip(batched, alone_a, alone_b):
        torch.testing.assert_close(out, torch.cat([oa, ob]), rtol=1e-5, atol=1e-5)


def test_two_calls_per_step_keep_separate_matchings():
    model = tiny_cogvideox()
    cond, uncond = cogvideox_inputs(seed=1), cogvideox_inputs(seed=2)
    cfg = cheap(q_ratio=0.5, kv_ratio=0.5, matching_every=2)
    compiled = asymrnr_fx.compile(model, cfg)
    got = []
    for i in range(3):  # cond then uncond, at the same timestep, per step
        run(compiled, cond, 900.0 - 10 * i)
        got.append(run(compiled, uncond, 900.0 - 10 * i))
    assert compiled.asymrnr.step == 2
    alone = steps(asymrnr_fx.compile(tiny_cogvideox(), cfg), uncond, 3)
    for x, y in zip(got, alone):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
    # explicit contexts do the same
    compiled2 = asymrnr_fx.compile(tiny_cogvideox(), cfg)
    with compiled2.asymrnr.context("uncond"):
        first = run(compiled2, uncond, 900.0)
    torch.testing.assert_close(first, alone[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("segments", ["auto", "sites"])
def test_changing_schedule_causes_no_dynamo_recompiles(segments):
    """A random ratio per block and step: each block is a span (or a site segment) of its own.
    Its compiled variants are bounded by its length pairs and, per pair, the sides a call can
    match (a reduced side matches on the first call of a window it is reduced in), not by steps."""
    model, inputs = tiny_cogvideox(), cogvideox_inputs()
    g = torch.Generator().manual_seed(0)
    choices = torch.tensor([0.0, 0.3, 0.5])
    q = choices[torch.randint(0, 3, (2, 50), generator=g)]
    kv = choices[torch.randint(0, 3, (2, 50), generator=g)]
    compiled = asymrnr_fx.compile(model, cheap(schedule=Schedule(q=q, kv=kv), matching_every=3, segments=segments))
    run(compiled, inputs, 1000.0)
    with torch.compiler.set_stance("fail_on_recompile"):
        for i in range(1, 50):
            run(compiled, inputs, 1000.0 - 10 * i)
    rt = compiled.asymrnr
    nv = rt.info.sites[0].layout.n_visual
    per_site = {}
    for call in rt.used_lengths.values():
        for site, lengths in call.items():
            per_site.setdefault(site, set()).add(lengths)
    assert sum(len(p) for p in per_site.values()) > 8  # the ratios really changed
    bound = sum(2 ** ((nq < nv) + (nkv < nv)) for pairs in per_site.values() for nq, nkv in pairs)
    assert rt.stats["compiles"] <= 1 + bound < 50 * 2
def test_entry_point_resolves_without_import():
    code = (
        "import torch, sys; sys.path.insert(0, 'tests'); from conftest import *\n"
        "m = tiny_cogvideox(); x = cogvideox_inputs()\n"
        "c = torch.compile(m, backend='asymrnr', options={'q_ratio': 0.5, 'kv_ratio': 0.3, 'compiler': 'aot_eager'})\n"
        "out = run(c, x, 900.0)\n"
        "assert 'asymrnr_fx' in sys.modules\n"
        "print('diff', float((out - run(m, x, 900.0)).abs().max()))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert float(done.stdout.split("diff")[1]) > 1e-3


def test_schedule_of_wrong_shape_names_both_shapes():
    model, inputs = tiny_cogvideox(), cogvideox_inputs()
    sched = Schedule(q=torch.full((30, 50), 0.5))
    compiled = asymrnr_fx.compile(model, cheap(schedule=sched))
    with pytest.raises(Exception, match=r"shape \(blocks=30, steps=50\) but the model cogvideox has 2 attention blocks"):
        run(compiled, inputs, 900.0)


def test_generation_longer_than_schedule_is_a_clear_error():
    model, inputs = tiny_cogvideox(), cogvideox_inputs()
    compiled = asymrnr_fx.compile(model, cheap(schedule=Schedule(q=torch.full((2, 2), 0.5))))
    steps(compiled, inputs, 2)
    with pytest.raises(ScheduleError, match="denoising step 2 is outside schedule"):
        run(compiled, inputs, 800.0)


class NotAVideoModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 24)

    def forward(self, x, timestep):
        q, k, v = self.proj(x).unflatten(-1, (3, 2, 4)).permute(2, 0, 3, 1, 4)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v) * timestep


def test_unsupported_model_errors_or_runs_unreduced_with_one_warning():
    model, x, t = NotAVideoModel(), torch.randn(1, 5, 8), torch.tensor(1.0)
    with pytest.raises(Exception, match="asymrnr does not know this model"):
        torch.compile(model, backend="asymrnr", options={"compiler": "aot_eager"})(x, t)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="asymrnr", options={"compiler": "aot_eager", "on_unsupported": "warn"})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = compiled(x, t)
        compiled(x, t)
    assert len([w for w in caught if "running this graph unreduced" in str(w.message)]) == 1
    torch.testing.assert_close(out, model(x, t))


def test_dynamic_shapes_run_unreduced_with_a_warning():
    model, inputs = tiny_cogvideox(), cogvideox_inputs()
    compiled = torch.compile(model, backend="asymrnr", dynamic=True, options={"compiler": "aot_eager"})
    with pytest.warns(UserWarning, match="dynamic shapes.*the speedup is lost.*dynamic=False"):
        out = run(compiled, inputs, 900.0)
    torch.testing.assert_close(out, run(model, inputs, 900.0), rtol=1e-5, atol=1e-5)
