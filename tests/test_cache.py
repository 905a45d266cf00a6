"""Feature caching inside the compiled model (cheap inner compiler): against diffusers'
FirstBlockCache and a plain eager Skip-Cache, composed with the reduction, per context, with no
graph break, no recompile and state that does not grow."""

from __future__ import annotations

import ast
import math

import pytest
import torch
from conftest import (
    cogvideox_generate,
    cogvideox_inputs,
    hunyuan_inputs,
    run,
    tiny_cogvideox,
    tiny_cogvideox_pipeline,
    tiny_hunyuan,
)
from diffusers.hooks import FirstBlockCacheConfig, MagCacheConfig

import asymrnr_fx
from asymrnr_fx import AsymRnRConfig, BlockCache, ConfigError, SkipCache

TIMESTEPS = [900.0 - 40 * i for i in range(10)]


def cheap(**kw) -> AsymRnRConfig:
    return AsymRnRConfig(compiler="aot_eager", **kw)


def generate(model, inputs, timesteps=TIMESTEPS):
    return [run(model, inputs, t) for t in timesteps]


@pytest.mark.parametrize("threshold", [0.25, 0.5])
def test_block_cache_equals_diffusers_first_block_cache(threshold):
    x = cogvideox_inputs()
    peer = tiny_cogvideox(num_layers=4)
    peer.enable_cache(FirstBlockCacheConfig(threshold=threshold))
    with peer.cache_context("cond"):
        want = generate(peer, x)
    cfg = cheap(q_ratio=0.0, kv_ratio=0.0, cache=BlockCache(threshold=threshold, full_last=0))
    ours = asymrnr_fx.compile(tiny_cogvideox(num_layers=4), cfg, fullgraph=True)
    got = generate(ours, x)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)
    rt = ours.asymrnr
    assert rt.stats["cache_hits"] > 0 and rt.stats["cache_misses"] > 0
    assert rt.cache_log[(0, 0)] == (4, 0) and rt.rewrites["cache_spans"] == 1


def test_block_cache_on_hunyuan_video_equals_diffusers():
    x = hunyuan_inputs()
    peer = tiny_hunyuan()
    peer.enable_cache(FirstBlockCacheConfig(threshold=0.3))
    with peer.cache_context("cond"):
        want = generate(peer, x)
    cfg = cheap(q_ratio=0.0, kv_ratio=0.0, cache=BlockCache(threshold=0.3, full_last=0))
    ours = asymrnr_fx.compile(tiny_hunyuan(), cfg, fullgraph=True)
    for g, w in zip(generate(ours, x), want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    assert ours.asymrnr.stats["cache_hits"] > 0


def _printed_ratios(text: str) -> list[float]:
    """The list diffusers' MagCache prints after its calibration run."""
    line = next(ln for ln in text.split("Calibration Complete", 1)[1].splitlines() if ln.startswith("["))
    return [float(r) for r in ast.literal_eval(line)]


def test_magnitude_calibration_equals_diffusers_mag_cache_calibration(capsys):
    x = cogvideox_inputs()
    peer = tiny_cogvideox(num_layers=4)
    peer.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=len(TIMESTEPS)))
    with peer.cache_context("cond"):
        want = generate(peer, x)
    peer_ratios = _printed_ratios(capsys.readouterr().out)
    ours = asymrnr_fx.compile(tiny_cogvideox(num_layers=4), cheap(q_ratio=0.0, kv_ratio=0.0,
                                                                  cache=BlockCache(policy="magnitude")))
    got = generate(ours, x)  # the calibration generation runs dense
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)
    rt = ours.asymrnr
    assert rt.stats["cache_hits"] == 0 and rt.cache_ratios() == {}  # finished at the generation's end
    rt.reset()
    assert rt.cache_ratios()[0] == pytest.approx(peer_ratios, rel=1e-5)


