"""Wan 2.1 / 2.2, SkyReels-V2, LTX-Video and Allegro, built tiny from their configs (no weights):
the attention sites and their classification, the reduction against the independent eager
reference of test_reference, ratio 0 against the aot_eager baseline, short generations with no
recompile and the block cache, all with the cheap inner compiler; Inductor end to end for Wan
and LTX-Video; a tiny Wan 2.2 A14B pipeline (two transformers, one runtime each)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from diffusers import (
    AllegroTransformer3DModel,
    FluxTransformer2DModel,
    LTXVideoTransformer3DModel,
    SkyReelsV2Transformer3DModel,
    WanTransformer3DModel,
)
from diffusers.models.embeddings import get_3d_rotary_pos_embed_allegro
from test_reference import reference_self_attention
from test_symmetric import RefSymmetric

import asymrnr_fx
from asymrnr_fx import AsymRnRConfig, BlockCache

GRID = (3, 8, 8)  # (frames, height, width) after patching, in every tiny family here
N_VISUAL = 3 * 8 * 8
CROSS = "attention module 'attn2' is not self-attention over video"


def cheap(**kw) -> AsymRnRConfig:
    return AsymRnRConfig(compiler="aot_eager", **kw)


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ---- tiny models and their inputs (everything but the timestep) --------------------------------
def tiny_wan(num_layers: int = 2, seed: int = 0, **config) -> WanTransformer3DModel:
    torch.manual_seed(seed)
    base = {"patch_size": (1, 2, 2), "num_attention_heads": 2, "attention_head_dim": 12, "in_channels": 4,
            "out_channels": 4, "text_dim": 16, "freq_dim": 32, "ffn_dim": 32, "rope_max_seq_len": 32}
    return WanTransformer3DModel(**{**base, **config}, num_layers=num_layers).eval()


def wan_inputs(channels: int = 4, n_text: int = 5, seed: int = 1) -> dict:
    """Latent (B, C, F, H, W) = (1, C, 3, 16, 16): 3 x 8 x 8 tokens after the (1, 2, 2) patches."""
    return {"hidden_states": _randn(1, channels, 3, 16, 16, seed=seed),
            "encoder_hidden_states": _randn(1, n_text, 16, seed=seed + 1)}


def tiny_wan_i2v(num_layers: int = 2, seed: int = 0) -> WanTransformer3DModel:
    return tiny_wan(num_layers, seed, image_dim=8, added_kv_proj_dim=24)


def wan_i2v_inputs(seed: int = 1) -> dict:
    """Wan I2V: the image tokens (4 here, 257 released) precede the text in the cross-attention
    context; the attention processor takes the last 512 tokens as text (hard-coded)."""
    return {**wan_inputs(n_text=512, seed=seed), "encoder_hidden_states_image": _randn(1, 4, 8, seed=seed + 2)}


def tiny_wan22_5b(num_layers: int = 2, seed: int = 0) -> WanTransformer3DModel:
    """The Wan 2.2 TI2V-5B config variant: 48 latent channels (its 16x16 VAE)."""
    return tiny_wan(num_layers, seed, in_channels=48, out_channels=48)


def tiny_skyreels(num_layers: int = 2, seed: int = 0) -> SkyReelsV2Transformer3DModel:
    torch.manual_seed(seed)
    return SkyReelsV2Transformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=32, ffn_dim=32, num_layers=num_layers, rope_max_seq_len=32,
    ).eval()


def skyreels_inputs(seed: int = 1) -> dict:
    return {**wan_inputs(seed=seed), "enable_diffusion_forcing": True}


def tiny_ltx(num_layers: int = 2, seed: int = 0) -> LTXVideoTransformer3DModel:
    torch.manual_seed(seed)
    return LTXVideoTransformer3DModel(
        in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=12,
        cross_attention_dim=24, num_layers=num_layers, caption_channels=16,
    ).eval()


def ltx_inputs(seed: int = 1) -> dict:
    """Packed latent (B, N, C) = (1, 3 * 8 * 8, 8) plus the grid as ints, as LTXPipeline passes
    them; the last text token is padding."""
    mask = torch.ones(1, 5)
    mask[:, -1] = 0
    return {"hidden_states": _randn(1, N_VISUAL, 8, seed=seed), "encoder_hidden_states": _randn(1, 5, 16, seed=seed + 1),
            "encoder_attention_mask": mask, "num_frames": 3, "height": 8, "width": 8,
            "rope_interpolation_scale": (8 / 25, 32, 32)}


def tiny_allegro(num_layers: int = 2, seed: int = 0) -> AllegroTransformer3DModel:
    torch.manual_seed(seed)
    return AllegroTransformer3DModel(
        num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4, num_layers=num_layers,
        cross_attention_dim=24, caption_channels=24, sample_height=8, sample_width=8, sample_frames=3,
    ).eval()


def allegro_rope() -> tuple:
    """The RoPE input that AllegroPipeline builds: per-axis tables and (3, 1, N) positions."""
    *freqs, t, h, w = get_3d_rotary_pos_embed_allegro(12, ((0, 0), (8, 8)), (8, 8), 3, (2.2, 2.0, 2.0))
    pos = torch.cartesian_prod(t.long(), h.long(), w.long()).T.reshape(3, 1, -1).contiguous()
    return tuple(freqs), tuple(pos)


def allegro_inputs(seed: int = 1) -> dict:
    mask = torch.ones(1, 5)
    mask[:, -1] = 0
    return {"hidden_states": _randn(1, 4, 3, 16, 16, seed=seed), "encoder_hidden_states": _randn(1, 5, 24, seed=seed + 1),
            "encoder_attention_mask": mask, "image_rotary_emb": allegro_rope()}


# ---- the families, as data --------------------------------------------------------------------
def _per_sample(t: float, inputs: dict) -> torch.Tensor:
    return torch.full((inputs["hidden_states"].shape[0],), t)


def _per_token(t: float, inputs: dict) -> torch.Tensor:
    """Wan 2.2 TI2V (WanPipeline expand_timesteps): one timestep per token, (B, N)."""
    return torch.full((inputs["hidden_states"].shape[0], N_VISUAL), t)


def _conditioned_first_frame(t: float, inputs: dict) -> torch.Tensor:
    """LTX-Video image-to-video (LTXImageToVideoPipeline): t * (1 - conditioning mask) per token,
    (B, N), the first frame's tokens clean (timestep 0), the others at t."""
    per_token = torch.full((inputs["hidden_states"].shape[0], N_VISUAL), t)
    per_token[:, : N_VISUAL // 3] = 0.0
    return per_token


def _per_frame(t: float, inputs: dict) -> torch.Tensor:
    """SkyReels-V2 diffusion forcing: later frames noisier, (B, F) with several values."""
    return torch.tensor([[t, t + 25.0, t + 50.0]]).expand(inputs["hidden_states"].shape[0], -1)


@dataclass(frozen=True)
class Family:
    name: str
    build: Callable[..., torch.nn.Module]  # build(num_layers=..., seed=...)
    inputs: Callable[[], dict]
    timestep: Callable[[float, dict], torch.Tensor]
    cross_per_block: int  # attention calls per block that are not reducible (all cross-attention)


FAMILIES = [
    Family("wan21_t2v", tiny_wan, wan_inputs, _per_sample, 1),
    Family("wan21_i2v", tiny_wan_i2v, wan_i2v_inputs, _per_sample, 2),  # image and text context
    Family("wan22_ti2v_5b", tiny_wan22_5b, lambda: wan_inputs(channels=48), _per_token, 1),
    Family("skyreels_v2_df", tiny_skyreels, skyreels_inputs, _per_frame, 1),
    Family("ltx_video", tiny_ltx, ltx_inputs, _per_sample, 1),
    Family("ltx_video_i2v", tiny_ltx, ltx_inputs, _conditioned_first_frame, 1),
    Family("allegro", tiny_allegro, allegro_inputs, _per_sample, 1),
]
BY_NAME = {f.name: f for f in FAMILIES}
ADAPTER_FAMILY = {"wan21_t2v": "wan", "wan21_i2v": "wan", "wan22_ti2v_5b": "wan", "skyreels_v2_df": "skyreels_v2",
                  "ltx_video": "ltx_video", "ltx_video_i2v": "ltx_video", "allegro": "allegro"}
each_family = pytest.mark.parametrize("fam", FAMILIES, ids=[f.name for f in FAMILIES])


def call(model, fam: Family, inputs: dict, t: float) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, timestep=fam.timestep(t, inputs), return_dict=False)[0]


