"""Quality harness: metrics against hand-computed values, monotonicity, and the floor helpers."""

from __future__ import annotations

import math

import pytest
import torch

from asymrnr_fx import quality

FRAMES = (8, 3, 16, 16)


def _frames(seed: int) -> torch.Tensor:
    """Smooth-ish frames in [-1, 1] so SSIM has structure to compare."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand((8, 3, 4, 4), generator=g) * 2 - 1
    return torch.nn.functional.interpolate(coarse, size=(16, 16), mode="bilinear", align_corners=False)


def _noisy(frames: torch.Tensor, sigma: float, seed: int = 1) -> torch.Tensor:
    noise = torch.randn(frames.shape, generator=torch.Generator().manual_seed(seed))
    return (frames + sigma * noise).clamp(-1, 1)


def test_psnr_identical_is_inf() -> None:
    x = _frames(0)
    assert quality.psnr(x, x.clone()) == math.inf


def test_psnr_matches_hand_value() -> None:
    # [-1, 1] 0.0 vs 0.2 -> [0, 1] 0.5 vs 0.6: MSE 0.01, PSNR = 10 log10(1 / 0.01) = 20 dB.
    ref, cand = torch.zeros(FRAMES), torch.full(FRAMES, 0.2)
    assert quality.psnr(cand, ref) == pytest.approx(20.0, abs=1e-4)


def test_psnr_finite_and_drops_with_noise() -> None:
    x = _frames(0)
    values = [quality.psnr(_noisy(x, s), x) for s in (0.01, 0.05, 0.2)]
    assert all(math.isfinite(v) for v in values)
    assert values[0] > values[1] > values[2] > 5.0


def test_ssim_range_and_monotone() -> None:
    x = _frames(0)
    assert quality.ssim(x, x.clone()) == pytest.approx(1.0, abs=1e-6)
    values = [quality.ssim(_noisy(x, s), x) for s in (0.01, 0.1, 0.5)]
    assert all(-1.0 <= v < 1.0 for v in values)
    assert values[0] > values[1] > values[2]
    assert quality.ssim(_frames(1), x) < 0.5  # unrelated content


def test_relative_l2_hand_example() -> None:
    ref = torch.tensor([3.0, 4.0])  # ||ref|| = 5
    assert quality.relative_l2(torch.tensor([3.0, 5.0]), ref) == pytest.approx(0.2)
    assert quality.relative_l2(ref.clone(), ref) == 0.0
    assert quality.relative_l2(-ref, ref) == pytest.approx(2.0)


def test_mismatch_and_zero_reference_raise() -> None:
    with pytest.raises(ValueError, match="Shape mismatch"):
        quality.psnr(torch.zeros(FRAMES), torch.zeros(4, 3, 16, 16))
    with pytest.raises(ValueError, match="zero norm"):
        quality.relative_l2(torch.ones(3), torch.zeros(3))


def test_mean_metrics_is_arithmetic_mean() -> None:
    m = quality.mean_metrics([quality.Metrics(20.0, 0.8, 0.1), quality.Metrics(30.0, 1.0, 0.3)])
    assert m == quality.Metrics(25.0, 0.9, pytest.approx(0.2))


def _seeded(prompt: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A real deterministic 'generator': output depends only on (prompt, seed)."""
    latents = _frames(seed * 31 + len(prompt))[None]
    return latents[0].clamp(-1, 1), latents


def _perturbed(prompt: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    latents = _seeded(prompt, seed)[1] + 0.05
    return latents[0].clamp(-1, 1), latents


def _unseeded(prompt: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    latents = torch.rand((1, *FRAMES)) * 2 - 1  # ignores the seed: nondeterministic
    return latents[0], latents


PROMPTS = ("red circle moving right", "blue square static")


def test_noise_floor_of_identical_generator_is_exact() -> None:
    report = quality.noise_floor(_seeded, prompts=PROMPTS, seed=3)
    assert set(report.per_prompt) == set(PROMPTS)
    assert report.mean == quality.Metrics(math.inf, 1.0, 0.0)
    assert quality.is_deterministic(_seeded, PROMPTS, seed=3)


def test_noise_floor_against_other_generator_is_finite() -> None:
    report = quality.noise_floor(_seeded, _perturbed, prompts=PROMPTS, seed=3)
    for name, m in report.per_prompt.items():
        latents = _seeded(name, 3)[1]
        expected = 0.05 * math.sqrt(latents.numel()) / float(latents.norm())
        assert m.rel_l2 == pytest.approx(expected, rel=1e-5)
        assert 20.0 < m.psnr < math.inf
    assert "mean" in report.table()


def test_nondeterministic_generator_is_detected() -> None:
    assert not quality.is_deterministic(_unseeded, PROMPTS)
    assert quality.evaluate(_unseeded, _unseeded, PROMPTS).mean.psnr < 15.0


def test_compare_sets_requires_all_reference_prompts() -> None:
    ref = quality.collect(_seeded, PROMPTS)
    with pytest.raises(KeyError, match="lacks prompts"):
        quality.compare_sets({PROMPTS[0]: ref[PROMPTS[0]]}, ref)


# --- on the shipped fixture: the floors the backend's results are read against -----------------

FLOOR_PROMPTS = ("red circle moving right", "blue square static")


def test_fixture_dense_eager_is_bitwise_deterministic() -> None:
    from asymrnr_fx.models import fixture

    gen = fixture.load().generator(steps=6)
    assert quality.is_deterministic(gen, FLOOR_PROMPTS, seed=0)
    assert quality.noise_floor(gen, prompts=FLOOR_PROMPTS).mean == quality.Metrics(math.inf, 1.0, 0.0)


def test_fixture_numeric_floor_against_float64_is_small_but_nonzero() -> None:
    from asymrnr_fx.models import fixture

    fp32, fp64 = fixture.load(), fixture.load(dtype=torch.float64)
    report = quality.noise_floor(fp32.generator(steps=6), fp64.generator(steps=6), prompts=FLOOR_PROMPTS)
    for m in report.per_prompt.values():
        assert 0.0 < m.rel_l2 < 1e-4 and 80.0 < m.psnr < math.inf and m.ssim > 0.999