@pytest.mark.parametrize("threshold", [0.05, 0.2])
def test_magnitude_policy_equals_diffusers_mag_cache(threshold):
    """Given the same ratios, our decisions and outputs are MagCache's (retention = full_first,
    max_skip_steps = max_cached, no forced last step); the span is every block (no head)."""
    x, n = cogvideox_inputs(), len(TIMESTEPS)
    ratios = [1.0, 1.02, 0.99, 1.05, 0.96, 1.01, 1.08, 0.9, 1.1, 0.95]
    peer = tiny_cogvideox(num_layers=4)
    peer.enable_cache(MagCacheConfig(threshold=threshold, max_skip_steps=3, retention_ratio=0.2,
                                     num_inference_steps=n, mag_ratios=ratios))
    with peer.cache_context("cond"):
        want = generate(peer, x)
    cache = BlockCache(policy="magnitude", threshold=threshold, full_first=2, full_last=0, max_cached=3,
                       ratios=tuple(ratios))
    ours = asymrnr_fx.compile(tiny_cogvideox(num_layers=4), cheap(q_ratio=0.0, kv_ratio=0.0, cache=cache),
                              fullgraph=True)
    for g, w in zip(generate(ours, x), want):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)
    rt = ours.asymrnr
    assert rt.stats["cache_hits"] > 0 and rt.stats["cache_misses"] > 2
    assert {v for v in rt.cache_log.values()} == {(4, 0), (0, 4)}  # a cached step runs no block
    assert rt.rewrites["cache_spans"] == 1 and "signal" not in str(rt.rewrites)


def test_magnitude_ratios_resample_to_another_step_count():
    from asymrnr_fx import cache

    ratios = (1.0,) + (0.9,) * 9  # magnitude 0.9 ** k over 10 steps
    assert cache.ratio_at(ratios, 4, 10) == 0.9 and cache.ratio_at(ratios, 0, 20) == 1.0
    # over 19 steps each step covers half a calibrated step: sqrt(0.9); the product is kept
    assert cache.ratio_at(ratios, 7, 19) == pytest.approx(math.sqrt(0.9))
    assert math.prod(cache.ratio_at(ratios, s, 19) for s in range(19)) == pytest.approx(0.9 ** 9)


class _EagerSpan(torch.nn.Module):
    """Plain reference: CogVideoX blocks [a, b) that, when `reuse` is set, return their input
    plus the residual stored at the last full run."""

    def __init__(self, blocks):
        super().__init__()
        self.blocks, self.reuse, self.residual = torch.nn.ModuleList(blocks), False, None

    def forward(self, hidden_states, encoder_hidden_states, **kwargs):
        if self.reuse:
            return hidden_states + self.residual[0], encoder_hidden_states + self.residual[1]
        h, e = hidden_states, encoder_hidden_states
        for block in self.blocks:
            h, e = block(hidden_states=h, encoder_hidden_states=e, **kwargs)
        self.residual = (h - hidden_states, e - encoder_hidden_states)
        return h, e


def _identity_blocks(n: int) -> list[torch.nn.Module]:
    class Passthrough(torch.nn.Module):
        def forward(self, hidden_states, encoder_hidden_states, **kwargs):
            return hidden_states, encoder_hidden_states

    return [Passthrough() for _ in range(n)]


def test_skip_cache_equals_a_plain_eager_skip_cache():
    rule = SkipCache(interval=2, full_above=850.0, full_below=600.0, blocks=1)
    x = cogvideox_inputs()
    ref = tiny_cogvideox(num_layers=5)
    blocks = list(ref.transformer_blocks)
    span = _EagerSpan(blocks[1:4])
    ref.transformer_blocks = torch.nn.ModuleList([blocks[0], span, *_identity_blocks(2), blocks[4]])
    want, reused, since_full = [], [], 0
    for t in TIMESTEPS:
        banded = rule.full_below < t < rule.full_above
        span.reuse = banded and since_full % rule.interval != 0
        since_full = since_full + 1 if span.reuse else 1
        want.append(run(ref, x, t))
        reused.append(span.reuse)
    ours = asymrnr_fx.compile(tiny_cogvideox(num_layers=5), cheap(q_ratio=0.0, kv_ratio=0.0, cache=rule))
    got = generate(ours, x)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)
    log = ours.asymrnr.cache_log
    assert [log[(i, 0)] for i in range(len(TIMESTEPS))] == [(2, 3) if r else (5, 0) for r in reused]
    assert sum(reused) >= 3


