"""The methods of the table, as data, and one small `prepare_*` function per kind.

A spec names a kind (a key of RUNNERS) and its options. `prepare(spec, model, workload, ctx)`
gets a private copy of the workload's eager model, installs the method on it and returns the
callable the generation loop calls in place of the transformer, plus what to reset between
generations. Peers are imported only here and only when their row runs: a peer that cannot be
imported or run becomes a row with its error, not a missing row.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import io
import itertools
import os
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

import torch

import asymrnr_fx
from asymrnr_fx import AsymRnRConfig, BlockCache, SkipCache

from .flops import symmetric_ratio
from .measure import CompileStats, timed_backend
from .workloads import Workload

Call = Callable[..., Any]
ALL_MODES = frozenset({"smoke", "quick", "full"})
QUICK = frozenset({"quick", "full"})
FULL = frozenset({"full"})
NEVER: frozenset[str] = frozenset()
DEEP = frozenset({"deep-50", "deep-skip-50"})  # the deep pair: plain and Skip-DiT (issue 10)
FIXTURES = frozenset({"fixture", "fixture-50"}) | DEEP  # the trained models: every workload with fidelity
WAN = frozenset({"wan2.1-1.3b"})  # random weights: caching rows there measure speed at the skips they took


@dataclass(frozen=True)
class MethodSpec:
    """One row kind of the table. `options` are the kind's keyword arguments."""

    name: str
    kind: str
    family: str  # "dense" | "ours" | "peer"
    options: tuple[tuple[str, Any], ...] = ()
    compiled: bool = False
    modes: frozenset[str] = QUICK
    workloads: frozenset[str] | None = None  # None: every workload
    baseline: bool = False
    core: bool = False  # also run on the random-weight workloads in --quick


    @property
    def opts(self) -> dict[str, Any]:
        return dict(self.options)

    def runs_in(self, mode: str, workload: str) -> bool:
        return mode in self.modes and (self.workloads is None or workload in self.workloads)


def spec(name: str, kind: str, family: str, *, compiled: bool = False, modes: frozenset[str] = QUICK,
         workloads: frozenset[str] | None = None, baseline: bool = False, core: bool = False,
         **options: Any) -> MethodSpec:
    return MethodSpec(name, kind, family, tuple(options.items()), compiled, modes, workloads, baseline, core)


@dataclass(frozen=True)
class RunContext:
    compiler: str  # "inductor" (real numbers) or "aot_eager" (smoke test)
    device: str


@dataclass
class Prepared:
    call: Call
    reset: Callable[[], None] = lambda: None
    runtime: asymrnr_fx.AsymRnRRuntime | None = None
    stats: CompileStats = field(default_factory=CompileStats)
    note: str = ""


# ---- dense ------------------------------------------------------------------------------------------
def prepare_eager(spec: MethodSpec, model: torch.nn.Module, wl: Workload, ctx: RunContext) -> Prepared:
    return Prepared(model)


def _compile(model: torch.nn.Module, ctx: RunContext, stats: CompileStats) -> Call:
    return torch.compile(model, backend=timed_backend(stats, ctx.compiler), dynamic=False)


def prepare_compiled(spec: MethodSpec, model: torch.nn.Module, wl: Workload, ctx: RunContext) -> Prepared:
    stats = CompileStats()
    return Prepared(_compile(model, ctx, stats), stats=stats)


# ---- ours -------------------------------------------------------------------------------------------
def asymrnr_config(opts: dict[str, Any], wl: Workload, compiler: str) -> AsymRnRConfig:
    """Config of one of our rows: a published schedule by label, or constant ratios; with the
    block cache of option "cache" (None: no caching) and the `segments` of option "segments"."""
    cache, segments = opts.get("cache"), opts.get("segments", "auto")
    if "schedule" in opts:
        published = wl.schedules[opts["schedule"]]
        if isinstance(published, str):
            raise FileNotFoundError(published)
        schedule, every = published
        return AsymRnRConfig(schedule=schedule, matching_every=every, compiler=compiler, cache=cache,
                             segments=segments)
    if "match_flops_of" in opts:
        h = round(symmetric_ratio(*opts["match_flops_of"]), 4)
        return AsymRnRConfig(q_ratio=0.0, kv_ratio=0.0, h_ratio=h, compiler=compiler, cache=cache, segments=segments)
    return AsymRnRConfig(q_ratio=opts.get("q", 0.0), kv_ratio=opts.get("kv", 0.0), compiler=compiler,
                         cache=cache, segments=segments)