def generate(model, fam: Family, inputs: dict, timesteps) -> list[torch.Tensor]:
    return [call(model, fam, inputs, t) for t in timesteps]


# ---- sites and classification ----------------------------------------------------------------
@each_family
def test_sites_found_and_classified(fam):
    compiled = asymrnr_fx.compile(fam.build(num_layers=2), cheap(q_ratio=0.5, kv_ratio=0.3))
    call(compiled, fam, fam.inputs(), 900.0)
    rt = compiled.asymrnr
    info = rt.info
    assert info.adapter.family == ADAPTER_FAMILY[fam.name] and info.grid == GRID and info.num_blocks == 2
    reducible = [s for s in info.sites if s.reducible]
    others = [s for s in info.sites if not s.reducible]
    assert [s.path.rsplit(".", 1)[-1] for s in reducible] == ["attn1", "attn1"]
    assert [s.block for s in reducible] == [0, 1]
    assert all(s.layout.n_text == 0 and s.layout.n_visual == N_VISUAL for s in reducible)
    assert len(others) == 2 * fam.cross_per_block
    assert {s.reason for s in others} == {CROSS} and all(s.path.endswith(".attn2") for s in others)
    assert rt.rewrites["sites_found"] == 2 + 2 * fam.cross_per_block
    assert rt.rewrites["sites_reducible"] == rt.rewrites["sites_reduced"] == 2


