"""Quality harness: how far an accelerated generation is from the dense one with the same seed.

Metrics (candidate vs reference, same prompt and seed):

* PSNR and SSIM of the decoded frames, each frame treated as an RGB image in [0, 1] (frames in
  [-1, 1] are mapped by ``(x + 1) / 2``). Both come from ``torchmetrics.functional.image``;
  SSIM uses its defaults (Gaussian kernel 11, sigma 1.5). Identical frames give PSNR ``inf``.
* Relative L2 of the final latents, ``||candidate - reference|| / ||reference||``.

A *generator* is any ``(prompt, seed) -> (frames, latents)`` callable, e.g.
``fixture.generator(transformer=compiled)`` from :mod:`asymrnr_fx.models.fixture`.
:func:`noise_floor` gives the baseline every accelerated result should be read against: a dense
eager model compared with itself (must be identical) or with another exact implementation of
itself, e.g. the same transformer compiled by Inductor (the floor of numeric noise).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

Generator = Callable[[str, int], tuple[torch.Tensor, torch.Tensor]]
Samples = Mapping[str, tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Metrics:
    """``psnr`` in dB (``inf`` when identical), ``ssim`` in [-1, 1], ``rel_l2`` >= 0."""

    psnr: float
    ssim: float
    rel_l2: float


@dataclass(frozen=True)
class Report:
    """Per-prompt metrics and their arithmetic mean (a single identical prompt makes PSNR ``inf``)."""

    per_prompt: dict[str, Metrics]
    mean: Metrics

    def table(self) -> str:
        """Plain-text table, one row per prompt plus the mean."""
        rows = [*self.per_prompt.items(), ("mean", self.mean)]
        width = max(len(name) for name, _ in rows)
        lines = [f"{'prompt':<{width}}  {'PSNR dB':>8}  {'SSIM':>6}  {'rel L2':>9}"]
        lines += [f"{n:<{width}}  {m.psnr:>8.2f}  {m.ssim:>6.4f}  {m.rel_l2:>9.2e}" for n, m in rows]
        return "\n".join(lines)


def to_unit(frames: torch.Tensor) -> torch.Tensor:
    """``(frames, 3, H, W)`` in [-1, 1] -> float32 images in [0, 1] (clamped)."""
    return ((frames.float() + 1) / 2).clamp(0, 1)


def _check_pair(candidate: torch.Tensor, reference: torch.Tensor) -> None:
    if candidate.shape != reference.shape:
        raise ValueError(
            f"Shape mismatch: candidate {tuple(candidate.shape)} vs reference {tuple(reference.shape)}."
        )


def psnr(candidate: torch.Tensor, reference: torch.Tensor) -> float:
    """PSNR in dB of frames ``(frames, 3, H, W)`` in [-1, 1]; ``inf`` when identical."""
    _check_pair(candidate, reference)
    a, b = to_unit(candidate), to_unit(reference)
    return float(peak_signal_noise_ratio(a, b, data_range=1.0))


def ssim(candidate: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean SSIM over frames ``(frames, 3, H, W)`` in [-1, 1]; 1.0 when identical."""
    _check_pair(candidate, reference)
    a, b = to_unit(candidate), to_unit(reference)
    return float(structural_similarity_index_measure(a, b, data_range=1.0))


def relative_l2(candidate: torch.Tensor, reference: torch.Tensor) -> float:
    """``||candidate - reference||_2 / ||reference||_2`` over all elements (float64)."""
    _check_pair(candidate, reference)
    ref = reference.double()
    norm = ref.norm()
    if norm == 0:
        raise ValueError("relative_l2: reference has zero norm; relative error is undefined.")
    return float((candidate.double() - ref).norm() / norm)


def compare(
    candidate: tuple[torch.Tensor, torch.Tensor], reference: tuple[torch.Tensor, torch.Tensor]
) -> Metrics:
    """Metrics between two ``(frames, latents)`` pairs generated from the same prompt and seed."""
    (frames_c, latents_c), (frames_r, latents_r) = candidate, reference
    return Metrics(psnr(frames_c, frames_r), ssim(frames_c, frames_r), relative_l2(latents_c, latents_r))


def collect(
    generator: Generator, prompts: Iterable[str], seed: int = 0
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Run ``generator`` once per prompt with the same ``seed``; keep ``(frames, latents)`` on CPU."""
    out = {}
    for prompt in prompts:
        frames, latents = generator(prompt, seed)
        out[prompt] = (frames.detach().cpu(), latents.detach().cpu())
    return out


def mean_metrics(metrics: Iterable[Metrics]) -> Metrics:
    """Arithmetic mean of each field (``inf`` PSNR propagates)."""
    items = list(metrics)
    if not items:
        raise ValueError("mean_metrics: no metrics to average; pass at least one prompt.")
    fields = zip(*((m.psnr, m.ssim, m.rel_l2) for m in items), strict=True)
    return Metrics(*(math.fsum(f) / len(items) for f in fields))


def compare_sets(candidate: Samples, reference: Samples) -> Report:
    """Report over the prompts of ``reference`` (``candidate`` must hold all of them)."""
    missing = set(reference) - set(candidate)
    if missing:
        raise KeyError(f"compare_sets: candidate lacks prompts {sorted(missing)}.")
    per_prompt = {p: compare(candidate[p], reference[p]) for p in reference}
    return Report(per_prompt, mean_metrics(per_prompt.values()))


def evaluate(candidate: Generator, reference: Generator, prompts: Iterable[str], seed: int = 0) -> Report:
    """Generate every prompt with both generators (same seed) and compare."""
    prompts = list(prompts)
    return compare_sets(collect(candidate, prompts, seed), collect(reference, prompts, seed))


def noise_floor(
    reference: Generator, other: Generator | None = None, prompts: Iterable[str] = (), seed: int = 0
) -> Report:
    """Baseline report. ``other=None``: ``reference`` run twice, which must be identical (PSNR inf,
    rel L2 0; anything else means the dense path is nondeterministic). Otherwise ``reference`` vs
    ``other``, an exact re-implementation (e.g. Inductor), measuring pure numeric noise."""
    return evaluate(other if other is not None else reference, reference, prompts, seed)


def is_deterministic(generator: Generator, prompts: Iterable[str], seed: int = 0) -> bool:
    """True when two runs of ``generator`` give bitwise-identical frames and latents for every prompt."""
    prompts = list(prompts)
    first, second = collect(generator, prompts, seed), collect(generator, prompts, seed)
    return all(
        torch.equal(first[p][0], second[p][0]) and torch.equal(first[p][1], second[p][1]) for p in prompts
    )