def prepare_asymrnr(spec: MethodSpec, model: torch.nn.Module, wl: Workload, ctx: RunContext) -> Prepared:
    cfg = asymrnr_config(spec.opts, wl, ctx.compiler)
    compiled = asymrnr_fx.compile(model, cfg)
    rt = compiled.asymrnr
    rt.num_steps = wl.steps  # the manual loop has no pipeline to tell the cache its last steps
    note = f"h={cfg.reduction.h_ratio}" if cfg.reduction.h_ratio else ""
    if isinstance(cfg.cache, BlockCache) and cfg.cache.policy == "magnitude" and not cfg.cache.ratios:
        _calibrate(compiled, rt, wl)
        note = "calibrated on one dense generation of the calibration prompt (as MagCache)"
    return Prepared(compiled, reset=rt.reset, runtime=rt, note=note)


def _calibrate(compiled: Call, rt: asymrnr_fx.AsymRnRRuntime, wl: Workload) -> None:
    """The "magnitude" policy's calibration: one dense generation (untimed) on the workload's
    calibration prompt, at the timed runs' step count, as MagCache's calibrate=True run."""
    if wl.calibrate is None:
        raise ValueError(f"workload {wl.name} has no calibration generation for the magnitude policy.")
    wl.calibrate(compiled)
    rt.reset()
    if not rt.cache_ratios():
        raise RuntimeError("the magnitude policy's calibration recorded no ratios.")


# ---- peers: diffusers cache hooks -------------------------------------------------------------------
class _Clock:
    """The current timestep, for hooks that ask for it through a callback (PAB, FasterCache)."""

    t: float = 1000.0

    def get(self) -> float:
        return self.t


def diffusers_config(name: str, params: dict[str, Any], clock: _Clock) -> Any:
    import diffusers

    cls = getattr(diffusers, name)
    if "current_timestep_callback" in {f.name for f in fields(cls)}:
        params = {**params, "current_timestep_callback": clock.get}
    return cls(**params)


class _InContext:
    """Calls `inner` inside `model.cache_context("cond", ...)` with what a diffusers 0.42 pipeline
    (Wan's) passes: step index, sigma and step count (SeaCache reads them; FlowMatchEuler with shift 1,
    the fixture's sampler: sigma = t / 1000). `step` counts calls since the last reset."""

    def __init__(self, model: torch.nn.Module, inner: Call, steps: int, clock: _Clock) -> None:
        self.model, self.inner, self.steps, self.clock, self.step = model, inner, steps, clock, 0

    def __call__(self, **kwargs: Any) -> Any:
        t = self.clock.t = float(kwargs["timestep"].reshape(-1)[0])
        where = {"step_index": self.step, "sigma": t / 1000, "num_inference_steps": self.steps}
        with self.model.cache_context("cond", **where):
            out = self.inner(**kwargs)
        self.step += 1
        return out

    def reset(self) -> None:
        self.model._reset_stateful_cache()
        self.step = 0


def cogvideox_raw_vision(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> list[torch.Tensor]:
    """SeaCache's `raw_vision_callback` for CogVideoX: latents (B, F, C, H, W) -> one (C, F, H, W)
    per sample (diffusers ships adapters for Wan and Cosmos 3 only)."""
    return [x.permute(1, 0, 2, 3) for x in kwargs["hidden_states"].unbind(0)]


def printed_mag_ratios(text: str, steps: int) -> list[float]:
    """The list diffusers' MagCache prints after "Calibration Complete" (its only way of handing
    the calibrated ratios over)."""
    lines = text.split("Calibration Complete", 1)[-1].splitlines()[1:]
    for line in lines:
        if line.strip().startswith("["):
            ratios = [float(r) for r in ast.literal_eval(line.strip())]
            if len(ratios) != steps:
                raise RuntimeError(f"MagCache calibration gave {len(ratios)} ratios for {steps} steps.")
            return ratios
    raise RuntimeError("MagCache calibration printed no ratios (has diffusers changed how it reports them?).")


def module_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of `model`'s modules (peers patch them in place) that shares its parameters and
    buffers: one set of weights in memory however many methods run (the scaled Wan shape holds
    5.6 GB of them)."""
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)



def mag_ratios(model: torch.nn.Module, wl: Workload) -> list[float]:
    """MagCache calibration: one generation of a copy of the eager model with `calibrate=True`
    (nothing skipped), on the workload's calibration prompt; once per workload."""
    if "mag_ratios" not in wl.memo:
        from diffusers import MagCacheConfig

        if wl.calibrate is None:
            raise ValueError(f"workload {wl.name} has no calibration generation for MagCache.")
        probe = module_copy(model)
        probe.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=wl.steps))
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed), torch.no_grad():
            wl.calibrate(_InContext(probe, probe, wl.steps, _Clock()))
        wl.memo["mag_ratios"] = printed_mag_ratios(printed.getvalue(), wl.steps)
    return wl.memo["mag_ratios"]


