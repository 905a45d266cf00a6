"""Feature caching across denoising steps: the configs and their decisions, pure torch.

The model's blocks are split into head [0, a), span [a, b) and tail [b, n). A *full* step runs
every block and stores, per residual stream, the span's residual R = S_b - S_a (S_i: the stream
entering block i). A *cached* step runs the head, skips the span and feeds the tail S_a + R. On
models with long skip branches (HunyuanDiT, Skip-DiT) a full step stores the deep feature S_b
itself and a cached step feeds it to the tail, which fuses it with the fresh shallow skips of
the head (Skip-DiT's Skip-Cache).

- `BlockCache` (training-free, adaptive): head = the first block(s). The signal is the head's
  residual r = S_a - S_0 on the visual stream; the relative L1 change of r against its value at
  the last full step decides (policy "first_block", as diffusers FirstBlockCache / ParaAttention
  FBCache), or that change accumulated over the cached steps since the last full one, in the
  spirit of TeaCache / EasyCache (policy "accumulated").
- `BlockCache(policy="magnitude")` (training-free, calibrated, in the spirit of MagCache): no
  signal, so no head block is needed (span from block 0). One dense generation records, per
  step, the mean ratio of the visual residual's token norms to the previous step's; later
  generations accumulate the product of these ratios since the last full step and reuse the span
  while the summed distance of that product from 1 stays under the threshold.
- `BlockCache(policy="spectral")` (training-free, in the spirit of SeaCache): no head block; the
  signal is the visual stream entering the span, filtered over its (F, H, W) token grid by
  SeaCache's spectral-evolution-aware gain at the step's noise level; its relative L1 change
  step to step, accumulated since the last full step, decides as "accumulated" does. A cached
  step extrapolates the residual linearly from the last two full steps (`extrapolate`, default
  on for this policy, as SeaCache's residual_order 1).
- `SkipCache` (Skip-DiT's Skip-Cache rule, training-free residual form for models without long
  skips): head and tail of `blocks` blocks each; full steps while t >= full_above, once
  t <= full_below, and every `interval`-th step between.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch

from .errors import ConfigError, reject_unknown

BLOCK_POLICIES = ("first_block", "accumulated", "magnitude", "spectral")
SIGNAL_POLICIES = ("first_block", "accumulated")  # policies that read the head's residual


def _check_int(owner: str, name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{owner}.{name} must be an int >= {low}, got {value!r}.")


def _check_number(owner: str, name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ConfigError(f"{owner}.{name} must be a number, got {value!r}.")


@dataclass(frozen=True)
class BlockCache:
    """Adaptive block caching. threshold: the policy's change under which the span is reused;
    head_blocks / tail_blocks: blocks always computed at each end (head default: 1 for the
    signal policies, 0 for "magnitude"); full_first / full_last: steps always computed in full at
    the start / end (the end is known from the pipeline's step count, `callback_on_step_end` or
    `runtime.num_steps`); max_cached: most consecutive cached steps (0: no limit); ratios
    ("magnitude" only): the step-to-step magnitude ratios of a calibration (one per step,
    `runtime.cache_ratios()`); empty: the first generation runs dense and calibrates. power
    ("spectral" only): the exponent of SeaCache's clean-signal power prior (3 for video);
    extrapolate: cached steps reuse the residual extrapolated linearly from the last two full
    steps (default: on for "spectral", off for the others)."""

    threshold: float = 0.08
    policy: str = "first_block"
    head_blocks: int | None = None
    tail_blocks: int = 0
    full_first: int = 1
    full_last: int = 1
    max_cached: int = 0
    ratios: tuple[float, ...] = ()
    power: float = 3.0
    extrapolate: bool | None = None

    def __post_init__(self) -> None:
        _check_number("BlockCache", "threshold", self.threshold)
        _check_number("BlockCache", "power", self.power)
        if self.power <= 0:
            raise ConfigError(f"BlockCache.power must be > 0, got {self.power!r}. Use e.g. 3.0 (video).")
        if self.extrapolate is not None and not isinstance(self.extrapolate, bool):
            raise ConfigError(f"BlockCache.extrapolate must be True, False or None, got {self.extrapolate!r}.")
        if self.threshold <= 0:
            raise ConfigError(f"BlockCache.threshold must be > 0, got {self.threshold!r}. Use e.g. 0.08.")
        if self.policy not in BLOCK_POLICIES:
            raise ConfigError(f"BlockCache.policy must be one of {BLOCK_POLICIES}, got {self.policy!r}.")
        if self.head_blocks is not None:
            _check_int("BlockCache", "head_blocks", self.head_blocks, 1 if self.needs_signal else 0)
        for name in ("tail_blocks", "full_first", "full_last", "max_cached"):
            _check_int("BlockCache", name, getattr(self, name), 0)
        object.__setattr__(self, "ratios", _check_ratios(self.ratios, self.policy))

    @property
    def needs_signal(self) -> bool:
        return self.policy in SIGNAL_POLICIES

    @property
    def extrapolates(self) -> bool:
        return self.extrapolate if self.extrapolate is not None else self.policy == "spectral"

    @property
    def head(self) -> int:
        return self.head_blocks if self.head_blocks is not None else int(self.needs_signal)

    def span(self, num_blocks: int) -> tuple[int, int]:
        return _span(self, self.head, num_blocks - self.tail_blocks, num_blocks)


def _check_ratios(ratios: Any, policy: str) -> tuple[float, ...]:
    if not isinstance(ratios, (tuple, list)) or not all(
        isinstance(r, (int, float)) and not isinstance(r, bool) and math.isfinite(r) and r > 0 for r in ratios
    ):
        raise ConfigError(f"BlockCache.ratios must be positive finite numbers (one per step), got {ratios!r}.")
    if ratios and policy != "magnitude":
        raise ConfigError(f"BlockCache.ratios is read by policy='magnitude' only, got policy={policy!r}.")
    return tuple(float(r) for r in ratios)


@dataclass(frozen=True)
class SkipCache:
    """Skip-Cache (Skip-DiT release rule "N{interval}-{full_above}-{full_below}", default N2-700-50):
    `blocks` blocks computed at each end on cached steps."""

    interval: int = 2
    full_above: float = 700.0
    full_below: float = 50.0
    blocks: int = 1

    def __post_init__(self) -> None:
        _check_int("SkipCache", "interval", self.interval, 1)
        _check_int("SkipCache", "blocks", self.blocks, 1)
        _check_number("SkipCache", "full_above", self.full_above)
        _check_number("SkipCache", "full_below", self.full_below)
        if self.full_below >= self.full_above:
            raise ConfigError(
                f"SkipCache.full_below ({self.full_below}) must be below full_above ({self.full_above}): "
                "no step could be cached."
            )

    def span(self, num_blocks: int) -> tuple[int, int]:
        return _span(self, self.blocks, num_blocks - self.blocks, num_blocks)


CacheConfig = BlockCache | SkipCache


def _span(cfg: CacheConfig, a: int, b: int, num_blocks: int) -> tuple[int, int]:
    if not 0 <= a < b <= num_blocks:
        raise ConfigError(
            f"{cfg} leaves no block to skip in a model of {num_blocks} blocks (span [{a}, {b})). "
            "Compute fewer blocks at the ends."
        )
    return a, b


@dataclass
class SpanState:
    """One context's cache within one generation. stored: per span output, its residual R (or,
    on models with long skips, the output itself: the deep feature); signal: the
    head's residual at the last full step; previous: at the previous step; changed: the change
    accumulated since the last full step; cached: consecutive cached steps; since_full: steps
    since the last full one; ratio: the product of magnitude ratios since it ("magnitude");
    older: what the full step before the last stored (for extrapolation), with both steps."""

    stored: list[torch.Tensor] | None = None
    older: list[torch.Tensor] | None = None
    full_steps: tuple[int, int] = (-1, -1)  # (the full step before the last, the last full step)
    signal: torch.Tensor | None = None
    previous: torch.Tensor | None = None
    changed: float = 0.0
    cached: int = 0
    since_full: int = 0
    ratio: float = 1.0


def relative_l1(x: torch.Tensor, ref: torch.Tensor) -> float:
    """mean|x - ref| / mean|ref| (float32), the change measure of FirstBlockCache."""
    x, ref = x.float(), ref.float()
    return float((x - ref).abs().mean() / ref.abs().mean().clamp_min(1e-12))


def forced_full(cfg: CacheConfig, state: SpanState, step: int, num_steps: int | None) -> bool:
    """Steps that must run in full whatever the signal says."""
    if state.stored is None:
        return True
    if isinstance(cfg, SkipCache):
        return False
    late = num_steps is not None and step >= num_steps - cfg.full_last
    return step < cfg.full_first or late or (cfg.max_cached > 0 and state.cached >= cfg.max_cached)


def skip_cache_decides(cfg: SkipCache, state: SpanState, t: float | None) -> bool:
    """True to reuse the span at timestep t: between the two bands, all but every interval-th step."""
    if t is None or t >= cfg.full_above or t <= cfg.full_below:
        return False
    return state.since_full % cfg.interval != 0


def block_cache_change(cfg: BlockCache, state: SpanState, signal: torch.Tensor) -> float:
    """The change the policy compares with its threshold, given the head's residual `signal`:
    against the last full step ("first_block"), or step to step summed since it ("accumulated")."""
    if cfg.policy == "first_block":
        return relative_l1(signal, state.signal)
    return state.changed + relative_l1(signal, state.previous)  # "accumulated", "spectral"


def sea_filter(x: torch.Tensor, sigma: float, power: float) -> torch.Tensor:
    """SeaCache's spectral-evolution-aware indicator (paper 2602.18993, Eq. 7): x (B, F, H, W, C)
    filtered over (F, H, W) by the per-axis Wiener gain of a clean signal with power
    1 / |f|^power in noise of level sigma, the gain normalised to unit mean. float32."""
    sigma = min(max(sigma, 1e-6), 1.0 - 1e-6)
    signal, noise = 1.0 - sigma, sigma
    gain = torch.ones((), device=x.device)
    for axis in (1, 2, 3):
        prior = 1.0 / (torch.fft.fftfreq(x.shape[axis], device=x.device).abs().pow(power) + 1e-16)
        axis_gain = signal * prior / (signal**2 * prior + noise**2 + 1e-16)
        gain = gain * axis_gain.reshape([-1 if d == axis else 1 for d in range(x.dim())])
    gain = gain / gain.mean()
    return torch.fft.ifftn(torch.fft.fftn(x.float(), dim=(1, 2, 3)) * gain, dim=(1, 2, 3)).real


def extrapolated(state: SpanState, step: int) -> list[torch.Tensor]:
    """The stored tensors moved on linearly to `step` from the last two full steps (as they are
    when only one full step was seen)."""
    (s0, s1), newest, older = state.full_steps, state.stored, state.older
    if older is None or s1 <= s0:
        return list(newest)
    k = (step - s1) / (s1 - s0)
    return [r1 + (r1 - r0) * k for r1, r0 in zip(newest, older)]


def magnitude_change(state: SpanState, ratio: float) -> tuple[float, float]:
    """("magnitude") the change since the last full step and the accumulated ratio, given this
    step's calibrated magnitude ratio: the product of ratios estimates how far the residual has
    drifted from the cached one, and each step adds its distance from 1 (MagCache's error)."""
    accumulated = state.ratio * ratio
    return state.changed + abs(1.0 - accumulated), accumulated


def token_norms(residual: torch.Tensor) -> torch.Tensor:
    """(B, N, C) residual -> (B, N) float32 norms of its token vectors."""
    return torch.linalg.vector_norm(residual.float(), dim=-1)


def norm_ratio(current: torch.Tensor, previous: torch.Tensor) -> float:
    """One step's magnitude ratio, the mean over tokens of |r_t| / |r_t-1| (MagCache's measure)."""
    return float((current / (previous + 1e-8)).mean())


def ratio_at(ratios: tuple[float, ...], step: int, num_steps: int | None) -> float:
    """The calibrated ratio of `step` in a generation of `num_steps`. A calibration of another
    length is resampled: its log-magnitude curve, over the generation's progress in [0, 1], is
    interpolated linearly at this step and the previous one."""
    n = len(ratios)
    if step == 0 or n < 2:
        return 1.0
    if num_steps is None or num_steps == n or num_steps < 2:
        return ratios[min(step, n - 1)]
    curve = torch.tensor(ratios, dtype=torch.float64).log().cumsum(0)

    def at(u: float) -> float:
        x = min(max(u, 0.0), 1.0) * (n - 1)
        i = min(int(x), n - 2)
        return float(curve[i] + (x - i) * (curve[i + 1] - curve[i]))

    return math.exp(at(step / (num_steps - 1)) - at((step - 1) / (num_steps - 1)))


def record_full(state: SpanState, stored: list[torch.Tensor], signal: torch.Tensor | None, step: int = 0,
                keep_older: bool = False) -> None:
    state.older = state.stored if keep_older else None
    state.full_steps = (state.full_steps[1], step)
    state.stored, state.signal, state.previous = stored, signal, signal
    state.changed, state.cached, state.since_full, state.ratio = 0.0, 0, 1, 1.0


def record_cached(state: SpanState, signal: torch.Tensor | None, change: float, ratio: float = 1.0) -> None:
    state.previous, state.changed, state.ratio = signal, change, ratio
    state.cached += 1
    state.since_full += 1


CACHE_KINDS: dict[str, type] = {"block": BlockCache, "skip": SkipCache}


def cache_from_options(opts: dict[str, Any]) -> CacheConfig | None:
    """Pop the cache keys of torch.compile `options=`: "cache" ("block", "skip", a config or None)
    and "cache_<field>" for the chosen config's fields, e.g. {"cache": "block", "cache_threshold": 0.1}."""
    kind = opts.pop("cache", None)
    fields = {k[len("cache_"):]: opts.pop(k) for k in [k for k in opts if k.startswith("cache_")]}
    if kind is None or isinstance(kind, (BlockCache, SkipCache)):
        if fields:
            raise ConfigError(f"options {sorted('cache_' + f for f in fields)} need options['cache'] = 'block' or 'skip'.")
        return kind
    if kind not in CACHE_KINDS:
        raise ConfigError(f"options['cache'] must be one of {sorted(CACHE_KINDS)} or a BlockCache / SkipCache, got {kind!r}.")
    cls = CACHE_KINDS[kind]
    reject_unknown(fields, [f.name for f in dataclasses.fields(cls)], prefix="cache_", where=f" for cache={kind!r}")
    return cls(**fields)


def check_cache(value: Any) -> None:
    if value is not None and not isinstance(value, (BlockCache, SkipCache)):
        raise ConfigError(
            f"cache must be asymrnr_fx.BlockCache(...), asymrnr_fx.SkipCache(...) or None, got {value!r}."
        )
