"""Schedules: the published tier files read with the published semantics, and applied exactly."""

from __future__ import annotations

import pytest
import torch
import yaml
from conftest import REFERENCE, cogvideox_inputs, run, tiny_cogvideox
from safetensors.torch import load_file

import asymrnr_fx
from asymrnr_fx import AsymRnRConfig, Schedule, ScheduleError
from asymrnr_fx.schedule import tiers_to_ratios

needs_reference = pytest.mark.skipif(not REFERENCE.exists(), reason="shared/reference not beside the repo")


def published_ratio(tier: int, entries: dict) -> float:
    """The rule in the release's README, written out: largest ratio whose threshold <= tier."""
    hits = [r for t, r in entries.items() if t <= tier]
    return max(hits) if hits else 0.0


def test_tiers_to_ratios_takes_largest_ratio_whose_threshold_is_reached():
    tiers = torch.tensor([[5, 6, 7, 8, 9]])
    got = tiers_to_ratios(tiers, {6: 0.4, 7: 0.8})
    assert got.tolist() == [[0.0, 0.4, 0.8, 0.8, 0.8]]
    # not monotone in the threshold: the largest *ratio* wins, as published
    assert tiers_to_ratios(tiers, {6: 0.5, 8: 0.2}).tolist() == [[0.0, 0.5, 0.5, 0.5, 0.5]]


@needs_reference
@pytest.mark.parametrize("variant", ["0", "1"])
def test_published_cogvideox_schedule_is_read_exactly(variant):
    sched = Schedule.from_published(
        REFERENCE / "euclidean_cogvideox-2b_cache5.safetensors", REFERENCE / f"cogvideox-2b_cache5_{variant}.yaml"
    )
    tiers = load_file(str(REFERENCE / "euclidean_cogvideox-2b_cache5.safetensors"))
    entries = yaml.safe_load((REFERENCE / f"cogvideox-2b_cache5_{variant}.yaml").read_text())
    assert sched.shape == (30, 50)
    for b in range(30):
        for s in range(50):
            assert sched.ratio("q", b, s) == published_ratio(int(tiers["q"][b, s]), entries["q"])
            assert sched.ratio("kv", b, s) == published_ratio(int(tiers["v"][b, s]), entries["v"])
    assert sched.ratio("h", 0, 0) == 0.0


@needs_reference
def test_published_schedule_applies_exact_lengths_on_a_30_block_model():
    """A tiny 30-block CogVideoX over 50 steps: every site and step uses the published ratio."""
    sched = Schedule.from_published(
        REFERENCE / "euclidean_cogvideox-2b_cache5.safetensors", REFERENCE / "cogvideox-2b_cache5_0.yaml"
    )
    model, inputs = tiny_cogvideox(num_layers=30, heads=1), cogvideox_inputs()
    compiled = asymrnr_fx.compile(model, AsymRnRConfig(schedule=sched, matching_every=5, compiler="aot_eager"))
    for step in range(50):
        run(compiled, inputs, 999.0 - 20 * step)
    rt = compiled.asymrnr
    n_visual, n_dst = 192, 2 * 4 * 4
    for step in range(50):
        used = rt.used_lengths[(step, 0)]
        assert used == rt.reduced_lengths(step)
        for b in range(30):
            q, kv = sched.ratio("q", b, step), sched.ratio("kv", b, step)
            want_q = max(n_dst, int(n_visual * (1 - q))) if q else n_visual
            want_kv = max(n_dst, int(n_visual * (1 - kv))) if kv else n_visual
            assert used[f"transformer_blocks.{b}.attn1"] == (want_q, want_kv), (step, b)
    distinct = {v for d in rt.used_lengths.values() for v in d.values()}
    assert len(distinct) >= 3
    # matchings: once per window, per site and feature actually reduced in that window
    assert rt.stats["matchings"] <= 10 * 30 * 2


@needs_reference
def test_published_file_with_unknown_feature_is_rejected(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("z:\n  3: 0.5\n")
    with pytest.raises(ScheduleError, match="unknown feature 'z'"):
        Schedule.from_published(REFERENCE / "euclidean_cogvideox-2b_cache5.safetensors", bad)


def test_invalid_tables_are_clear_errors():
    with pytest.raises(ScheduleError, match=r"schedule\['q'\] must be a ratio in \[0, 1\)"):
        Schedule(q=torch.full((2, 3), 1.2))
    with pytest.raises(ScheduleError, match="disagree in shape"):
        Schedule(q=torch.zeros(2, 3), kv=torch.zeros(3, 3))
    with pytest.raises(ScheduleError, match="either h"):
        Schedule(q=0.5, h=0.5)


def test_hunyuan_blocks_are_numbered_double_then_single():
    """As in the published 60 x 30 table: 20 double-stream blocks, then 40 single-stream ones."""
    torch.manual_seed(0)
    from diffusers import HunyuanVideoTransformer3DModel

    model = HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
        num_single_layers=3, num_refiner_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=16,
        pooled_projection_dim=8, rope_axes_dim=(4, 6, 6),
    ).eval()
    from conftest import hunyuan_inputs

    ratios = torch.tensor([[0.1], [0.2], [0.3], [0.4], [0.5]])
    compiled = asymrnr_fx.compile(model, AsymRnRConfig(schedule=Schedule(q=ratios), compiler="aot_eager"))
    run(compiled, hunyuan_inputs(), 900.0)
    used = compiled.asymrnr.used_lengths[(0, 0)]
    paths = ["transformer_blocks.0.attn", "transformer_blocks.1.attn"] + [f"single_transformer_blocks.{i}.attn" for i in range(3)]
    assert [used[p][0] for p in paths] == [int(192 * (1 - r)) for r in (0.1, 0.2, 0.3, 0.4, 0.5)]
    torch._dynamo.reset()
    wrong = asymrnr_fx.compile(model, AsymRnRConfig(schedule=Schedule(q=ratios[:4]), compiler="aot_eager"))
    with pytest.raises(Exception, match="has 5 attention blocks"):
        run(wrong, hunyuan_inputs(), 900.0)
