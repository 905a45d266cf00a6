"""The uncut graph (`segments="auto"`, a schedule of few length patterns, nothing cached): every
site reduced in one compiled graph, matchings computed inside it on the call that opens their
window. It must give what the cut graph gives, compile a bounded number of variants, and fall
back to the cut graph where it cannot apply."""

from __future__ import annotations

import pytest
import torch
from conftest import cogvideox_inputs, hunyuan_inputs, run, tiny_cogvideox, tiny_hunyuan

import asymrnr_fx
from asymrnr_fx import AsymRnRConfig, BlockCache, ConfigError, Schedule

TIMESTEPS = [900.0 - 40.0 * i for i in range(12)]


def generate(model, inputs, timesteps=TIMESTEPS) -> list[torch.Tensor]:
    outs = [run(model, inputs, timesteps[0])]
    with torch.compiler.set_stance("fail_on_recompile"):
        outs += [run(model, inputs, t) for t in timesteps[1:]]
    return outs


def pair(model, compiler: str = "aot_eager", **kw):
    return {seg: asymrnr_fx.compile(model, AsymRnRConfig(compiler=compiler, segments=seg, **kw)) for seg in ("auto", "sites")}


@pytest.mark.parametrize("reduce_mode", ["replace", "mean"])
def test_uncut_graph_equals_the_cut_one_over_matching_windows(reduce_mode):
    model, inputs = tiny_cogvideox(num_layers=3), cogvideox_inputs()
    compiled = pair(model, q_ratio=0.5, kv_ratio=0.3, matching_every=4, reduce_mode=reduce_mode)
    outs = {seg: generate(c, inputs) for seg, c in compiled.items()}
    for a, b in zip(outs["auto"], outs["sites"], strict=True):
        assert torch.equal(a, b)
    uncut, cut = (compiled[s].asymrnr for s in ("auto", "sites"))
    assert uncut.stats["segments"] == 1 and cut.stats["segments"] == 4
    # one program that matches (the window's first call) and one that reuses: no matching program
    assert uncut.stats["compiles"] == 2
    assert uncut.stats["matchings"] == cut.stats["matchings"] == 3 * 3 * 2  # windows x sites x (q, v)
    assert uncut.used_lengths == cut.used_lengths
    assert uncut.rewrites["sites_reduced"] == 3


def test_uncut_graph_reduces_one_side_and_masked_sites():
    """kv only (queries kept: no restore), on HunyuanVideo (a text mask on every site, and two
    block structures)."""
    model, inputs = tiny_hunyuan(double=1, single=2), hunyuan_inputs()
    compiled = pair(model, q_ratio=0.0, kv_ratio=0.4, matching_every=3)
    outs = {seg: generate(c, inputs) for seg, c in compiled.items()}
    for a, b in zip(outs["auto"], outs["sites"], strict=True):
        assert torch.equal(a, b)
    rt = compiled["auto"].asymrnr
    assert rt.stats["segments"] == 1 and rt.stats["compiles"] == 2
    assert rt.stats["matchings"] == 4 * 3  # windows x sites x (v)


def test_uncut_graph_keeps_a_matching_per_context():
    """CFG as two calls per step: each context matches on its own first call of a window."""
    model, cond, uncond = tiny_cogvideox(), cogvideox_inputs(seed=1), cogvideox_inputs(seed=2)
    compiled = pair(model, q_ratio=0.5, kv_ratio=0.5, matching_every=2)
    outs = {}
    for seg, c in compiled.items():
        outs[seg] = [run(c, x, t) for t in TIMESTEPS[:6] for x in (cond, uncond)]
    for a, b in zip(outs["auto"], outs["sites"], strict=True):
        assert torch.equal(a, b)
    rt = compiled["auto"].asymrnr
    assert rt.memory()["contexts"] == 2 and rt.stats["matchings"] == 3 * 2 * 2 * 2  # windows x contexts x sites x (q, v)


def test_many_step_patterns_a_cache_or_the_symmetric_mode_cut_the_graph():
    """A ramp of 5 patterns in every block: one span per block (one cut, at block 1); the
    symmetric mode cuts at both sites; a cache at its span's bounds."""
    model, inputs = tiny_cogvideox(), cogvideox_inputs()
    ramp = Schedule(q=torch.linspace(0.1, 0.5, 5).repeat(2, 1), kv=0.3)
    assert ramp.step_patterns == 5 and Schedule.constant(q=0.5).step_patterns == 1
    two = Schedule(q=torch.tensor([[0.5, 0.5, 0.2], [0.5, 0.5, 0.2]]))
    assert two.step_patterns == 2
    for kw, segments in (({"schedule": ramp}, 2), ({"schedule": two}, 1), ({"h_ratio": 0.5, "q_ratio": 0.0, "kv_ratio": 0.0}, 3),
                         ({"q_ratio": 0.5, "cache": BlockCache()}, None)):
        compiled = asymrnr_fx.compile(model, AsymRnRConfig(compiler="aot_eager", **kw))
        run(compiled, inputs, 900.0)
        got = compiled.asymrnr.stats["segments"]
        assert got == segments if segments is not None else got > 1, kw


