"""Run the methods of one workload in interleaved rounds: round r runs timed generation r of every
method, the order rotated by one method per round, so slow drifts of the machine (other load,
heat) spread over all methods instead of landing on whichever ran last.

Each compiled method takes its turn in a fresh Dynamo (`torch._dynamo.reset()`): the models' copies
share their Python code, and Dynamo keeps per-code state (cache entries, frames it decided to skip
after a graph break in a loop) that would otherwise let one method change how another runs. So a
compiled method's turn is an untimed warm-up generation (the first one: compilation, matchings;
later ones: re-tracing, with compiled kernels and segments cached) and then the timed generation.
Compile counts and Dynamo's graphs, breaks and recompiles are those of the first turn. Memory and
Dynamo instruments wrap each generation. Errors become the row's status."""

from __future__ import annotations

import contextlib
import gc
import math
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm import tqdm

from asymrnr_fx import AsymRnRRuntime

from .flops import CallFlops, SiteLengths, cached_call_flops, ideal_speedup, reduced_call_flops
from .measure import CallTimer, DynamoTally, PeakMemory, per_step_median, summary, synchronize
from .methods import RUNNERS, MethodSpec, Prepared, RunContext, module_copy
from .workloads import Workload

Samples = dict[int, tuple[torch.Tensor, torch.Tensor]]

INSTALL_HINTS = {
    "cache_dit": "pip install 'cache-dit==1.5.3' (or the repository's .[bench] extra)",
    "para_attn": "pip >= 26.3 refuses para-attn 0.3.38 ('Distributions from PyPI cannot declare direct URL "
                 "dependencies': its sdist's dev extra names diffusers @ git+...); install it with pip <= 26.1: "
                 "python -m pip install 'pip==26.1' && pip install --no-deps para-attn==0.3.38",
    "psutil": "pip install psutil",
}


@dataclass
class Result:
    """One row: a method on a workload. Times in seconds unless the name says ms."""

    workload: str
    method: str
    family: str
    kind: str
    compiled: bool
    baseline: bool
    steps: int
    status: str = "ok"
    note: str = ""
    cache: str = ""  # our block cache's config, "" for none
    warmup_s: float = math.nan
    gen_s: list[float] = field(default_factory=list)
    step_ms: list[float] = field(default_factory=list)
    compile_s: float | None = None
    compiles: int | None = None
    dynamo_graphs: int | None = None
    graph_breaks: int | None = None
    graph_break_reasons: list[str] = field(default_factory=list)
    recompiles: int | None = None
    recompile_reasons: list[str] = field(default_factory=list)
    peak_mib: float | None = None
    matchings: int | None = None
    # our block cache: span decisions over all generations, and blocks computed at each step
    num_blocks: int | None = None
    cache_span: tuple[int, int] | None = None
    cache_hits: int | None = None
    cache_misses: int | None = None
    blocks_by_generation: list[list[float | None]] = field(default_factory=list)  # warm-up first
    blocks_per_step: list[float | None] | None = None  # mean over the timed generations
    flops_per_step: list[int] | None = None
    ideal: float | None = None
    psnr: float | None = None
    ssim: float | None = None
    rel_l2: float | None = None
    speedup: float | None = None
    speedup_same_backend: float | None = None
    efficiency: float | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def total_s(self) -> float:
        return summary(self.gen_s)[0]

    @property
    def spread_s(self) -> float:
        return summary(self.gen_s)[1]

    @property
    def ms_per_step(self) -> float:
        return 1e3 * self.total_s / self.steps

    @property
    def blocks_computed(self) -> float | None:
        """Share of the block evaluations of dense that the timed generations ran."""
        known = [b for b in self.blocks_per_step or [] if b is not None]
        return sum(known) / (len(known) * self.num_blocks) if known and self.num_blocks else None

    def to_json(self) -> dict[str, Any]:
        out = {k: v for k, v in vars(self).items()}
        out.update(total_s=self.total_s, spread_s=self.spread_s, ms_per_step=self.ms_per_step)
        return out


def error_status(err: BaseException) -> str:
    first = (str(err).strip().splitlines() or [""])[0][:400]
    if isinstance(err, ImportError):
        hint = INSTALL_HINTS.get((err.name or "").split(".")[0], "")
        return f"not installed: {type(err).__name__}: {first}" + (f" -- {hint}" if hint else "")
    return f"error: {type(err).__name__}: {first}"