def test_wan_i2v_image_context_is_a_second_cross_attention():
    """The image tokens get their own SDPA inside attn2 (keys: 4 image tokens), never reduced."""
    compiled = asymrnr_fx.compile(tiny_wan_i2v(), cheap(q_ratio=0.5, kv_ratio=0.3))
    call(compiled, BY_NAME["wan21_i2v"], wan_i2v_inputs(), 900.0)
    reasons = [s.reason for s in compiled.asymrnr.info.sites if s.block == 0 and not s.reducible]
    assert reasons == [CROSS, CROSS]
    assert compiled.asymrnr.used_lengths[(0, 0)] == {f"blocks.{i}.attn1": (96, 134) for i in range(2)}


# ---- numerics ---------------------------------------------------------------------------------
@each_family
@pytest.mark.parametrize("q,kv,mode", [(0.5, 0.3, "replace"), (0.4, 0.6, "mean")])
def test_reduction_matches_the_eager_reference(fam, q, kv, mode):
    model, inputs = fam.build(num_layers=2), fam.inputs()
    cfg = cheap(q_ratio=q, kv_ratio=kv, reduce_mode=mode, split="fixed")
    got = call(asymrnr_fx.compile(model, cfg), fam, inputs, 900.0)
    with reference_self_attention({N_VISUAL: GRID}, q, kv, mode=mode) as calls:
        want = call(model, fam, inputs, 900.0)
    assert len(calls) == 2  # the reference ran at both self-attentions, and only there
    dense = call(model, fam, inputs, 900.0)
    assert (got - dense).abs().max() > 1e-3  # the reduction changed the output...
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)  # ...exactly as the reference


@each_family
def test_ratio_zero_equals_the_aot_eager_baseline(fam):
    model, inputs = fam.build(num_layers=2), fam.inputs()
    compiled = asymrnr_fx.compile(model, cheap(q_ratio=0.0, kv_ratio=0.0))
    baseline = torch.compile(model, backend="aot_eager")
    assert torch.equal(call(compiled, fam, inputs, 900.0), call(baseline, fam, inputs, 900.0))
    rt = compiled.asymrnr
    assert rt.stats["dense_graphs"] == 1 and rt.rewrites["nodes_inserted"] == 0 and rt.stats["matchings"] == 0


# ---- generations: step tracking, no recompile, caching ---------------------------------------
STEPS = (900.0, 860.0, 820.0, 780.0)