def test_spans_group_blocks_of_few_patterns_together():
    """Blocks 0-1 change their ratio at the same step (2 patterns together: one span), block 2 at
    another (3 patterns with it: a span of its own), block 3 reduces keys/values only, at one
    ratio (it joins block 2's span). The spans give what the graph cut at every site gives, with 2 programs per pattern
    of each span at most and no recompile."""
    model, inputs = tiny_cogvideox(num_layers=4), cogvideox_inputs()
    q = torch.tensor([[0.5] * 3 + [0.2] * 3, [0.5] * 3 + [0.2] * 3, [0.5] * 5 + [0.3], [0.0] * 6])
    schedule = Schedule(q=q, kv=0.3)
    assert schedule.step_patterns == 3
    compiled = pair(model, schedule=schedule, matching_every=2)
    outs = {seg: generate(c, inputs, TIMESTEPS[:6]) for seg, c in compiled.items()}
    for a, b in zip(outs["auto"], outs["sites"], strict=True):
        assert torch.equal(a, b)
    spans, cut = (compiled[s].asymrnr for s in ("auto", "sites"))
    assert spans.stats["segments"] == 2 and cut.stats["segments"] == 5
    assert spans.used_lengths == cut.used_lengths
    assert spans.stats["matchings"] == cut.stats["matchings"] == 3 * (3 + 4)  # windows x (q of 3 sites, v of 4)
    # windows open at steps 0, 2, 4. Span 0: 2 patterns x (matching, reuse); span 1: 0.5 x
    # (matching, reuse) and 0.3 (step 5 only, a reuse)
    assert spans.stats["compiles"] == 2 * 2 + 3


def test_segments_graph_keeps_a_many_pattern_schedule_whole():
    """`segments="graph"`: a schedule of 5 step patterns in one graph, as the cut graph gives it;
    two programs per pattern at most."""
    model, inputs = tiny_cogvideox(num_layers=2), cogvideox_inputs()
    ramp = Schedule(q=torch.linspace(0.1, 0.5, 5).repeat_interleave(2).repeat(2, 1), kv=0.3)
    compiled = {seg: asymrnr_fx.compile(model, AsymRnRConfig(compiler="aot_eager", segments=seg, schedule=ramp,
                                                             matching_every=3)) for seg in ("graph", "sites")}
    outs = {seg: generate(c, inputs, TIMESTEPS[:10]) for seg, c in compiled.items()}
    for a, b in zip(outs["graph"], outs["sites"], strict=True):
        assert torch.equal(a, b)
    rt = compiled["graph"].asymrnr
    assert rt.stats["segments"] == 1 and 5 < rt.stats["compiles"] <= 2 * 5
    assert rt.used_lengths == compiled["sites"].asymrnr.used_lengths


def test_segments_graph_refuses_what_needs_cuts():
    with pytest.raises(ConfigError, match="a cache needs it cut at block boundaries"):
        AsymRnRConfig(q_ratio=0.5, cache=BlockCache(), segments="graph")
    with pytest.raises(ConfigError, match="asymmetric mode only"):
        AsymRnRConfig(q_ratio=0.0, kv_ratio=0.0, h_ratio=0.5, segments="graph")
    with pytest.raises(ConfigError, match="asymmetric mode only"):
        torch.compile(tiny_cogvideox(), backend="asymrnr", options={"segments": "graph", "h_ratio": 0.3, "q_ratio": 0.0, "kv_ratio": 0.0})(
            **cogvideox_inputs(), timestep=torch.tensor([900.0]), return_dict=False)


def test_segments_must_be_a_known_choice():
    with pytest.raises(ConfigError, match="segments must be one of"):
        AsymRnRConfig(segments="blocks")
    with pytest.raises(ConfigError, match="segments must be one of"):
        torch.compile(tiny_cogvideox(), backend="asymrnr", options={"segments": None})(
            **cogvideox_inputs(), timestep=torch.tensor([900.0]), return_dict=False)


def test_uncut_graph_with_inductor_matches_the_cut_graph_without_recompiles():
    model, inputs = tiny_cogvideox(num_layers=2), cogvideox_inputs()
    compiled = pair(model, compiler="inductor", q_ratio=0.5, kv_ratio=0.3, matching_every=4)
    outs = {seg: generate(c, inputs, TIMESTEPS[:6]) for seg, c in compiled.items()}
    for a, b in zip(outs["auto"], outs["sites"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    rt = compiled["auto"].asymrnr
    assert rt.stats["segments"] == 1 and rt.stats["compiles"] == 2 and rt.stats["matchings"] == 2 * 2 * 2
