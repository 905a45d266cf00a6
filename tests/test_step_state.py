"""Step state that cannot go stale: generations, steps and contexts from every signal the
pipeline gives, and state bounded over many generations (cheap inner compiler)."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import cogvideox_generate, cogvideox_inputs, run, tiny_cogvideox, tiny_cogvideox_pipeline

import asymrnr_fx
from asymrnr_fx import AsymRnRConfig, Schedule
from asymrnr_fx.runtime import MAX_CONTEXTS


def cheap(**kw) -> AsymRnRConfig:
    return AsymRnRConfig(compiler="aot_eager", **kw)


def compiled_pipeline(cfg: AsymRnRConfig):
    pipe = tiny_cogvideox_pipeline()
    pipe.transformer = asymrnr_fx.compile(pipe.transformer, cfg)
    return pipe, pipe.transformer.asymrnr


def test_callback_leaves_no_stale_step():
    # a schedule of exactly as many steps as the run: a stale step raised "outside schedule"
    table = torch.tensor([[0.5, 0.3, 0.0], [0.3, 0.5, 0.5]])
    pipe, rt = compiled_pipeline(cheap(schedule=Schedule(q=table, kv=table), matching_every=2))
    first = cogvideox_generate(pipe)
    for _ in range(3):
        again = cogvideox_generate(pipe, callback_on_step_end=rt.callback_on_step_end)
        torch.testing.assert_close(again, first, rtol=0, atol=0)
    torch.testing.assert_close(cogvideox_generate(pipe), first, rtol=0, atol=0)
    assert rt.stats["step_corrections"] == 0


def test_state_holds_one_generation_over_many():
    pipe, rt = compiled_pipeline(cheap(q_ratio=0.5, kv_ratio=0.5, matching_every=2))
    held = []

    def callback(pipe, step, t, kwargs):
        held.append((len(rt.used_lengths), rt.memory()["matchings"]))
        return rt.callback_on_step_end(pipe, step, t, kwargs)

    for _ in range(10):
        cogvideox_generate(pipe, callback_on_step_end=callback)
    # 3 steps x one named context; two sites x (q, v) matchings, recomputed in place at step 2
    assert held == [(1, 4), (2, 4), (3, 4)] * 10
    assert rt.memory()["matchings"] == 0  # the pipeline's reset at the end of each run freed them


def test_one_step_generations_with_equal_first_timesteps_restart():
    pipe, rt = compiled_pipeline(cheap(q_ratio=0.5, kv_ratio=0.5))
    fresh, _ = compiled_pipeline(cheap(q_ratio=0.5, kv_ratio=0.5))
    want = {size: cogvideox_generate(fresh, steps=3, size=size) for size in (64, 96)}
    for first, then in ((64, 64), (96, 64), (64, 96)):  # a 1-step generation, then a 3-step one
        cogvideox_generate(pipe, steps=1, size=first, seed=5)
        torch.testing.assert_close(cogvideox_generate(pipe, steps=3, size=then), want[then], rtol=0, atol=0)
    assert rt.stats["resets"] == 6  # the pipeline resets its stateful hooks (ours too) after each run


def test_raw_calls_restart_when_the_latent_changes_shape():
    model = tiny_cogvideox()
    compiled = asymrnr_fx.compile(model, cheap(q_ratio=0.5, kv_ratio=0.5))
    small, big = cogvideox_inputs(), cogvideox_inputs(size=24)
    want = steps_of(asymrnr_fx.compile(tiny_cogvideox(), cheap(q_ratio=0.5, kv_ratio=0.5)), big)
    for _ in range(2):
        run(compiled, small, 900.0)  # a 1-step generation on another grid, at the same timestep
        for got, ref in zip(steps_of(compiled, big), want):
            torch.testing.assert_close(got, ref, rtol=0, atol=0)
    assert compiled.asymrnr.stats["generations"] == 4


def steps_of(compiled, x, ts=(900.0, 800.0, 700.0)):
    return [run(compiled, x, t) for t in ts]


def test_pipeline_step_index_is_the_step_and_restarts_the_generation():
    table = torch.tensor([[0.0, 0.5, 0.3], [0.0, 0.5, 0.3]])
    model, x = tiny_cogvideox(), cogvideox_inputs()
    compiled = asymrnr_fx.compile(model, cheap(schedule=Schedule(q=table)))
    rt = compiled.asymrnr
    for generation in range(2):
        for i in range(3):  # the same timestep every step: only the pipeline's index tells the step
            for name in ("cond", "uncond"):
                with compiled.cache_context(name, step_index=i, num_inference_steps=3):
                    run(compiled, x, 500.0)
                assert rt.step == i and rt.context_key == name
    assert rt.stats["generations"] == 2 and rt.num_steps == 3
    assert rt.used_lengths[(1, "uncond")]["transformer_blocks.0.attn1"] == (96, 192)
    assert rt.used_lengths[(2, "cond")]["transformer_blocks.1.attn1"] == (134, 192)


def test_a_named_context_called_twice_at_one_timestep_starts_a_new_generation():
    model, x = tiny_cogvideox(), cogvideox_inputs()
    compiled = asymrnr_fx.compile(model, cheap(q_ratio=0.5, kv_ratio=0.5))
    rt = compiled.asymrnr
    for t in (900.0, 900.0, 800.0, 800.0):
        with compiled.cache_context("cond_uncond"):
            run(compiled, x, t)
    assert rt.stats["generations"] == 3 and rt.step == 0  # [900], [900, 800], [800]


def test_named_contexts_keep_their_own_state_and_names_are_not_positions():
    model, x = tiny_cogvideox(), cogvideox_inputs()
    compiled = asymrnr_fx.compile(model, cheap(q_ratio=0.5, kv_ratio=0.5))
    rt = compiled.asymrnr
    run(compiled, x, 900.0)  # implicit context 0
    with rt.context("0"):
        run(compiled, cogvideox_inputs(seed=7), 900.0)
    assert set(rt.memory()["by_context"]) == {0, "0"}


def test_contexts_are_bounded():
    model, x = tiny_cogvideox(), cogvideox_inputs()
    compiled = asymrnr_fx.compile(model, cheap(q_ratio=0.5, kv_ratio=0.5))
    rt = compiled.asymrnr
    for k in range(3 * MAX_CONTEXTS):
        with rt.context(f"c{k}"):
            run(compiled, x, 900.0 - 10 * k)
    assert rt.memory()["contexts"] == MAX_CONTEXTS and rt.stats["contexts_evicted"] == 2 * MAX_CONTEXTS


def test_callback_step_zero_corrects_a_missed_generation():
    model, x = tiny_cogvideox(), cogvideox_inputs()
    compiled = asymrnr_fx.compile(model, cheap(q_ratio=0.5, kv_ratio=0.5))
    rt = compiled.asymrnr
    run(compiled, x, 900.0)
    run(compiled, x, 800.0)  # step 1 of a generation the pipeline ...
    rt.callback_on_step_end(None, 0, 800.0, {})  # ... says was step 0 of a new one
    assert rt.stats["step_corrections"] == 1 and rt.step == 1
    run(compiled, x, 700.0)
    assert rt.step == 1


def test_set_step_then_timesteps_go_on_counting():
    model, x = tiny_cogvideox(), cogvideox_inputs()
    compiled = asymrnr_fx.compile(model, cheap(q_ratio=0.5, kv_ratio=0.5))
    rt = compiled.asymrnr
    rt.set_step(4)
    run(compiled, x, 500.0)
    run(compiled, x, 400.0)
    assert rt.step == 5
    run(compiled, x, 900.0)  # higher: a new generation, manual or not
    assert rt.step == 0


def test_dynamic_graph_warns_that_the_speedup_is_lost():
    model = tiny_cogvideox()
    compiled = torch.compile(model, backend="asymrnr", options={"compiler": "aot_eager"})
    run(compiled, cogvideox_inputs(), 900.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run(compiled, cogvideox_inputs(size=24), 900.0)  # Dynamo recompiles with dynamic shapes
        run(compiled, cogvideox_inputs(size=32), 900.0)
    text = [str(w.message) for w in caught if "asymrnr" in str(w.message)]
    assert len(text) == 2 and "asymrnr_fx.compile" in text[0] and "dynamic=False" in text[0]
    assert asymrnr_fx.runtime_of(compiled).stats["unreduced_calls"] == 2


@pytest.mark.parametrize("steps", [1, 3])
def test_pipeline_generation_equals_a_fresh_model(steps):
    pipe, _ = compiled_pipeline(cheap(q_ratio=0.5, kv_ratio=0.3, matching_every=2))
    fresh, _ = compiled_pipeline(cheap(q_ratio=0.5, kv_ratio=0.3, matching_every=2))
    cogvideox_generate(pipe, steps=2, seed=3)  # a different generation first
    torch.testing.assert_close(cogvideox_generate(pipe, steps=steps), cogvideox_generate(fresh, steps=steps))


def test_two_compiled_models_of_one_module_keep_their_own_runtimes():
    model, x = tiny_cogvideox(), cogvideox_inputs()
    a = asymrnr_fx.compile(model, cheap(q_ratio=0.5, kv_ratio=0.5))
    b = asymrnr_fx.compile(model, cheap(q_ratio=0.3, kv_ratio=0.3))
    assert a.asymrnr is not b.asymrnr and a.asymrnr.config.reduction.q_ratio == 0.5
    with model.cache_context("uncond"):  # the one hook on the module informs both runtimes
        run(a, x, 900.0)
        run(b, x, 900.0)
    assert a.asymrnr.context_key == b.asymrnr.context_key == "uncond"


def test_a_site_draws_one_split_per_window_for_its_features_and_contexts():
    # the cut path matches Q and V of every site; both, in both contexts, use one drawn split
    model, x = tiny_cogvideox(), cogvideox_inputs()
    compiled = asymrnr_fx.compile(model, cheap(q_ratio=0.5, kv_ratio=0.5, matching_every=2, segments="sites"))
    rt = compiled.asymrnr
    for t in (900.0, 800.0, 700.0):  # steps 0 and 1 share window 0; step 2 opens window 1
        for name in ("cond", "uncond"):
            with rt.context(name):
                run(compiled, x, t)
    sites = [s for s in rt.info.sites if s.path in rt.active_sites]
    assert len(sites) == 2 and rt.step == 2
    assert rt.stats["matchings"] == 2 * 2 * 2 * len(sites)  # (Q, V) x contexts x windows
    assert rt.stats["splits"] == 2 * len(sites)  # one per site and window
    for name in ("cond", "uncond"):
        for site in sites:
            dst, src = rt._split(site.index, site.grid, 1)  # the window-1 draw
            for feature in ("q", "v"):
                m = rt._contexts[name].matchings[(site.index, feature)].matching
                assert torch.equal(m.dst, dst) and torch.equal(m.src, src)
    for _ in range(3):  # more generations: the kept splits end with each, one per site at most
        rt.reset()
        assert rt._splits == {}
        for t in (900.0, 800.0, 700.0):
            run(compiled, x, t)
        assert set(rt._splits) == {s.index for s in sites}
    assert rt.stats["splits"] == 2 * len(sites) + 3 * 2 * len(sites)
