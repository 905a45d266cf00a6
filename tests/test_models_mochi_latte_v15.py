"""Issue 11 families, built tiny from their configs: CogVideoX 1.5 (temporal patches), Latte
(interleaved spatial / temporal blocks), and Mochi and HunyuanVideo 1.5 unprepared (data-dependent
text selection, which Dynamo cannot keep in one static graph: they fail closed; prepared, they are
tested in tests/test_models_prepared.py). Cheap inner compiler except one Inductor test."""

from __future__ import annotations

import pytest
import torch
from conftest import run
from diffusers import CogVideoXTransformer3DModel, LatteTransformer3DModel, MochiTransformer3DModel
from diffusers.models.transformers.transformer_hunyuan_video15 import HunyuanVideo15Transformer3DModel
from test_reference import reference_attention, reference_self_attention
from test_symmetric import RefSymmetric, RefSymmetricCogVideoX

import asymrnr_fx
from asymrnr_fx import AsymRnRConfig, BlockCache, SkipCache
from asymrnr_fx.models.hunyuan_video15 import HUNYUAN_VIDEO15
from asymrnr_fx.models.mochi import MOCHI
from asymrnr_fx.passes import sites

STEPS = [900.0, 850.0, 800.0, 750.0]


def cheap(**kw) -> AsymRnRConfig:
    return AsymRnRConfig(compiler="aot_eager", **kw)


def generate(model, inputs, timesteps=STEPS) -> list[torch.Tensor]:
    """First step warms up; the rest must not recompile."""
    outs = [run(model, inputs, timesteps[0])]
    with torch.compiler.set_stance("fail_on_recompile"):
        outs += [run(model, inputs, t) for t in timesteps[1:]]
    return outs


def baseline(model, inputs, timesteps=STEPS) -> list[torch.Tensor]:
    compiled = torch.compile(model, backend="aot_eager")
    return [run(compiled, inputs, t) for t in timesteps]


# ---- tiny models --------------------------------------------------------------------------------
def tiny_cogvideox15(num_layers: int = 2, seed: int = 0, patch: tuple[int, int] = (2, 2)) -> CogVideoXTransformer3DModel:
    """`patch`: (patch_size, patch_size_t)."""
    torch.manual_seed(seed)
    return CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=32,
        text_embed_dim=16, num_layers=num_layers, sample_width=16, sample_height=16, sample_frames=9,
        patch_size=patch[0], patch_size_t=patch[1], max_text_seq_length=4, use_rotary_positional_embeddings=True,
    ).eval()


def cogvideox15_inputs(seed: int = 1) -> dict:
    """Latent (1, 4 frames, 4, 16, 16) -> grid (2, 8, 8): 128 visual + 4 text tokens."""
    g = torch.Generator().manual_seed(seed)
    return {
        "hidden_states": torch.randn(1, 4, 4, 16, 16, generator=g),
        "encoder_hidden_states": torch.randn(1, 4, 16, generator=g),
    }


def tiny_latte(num_layers: int = 2, seed: int = 0, head_dim: int = 8) -> LatteTransformer3DModel:
    """Two heads of `head_dim`; at 8 the inner width 16 equals the spatial token count (4 x 4)."""
    torch.manual_seed(seed)
    return LatteTransformer3DModel(
        num_attention_heads=2, attention_head_dim=head_dim, in_channels=4, out_channels=8, num_layers=num_layers,
        cross_attention_dim=2 * head_dim, sample_size=8, patch_size=2, activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
        caption_channels=16, video_length=4,
    ).eval()


def latte_inputs(seed: int = 1) -> dict:
    """Latent (1, 4, 4 frames, 8, 8) -> grid (4, 4, 4): spatial sequences of 16, temporal of 4."""
    g = torch.Generator().manual_seed(seed)
    return {"hidden_states": torch.randn(1, 4, 4, 8, 8, generator=g), "encoder_hidden_states": torch.randn(1, 5, 16, generator=g)}