def kept_lengths(rt: AsymRnRRuntime, step: int) -> dict[str, tuple[int, int]]:
    """Visual (queries, keys/values) kept per site at `step`: what the segments recorded when they
    ran (a site the rewrite left dense records nothing), else what the schedule asks for."""
    used = {path: n for (s, _), per_site in rt.used_lengths.items() if s == step for path, n in per_site.items()}
    return used or rt.reduced_lengths(step)


def cache_span(rt: AsymRnRRuntime) -> tuple[int, int] | None:
    cache = rt.config.cache
    return cache.span(rt.info.num_blocks) if cache is not None and rt.info is not None else None


def blocks_run(rt: AsymRnRRuntime, steps: int) -> list[float | None]:
    """Blocks computed at each step of the generation that just ran (mean over call contexts;
    None for a step the cache log has no entry for)."""
    per_step: dict[int, list[int]] = {}
    for (step, _), (run, _) in rt.cache_log.items():
        per_step.setdefault(step, []).append(run)
    return [statistics.fmean(per_step[s]) if s in per_step else None for s in range(steps)]


def ours_flops(res: Result, prep: Prepared, call: CallFlops, steps: int) -> list[int]:
    """Per-step FLOPs of our method from the reduced lengths at every step; where the block cache
    reused its span, weighted by the share of timed generations that did."""
    rt, out = prep.runtime, []
    sites = [s for s in rt.info.sites if s.reducible]
    span = cache_span(rt)
    for step in range(steps):
        kept = kept_lengths(rt, step)
        lengths = [SiteLengths(s.path, s.layout.n_text, s.layout.n_visual, *kept[s.path]) for s in sites if s.path in kept]
        full = reduced_call_flops(call, lengths, symmetric=rt.schedule.symmetric)
        ran = (res.blocks_per_step or [None] * steps)[step]
        if span is None or ran is None or not call.blocks:
            out.append(full)
            continue
        reused = (rt.info.num_blocks - ran) / (span[1] - span[0])
        cached = cached_call_flops(call, lengths, span, symmetric=rt.schedule.symmetric)
        out.append(round((1 - reused) * full + reused * cached))
    return out


@contextmanager
def _quiet_gc() -> Iterator[None]:
    """Collect before a timed generation and not during it: a collection lands on whoever runs."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


@dataclass
class MethodRun:
    """One method on one workload while the rounds go on. `counting`: Dynamo and compile counts
    are still being collected (the first turn)."""

    spec: MethodSpec
    res: Result
    model: torch.nn.Module | None
    prep: Prepared | None = None
    timer: CallTimer | None = None
    dynamo: DynamoTally = field(default_factory=DynamoTally)
    counting: bool = True
    compiles: tuple[float | None, int | None] = (None, None)  # (seconds, count) after the first turn
    samples: Samples = field(default_factory=dict)
    per_gen: list[list[float]] = field(default_factory=list)
    peak_bytes: int = 0

    @property
    def alive(self) -> bool:
        return self.res.ok and self.prep is not None

    def fail(self, err: BaseException) -> None:
        self.res.status = error_status(err)
        self.prep = self.timer = self.model = None

    def turn(self, wl: Workload, ctx: RunContext, r: int) -> None:
        """Round r: (compiled: fresh Dynamo, warm-up generation) and timed generation r; the first
        turn also prepares the method. An error ends this method's run."""
        try:
            if self.spec.compiled:
                torch._dynamo.reset()
            with PeakMemory() as mem:
                if self.prep is None:
                    self.prep = RUNNERS[self.spec.kind](self.spec, self.model, wl, ctx)
                    self.timer = CallTimer(self.prep.call)
                    self._generation(wl, 0, timed=False)
                elif self.spec.compiled:
                    self._generation(wl, r, timed=False)
                self._generation(wl, r, timed=True)
            self.peak_bytes = max(self.peak_bytes, mem.peak_bytes)
            if self.counting:
                self.counting, self.compiles = False, compile_counts(self.prep)
        except Exception as err:  # noqa: BLE001 -- a method that fails is a row that says so
            self.fail(err)

    def _generation(self, wl: Workload, i: int, timed: bool) -> None:
        prep, res, timer = self.prep, self.res, self.timer
        prep.reset()
        n0 = len(timer.times)
        watch = self.dynamo.watch() if self.counting else contextlib.nullcontext()
        with watch, torch.no_grad(), _quiet_gc():
            start = time.perf_counter()
            out = wl.generate(timer, i)
            synchronize()
            elapsed = time.perf_counter() - start
        if out is not None and i % wl.prompts not in self.samples:  # a repeated prompt adds nothing
            self.samples[i % wl.prompts] = out
        if (timed or i == 0) and prep.runtime is not None and prep.runtime.config.cache is not None:
            res.blocks_by_generation.append(blocks_run(prep.runtime, wl.steps))
        if timed:
            res.gen_s.append(elapsed)
            self.per_gen.append(timer.times[n0:])
        elif i == 0:
            res.warmup_s = elapsed