def test_cache_and_reduction_compose_with_no_graph_break_and_no_recompile():
    cfg = cheap(q_ratio=0.5, kv_ratio=0.3, matching_every=2, cache=BlockCache(threshold=0.3))
    model, x = tiny_cogvideox(num_layers=4), cogvideox_inputs()
    compiled = asymrnr_fx.compile(model, cfg, fullgraph=True)
    torch._dynamo.utils.counters.clear()
    generate(compiled, x)
    with torch.compiler.set_stance("fail_on_recompile"):
        for _ in range(2):
            outs = generate(compiled, x)
    rt = compiled.asymrnr
    assert dict(torch._dynamo.utils.counters["graph_break"]) == {}
    assert rt.stats["cache_hits"] > 0 and rt.stats["matchings"] > 0 and rt.stats["generations"] == 3
    # prologue, block-start and site pieces and one matching: bounded by structures x length
    # pairs, not by steps
    assert rt.stats["compiles"] <= 6 + 1
    dense = generate(torch.compile(tiny_cogvideox(num_layers=4), backend="aot_eager"), x)
    assert all((o - d).abs().max() > 1e-4 for o, d in zip(outs[1:], dense[1:]))  # it really changed


def test_skipped_blocks_neither_compute_nor_age_their_matchings():
    rule = SkipCache(interval=2, full_above=1000.0, full_below=0.0, blocks=1)  # cache every other step
    cfg = cheap(q_ratio=0.5, kv_ratio=0.5, matching_every=2, cache=rule)
    compiled = asymrnr_fx.compile(tiny_cogvideox(num_layers=3), cfg)
    rt = compiled.asymrnr
    per_block = []
    for t in TIMESTEPS[:8]:
        run(compiled, cogvideox_inputs(), t)
        per_block.append([rt.window(b) for b in range(3)])
    # block 1 runs at even steps only: its matching window advances every 4 steps, not every 2
    assert [per_block[i][1] for i in (0, 2, 4, 6)] == [0, 0, 1, 1]
    assert [w[0] for w in per_block] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert rt.state.skipped[1] == 4 and rt.state.skipped[0] == 0
    assert rt.stats["matchings"] == 2 * (4 + 2 + 4)  # (q, v) x windows of blocks 0, 1 (skipped half the time), 2


def test_contexts_keep_separate_caches():
    cfg = cheap(q_ratio=0.0, kv_ratio=0.0, cache=BlockCache(threshold=0.3))
    cond, uncond = cogvideox_inputs(seed=1), cogvideox_inputs(seed=2)
    both = asymrnr_fx.compile(tiny_cogvideox(num_layers=4), cfg)
    got = []
    for t in TIMESTEPS:
        for name, x in (("cond", cond), ("uncond", uncond)):
            with both.cache_context(name):
                out = run(both, x, t)
        got.append(out)
    alone = generate(asymrnr_fx.compile(tiny_cogvideox(num_layers=4), cfg), uncond)
    for g, w in zip(got, alone):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    assert both.asymrnr.memory()["contexts"] == 2


def test_cache_memory_does_not_grow_over_generations():
    cfg = cheap(q_ratio=0.3, kv_ratio=0.3, cache=BlockCache(threshold=0.3))
    compiled = asymrnr_fx.compile(tiny_cogvideox(num_layers=4), cfg)
    held = []
    for _ in range(3):
        generate(compiled, cogvideox_inputs())
        held.append(compiled.asymrnr.memory())
    assert held[0] == held[1] == held[2]
    # one context: a residual per stream (video 192 x 32, text 4 x 32) and at most two signals
    assert (192 + 4) * 32 < held[0]["cache_elements"] <= (192 + 4) * 32 + 2 * 192 * 32


def test_pipeline_with_cache_stays_close_to_dense():
    pipe = tiny_cogvideox_pipeline(tiny_cogvideox(num_layers=4))
    dense = cogvideox_generate(pipe, steps=8)
    pipe.transformer = asymrnr_fx.compile(pipe.transformer, cheap(q_ratio=0.0, kv_ratio=0.0, cache=BlockCache()))
    cached = cogvideox_generate(pipe, steps=8)
    rt = pipe.transformer.asymrnr
    assert rt.stats["cache_hits"] + rt.stats["cache_misses"] == 8
    assert (cached - dense).norm() / dense.norm() < 0.2