@each_family
def test_generation_tracks_steps_without_recompiles(fam):
    model, inputs = fam.build(num_layers=2), fam.inputs()
    compiled = asymrnr_fx.compile(model, cheap(q_ratio=0.5, kv_ratio=0.3, matching_every=2))
    rt = compiled.asymrnr
    first = call(compiled, fam, inputs, STEPS[0])
    with torch.compiler.set_stance("fail_on_recompile"):
        generate(compiled, fam, inputs, STEPS[1:])
        assert rt.step == 3 and sorted(rt.used_lengths) == [(i, 0) for i in range(4)]
        again = generate(compiled, fam, inputs, STEPS)  # the timestep went back up: a new generation
    assert rt.stats["generations"] == 2 and rt.step == 3
    assert rt.stats["matchings"] == 2 * (2 * 2 * 2)  # generations x windows x sites x (q, v)
    torch.testing.assert_close(again[0], first, rtol=0, atol=0)


def _cached_generation(fam: Family, cfg: AsymRnRConfig, timesteps) -> tuple[list[torch.Tensor], object]:
    compiled = asymrnr_fx.compile(fam.build(num_layers=4), cfg)
    generate(compiled, fam, fam.inputs(), timesteps)
    with torch.compiler.set_stance("fail_on_recompile"):
        outs = generate(compiled, fam, fam.inputs(), timesteps)
    return outs, compiled.asymrnr


CACHE_STEPS = tuple(900.0 - 5 * i for i in range(6))


@each_family
@pytest.mark.parametrize("q,kv", [(0.0, 0.0), (0.5, 0.3)])
def test_block_cache_skips_blocks_without_recompiles(fam, q, kv):
    cfg = cheap(q_ratio=q, kv_ratio=kv, matching_every=2, cache=BlockCache(threshold=0.5))
    outs, rt = _cached_generation(fam, cfg, CACHE_STEPS)
    log = rt.cache_log  # this generation's (step, context) -> (blocks run, blocks skipped)
    assert sorted(log) == [(i, 0) for i in range(len(CACHE_STEPS))] and log[(0, 0)] == (4, 0)
    assert all(run + skipped == 4 for run, skipped in log.values())
    assert sum(skipped > 0 for _, skipped in log.values()) >= 2 and rt.stats["cache_hits"] >= 4
    assert (rt.stats["matchings"] > 0) == (q > 0)
    dense = generate(torch.compile(fam.build(num_layers=4), backend="aot_eager"), fam, fam.inputs(), CACHE_STEPS)
    assert (outs[-1] - dense[-1]).abs().max() > 1e-5  # cached steps really reused the span


@each_family
def test_magnitude_policy_calibrates_on_the_first_generation_then_skips(fam):
    """The calibrated policy: the first generation runs dense and measures one magnitude ratio
    per step; the next ones skip where the accumulated ratio stays under the threshold."""
    cfg = cheap(q_ratio=0.5, kv_ratio=0.3, cache=BlockCache(policy="magnitude", threshold=0.5, full_last=0))
    compiled = asymrnr_fx.compile(fam.build(num_layers=4), cfg)
    rt = compiled.asymrnr
    first = generate(compiled, fam, fam.inputs(), CACHE_STEPS)
    assert rt.stats.get("cache_hits", 0) == 0 and all(skipped == 0 for _, skipped in rt.cache_log.values())
    with torch.compiler.set_stance("fail_on_recompile"):
        again = generate(compiled, fam, fam.inputs(), CACHE_STEPS)
    assert len(rt.cache_ratios()[0]) == len(CACHE_STEPS) and rt.stats["cache_hits"] > 0
    assert any(skipped > 0 for _, skipped in rt.cache_log.values())
    assert (again[-1] - first[-1]).abs().max() > 1e-5  # cached steps reused the span


# ---- unsupported models -----------------------------------------------------------------------
def test_unsupported_model_error_names_every_family():
    torch.manual_seed(0)
    flux = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
                                  num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                                  axes_dims_rope=(4, 4, 8)).eval()
    inputs = {"hidden_states": _randn(1, 16, 4, seed=1), "encoder_hidden_states": _randn(1, 8, 32, seed=2),
              "pooled_projections": _randn(1, 32, seed=3), "timestep": torch.tensor([0.9]),
              "img_ids": torch.zeros(16, 3), "txt_ids": torch.zeros(8, 3), "return_dict": False}
    with pytest.raises(Exception, match="asymrnr does not know this model") as err:
        asymrnr_fx.compile(flux, cheap(q_ratio=0.5, kv_ratio=0.3))(**inputs)
    for family in ("allegro", "cogvideox", "hunyuan_video", "ltx_video", "skyreels_v2", "wan"):
        assert f"'{family}'" in str(err.value)
    assert "FluxTransformerBlock" in str(err.value)