def compile_counts(prep: Prepared) -> tuple[float | None, int | None]:
    """Inner-compiler seconds and calls so far: ours from the runtime, others from the backend."""
    if prep.runtime is not None:
        return prep.runtime.compile_seconds, prep.runtime.stats["compiles"]
    return prep.stats.seconds, prep.stats.compiles


def new_result(spec: MethodSpec, wl: Workload, ctx: RunContext, status: str = "ok") -> Result:
    """The row of `spec` on `wl`, before anything ran."""
    return Result(wl.name, spec.name.format(compiler=ctx.compiler), spec.family, spec.kind, spec.compiled,
                  spec.baseline, wl.steps, status=status, note=spec.opts.get("note", ""),
                  cache=repr(spec.opts["cache"]) if spec.opts.get("cache") else "")


def new_run(spec: MethodSpec, wl: Workload, ctx: RunContext) -> MethodRun:
    return MethodRun(spec, new_result(spec, wl, ctx), module_copy(wl.model))


def _record(run: MethodRun, call: CallFlops, steps: int) -> None:
    """Timings, compile counts, cache decisions and (ours) FLOP-ideal speedup, once the rounds ran."""
    res, prep, dyn = run.res, run.prep, run.dynamo
    res.step_ms = [1e3 * t for t in per_step_median(run.per_gen)]
    res.dynamo_graphs, res.graph_breaks, res.recompiles = dyn.graphs, dyn.graph_breaks, dyn.recompiles
    res.graph_break_reasons = [f"{n}x {why}" for why, n in dyn.break_reasons.most_common(5)]
    res.recompile_reasons = dyn.reasons[:5]
    res.peak_mib = run.peak_bytes / 2**20
    rt = prep.runtime
    if res.compiled:
        res.compile_s, res.compiles = run.compiles
    if rt is not None:
        res.matchings = rt.stats["matchings"]
        _record_cache(res, rt)
        res.flops_per_step = ours_flops(res, prep, call, steps)
        res.ideal = ideal_speedup(call.dense, res.flops_per_step)
    if res.family == "dense":
        res.flops_per_step, res.ideal = [call.dense] * steps, 1.0
    res.note = "; ".join(n for n in (res.note, prep.note) if n)


def _record_cache(res: Result, rt: AsymRnRRuntime) -> None:
    span = cache_span(rt)
    if span is None:
        return
    res.num_blocks, res.cache_span = rt.info.num_blocks, span
    res.cache_hits, res.cache_misses = rt.stats["cache_hits"], rt.stats["cache_misses"]
    timed = res.blocks_by_generation[1:] or res.blocks_by_generation
    steps = zip(*timed) if timed else []
    res.blocks_per_step = [statistics.fmean(col) if None not in col else None for col in steps]
    if rt.stats["cache_disabled"]:
        res.note = "; ".join(n for n in (res.note, "block cache disabled by the runtime (see warnings)") if n)


def finish(run: MethodRun, call: CallFlops, steps: int) -> tuple[Result, Samples]:
    if run.alive:
        try:
            _record(run, call, steps)
        except Exception as err:  # noqa: BLE001
            run.fail(err)
    run.prep = run.timer = run.model = None
    return run.res, run.samples


def round_order(n: int, r: int) -> list[int]:
    """Method order of timed round r (1-based): rotated by one method per round."""
    k = (r - 1) % n if n else 0
    return list(range(k, n)) + list(range(k))


def run_methods(specs: list[MethodSpec], wl: Workload, ctx: RunContext, call: CallFlops, reps: int,
                report: Callable[[Result, str], None] | None = None
                ) -> tuple[list[tuple[Result, Samples]], list[list[str]]]:
    """`reps` interleaved rounds (the first also warms every method up). Returns each method's
    result and samples, and the method order of each round as it ran."""
    runs, rounds = [new_run(spec, wl, ctx) for spec in specs], []
    for r in tqdm(range(1, reps + 1), desc=f"{wl.name}: rounds", unit="round", leave=False):
        live = [x for x in runs if x.res.ok]
        order = [live[k] for k in round_order(len(live), r)]
        for x in order:
            x.turn(wl, ctx, r)
            if r == 1 and report is not None:
                report(x.res, "warm-up")
        rounds.append([x.res.method for x in order])
    out = [finish(x, call, wl.steps) for x in runs]
    torch._dynamo.reset()
    return out, rounds
