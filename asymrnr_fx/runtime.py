"""Step state of one compiled model: generation, step, call context, cached matchings and the
block cache's state.

Everything here is invisible to Dynamo's guards (the runner reads it at call time), so a
schedule that changes ratios every step causes no recompiles. One runtime per compiled model,
shared by all of its Dynamo graphs.

Where a call stands, from the strongest signal to the weakest:
1. The diffusers pipeline's `transformer.cache_context(name, step_index=...)` (received by a
   stateful hook that `asymrnr_fx.compile` registers): `name` is the call's context; a
   `step_index` is the step, and one not above the context's last starts a new generation.
2. `callback_on_step_end` / `set_step(i)`: the next call is step i. A callback at the pipeline's
   last step (`pipe.num_timesteps`) ends the generation.
3. The timestep input: higher than the previous call's starts a new generation, lower is the
   next step, equal is another call of the same step (classifier-free guidance as two calls).
Also a new generation: the latent's shape, dtype or device differs from the previous call's, a
named context calls twice at one step, or `reset()`. Calls without a name get the context of
their position in the step (0, 1, ...). State is one generation deep and holds at most
`MAX_CONTEXTS` contexts.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from . import cache, tokens
from .config import AsymRnRConfig
from .schedule import Schedule

# (features (B, H, N, D), dst, src, layout) -> (nearest, order) of the matching of its visual tokens
Matcher = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, tokens.Layout], tuple[torch.Tensor, torch.Tensor]]

MAX_CONTEXTS = 8  # e.g. cond, uncond, cond_uncond and a few positional ones: bounded by construction


@dataclass
class _Cached:
    window: int
    matching: tokens.Matching
    plans: dict[tuple[int, str, tokens.Layout], tokens.Plan] = field(default_factory=dict)


@dataclass
class ContextState:
    """One call context's state within one generation."""

    last_step: int = -1
    matchings: dict[tuple[int, str], _Cached] = field(default_factory=dict)
    skipped: Counter = field(default_factory=Counter)  # block -> steps the block cache skipped it
    cache: Any = None  # the block cache's state (asymrnr_fx.cache.SpanState)


def _context_memory(ctx: ContextState) -> dict[str, int]:
    cached = ctx.cache
    tensors = [*(cached.stored or []), *(cached.older or []), cached.signal, cached.previous] if cached is not None else []
    unique = {id(t): t for t in tensors if t is not None}  # signal and previous may be one tensor
    return {
        "matchings": len(ctx.matchings),
        "plans": sum(len(c.plans) for c in ctx.matchings.values()),
        "cache_elements": sum(t.numel() for t in unique.values()),
    }


def _timestep_value(timestep: Any) -> float | None:
    """The call's timestep as one number: the mean of a tensor of several (per sample, per frame in
    diffusion forcing, per token in image-to-video conditioning). A first element would stall
    where the first frame is clean (t = 0) while the others still denoise."""
    if timestep is None:
        return None
    if isinstance(timestep, torch.Tensor):
        return float(timestep.reshape(-1)[0]) if timestep.numel() == 1 else float(timestep.float().mean())
    return float(timestep)


def _check_step(step: Any) -> int:
    if isinstance(step, bool) or not isinstance(step, int):
        raise TypeError(f"step must be an int, got {step!r} ({type(step).__name__}). Use e.g. set_step(3).")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}.")
    return step


