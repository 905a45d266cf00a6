"""Step state of one compiled model: step index, call context, cached matchings and plans.

Everything here is invisible to Dynamo's guards (the runner reads it at call time), so a
schedule that changes ratios every step causes no recompiles. One runtime per compiled model,
shared by all of its Dynamo graphs.

Step tracking: with `auto_step`, each call reads the timestep input. A higher timestep than the
last call's starts a new generation (step 0); a lower one is the next step; an equal one is
another call of the same step (classifier-free guidance as two calls), which gets its own
context and so its own matchings. Explicitly: `set_step`, `callback_on_step_end` (diffusers
pipelines), `context(name)` and `reset()`.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from . import tokens
from .config import AsymRnRConfig
from .schedule import Schedule


@dataclass
class _Cached:
    window: int
    matching: tokens.Matching
    plans: dict[tuple[int, str, tokens.Layout], tokens.Plan] = field(default_factory=dict)


class AsymRnRRuntime:
    """Per-model state. `stats` counts matchings, plans, compilations and calls."""

    def __init__(self, config: AsymRnRConfig) -> None:
        self.config = config
        self.schedule: Schedule = config.effective_schedule()
        self.stats: Counter = Counter()
        self.compile_seconds = 0.0
        self.rewrites: Counter = Counter()  # what the graph passes changed
        self.compiled: dict[tuple, Any] = {}  # (segment structure, variant, strides) -> callable
        self.used_lengths: dict[tuple[int, Any], dict[str, tuple[int, int]]] = {}
        self.info: Any = None
        self.active_sites: set[str] = set()  # sites with a reducing segment (others stay dense)
        self.symmetric_points: dict[str, Any] = {}  # symmetric mode: each site's rewrite points
        self._reduced_sites: set[str] = set()
        self.lock = threading.RLock()  # one call at a time: step state is shared
        self.reset()

    # ---- step tracking -------------------------------------------------------------------
    def reset(self) -> None:
        """Start a new generation: step 0, no cached matchings, automatic tracking on."""
        self.step = 0
        self._manual = False
        self._last_t: float | None = None
        self._call_in_step = 0
        self._context: str | None = None
        self._cache: dict[tuple[Any, int], _Cached] = {}
        self.stats["resets"] += 1

    def set_step(self, step: int) -> None:
        """Use `step` for the following calls; turns automatic tracking off until reset()."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}.")
        self._manual = True
        self.step = step
        self._call_in_step = -1  # the next call is the step's first

    def callback_on_step_end(self, pipe: Any, step: int, timestep: Any, callback_kwargs: dict) -> dict:
        """diffusers `callback_on_step_end=` hook: the next call is step `step + 1`."""
        self.set_step(step + 1)
        return callback_kwargs

    @contextlib.contextmanager
    def context(self, name: str) -> Iterator[None]:
        """Calls inside use matchings of their own (e.g. "cond" / "uncond")."""
        previous, self._context = self._context, name
        try:
            yield
        finally:
            self._context = previous

    def begin_call(self, timestep: torch.Tensor | float | None) -> None:
        self.stats["calls"] += 1
        if self._manual or not self.config.auto_step or timestep is None:
            self._call_in_step = self._call_in_step + 1 if self._manual else 0
            return
        t = float(timestep.reshape(-1)[0]) if isinstance(timestep, torch.Tensor) else float(timestep)
        if self._last_t is None or t > self._last_t:
            if self._last_t is not None:
                self.reset()
            self.step, self._call_in_step = 0, 0
        elif t < self._last_t:
            self.step, self._call_in_step = self.step + 1, 0
        else:
            self._call_in_step += 1
        self._last_t = t

    @property
    def context_key(self) -> Any:
        return self._context if self._context is not None else self._call_in_step

    @property
    def window(self) -> int:
        return self.step // self.config.matching_every

    # ---- binding and introspection ---------------------------------------------------------
    def bind(self, info: Any) -> None:
        """Attach the analysed model (sites, grid, block count); checks the schedule fits it."""
        self.schedule.check_blocks(info.num_blocks, info.adapter.family)
        self.info = info
        self.rewrites["sites_found"] = len(info.sites)
        self.rewrites["sites_reducible"] = sum(s.reducible for s in info.sites)

    def record(self, site: Any, n_q: int, n_kv: int) -> None:
        self.used_lengths.setdefault((self.step, self.context_key), {})[site.path] = (n_q, n_kv)
        if min(n_q, n_kv) < site.layout.n_visual:
            self._reduced_sites.add(site.path)
            self.rewrites["sites_reduced"] = len(self._reduced_sites)

    def reduced_lengths(self, step: int) -> dict[str, tuple[int, int]]:
        """Visual tokens kept (queries, keys/values) at every reducible site at `step`; a site the
        current mode cannot reduce (see `active_sites`) keeps all of them."""
        from .backend import site_lengths

        if self.info is None:
            raise LookupError("the runtime is not bound to a model yet: call the compiled model once.")
        n_dst = tokens.count_windows(self.info.grid, self.config.dst_stride)
        saved, self.step = self.step, step
        try:
            return {
                s.path: site_lengths(self, s, n_dst)
                if s.path in self.active_sites
                else (s.layout.n_visual, s.layout.n_visual)
                for s in self.info.sites
                if s.reducible
            }
        finally:
            self.step = saved

    # ---- ratios and plans ------------------------------------------------------------------
    def ratios(self, block: int) -> tuple[float, float, float]:
        s = self.schedule
        return tuple(s.ratio(f, block, self.step) for f in ("q", "kv", "h"))

    def _split(self, site: int, grid: tokens.Grid) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(self.config.seed * 1_000_003 + site * 10_007 + self.window)
        fixed = self.config.split == "fixed"
        return tokens.window_split(grid, self.config.dst_stride, generator=gen, fixed=fixed)

    def matching(
        self, site: int, feature: str, features: Callable[[], torch.Tensor], layout: tokens.Layout, grid: tokens.Grid
    ) -> _Cached:
        """The site's matching on `feature` for this window and context, computed once per window
        from `features()` (B, H, N, D), which is not called when the cached matching is reused."""
        key = (self.context_key, site, feature)
        cached = self._cache.get(key)
        if cached is None or cached.window != self.window:
            with torch.no_grad():
                vis = features().narrow(2, layout.visual_offset, layout.n_visual)
                dst, src = self._split(site, grid)
                m = tokens.match_sources(
                    vis, dst, src, metric=self.config.distance, max_elements=self.config.max_match_elements
                )
            cached = self._cache[key] = _Cached(self.window, m)
            self.stats["matchings"] += 1
        return cached

    def plan(self, cached: _Cached, n_keep: int, layout: tokens.Layout) -> tokens.Plan:
        key = (n_keep, self.config.reduce_mode, layout)
        if key not in cached.plans:
            with torch.no_grad():
                cached.plans[key] = tokens.make_plan(cached.matching, n_keep, layout, self.config.reduce_mode)
            self.stats["plans"] += 1
        return cached.plans[key]