def tiny_mochi(seed: int = 0, num_layers: int = 2) -> MochiTransformer3DModel:
    torch.manual_seed(seed)
    return MochiTransformer3DModel(
        patch_size=2, num_attention_heads=2, attention_head_dim=16, num_layers=num_layers, pooled_projection_dim=16,
        in_channels=4, text_embed_dim=16, time_embed_dim=4, max_sequence_length=8,
    ).eval()


def mochi_inputs(seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(1, 6)
    mask[:, :4] = 1
    return {"hidden_states": torch.randn(1, 4, 3, 16, 16, generator=g),
            "encoder_hidden_states": torch.randn(1, 6, 16, generator=g), "encoder_attention_mask": mask}


def tiny_hunyuan15(seed: int = 0, num_layers: int = 2) -> HunyuanVideo15Transformer3DModel:
    torch.manual_seed(seed)
    return HunyuanVideo15Transformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=num_layers,
        num_refiner_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=16, text_embed_2_dim=8,
        image_embed_dim=12, rope_axes_dim=(4, 6, 6), target_size=16, task_type="t2v",
    ).eval()


def hunyuan15_inputs(seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    mask, mask_2 = torch.zeros(1, 6), torch.zeros(1, 3)
    mask[:, :4], mask_2[:, :2] = 1, 1
    return {"hidden_states": torch.randn(1, 4, 3, 16, 16, generator=g),
            "encoder_hidden_states": torch.randn(1, 6, 16, generator=g), "encoder_attention_mask": mask,
            "encoder_hidden_states_2": torch.randn(1, 3, 8, generator=g), "encoder_attention_mask_2": mask_2,
            "image_embeds": torch.zeros(1, 2, 12)}


def dynamo_graphs(model, inputs) -> list[torch.fx.GraphModule]:
    """The graphs Dynamo hands to a backend for one call."""
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    run(torch.compile(model, backend=capture, dynamic=False), inputs, 900.0)
    return graphs


def reasons(info) -> list[str]:
    return [s.reason for s in info.sites]


# ---- CogVideoX 1.5 ------------------------------------------------------------------------------
@pytest.mark.parametrize("patch,grid", [((2, 2), (2, 8, 8)), ((1, 4), (1, 16, 16))], ids=["p2-pt2", "p1-pt4"])
def test_cogvideox15_sites_follow_the_temporal_patches(patch, grid):
    """4 latent frames of 16 x 16. Patches (p 1, pt 4) hold as many values as (p 2, pt 1): the
    grid comes from the graph's patch reshape, not the weight's size."""
    compiled = asymrnr_fx.compile(tiny_cogvideox15(patch=patch), cheap(q_ratio=0.5, kv_ratio=0.3))
    run(compiled, cogvideox15_inputs(), 900.0)
    info = compiled.asymrnr.info
    assert info.grid == grid
    assert reasons(info) == ["", ""]
    assert [s.layout for s in info.sites] == [asymrnr_fx.tokens.Layout(4, grid[0] * grid[1] * grid[2], True)] * 2
    assert compiled.asymrnr.rewrites["sites_reduced"] == 2


@pytest.mark.parametrize("q,kv,mode", [(0.5, 0.3, "replace"), (0.4, 0.6, "mean")])
def test_cogvideox15_matches_reference(q, kv, mode):
    model, inputs = tiny_cogvideox15(), cogvideox15_inputs()
    cfg = cheap(q_ratio=q, kv_ratio=kv, reduce_mode=mode, split="fixed")
    got = run(asymrnr_fx.compile(model, cfg), inputs, 900.0)
    with reference_attention(4 + 128, 4, True, (2, 8, 8), q, kv, "euclidean", mode) as calls:
        want = run(model, inputs, 900.0)
    assert len(calls) == 2
    assert (got - run(model, inputs, 900.0)).abs().max() > 1e-3
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_cogvideox15_ratio_zero_equals_baseline_and_generates_without_recompile():
    model, inputs = tiny_cogvideox15(), cogvideox15_inputs()
    dense = asymrnr_fx.compile(model, cheap(q_ratio=0.0, kv_ratio=0.0))
    for got, want in zip(generate(dense, inputs), baseline(model, inputs)):
        assert torch.equal(got, want)
    torch._dynamo.reset()
    reduced = asymrnr_fx.compile(model, cheap(q_ratio=0.5, kv_ratio=0.3, matching_every=2))
    generate(reduced, inputs)
    rt = reduced.asymrnr
    assert rt.step == 3 and rt.stats["matchings"] == 2 * 2 * 2  # 2 windows x 2 sites x (q, v)
    assert rt.used_lengths[(3, 0)] == {f"transformer_blocks.{i}.attn1": (64, 89) for i in range(2)}


@pytest.mark.parametrize("q,kv", [(0.0, 0.0), (0.5, 0.3)])
def test_cogvideox15_block_cache_skips_blocks(q, kv):
    model, inputs = tiny_cogvideox15(num_layers=4), cogvideox15_inputs()
    cfg = cheap(q_ratio=q, kv_ratio=kv, cache=BlockCache(threshold=0.3, full_last=0))
    compiled = asymrnr_fx.compile(model, cfg)
    generate(compiled, inputs)
    rt = compiled.asymrnr
    assert rt.stats["cache_hits"] > 0 and rt.cache_log[(0, 0)] == (4, 0)
    assert (1, 3) in rt.cache_log.values()  # head block run, span of 3 skipped
    assert rt.stats["matchings"] > 0 if q else rt.stats["matchings"] == 0


def test_cogvideox15_symmetric_mode_matches_the_reference_on_the_temporal_patch_grid():
    model, inputs = tiny_cogvideox15(), cogvideox15_inputs()
    cfg = cheap(q_ratio=0.0, kv_ratio=0.0, h_ratio=0.5, split="fixed")
    compiled = asymrnr_fx.compile(model, cfg)
    got = run(compiled, inputs, 900.0)
    rt = compiled.asymrnr
    assert rt.rewrites["sites_reduced"] == 2 and "sites_not_symmetric" not in rt.rewrites
    for block in model.transformer_blocks:
        block.attn1.set_processor(RefSymmetricCogVideoX(0.5, grid=(2, 8, 8)))
    want = run(model, inputs, 900.0)
    assert (got - run(asymrnr_fx.compile(tiny_cogvideox15(), cheap()), inputs, 900.0)).abs().max() > 1e-3
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


# ---- Latte --------------------------------------------------------------------------------------
LATTE_SPATIAL = 16  # 4 x 4 patches per frame


def test_latte_sites_are_numbered_in_execution_order_and_classified():
    compiled = asymrnr_fx.compile(tiny_latte(num_layers=3), cheap(q_ratio=0.5, kv_ratio=0.3))
    run(compiled, latte_inputs(), 900.0)
    info = compiled.asymrnr.info
    assert info.grid == (1, 4, 4) and info.num_blocks == 6
    by_kind = {}
    for s in info.sites:
        by_kind.setdefault(s.path.split(".", 2)[0] + "." + s.path.rsplit(".", 1)[1], []).append(s)
    spatial, cross, temporal = by_kind["transformer_blocks.attn1"], by_kind["transformer_blocks.attn2"], by_kind["temporal_transformer_blocks.attn1"]
    assert [s.block for s in spatial] == [0, 2, 4] and [s.block for s in temporal] == [1, 3, 5]
    assert all(s.reducible and s.layout == asymrnr_fx.tokens.Layout(0, LATTE_SPATIAL, False) for s in spatial)
    assert all("'attn2' is not self-attention" in s.reason for s in cross)
    # temporal sequences run over the 4 frames of one position: reduced on their own grid (4, 1, 1)
    assert all(s.reducible and s.grid == (4, 1, 1) and s.layout.n_visual == 4 for s in temporal)
    assert compiled.asymrnr.rewrites["sites_found"] == 9 and compiled.asymrnr.rewrites["sites_reduced"] == 6
    assert compiled.asymrnr.used_lengths[(0, 0)]["temporal_transformer_blocks.0.attn1"] == (2, 2)


@pytest.mark.parametrize("q,kv,mode", [(0.5, 0.3, "replace"), (0.3, 0.5, "mean")])
def test_latte_matches_reference_per_frame_and_per_position(q, kv, mode):
    model, inputs = tiny_latte(), latte_inputs()
    got = run(asymrnr_fx.compile(model, cheap(q_ratio=q, kv_ratio=kv, reduce_mode=mode, split="fixed")), inputs, 900.0)
    with reference_self_attention({LATTE_SPATIAL: (1, 4, 4), 4: (4, 1, 1)}, q, kv, mode=mode) as calls:
        want = run(model, inputs, 900.0)
    assert calls == [(1, 4, 4), (4, 1, 1)] * 2  # each block's self-attention, on its own grid
    assert (got - run(model, inputs, 900.0)).abs().max() > 1e-3
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_latte_ratio_zero_equals_baseline_and_generates_without_recompile():
    model, inputs = tiny_latte(), latte_inputs()
    for got, want in zip(generate(asymrnr_fx.compile(model, cheap(q_ratio=0.0, kv_ratio=0.0)), inputs), baseline(model, inputs)):
        assert torch.equal(got, want)
    torch._dynamo.reset()
    reduced = asymrnr_fx.compile(model, cheap(q_ratio=0.5, kv_ratio=0.5, matching_every=2))
    generate(reduced, inputs)
    rt = reduced.asymrnr
    assert rt.step == 3 and rt.stats["matchings"] == 2 * 4 * 2  # windows x (2 spatial + 2 temporal sites) x (q, v)
    assert rt.used_lengths[(3, 0)] == {
        **{f"transformer_blocks.{i}.attn1": (8, 8) for i in range(2)},
        **{f"temporal_transformer_blocks.{i}.attn1": (2, 2) for i in range(2)},
    }


LATTE_CACHES = [
    BlockCache(threshold=0.3, head_blocks=2, tail_blocks=2, full_last=0),  # spans whole (spatial, temporal) pairs
    SkipCache(interval=2, full_above=880.0, full_below=0.0, blocks=2),
]


@pytest.mark.parametrize("rule", LATTE_CACHES, ids=["block", "skip"])
@pytest.mark.parametrize("q,kv", [(0.0, 0.0), (0.5, 0.3)])
def test_latte_cache_skips_layer_pairs(rule, q, kv):
    model, inputs = tiny_latte(num_layers=3), latte_inputs()
    compiled = asymrnr_fx.compile(model, cheap(q_ratio=q, kv_ratio=kv, cache=rule))
    generate(compiled, inputs)
    rt = compiled.asymrnr
    assert rt.stats["cache_hits"] > 0 and rt.stats.get("cache_disabled", 0) == 0
    assert rt.cache_log[(0, 0)] == (6, 0) and (4, 2) in rt.cache_log.values()  # blocks 2, 3 skipped
    assert rt.state.skipped[2] == rt.state.skipped[3] > 0 and rt.state.skipped[1] == 0


@pytest.mark.parametrize("rule", [BlockCache(threshold=0.3, tail_blocks=1, full_last=0), SkipCache(interval=2, full_above=880.0, full_below=0.0)],
                         ids=["block", "skip"])
def test_latte_cache_defaults_round_the_span_to_whole_layers(rule):
    """One block at each end would start the span at block 1, a temporal block reading per-position
    sequences: the head and tail grow to whole (spatial, temporal) layers, as written out above."""
    model, inputs = tiny_latte(num_layers=3), latte_inputs()
    compiled = asymrnr_fx.compile(model, cheap(q_ratio=0.0, kv_ratio=0.0, cache=rule))
    generate(compiled, inputs)
    rt = compiled.asymrnr
    assert rt.stats["cache_hits"] > 0 and (4, 2) in rt.cache_log.values()  # blocks 2, 3 skipped
    assert rt.state.skipped[2] == rt.state.skipped[3] > 0 and rt.state.skipped[1] == rt.state.skipped[4] == 0


def test_latte_cache_with_no_whole_layer_to_skip_is_a_clear_error():
    rule = BlockCache(threshold=0.3, tail_blocks=1)  # [1, 3) grows to [2, 2)
    compiled = asymrnr_fx.compile(tiny_latte(num_layers=2), cheap(q_ratio=0.0, kv_ratio=0.0, cache=rule))
    with pytest.raises(Exception, match="leaves no whole layer to skip in latte"):
        run(compiled, latte_inputs(), 900.0)


def test_latte_symmetric_mode_reduces_per_frame_and_per_position_as_the_reference():
    """Spatial sequences (one per frame) and temporal ones (one per position) each share one
    matching over their batch of sequences, on their own grid."""
    model, inputs = tiny_latte(head_dim=12), latte_inputs()  # inner width 24: no token count (16, 4) equals it
    compiled = asymrnr_fx.compile(model, cheap(q_ratio=0.0, kv_ratio=0.0, h_ratio=0.5, split="fixed"))
    got = run(compiled, inputs, 900.0)
    rt = compiled.asymrnr
    assert rt.rewrites["sites_reduced"] == 4 and "sites_not_symmetric" not in rt.rewrites
    assert rt.used_lengths[(0, 0)]["transformer_blocks.0.attn1"] == (8, 8)
    assert rt.used_lengths[(0, 0)]["temporal_transformer_blocks.0.attn1"] == (2, 2)
    grids = {LATTE_SPATIAL: (1, 4, 4), 4: (4, 1, 1)}
    attns = [m for name, m in model.named_modules() if name.endswith("attn1")]
    refs = [RefSymmetric(m.processor, 0.5, grid_of=grids.__getitem__) for m in attns]
    for m, ref in zip(attns, refs):
        m.set_processor(ref)
    want = run(model, inputs, 900.0)
    assert [r.calls for r in refs] == [1] * 4
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_latte_symmetric_mode_keeps_sites_dense_where_a_token_count_equals_the_width():
    """tiny_latte: 16 spatial tokens and inner width 16: shape arguments could not be told apart,
    so its spatial sites stay dense with the reason; the temporal ones (4 tokens) are reduced."""
    compiled = asymrnr_fx.compile(tiny_latte(), cheap(q_ratio=0.0, kv_ratio=0.0, h_ratio=0.5))
    with pytest.warns(UserWarning, match="transformer_blocks.0.attn1 stays dense in symmetric mode: a token count"):
        run(compiled, latte_inputs(), 900.0)
    rt = compiled.asymrnr
    assert rt.rewrites["sites_not_symmetric"] == 2 and rt.rewrites["sites_reduced"] == 2
    assert set(rt.used_lengths[(0, 0)]) == {f"temporal_transformer_blocks.{i}.attn1" for i in range(2)}


@pytest.mark.inductor
def test_latte_inductor_end_to_end():
    model, inputs = tiny_latte(), latte_inputs()
    cfg = AsymRnRConfig(q_ratio=0.5, kv_ratio=0.3, matching_every=2)
    compiled = asymrnr_fx.compile(model, cfg)
    got = generate(compiled, inputs, STEPS[:3])
    torch._dynamo.reset()
    cheap_run = generate(asymrnr_fx.compile(tiny_latte(), cheap(q_ratio=0.5, kv_ratio=0.3, matching_every=2)), inputs, STEPS[:3])
    for g, w in zip(got, cheap_run):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
    assert compiled.asymrnr.rewrites["sites_reduced"] == 4 and compiled.asymrnr.stats["compiles"] >= 2  # spatial and temporal


# ---- Mochi and HunyuanVideo 1.5, unprepared -----------------------------------------------------
@pytest.fixture
def capture_dynamic_output_shapes():
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        yield


def test_unprepared_mochi_text_selection_keeps_its_sites_dense(capture_dynamic_output_shapes):
    """diffusers' processor: one graph only when nonzero is captured; the text length is then
    symbolic (u0 + 192), so the sites cannot be reduced."""
    (gm,) = dynamo_graphs(tiny_mochi(), mochi_inputs())
    found, _, n_blocks = sites.find_sites(gm, MOCHI, (3, 8, 8))
    assert n_blocks == 2 and [s.path for s in found] == ["time_embed.pooler", "transformer_blocks.0.attn1", "transformer_blocks.1.attn1"]
    assert found[0].reason == "not inside a transformer block"
    assert all("depends on the data" in s.reason for s in found[1:])


def test_unprepared_mochi_and_hunyuan15_fail_closed():
    """Dynamo breaks the graph inside forward() (Mochi's processor, HunyuanVideo 1.5's forward):
    the graph with the embeddings has no block, and the message says how to prepare the model."""
    for model, inputs in ((tiny_mochi(), mochi_inputs()), (tiny_hunyuan15(), hunyuan15_inputs())):
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="asymrnr", dynamic=False, options={"q_ratio": 0.5})
        with pytest.raises(Exception, match=r"asymrnr does not know this model.*asymrnr_fx.prepare\(model\)"):
            run(compiled, inputs, 900.0)
    torch._dynamo.reset()
    options = {"q_ratio": 0.5, "on_unsupported": "warn", "compiler": "aot_eager"}
    compiled = torch.compile(tiny_hunyuan15(), backend="asymrnr", dynamic=False, options=options)
    with pytest.warns(UserWarning, match="running this graph unreduced"):
        out = run(compiled, hunyuan15_inputs(), 900.0)
    torch.testing.assert_close(out, run(tiny_hunyuan15(), hunyuan15_inputs(), 900.0), rtol=1e-5, atol=1e-5)