def prepare_diffusers(spec: MethodSpec, model: torch.nn.Module, wl: Workload, ctx: RunContext) -> Prepared:
    opts, clock, stats = spec.opts, _Clock(), CompileStats()
    params = dict(opts.get("params", {}))
    if opts.get("calibrate"):  # MagCache: ratios from its own calibration run, for this step count
        params.update(mag_ratios=mag_ratios(model, wl), num_inference_steps=wl.steps)
    model.enable_cache(diffusers_config(opts["config"], params, clock))
    inner = _compile(model, ctx, stats) if spec.compiled else model
    call = _InContext(model, inner, wl.steps, clock)  # outside a pipeline the hooks need a named context
    return Prepared(call, reset=call.reset, stats=stats)


# ---- peers: cache-dit ---------------------------------------------------------------------------------
def prepare_cache_dit(spec: MethodSpec, model: torch.nn.Module, wl: Workload, ctx: RunContext) -> Prepared:
    os.environ.setdefault("CACHE_DIT_LOG_LEVEL", "warning")
    import cache_dit

    params, stats = {**spec.opts.get("params", {}), "num_inference_steps": wl.steps}, CompileStats()
    cache_dit.enable_cache(model, cache_config=cache_dit.DBCacheConfig(**params))

    def reset() -> None:  # transformer-only use: a fresh context per generation
        cache_dit.refresh_context(model, cache_config=cache_dit.DBCacheConfig(**params))

    inner = _compile(model, ctx, stats) if spec.compiled else model
    return Prepared(inner, reset=reset, stats=stats)


# ---- peers: ParaAttention ---------------------------------------------------------------------------
def prepare_para_attn(spec: MethodSpec, model: torch.nn.Module, wl: Workload, ctx: RunContext) -> Prepared:
    from para_attn.first_block_cache import utils
    from para_attn.first_block_cache.diffusers_adapters import apply_cache_on_transformer

    apply_cache_on_transformer(model)
    params, stats = spec.opts.get("params", {}), CompileStats()

    def reset() -> None:  # what apply_cache_on_pipe does around each pipeline call
        utils.set_current_cache_context(utils.create_cache_context(**params))

    inner = _compile(model, ctx, stats) if spec.compiled else model
    return Prepared(inner, reset=reset, stats=stats)


RUNNERS: dict[str, Callable[[MethodSpec, torch.nn.Module, Workload, RunContext], Prepared]] = {
    "eager": prepare_eager,
    "compiled": prepare_compiled,
    "asymrnr": prepare_asymrnr,
    "diffusers": prepare_diffusers,
    "cache_dit": prepare_cache_dit,
    "para_attn": prepare_para_attn,
}


def _peer(name: str, kind: str, modes_eager: frozenset[str], modes_compiled: frozenset[str],
          workloads: frozenset[str] = FIXTURES, core: bool = False, **opts: Any):
    """The eager and the torch.compile'd row of one peer configuration (fixture workloads unless told)."""
    return [
        spec(name, kind, "peer", modes=modes_eager, workloads=workloads, core=core, **opts),
        spec(f"{name} + compile", kind, "peer", compiled=True, modes=modes_compiled, workloads=workloads,
             core=core, **opts),
    ]


def _fbc(threshold: float, modes_eager: frozenset[str], modes_compiled: frozenset[str]) -> list[MethodSpec]:
    return _peer(f"diffusers FirstBlockCache t={threshold}", "diffusers", modes_eager, modes_compiled,
                 config="FirstBlockCacheConfig", params={"threshold": threshold})


