"""HunyuanDiT (image DiT with native long skips), built tiny from its config: sites, the
reduction against the independent eager reference, ratio 0, no recompile, and Skip-Cache on its
long skips (the tail fuses the cached deep feature with the fresh shallow skip) against a plain
eager Skip-DiT Skip-Cache written here."""

from __future__ import annotations

import pytest
import torch
from conftest import skip_dit_reuse
from diffusers import HunyuanDiT2DModel
from diffusers.models.embeddings import get_2d_rotary_pos_embed
from test_reference import reference_self_attention
from test_symmetric import RefSymmetric

import asymrnr_fx
from asymrnr_fx import AsymRnRConfig, BlockCache, ConfigError, SkipCache

GRID = (1, 8, 8)
N = 64
TIMESTEPS = [900.0, 800.0, 700.0, 600.0, 500.0, 400.0, 300.0, 200.0, 100.0, 40.0, 10.0]


def cheap(**kw) -> AsymRnRConfig:
    return AsymRnRConfig(compiler="aot_eager", **kw)


def tiny_hunyuan_dit(num_layers: int = 6, seed: int = 0) -> HunyuanDiT2DModel:
    """Blocks 0 .. L/2 - 2 hand their output to blocks L - 1 .. L/2 + 1 (L = 6: 0 -> 5, 1 -> 4)."""
    torch.manual_seed(seed)
    return HunyuanDiT2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, patch_size=2, sample_size=8, hidden_size=16,
        num_layers=num_layers, cross_attention_dim=16, cross_attention_dim_t5=16, pooled_projection_dim=8,
        text_len=5, text_len_t5=7, use_style_cond_and_image_meta_size=False,
    ).eval()


def inputs(seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "hidden_states": torch.randn(1, 4, 16, 16, generator=g),
        "encoder_hidden_states": torch.randn(1, 5, 16, generator=g),
        "text_embedding_mask": torch.ones(1, 5),
        "encoder_hidden_states_t5": torch.randn(1, 7, 16, generator=g),
        "text_embedding_mask_t5": torch.ones(1, 7),
        "image_rotary_emb": get_2d_rotary_pos_embed(8, ((0, 0), (8, 8)), (8, 8)),
    }


def call(model, x: dict, t: float) -> torch.Tensor:
    with torch.no_grad():
        return model(**x, timestep=torch.tensor([t]), return_dict=False)[0]


def generate(model, x: dict, timesteps=TIMESTEPS) -> list[torch.Tensor]:
    return [call(model, x, t) for t in timesteps]


def test_sites_found_and_classified():
    compiled = asymrnr_fx.compile(tiny_hunyuan_dit(), cheap(q_ratio=0.5, kv_ratio=0.3))
    call(compiled, inputs(), 900.0)
    rt = compiled.asymrnr
    assert rt.info.adapter.family == "hunyuan_dit" and rt.info.grid == GRID and rt.info.num_blocks == 6
    reducible = [s for s in rt.info.sites if s.reducible]
    assert [s.path for s in reducible] == [f"blocks.{i}.attn1" for i in range(6)]
    assert all(s.layout.n_text == 0 and s.layout.n_visual == N for s in reducible)
    others = [s for s in rt.info.sites if not s.reducible]
    assert [s.path for s in others] == [f"blocks.{i}.attn2" for i in range(6)]
    assert {s.reason for s in others} == {"attention module 'attn2' is not self-attention over video"}


def test_reduction_matches_the_eager_reference():
    model, x = tiny_hunyuan_dit(num_layers=4), inputs()
    got = call(asymrnr_fx.compile(model, cheap(q_ratio=0.5, kv_ratio=0.3, split="fixed")), x, 900.0)
    with reference_self_attention({N: GRID}, 0.5, 0.3) as calls:
        want = call(model, x, 900.0)
    assert len(calls) == 4
    assert (got - call(model, x, 900.0)).abs().max() > 1e-3
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_ratio_zero_equals_the_baseline():
    model, x = tiny_hunyuan_dit(), inputs()
    compiled = asymrnr_fx.compile(model, cheap(q_ratio=0.0, kv_ratio=0.0))
    assert torch.equal(call(compiled, x, 900.0), call(torch.compile(model, backend="aot_eager"), x, 900.0))
    assert compiled.asymrnr.stats["dense_graphs"] == 1


class _SkipDiTSpan(torch.nn.Module):
    """Plain reference for blocks [1, L - 1) of a long-skip model: on a cached step every one
    passes its input through, and the last hands the tail the deep feature stored at the last
    full step (the blocks' skip pushes and pops still happen, read by skipped blocks only)."""

    def __init__(self, block: torch.nn.Module, store: dict, last: bool):
        super().__init__()
        self.block, self.store, self.last = block, store, last

    def forward(self, hidden_states, **kwargs):
        if self.store["reuse"]:
            return self.store["deep"] if self.last else hidden_states
        out = self.block(hidden_states, **kwargs)
        if self.last:
            self.store["deep"] = out
        return out