def test_no_cache_is_the_unchanged_backend():
    compiled = asymrnr_fx.compile(tiny_cogvideox(num_layers=3), cheap(q_ratio=0.5, kv_ratio=0.3))
    run(compiled, cogvideox_inputs(), 900.0)
    rt = compiled.asymrnr
    # no cache and one step pattern: the uncut graph, one segment
    assert rt.rewrites["cache_spans"] == 0 and rt.stats["segments"] == 1 and rt.cache_log == {}


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda: BlockCache(threshold=0.0), "BlockCache.threshold must be > 0, got 0.0"),
        (lambda: BlockCache(policy="teacache"), "BlockCache.policy must be one of"),
        (lambda: BlockCache(head_blocks=0), "BlockCache.head_blocks must be an int >= 1, got 0"),
        (lambda: BlockCache(ratios=(1.0, 0.9)), "BlockCache.ratios is read by policy='magnitude' only"),
        (lambda: BlockCache(policy="magnitude", ratios=(1.0, -1.0)), "BlockCache.ratios must be positive"),
        (lambda: BlockCache(policy="magnitude", head_blocks=-1), "BlockCache.head_blocks must be an int >= 0"),
        (lambda: SkipCache(interval=0), "SkipCache.interval must be an int >= 1, got 0"),
        (lambda: SkipCache(full_above=50.0, full_below=700.0), "must be below full_above"),
        (lambda: AsymRnRConfig(cache="block"), "cache must be asymrnr_fx.BlockCache"),
        (lambda: AsymRnRConfig.from_options({"cache": "tea"}), "options['cache'] must be one of"),
        (lambda: AsymRnRConfig.from_options({"cache": "block", "cache_treshold": 0.1}), "Did you mean 'cache_threshold'"),
        (lambda: AsymRnRConfig.from_options({"cache_threshold": 0.1}), "need options['cache']"),
    ],
)
def test_bad_cache_configs_are_clear_errors(make, message):
    with pytest.raises(ConfigError) as err:
        make()
    assert message in str(err.value)


def test_a_span_with_no_block_to_skip_is_a_clear_error():
    compiled = asymrnr_fx.compile(tiny_cogvideox(num_layers=2), cheap(cache=SkipCache(blocks=1)))
    with pytest.raises(ConfigError, match=r"leaves no block to skip in a model of 2 blocks"):
        run(compiled, cogvideox_inputs(), 900.0)


def test_options_select_the_cache():
    model = tiny_cogvideox(num_layers=4)
    opts = {"compiler": "aot_eager", "q_ratio": 0.0, "kv_ratio": 0.0, "cache": "block", "cache_threshold": 0.3}
    compiled = torch.compile(model, backend="asymrnr", options=opts, dynamic=False)
    generate(compiled, cogvideox_inputs())
    rt = asymrnr_fx.runtime_of(compiled)
    assert rt.config.cache == BlockCache(threshold=0.3) and rt.stats["cache_hits"] > 0


def test_block_cache_equals_diffusers_on_the_trained_fixture():
    from asymrnr_fx.models import fixture

    fixture_model = fixture.load()
    prompt = fixture.PROMPTS[1]
    cfg = cheap(q_ratio=0.0, kv_ratio=0.0, cache=BlockCache(threshold=0.4, full_last=0))
    ours = asymrnr_fx.compile(fixture_model.transformer, cfg)
    got = fixture_model.sample(prompt, steps=16, seed=1, transformer=ours).latents
    peer = fixture.load().transformer
    peer.enable_cache(FirstBlockCacheConfig(threshold=0.4))
    with peer.cache_context("cond"):
        want = fixture_model.sample(prompt, steps=16, seed=1, transformer=peer).latents
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert ours.asymrnr.stats["cache_hits"] >= 8