# Our block caches: (label, config, modes alone, modes composed with q=kv=0.3, with the published base).
# SkipCache's bands are the scheduler's timesteps (the fixture's run from 1000 down to 1); blocks=1
# computes the first and the last of the fixture's 4 blocks on a cached step.
CACHES: list[tuple[str, BlockCache | SkipCache, frozenset[str], frozenset[str], frozenset[str]]] = [
    ("BlockCache t=0.05", BlockCache(threshold=0.05), FULL, FULL, FULL),
    ("BlockCache t=0.1", BlockCache(threshold=0.1), QUICK, FULL, FULL),
    ("BlockCache t=0.2", BlockCache(threshold=0.2), ALL_MODES, FULL, FULL),
    ("BlockCache t=0.3", BlockCache(threshold=0.3), FULL, FULL, FULL),
    ("BlockCache t=0.4", BlockCache(threshold=0.4), FULL, FULL, FULL),
    # alone only: thresholds that fill the gaps of the 2026-11-23 run (peers at 45 dB and at 2.3-2.6x)
    ("BlockCache t=0.07", BlockCache(threshold=0.07), FULL, NEVER, NEVER),
    ("BlockCache t=0.08", BlockCache(threshold=0.08), FULL, NEVER, NEVER),
    ("BlockCache t=0.5", BlockCache(threshold=0.5), FULL, NEVER, NEVER),
    ("BlockCache t=0.6", BlockCache(threshold=0.6), FULL, NEVER, NEVER),
    ("BlockCache accumulated t=0.1", BlockCache(threshold=0.1, policy="accumulated"), FULL, FULL, FULL),
    ("BlockCache accumulated t=0.2", BlockCache(threshold=0.2, policy="accumulated"), FULL, FULL, FULL),
    ("BlockCache accumulated t=0.4", BlockCache(threshold=0.4, policy="accumulated"), FULL, FULL, FULL),
    ("BlockCache accumulated t=0.6", BlockCache(threshold=0.6, policy="accumulated"), FULL, NEVER, NEVER),
    # calibrated (MagCache's rule, no head block): ff = full_first, mc = max_cached
    *[(f"BlockCache magnitude t={t} ff={ff}" + (f" mc={mc}" if mc else ""),
       BlockCache(policy="magnitude", threshold=t, full_first=ff, max_cached=mc), FULL, both, NEVER)
      for t, ff, mc, both in ((0.05, 10, 0, NEVER), (0.06, 10, 3, NEVER), (0.1, 10, 2, NEVER),
                              (1.0, 10, 3, NEVER), (0.3, 6, 4, NEVER), (1.0, 4, 5, FULL))],
    # SeaCache's spectral indicator on the visual stream entering block 0, residual extrapolated
    *[(f"BlockCache spectral t={t}" + (f" mc={mc}" if mc else ""),
       BlockCache(policy="spectral", threshold=t, max_cached=mc), FULL, NEVER, NEVER)
      for t, mc in ((0.15, 2), (0.25, 2), (0.4, 2), (0.25, 0), (0.5, 3))],
    ("SkipCache N2-700-50", SkipCache(interval=2, full_above=700, full_below=50, blocks=1),
     ALL_MODES, ALL_MODES, FULL),
    ("SkipCache N3-700-50", SkipCache(interval=3, full_above=700, full_below=50, blocks=1), FULL, FULL,
     FULL),
    # the deep pair's Skip-Cache sweep: longer intervals, and without the always-full ends
    *[(f"SkipCache N{n}-{above}-{below}", SkipCache(interval=n, full_above=above, full_below=below, blocks=1),
       FULL, NEVER, NEVER) for n, above, below in ((4, 700, 50), (2, 1000, 0), (3, 1000, 0), (4, 1000, 0))],
]


def _ours_cached() -> list[MethodSpec]:
    """Each block cache alone, + constant q=kv=0.3, + the published base schedule (fixtures only)."""
    out = []
    for label, cache, alone, constant, published in CACHES:
        out += [
            spec(f"asymrnr {label}", "asymrnr", "ours", compiled=True, modes=alone, workloads=FIXTURES,
                 cache=cache),
            spec(f"asymrnr {label} + q=0.3 kv=0.3", "asymrnr", "ours", compiled=True, modes=constant,
                 workloads=FIXTURES, cache=cache, q=0.3, kv=0.3),
            spec(f"asymrnr {label} + published base", "asymrnr", "ours", compiled=True, modes=published,
                 workloads=FIXTURES, cache=cache, schedule="base"),
        ]
    return out


TAYLORSEER_ATTN1 = {"cache_interval": 5, "disable_cache_before_step": 3, "max_order": 1,
                    "taylor_factors_dtype": torch.float32, "cache_identifiers": [r"^transformer_blocks.*attn1"]}
PAB_SPATIAL = {"spatial_attention_block_skip_range": 2, "spatial_attention_timestep_skip_range": (100, 800)}