def _eager_skip_cache(model: HunyuanDiT2DModel, x: dict, interval: int) -> list[torch.Tensor]:
    """Skip-DiT's rule: full while t >= 700 and once t <= 50, else every `interval`-th step."""
    store, n = {"reuse": False}, len(model.blocks)
    for i in range(1, n - 1):
        model.blocks[i] = _SkipDiTSpan(model.blocks[i], store, last=i == n - 2)
    outs = []
    for t, reuse in zip(TIMESTEPS, skip_dit_reuse(TIMESTEPS, interval)):
        store["reuse"] = reuse
        outs.append(call(model, x, t))
    return outs


@pytest.mark.parametrize("interval", [2, 3])
def test_skip_cache_on_long_skips_equals_a_plain_eager_skip_dit(interval):
    x = inputs()
    want = _eager_skip_cache(tiny_hunyuan_dit(), x, interval)
    cfg = cheap(q_ratio=0.0, kv_ratio=0.0, cache=SkipCache(interval=interval))
    ours = asymrnr_fx.compile(tiny_hunyuan_dit(), cfg, fullgraph=True)
    got = [call(ours, x, TIMESTEPS[0])]
    with torch.compiler.set_stance("fail_on_recompile"):
        got += generate(ours, x, TIMESTEPS[1:])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)
    rt = ours.asymrnr
    cached = [step for (step, _), (run, skipped) in rt.cache_log.items() if skipped]
    assert cached == ([3, 5, 7] if interval == 2 else [3, 4, 6, 7])
    assert set(rt.cache_log.values()) == {(6, 0), (2, 4)}  # a cached step runs blocks 0 and 5 only
    assert (got[3] - call(tiny_hunyuan_dit(), x, TIMESTEPS[3])).abs().max() > 1e-4  # step 3 reused


def test_block_cache_and_reduction_on_long_skips_without_recompiles():
    x = inputs()
    ours = asymrnr_fx.compile(tiny_hunyuan_dit(), cheap(q_ratio=0.5, kv_ratio=0.3,
                                                        cache=BlockCache(threshold=0.5, full_last=0)))
    call(ours, x, TIMESTEPS[0])
    with torch.compiler.set_stance("fail_on_recompile"):
        outs = generate(ours, x, TIMESTEPS[1:])
    assert all(torch.isfinite(o).all() for o in outs)
    assert ours.asymrnr.stats["cache_hits"] > 0 and ours.asymrnr.rewrites["sites_reduced"] == 6


def test_magnitude_policy_on_long_skips_is_a_clear_error():
    ours = asymrnr_fx.compile(tiny_hunyuan_dit(), cheap(q_ratio=0.0, kv_ratio=0.0,
                                                        cache=BlockCache(policy="magnitude")))
    with pytest.raises(ConfigError, match="has long skips and caches the span's output"):
        call(ours, inputs(), 900.0)


@pytest.mark.inductor
def test_skip_cache_on_long_skips_with_inductor_end_to_end():
    x = inputs()
    cfg = AsymRnRConfig(q_ratio=0.5, kv_ratio=0.3, cache=SkipCache(interval=2))
    ours = asymrnr_fx.compile(tiny_hunyuan_dit(), cfg)
    got = [call(ours, x, TIMESTEPS[0])]
    with torch.compiler.set_stance("fail_on_recompile"):
        got += generate(ours, x, TIMESTEPS[1:])
    torch._dynamo.reset()
    cheap_run = generate(asymrnr_fx.compile(tiny_hunyuan_dit(), cheap(q_ratio=0.5, kv_ratio=0.3,
                                                                      cache=SkipCache(interval=2))), x)
    for g, w in zip(got, cheap_run):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
    rt = ours.asymrnr
    assert [s for (s, _), (_, skipped) in rt.cache_log.items() if skipped] == [3, 5, 7]
    assert rt.rewrites["sites_reduced"] == 6 and rt.stats["compiles"] >= 3


def test_symmetric_mode_matches_the_reference_with_the_2d_rope():
    """Hidden state reduced before the projections of every block's self-attention, the (N, D)
    RoPE tables gathered with it, against HunyuanDiT's own processor on the kept tokens."""
    model, x = tiny_hunyuan_dit(), inputs()
    compiled = asymrnr_fx.compile(model, cheap(q_ratio=0.0, kv_ratio=0.0, h_ratio=0.5, split="fixed"))
    got = call(compiled, x, 900.0)
    rt = compiled.asymrnr
    assert rt.rewrites["sites_reduced"] == 6 and "sites_not_symmetric" not in rt.rewrites
    assert set(rt.used_lengths[(0, 0)].values()) == {(32, 32)}
    attns = [block.attn1 for block in model.blocks]
    refs = [RefSymmetric(a.processor, 0.5, "image_rotary_emb", lambda rope, rows: tuple(t[rows] for t in rope),
                         grid_of=lambda n: (1, 8, 8)) for a in attns]
    for a, ref in zip(attns, refs):
        a.set_processor(ref)
    want = call(model, x, 900.0)
    assert [r.calls for r in refs] == [1] * 6
    assert (got - call(asymrnr_fx.compile(tiny_hunyuan_dit(), cheap()), x, 900.0)).abs().max() > 1e-3
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