class AsymRnRRuntime:
    """Per-model state. `stats` counts matchings, plans, compilations, calls and cache decisions."""

    def __init__(self, config: AsymRnRConfig) -> None:
        self.config = config
        self.reduction = config.reduction
        self.schedule: Schedule = config.effective_schedule()
        self.stats: Counter = Counter()
        self.compile_seconds = 0.0
        self.rewrites: Counter = Counter()  # what the graph passes changed
        self.compiled: dict[tuple, Any] = {}  # (segment structure, variant, strides) -> callable
        # (key, build, inputs) -> callable for a key not in `compiled` (None: Inductor or the
        # configured inner compiler); `asymrnr_fx.export` records programs through it, and a
        # loaded package refuses to compile through it
        self.segment_compiler: Callable[[tuple, Callable, list], Any] | None = None
        self.compute_all = False  # exporting: every cached span computes, so every variant is seen
        self.info: Any = None
        self.active_sites: set[str] = set()  # sites with a reducing segment (others stay dense)
        self.symmetric_points: dict[str, Any] = {}  # symmetric mode: each site's rewrite points
        self._reduced_sites: set[str] = set()
        self.lock = threading.RLock()  # one call at a time: step state is shared
        self._pipeline: Any = None  # the diffusers CacheContext of the current call, if any
        self._context: str | None = None  # explicit `context(name)`
        self.step = 0
        self.timestep: float | None = None  # the current call's
        self.num_steps: int | None = None  # the generation's length, when a pipeline or the user says it
        self._last_t: float | None = None
        self._signature: Any = None
        self._key: Any = 0  # the current call's context (see `context_key`)
        self._calibrating: dict[Any, tuple[torch.Tensor, dict[int, float]]] = {}  # context -> (norms, step -> ratio)
        self._ratios: dict[Any, tuple[float, ...]] = {}  # a finished calibration, per context
        self._new_generation()

    # ---- generations ---------------------------------------------------------------------
    def _new_generation(self) -> None:
        self._finish_calibration()
        self.step, self._call_in_step, self._hold, self._ended = 0, -1, False, False
        self._last_t, self._signature = None, None
        self._contexts: OrderedDict[Any, ContextState] = OrderedDict()
        self._splits: dict[int, tuple[tuple, tuple[torch.Tensor, torch.Tensor]]] = {}  # see `window_split`
        self.used_lengths: dict[tuple[int, Any], dict[str, tuple[int, int]]] = {}
        self._lengths: dict[str, tuple[int, int]] = {}  # this call's entry of `used_lengths` (see `record`)
        self._state: ContextState | None = None  # this call's context state (see `state`)
        self.cache_log: dict[tuple[int, Any], tuple[int, int]] = {}  # (step, context) -> (run, skipped)
        self.stats["generations"] += 1

    def reset(self) -> None:
        """Start a new generation: step 0, no cached matchings or block caches."""
        self._new_generation()
        self.stats["resets"] += 1

    def set_step(self, step: int) -> None:
        """The next call is step `step`; tracking then goes on from there."""
        self.step, self._hold, self._call_in_step = _check_step(step), True, -1

    def callback_on_step_end(self, pipe: Any, step: int, timestep: Any, callback_kwargs: dict) -> dict:
        """diffusers `callback_on_step_end=`: the next call is step `step + 1`, or, after the
        pipeline's last step, the first of a new generation."""
        if _check_step(step) != self.step:
            self.stats["step_corrections"] += 1  # the calls of this step were counted as another step
        total = getattr(pipe, "num_timesteps", None)
        self.num_steps = total if isinstance(total, int) else self.num_steps
        if isinstance(total, int) and step + 1 >= total:
            self._ended = True
        else:
            self.set_step(step + 1)
        return callback_kwargs

    @contextlib.contextmanager
    def context(self, name: str) -> Iterator[None]:
        """Calls inside use state of their own (e.g. "cond" / "uncond")."""
        if not isinstance(name, str):
            raise TypeError(f"context name must be a str, got {name!r}. Use e.g. context('uncond').")
        previous, self._context = self._context, name
        try:
            yield
        finally:
            self._context = previous

    def set_pipeline_context(self, context: Any) -> None:
        """Receives diffusers' `cache_context(...)` (a CacheContext, or None when it closes)."""
        self._pipeline = context

    # ---- step tracking -------------------------------------------------------------------
    def _call_name(self) -> str | None:
        return self._pipeline.name if self._pipeline is not None else self._context

    def _locate(self, t: float | None, name: str | None) -> tuple[bool, int]:
        """(does this call start a new generation, its step)."""
        given = getattr(self._pipeline, "step_index", None)
        last = self._contexts[name].last_step if name in self._contexts else -1
        if given is not None:
            return given <= last or self._ended, given
        if self._ended:
            return True, 0
        rising = t is not None and self._last_t is not None and t > self._last_t
        if self._hold and not rising:
            self._hold = False
            return False, self.step
        if not self.config.auto_step or t is None:
            return False, self.step
        if self._last_t is None or rising:
            return rising, 0
        step = self.step + 1 if t < self._last_t else self.step
        repeated = name is not None and last == step  # a named call never runs twice in one step
        return repeated, 0 if repeated else step

    def begin_call(self, timestep: Any, signature: Any = None) -> None:
        """Place the next call: its generation, step and context."""
        self.stats["calls"] += 1
        t, name = _timestep_value(timestep), self._call_name()
        new, step = self._locate(t, name)
        if self._signature is not None and signature != self._signature:
            new, step = True, step if getattr(self._pipeline, "step_index", None) is not None else 0
        if new:
            self._new_generation()
        self._call_in_step = self._call_in_step + 1 if step == self.step and not new else 0
        self.step, self._last_t, self._signature, self.timestep = step, t, signature, t
        self.num_steps = getattr(self._pipeline, "num_inference_steps", None) or self.num_steps
        self._key = name if name is not None else self._call_in_step
        self._state = None
        self.state.last_step = step
        self._lengths = self.used_lengths.setdefault((step, self._key), {})

    @property
    def state(self) -> ContextState:
        """The current call context's state (created on first use; least recently used evicted).
        Looked up once per call: every site asks for it several times per call."""
        if self._state is None:
            self._state = self._context_state(self._key)
        return self._state

    def _context_state(self, key: Any) -> ContextState:
        if key in self._contexts:
            self._contexts.move_to_end(key)
        else:
            self._contexts[key] = ContextState()
            while len(self._contexts) > MAX_CONTEXTS:
                self._contexts.popitem(last=False)
                self.stats["contexts_evicted"] += 1
        return self._contexts[key]

    @property
    def context_key(self) -> Any:
        """The current call's context: its name, or its position in the step (0, 1, ...)."""
        return self._key

    def window(self, block: int | None) -> int:
        """Matching window of a block: steps on which it was computed, over `matching_every`.
        A step on which the block cache skipped the block neither computes nor ages a matching."""
        skipped = self.state.skipped[block] if block is not None else 0
        return (self.step - skipped) // self.reduction.matching_every

    # ---- block cache calibration ("magnitude" policy) ------------------------------------------
    def record_calibration(self, residual: torch.Tensor) -> None:
        """The span's visual residual at this full step, while the context has no calibration:
        its magnitude ratio to the previous step's is recorded (one norm per token is kept)."""
        key = self.context_key
        if key in self._ratios or (key not in self._calibrating and len(self._calibrating) >= MAX_CONTEXTS):
            return
        norms = cache.token_norms(residual)
        previous, ratios = self._calibrating.get(key, (None, {}))
        ratios[self.step] = 1.0 if previous is None else cache.norm_ratio(norms, previous)
        self._calibrating[key] = (norms, ratios)

    def _finish_calibration(self) -> None:
        """At a generation's end, its recorded ratios become the calibration of each context
        (kept across generations and resets; at most `MAX_CONTEXTS`)."""
        for key, (_, by_step) in self._calibrating.items():
            if len(by_step) >= 2 and (key in self._ratios or len(self._ratios) < MAX_CONTEXTS):
                self._ratios[key] = tuple(by_step[s] for s in sorted(by_step))
        self._calibrating = {}

    def cache_ratios(self) -> dict[Any, tuple[float, ...]]:
        """Calibrated magnitude ratios per context, once a dense generation has finished; pass
        one to `BlockCache(policy="magnitude", ratios=...)` to skip calibrating in a new process."""
        return dict(self._ratios)

    def memory(self) -> dict[str, Any]:
        """What the runtime holds now: contexts, matchings, plans and cached tensor elements, in
        total and per context (one generation's worth by construction)."""
        by_context = {key: _context_memory(ctx) for key, ctx in self._contexts.items()}
        total = {k: sum(entry[k] for entry in by_context.values()) for k in ("matchings", "plans", "cache_elements")}
        return {"contexts": len(by_context), **total, "by_context": by_context}

    # ---- binding and introspection ---------------------------------------------------------
    def bind(self, info: Any) -> None:
        """Attach the analysed model (sites, grid, block count); checks the schedule fits it."""
        self.schedule.check_blocks(info.num_blocks, info.adapter.family)
        self.info = info
        self.rewrites["sites_found"] = len(info.sites)
        self.rewrites["sites_reducible"] = sum(s.reducible for s in info.sites)

    def record(self, site: Any, n_q: int, n_kv: int) -> None:
        """Lengths used at `site` in this call (kept for the current generation only)."""
        self._lengths[site.path] = (n_q, n_kv)
        if min(n_q, n_kv) < site.layout.n_visual and site.path not in self._reduced_sites:
            self._reduced_sites.add(site.path)
            self.rewrites["sites_reduced"] = len(self._reduced_sites)

    def site_lengths(self, site: Any, n_dst: int, step: int | None = None) -> tuple[int, int]:
        """Visual tokens kept (queries, keys/values) at `site` at `step` (default: the current)."""
        q, kv, hidden = self.ratios(site.block, self.step if step is None else step)
        nv = site.layout.n_visual
        if hidden > 0:
            n = tokens.reduced_length(nv, n_dst, hidden)
            return n, n
        keep = [tokens.reduced_length(nv, n_dst, r) if r > 0 else nv for r in (q, kv)]
        return keep[0], keep[1]

    def reduced_lengths(self, step: int) -> dict[str, tuple[int, int]]:
        """Visual tokens kept (queries, keys/values) at every reducible site at `step`; a site the
        current mode cannot reduce (see `active_sites`) keeps all of them."""
        _check_step(step)
        if self.info is None:
            raise LookupError("the runtime is not bound to a model yet: call the compiled model once.")
        stride = self.reduction.dst_stride
        return {
            s.path: self.site_lengths(s, tokens.count_windows(s.grid, stride), step)
            if s.path in self.active_sites else (s.layout.n_visual,) * 2
            for s in self.info.sites
            if s.reducible
        }

    # ---- ratios and plans ------------------------------------------------------------------
    def ratios(self, block: int, step: int | None = None) -> tuple[float, float, float]:
        step = self.step if step is None else step
        return tuple(self.schedule.ratio(f, block, step) for f in ("q", "kv", "h"))

    def _split(self, site: int, grid: tokens.Grid, window: int) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(self.reduction.seed * 1_000_003 + site * 10_007 + window)
        fixed = self.reduction.split == "fixed"
        return tokens.window_split(grid, self.reduction.dst_stride, generator=gen, fixed=fixed)

    def matching(
        self, site: Any, feature: str, features: Callable[[], torch.Tensor], layout: tokens.Layout, grid: tokens.Grid,
        matcher: Matcher,
    ) -> _Cached:
        """The site's matching on `feature` for this window and context, computed once per window
        by `matcher` from `features()` (B, H, N, D), which is not called when the cached matching
        is reused."""
        cached = self.cached_matching(site, feature)
        if cached is None:
            with torch.no_grad():
                x = features()
                dst, src = self.window_split(site, grid, x.device)
                nearest, order = matcher(x, dst, src, layout)
            cached = self.store_matching(site, feature, tokens.Matching(dst, src, nearest, order))
        return cached

    def cached_matching(self, site: Any, feature: str) -> _Cached | None:
        """The site's matching on `feature` if one was computed in this window and context."""
        cached = self.state.matchings.get((site.index, feature))
        return cached if cached is not None and cached.window == self.window(site.block) else None

    def window_split(self, site: Any, grid: tokens.Grid, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(dst, src) of the site's matching in this window: a function of the seed, the site and
        the window only, so it is drawn once for all of the site's features and call contexts.
        The latest window's split of each site is kept (one per site, until the generation ends)."""
        key = (self.window(site.block), grid, device)
        kept = self._splits.get(site.index)
        if kept is None or kept[0] != key:
            split = tuple(t.to(device) for t in self._split(site.index, grid, key[0]))
            kept = self._splits[site.index] = (key, split)
            self.stats["splits"] += 1
        return kept[1]

    def store_matching(self, site: Any, feature: str, matching: tokens.Matching) -> _Cached:
        """Keep `matching` as the site's matching on `feature` for this window and context."""
        cached = self.state.matchings[(site.index, feature)] = _Cached(self.window(site.block), matching)
        self.stats["matchings"] += 1
        return cached

    def plan(self, cached: _Cached, n_keep: int, layout: tokens.Layout) -> tokens.Plan:
        key = (n_keep, self.reduction.reduce_mode, layout)
        if key not in cached.plans:
            with torch.no_grad():
                cached.plans[key] = tokens.make_plan(cached.matching, n_keep, layout, self.reduction.reduce_mode)
            self.stats["plans"] += 1
        return cached.plans[key]


# id(parameter) -> (weak reference to it, runtime). Keyed by id: tensors compare elementwise, so
# they cannot be dictionary keys compared by value (as WeakKeyDictionary would).
_RUNTIMES: dict[int, tuple[weakref.ref, AsymRnRRuntime]] = {}


def register_runtime(anchor: torch.Tensor, runtime: AsymRnRRuntime) -> None:
    """Remember the runtime of the model that owns parameter `anchor`."""
    key = id(anchor)
    # the table is bound now: at interpreter exit the module's globals may already be None
    _RUNTIMES[key] = (weakref.ref(anchor, lambda _, table=_RUNTIMES: table.pop(key, None)), runtime)


def runtime_for_anchor(anchor: torch.Tensor) -> AsymRnRRuntime | None:
    ref, runtime = _RUNTIMES.get(id(anchor), (None, None))
    return runtime if ref is not None and ref() is anchor else None


def runtime_of(model: torch.nn.Module) -> AsymRnRRuntime:
    """The runtime of a model compiled with backend="asymrnr" (after its first call)."""
    if isinstance(own := model.__dict__.get("asymrnr"), AsymRnRRuntime):  # asymrnr_fx.compile, a loaded package
        return own
    inner = getattr(model, "_orig_mod", model)
    for p in inner.parameters():
        if (rt := runtime_for_anchor(p)) is not None:
            return rt
    raise LookupError(
        "this model has no asymrnr runtime yet: compile it with backend='asymrnr' and call it once, "
        "or create one with asymrnr_fx.compile(model, config)."
    )