def _wan_caching() -> list[MethodSpec]:
    """Caching on the scaled Wan shape: random weights, so no fidelity; the rows say what a skip
    costs there. Ours and diffusers' FirstBlockCache apply the same rule at the same threshold
    (relative L1 of block 0's residual), so they skip on the same steps up to rounding; ours also
    computes the last step in full unless `full_last=0` (FirstBlockCache has no such rule). The
    other diffusers peers that apply to Wan run beside them; their decisions on random weights are
    as arbitrary as ours, so only what a skip costs and the compile contract compare."""
    ours = [("BlockCache t=0.2", BlockCache(threshold=0.2), {}),
            ("BlockCache t=0.2 full_last=0", BlockCache(threshold=0.2, full_last=0), {}),
            ("BlockCache t=0.2 + q=0.5 kv=0.3", BlockCache(threshold=0.2), {"q": 0.5, "kv": 0.3}),
            ("SkipCache N2-700-50", SkipCache(interval=2, full_above=700, full_below=50, blocks=1), {})]
    return [
        *[spec(f"asymrnr {label}", "asymrnr", "ours", compiled=True, modes=FULL, workloads=WAN, core=True,
               cache=cache, **ratios) for label, cache, ratios in ours],
        *_peer("diffusers FirstBlockCache t=0.2", "diffusers", FULL, FULL, workloads=WAN, core=True,
               config="FirstBlockCacheConfig", params={"threshold": 0.2}),
        *_peer("diffusers SeaCache (defaults)", "diffusers", FULL, FULL, workloads=WAN, core=True,
               config="SeaCacheConfig", note="defaults; diffusers' own Wan T2V adapter"),
        *_peer("diffusers MagCache (calibrated)", "diffusers", FULL, FULL, workloads=WAN, core=True,
               config="MagCacheConfig", calibrate=True,
               note="defaults; mag_ratios from one calibrate=True eager generation from another latent"),
        *_peer("diffusers TaylorSeer (attn1)", "diffusers", FULL, FULL, workloads=WAN, core=True,
               config="TaylorSeerCacheConfig", params={**TAYLORSEER_ATTN1, "cache_identifiers": [r"^blocks.*attn1"]},
               note="the fixture row's values on Wan's self-attention (the default identifiers match no Wan module)"),
        *_peer("diffusers PyramidAttentionBroadcast", "diffusers", FULL, FULL, workloads=WAN, core=True,
               config="PyramidAttentionBroadcastConfig", params=PAB_SPATIAL),
        *_peer("cache-dit DBCache F1B0 rdt=0.2", "cache_dit", FULL, FULL, workloads=WAN, core=True,
               params={"Fn_compute_blocks": 1, "Bn_compute_blocks": 0, "residual_diff_threshold": 0.2,
                       "max_warmup_steps": 2}),
        *_peer("ParaAttention FirstBlockCache rdt=0.2", "para_attn", FULL, FULL, workloads=WAN, core=True,
               params={"residual_diff_threshold": 0.2}),
    ]