def test_ltx_without_a_coordinate_grid_is_a_clear_error():
    """video_coords instead of num_frames / height / width (LTXConditionPipeline): fail closed."""
    inputs = {k: v for k, v in ltx_inputs().items() if k not in ("num_frames", "height", "width")}
    f, h, w = torch.meshgrid(torch.arange(3.0), torch.arange(8.0), torch.arange(8.0), indexing="ij")
    inputs["video_coords"] = torch.stack([f, h, w]).flatten(1)[None]
    with pytest.raises(Exception, match="ltx_video: no RoPE coordinate grid.*Pass num_frames, height and width"):
        call(asymrnr_fx.compile(tiny_ltx(), cheap()), BY_NAME["ltx_video"], inputs, 900.0)


# ---- Wan 2.2 A14B: two experts in one pipeline ------------------------------------------------
def test_wan22_two_experts_track_the_pipeline_steps_across_the_switch():
    """WanPipeline runs `transformer` for t >= boundary and `transformer_2` below, naming each
    call (cond / uncond, step_index): each compiled expert has its own runtime, and the low-noise
    one starts at the pipeline's step, not at its own first call."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    high = asymrnr_fx.compile(tiny_wan(seed=0), cheap(q_ratio=0.5, kv_ratio=0.3))
    low = asymrnr_fx.compile(tiny_wan(seed=1), cheap(q_ratio=0.5, kv_ratio=0.3))
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                       transformer=high, transformer_2=low, boundary_ratio=0.875)
    seen = []

    def record(_, i, t, kwargs):
        seen.append({name: sorted(k for k in m.asymrnr.used_lengths if k[0] == i) for name, m in (("high", high), ("low", low))})
        return kwargs

    emb, neg = _randn(1, 5, 16, seed=1), _randn(1, 5, 16, seed=2)
    pipe(prompt_embeds=emb, negative_prompt_embeds=neg, height=128, width=128, num_frames=9, num_inference_steps=4,
         guidance_scale=5.0, output_type="latent", callback_on_step_end=record, generator=torch.Generator().manual_seed(0))
    both = [(0, "cond"), (0, "uncond")]
    assert seen[0] == {"high": both, "low": []}  # t = 1000: the high-noise expert
    for i in (1, 2, 3):  # t = 858, 602, 9: the low-noise expert, at the pipeline's steps
        assert seen[i] == {"high": [], "low": [(i, "cond"), (i, "uncond")]}
    assert high.asymrnr.stats["calls"] == 2 and low.asymrnr.stats["calls"] == 6
    assert high.asymrnr.stats["resets"] == low.asymrnr.stats["resets"] == 1  # the pipeline ended both generations


# ---- Inductor end to end ----------------------------------------------------------------------
@pytest.mark.inductor
@pytest.mark.parametrize("name", ["wan21_t2v", "ltx_video", "skyreels_v2_df", "allegro"])
def test_inductor_reduced_generation_matches_the_cheap_path(name):
    fam = BY_NAME[name]
    cfg = {"q_ratio": 0.5, "kv_ratio": 0.3, "matching_every": 2}
    inputs, steps = fam.inputs(), STEPS[:3]
    fast = asymrnr_fx.compile(fam.build(num_layers=1), AsymRnRConfig(**cfg))
    got = generate(fast, fam, inputs, steps)
    torch._dynamo.reset()
    want = generate(asymrnr_fx.compile(fam.build(num_layers=1), cheap(**cfg)), fam, inputs, steps)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
    dense = call(fam.build(num_layers=1), fam, inputs, steps[0])
    assert (got[0] - dense).abs().max() > 1e-3  # the reduction really ran
    rt = fast.asymrnr
    # the uncut graph: the first call matches inside it, the next ones reuse
    assert rt.rewrites["sites_reduced"] == 1 and rt.stats["compiles"] == 2 and rt.stats["segments"] == 1


# ---- symmetric mode -----------------------------------------------------------------------------
def _rows(rope: tuple, rows: list[int]) -> tuple:
    return tuple(t[:, rows] for t in rope)


# How each family hands its RoPE to the self-attention processor, and its kept-token version,
# written out per family (the rewrite finds the token axis itself): Wan / SkyReels-V2 (cos, sin)
# (1, N, 1, D); LTX-Video (cos, sin) (B, N, D); Allegro (per-axis tables, positions (1, N) each).
ROPE_OF = {
    "wan": ("rotary_emb", _rows), "skyreels_v2": ("rotary_emb", _rows), "ltx_video": ("image_rotary_emb", _rows),
    "allegro": ("image_rotary_emb", lambda rope, rows: (rope[0], _rows(rope[1], rows))),
}


def _self_attentions(model) -> list:
    return [m for name, m in model.named_modules() if name.endswith(".attn1")]


@each_family
@pytest.mark.parametrize("mode", ["replace", "mean"])
def test_symmetric_mode_follows_each_rope_layout_and_matches_the_reference(fam, mode):
    """Hidden state reduced before the projections: the RoPE tables are gathered along their own
    token axis ((1, N, 1, D), (B, N, D), positions (1, N)); replace mode against the family's
    processor on the kept tokens, mean mode closer to dense than a larger ratio."""
    model, inputs = fam.build(num_layers=2), fam.inputs()
    dense = call(model, fam, inputs, 900.0)
    compiled = asymrnr_fx.compile(model, cheap(q_ratio=0.0, kv_ratio=0.0, h_ratio=0.5, split="fixed", reduce_mode=mode))
    got = call(compiled, fam, inputs, 900.0)
    rt = compiled.asymrnr
    assert rt.rewrites["sites_reduced"] == 2 and "sites_not_symmetric" not in rt.rewrites
    assert rt.stats["matchings"] == 2 and (got - dense).abs().max() > 1e-3
    assert rt.used_lengths[(0, 0)] == {s: (N_VISUAL // 2, N_VISUAL // 2) for s in rt.active_sites}
    if mode == "replace":
        refs = [RefSymmetric(m.processor, 0.5, *ROPE_OF[ADAPTER_FAMILY[fam.name]]) for m in _self_attentions(model)]
        for m, ref in zip(_self_attentions(model), refs):
            m.set_processor(ref)
        want = call(model, fam, inputs, 900.0)
        assert [r.calls for r in refs] == [1, 1]
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    else:
        torch._dynamo.reset()
        small = asymrnr_fx.compile(model, cheap(q_ratio=0.0, kv_ratio=0.0, h_ratio=0.1, split="fixed", reduce_mode=mode))
        assert (call(small, fam, inputs, 900.0) - dense).abs().max() < (got - dense).abs().max()


def test_symmetric_mode_fails_closed_when_a_token_count_equals_a_feature_size():
    """Head dim 192 = the 192 video tokens: Wan's (1, N, 1, D) table has two axes of a token count,
    and so would the shape arguments: the rewrite cannot tell them apart, so the site stays dense
    and says why."""
    model, fam = tiny_wan(attention_head_dim=N_VISUAL), BY_NAME["wan21_t2v"]
    inputs = wan_inputs()
    compiled = asymrnr_fx.compile(model, cheap(q_ratio=0.0, kv_ratio=0.0, h_ratio=0.3))
    with pytest.warns(UserWarning, match="stays dense in symmetric mode: a token count equals a feature size"):
        got = call(compiled, fam, inputs, 900.0)
    rt = compiled.asymrnr
    assert rt.rewrites["sites_not_symmetric"] == 2 and rt.rewrites["sites_rewritten"] == 0
    torch.testing.assert_close(got, call(torch.compile(model, backend="aot_eager"), fam, inputs, 900.0))


def test_diffusion_forcing_steps_follow_the_mean_timestep_when_the_first_frame_is_clean():
    """Asynchronous diffusion forcing (SkyReels-V2 ar_step > 0): frame 0 reaches t = 0 and stays
    there while later frames keep denoising; steps must go on (a first-element rule stalls and
    restarts the generation at every call)."""
    model, inputs = tiny_skyreels(), skyreels_inputs()
    compiled = asymrnr_fx.compile(model, cheap(q_ratio=0.5, kv_ratio=0.3))
    rt = compiled.asymrnr
    frames = [[0.0, 400.0 - 100 * i, 800.0 - 100 * i] for i in range(4)]
    with torch.no_grad():
        for ts in frames:
            compiled(**inputs, timestep=torch.tensor([ts]), return_dict=False)
    assert rt.step == 3 and rt.stats["generations"] == 1