def test_hunyuan15_block_graph_lacks_the_latent(capture_dynamic_output_shapes):
    """Unprepared, the blocks are traced after `if torch.all(image_embeds == 0)`: their graph's
    sites are found by the adapter, but its inputs hold neither the timestep nor the latent's grid."""
    graphs = dynamo_graphs(tiny_hunyuan15(), hunyuan15_inputs())
    blocks = [gm for gm in graphs if any(sites.is_sdpa(n) and "transformer_blocks" in sites.module_path(n) for n in gm.graph.nodes)]
    assert len(graphs) == 2 and len(blocks) == 1
    found, _, n_blocks = sites.find_sites(blocks[0], HUNYUAN_VIDEO15, (3, 8, 8))
    assert n_blocks == 2 and [s.block for s in found] == [0, 1]
    assert all("depends on the data" in s.reason for s in found)
    with pytest.raises(asymrnr_fx.models.UnsupportedModelError, match="no input 'timestep'"):
        sites.model_info(blocks[0], HUNYUAN_VIDEO15, [])


# ---- the calibrated ("magnitude") cache on these families -----------------------------------------
CALIBRATED = {
    "cogvideox15": (lambda: tiny_cogvideox15(num_layers=4), cogvideox15_inputs),
    "latte": (lambda: tiny_latte(num_layers=3), latte_inputs),  # the span rounds to whole layers
    "mochi": (lambda: tiny_mochi(num_layers=4), mochi_inputs),  # prepared by compile
    "hunyuan15": (lambda: tiny_hunyuan15(num_layers=4), hunyuan15_inputs),
}
CALIBRATION_STEPS = [900.0 - 5 * i for i in range(6)]