# id(parameter) -> (weak reference to it, runtime). Keyed by id: tensors compare elementwise, so
# they cannot be dictionary keys compared by value (as WeakKeyDictionary would).
_RUNTIMES: dict[int, tuple[weakref.ref, AsymRnRRuntime]] = {}


def register_runtime(anchor: torch.Tensor, runtime: AsymRnRRuntime) -> None:
    """Remember the runtime of the model that owns parameter `anchor`."""
    key = id(anchor)
    _RUNTIMES[key] = (weakref.ref(anchor, lambda _: _RUNTIMES.pop(key, None)), runtime)


def runtime_for_anchor(anchor: torch.Tensor) -> AsymRnRRuntime | None:
    ref, runtime = _RUNTIMES.get(id(anchor), (None, None))
    return runtime if ref is not None and ref() is anchor else None


def runtime_of(model: torch.nn.Module) -> AsymRnRRuntime:
    """The runtime of a model compiled with backend="asymrnr" (after its first call)."""
    inner = getattr(model, "_orig_mod", model)
    for p in inner.parameters():
        if (rt := runtime_for_anchor(p)) is not None:
            return rt
    raise LookupError(
        "this model has no asymrnr runtime yet: compile it with backend='asymrnr' and call it once, "
        "or create one with asymrnr_fx.compile(model, config)."
    )