class _EagerSeaSpan(torch.nn.Module):
    """Plain reference of the spectral policy over CogVideoX blocks [0, n): SeaCache's indicator
    (diffusers' own filter) of the visual input on its (F, H, W) grid, its step-to-step relative
    L1 change accumulated since the last full step, the residual extrapolated from the last two
    full steps (SeaCache's residual_order 1)."""

    def __init__(self, blocks, grid, threshold, full_first):
        super().__init__()
        self.blocks, self.grid, self.threshold, self.full_first = torch.nn.ModuleList(blocks), grid, threshold, full_first
        self.step, self.t, self.previous, self.accumulated, self.history, self.reused = -1, None, None, 0.0, [], []

    def _indicator(self, h):
        from diffusers.hooks.sea_cache import _apply_sea_filter

        return [_apply_sea_filter(x.reshape(*self.grid, -1), self.t / 1000, 3.0) for x in h]

    def forward(self, hidden_states, encoder_hidden_states, **kwargs):
        self.step += 1
        indicator = self._indicator(hidden_states)
        reuse = False
        if self.previous is not None and self.step >= self.full_first:
            change = sum(float((a - b).abs().mean() / b.abs().mean()) for a, b in zip(indicator, self.previous))
            self.accumulated += change / len(indicator)
            reuse = self.accumulated < self.threshold
        self.previous = indicator
        self.reused.append(reuse)
        if reuse:
            (s0, r0), (s1, r1) = self.history[-2] if len(self.history) > 1 else self.history[-1], self.history[-1]
            k = (self.step - s1) / (s1 - s0) if s1 > s0 else 0.0
            return tuple(x + a + (a - b) * k for x, a, b in zip((hidden_states, encoder_hidden_states), r1, r0))
        self.accumulated = 0.0
        h, e = hidden_states, encoder_hidden_states
        for block in self.blocks:
            h, e = block(hidden_states=h, encoder_hidden_states=e, **kwargs)
        self.history = [*self.history, (self.step, (h - hidden_states, e - encoder_hidden_states))][-2:]
        return h, e


def test_spectral_policy_equals_a_plain_eager_seacache_rule():
    threshold, n = 0.25, 4  # SeaCache's default; step-to-step changes here: 0.41 falling to 0.08
    x, noise = cogvideox_inputs(), torch.randn(1, 3, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    steps = [{**x, "hidden_states": x["hidden_states"] * (1 - t / 1000) + noise * t / 1000} for t in TIMESTEPS]
    ref = tiny_cogvideox(num_layers=n)
    span = _EagerSeaSpan(list(ref.transformer_blocks), (3, 8, 8), threshold, full_first=1)
    ref.transformer_blocks = torch.nn.ModuleList([span, *_identity_blocks(n - 1)])
    want = []
    for inputs, t in zip(steps, TIMESTEPS):
        span.t = t
        want.append(run(ref, inputs, t))
    rule = BlockCache(policy="spectral", threshold=threshold, full_first=1, full_last=0)
    ours = asymrnr_fx.compile(tiny_cogvideox(num_layers=n), cheap(q_ratio=0.0, kv_ratio=0.0, cache=rule), fullgraph=True)
    got = [run(ours, inputs, t) for inputs, t in zip(steps, TIMESTEPS)]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    log = ours.asymrnr.cache_log
    assert [log[(i, 0)] == (0, n) for i in range(len(TIMESTEPS))] == span.reused
    assert 2 <= sum(span.reused) <= len(TIMESTEPS) - 3  # both decisions, by the threshold


def test_spectral_filter_equals_seacache_filter():
    from diffusers.hooks.sea_cache import _apply_sea_filter

    x = torch.randn(2, 3, 6, 10, 8)
    for sigma in (0.05, 0.5, 0.97):
        want = torch.stack([_apply_sea_filter(x[b], sigma, 3.0) for b in range(2)])
        torch.testing.assert_close(asymrnr_fx.cache.sea_filter(x, sigma, 3.0), want, rtol=1e-5, atol=1e-6)


def test_extrapolation_moves_the_residual_on_linearly():
    state = asymrnr_fx.cache.SpanState()
    r0, r1 = torch.ones(2), torch.full((2,), 3.0)
    asymrnr_fx.cache.record_full(state, [r0], None, step=2, keep_older=True)
    assert asymrnr_fx.cache.extrapolated(state, 3)[0].tolist() == [1.0, 1.0]  # one full step: reused as is
    asymrnr_fx.cache.record_full(state, [r1], None, step=4, keep_older=True)
    assert asymrnr_fx.cache.extrapolated(state, 5)[0].tolist() == [4.0, 4.0]  # 3 + (3 - 1) * 1/2