METHODS: list[MethodSpec] = [
    spec("eager dense", "eager", "dense", modes=ALL_MODES, core=True),
    spec("{compiler} dense (baseline)", "compiled", "dense", compiled=True, modes=ALL_MODES, baseline=True,
         core=True),
    # ours: published schedules, constant ratios, one side only, symmetric at equal attention FLOPs
    spec("asymrnr published base", "asymrnr", "ours", compiled=True, modes=ALL_MODES, core=True, schedule="base"),
    spec("asymrnr published fast", "asymrnr", "ours", compiled=True, core=True, schedule="fast"),
    # the published base in one graph: two whole-model programs per step pattern (fixtures only:
    # on HunyuanVideo's 60 blocks and 10 patterns the warm-up passed 34 min and 20 GiB, 2026-12-07)
    spec("asymrnr published base, one graph", "asymrnr", "ours", compiled=True, modes=FULL, workloads=FIXTURES,
         schedule="base", segments="graph"),
    spec("asymrnr q=0.5 kv=0.3", "asymrnr", "ours", compiled=True, modes=ALL_MODES, core=True, q=0.5, kv=0.3),
    spec("asymrnr q=0.25 kv=0.25", "asymrnr", "ours", compiled=True, modes=FULL, q=0.25, kv=0.25),
    spec("asymrnr q=0.3 kv=0.3", "asymrnr", "ours", compiled=True, modes=QUICK, workloads=FIXTURES, q=0.3,
         kv=0.3),
    spec("asymrnr q=0.5 kv=0.5", "asymrnr", "ours", compiled=True, modes=FULL, q=0.5, kv=0.5),
    # near-zero ratios: what the gathers and matchings cost with almost nothing removed, in the
    # uncut graph (the default for a constant schedule) and cut at every site (as a table schedule)
    spec("asymrnr q=0.01 kv=0.01 (segmentation overhead)", "asymrnr", "ours", compiled=True, modes=FULL,
         workloads=FIXTURES, q=0.01, kv=0.01),
    spec("asymrnr q=0.01 kv=0.01 cut at sites", "asymrnr", "ours", compiled=True, modes=FULL,
         workloads=FIXTURES, q=0.01, kv=0.01, segments="sites"),
    spec("asymrnr q=0.7 kv=0.5", "asymrnr", "ours", compiled=True, modes=FULL, q=0.7, kv=0.5),
    spec("asymrnr q-only 0.5", "asymrnr", "ours", compiled=True, q=0.5),
    spec("asymrnr kv-only 0.5", "asymrnr", "ours", compiled=True, kv=0.5),
    spec("symmetric (ToMe-style), attention FLOPs of q0.5/kv0.3", "asymrnr", "ours", compiled=True,
         match_flops_of=(0.5, 0.3)),
    spec("symmetric (ToMe-style), attention FLOPs of q0.5/kv0.5", "asymrnr", "ours", compiled=True, modes=FULL,
         match_flops_of=(0.5, 0.5)),
    # ours with feature caching (trained fixture only, as the peers: skip decisions need trained weights)
    *_ours_cached(),
    # the scaled Wan shape: caching speed at the skips taken on random weights
    *_wan_caching(),
    # peers (trained fixture only: their skip decisions mean nothing on random weights)
    *_fbc(0.05, FULL, FULL),
    *_fbc(0.1, FULL, FULL),
    *_fbc(0.2, ALL_MODES, QUICK),
    *_fbc(0.4, FULL, FULL),
    *_fbc(0.6, FULL, FULL),
    *_peer("diffusers MagCache (calibrated)", "diffusers", ALL_MODES, QUICK, config="MagCacheConfig",
           calibrate=True,
           note="defaults; mag_ratios from one calibrate=True eager generation at the same step count"),
    *_peer("diffusers SeaCache (defaults)", "diffusers", ALL_MODES, QUICK, config="SeaCacheConfig",
           params={"raw_vision_callback": cogvideox_raw_vision},
           note="defaults; raw_vision_callback: the CogVideoX latents, (C, F, H, W) per sample"),
    *_peer("diffusers PyramidAttentionBroadcast", "diffusers", QUICK, FULL, config="PyramidAttentionBroadcastConfig",
           params=PAB_SPATIAL),
    *_peer("diffusers FasterCache", "diffusers", QUICK, FULL, config="FasterCacheConfig",
           params={"spatial_attention_block_skip_range": 2, "spatial_attention_timestep_skip_range": (-1, 681),
                   "attention_weight_callback": lambda _: 0.3, "is_guidance_distilled": True,
                   "tensor_format": "BFCHW"},
           note="diffusers' CogVideoX example values; is_guidance_distilled=True (the fixture samples without CFG)"),
    *_peer("diffusers TaylorSeer (defaults)", "diffusers", FULL, FULL, config="TaylorSeerCacheConfig",
           params={"taylor_factors_dtype": torch.float32},
           note="default identifiers ('^transformer_blocks.*attn') match no CogVideoX module (attn1): no-op"),
    *_peer("diffusers TaylorSeer (attn1)", "diffusers", QUICK, FULL, config="TaylorSeerCacheConfig",
           params=TAYLORSEER_ATTN1),
    *_peer("cache-dit DBCache F1B0 rdt=0.08", "cache_dit", FULL, FULL,
           params={"Fn_compute_blocks": 1, "Bn_compute_blocks": 0, "residual_diff_threshold": 0.08,
                   "max_warmup_steps": 2}),
    *_peer("cache-dit DBCache F1B0 rdt=0.2", "cache_dit", QUICK, FULL,
           params={"Fn_compute_blocks": 1, "Bn_compute_blocks": 0, "residual_diff_threshold": 0.2,
                   "max_warmup_steps": 2}),
    *_peer("ParaAttention FirstBlockCache rdt=0.08", "para_attn", FULL, FULL,
           params={"residual_diff_threshold": 0.08}),
    *_peer("ParaAttention FirstBlockCache rdt=0.2", "para_attn", QUICK, FULL,
           params={"residual_diff_threshold": 0.2}),
]