@pytest.mark.parametrize("name", CALIBRATED)
def test_magnitude_policy_calibrates_on_the_first_generation_then_skips(name):
    """The first generation runs dense and records one magnitude ratio per step; the next one
    skips where the accumulated ratio stays under the threshold, with no recompile."""
    build, make_inputs = CALIBRATED[name]
    cfg = cheap(q_ratio=0.5, kv_ratio=0.3, cache=BlockCache(policy="magnitude", threshold=0.5, full_last=0))
    compiled, inputs = asymrnr_fx.compile(build(), cfg), make_inputs()
    rt = compiled.asymrnr
    first = generate(compiled, inputs, CALIBRATION_STEPS)
    assert rt.stats.get("cache_hits", 0) == 0 and all(skipped == 0 for _, skipped in rt.cache_log.values())
    with torch.compiler.set_stance("fail_on_recompile"):
        again = [run(compiled, inputs, t) for t in CALIBRATION_STEPS]
    assert len(rt.cache_ratios()[0]) == len(CALIBRATION_STEPS) and rt.stats["cache_hits"] > 0
    assert any(skipped > 0 for _, skipped in rt.cache_log.values()) and rt.stats["matchings"] > 0
    assert (again[-1] - first[-1]).abs().max() > 1e-5  # cached steps reused the span
