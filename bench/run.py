"""Run one method on one workload: prepare it on a private copy of the model, one warm-up
generation (compilation, matchings), then `reps` timed generations, under the memory and
Dynamo instruments. Errors become the row's status."""

from __future__ import annotations

import copy
import gc
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm import tqdm

from asymrnr_fx import AsymRnRRuntime

from .flops import CallFlops, SiteLengths, ideal_speedup, reduced_call_flops
from .measure import CallTimer, DynamoWatch, PeakMemory, per_step_median, summary, synchronize
from .methods import RUNNERS, MethodSpec, Prepared, RunContext
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
    warmup_s: float = math.nan
    gen_s: list[float] = field(default_factory=list)
    step_ms: list[float] = field(default_factory=list)
    compile_s: float | None = None
    compiles: int | None = None
    dynamo_graphs: int | None = None
    recompiles: int | None = None
    recompile_reasons: list[str] = field(default_factory=list)
    peak_mib: float | None = None
    matchings: int | None = None
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


def ours_flops(prep: Prepared, call: CallFlops, steps: int) -> list[int]:
    """Per-step FLOPs of our method from the reduced lengths at every step."""
    rt, out = prep.runtime, []
    sites = [s for s in rt.info.sites if s.reducible]
    for step in range(steps):
        kept = kept_lengths(rt, step)
        lengths = [SiteLengths(s.path, s.layout.n_text, s.layout.n_visual, *kept[s.path]) for s in sites if s.path in kept]
        out.append(reduced_call_flops(call, lengths, symmetric=rt.schedule.symmetric))
    return out


def _generations(wl: Workload, prep: Prepared, res: Result, reps: int) -> Samples:
    """Warm-up generation 0, then `reps` timed ones; samples kept where the workload has them."""
    timer, samples, per_gen = CallTimer(prep.call), {}, []
    for i in tqdm(range(1 + reps), desc=f"{wl.name}: {res.method}"[:60], unit="gen", leave=False):
        prep.reset()
        n0, start = len(timer.times), time.perf_counter()
        with torch.no_grad():
            out = wl.generate(timer, i)
        synchronize()
        elapsed = time.perf_counter() - start
        if out is not None:
            samples[i] = out
        if i == 0:
            res.warmup_s = elapsed
        else:
            res.gen_s.append(elapsed)
            per_gen.append(timer.times[n0:])
    res.step_ms = [1e3 * t for t in per_step_median(per_gen)]
    return samples


def _record(res: Result, prep: Prepared, call: CallFlops, steps: int) -> None:
    """Compile counts and (ours) FLOP-ideal speedup, once the generations have run."""
    stats, rt = prep.stats, prep.runtime
    res.dynamo_graphs, res.recompiles, res.recompile_reasons = stats.dynamo_graphs, stats.recompiles, stats.reasons
    if rt is not None:
        res.compile_s, res.compiles, res.matchings = rt.compile_seconds, rt.stats["compiles"], rt.stats["matchings"]
        res.flops_per_step = ours_flops(prep, call, steps)
        res.ideal = ideal_speedup(call.dense, res.flops_per_step)
    elif res.compiled:
        res.compile_s, res.compiles = stats.seconds, stats.compiles
    if res.family == "dense":
        res.flops_per_step, res.ideal = [call.dense] * steps, 1.0
    res.note = "; ".join(n for n in (res.note, prep.note) if n)


def run_method(spec: MethodSpec, wl: Workload, ctx: RunContext, call: CallFlops, reps: int) -> tuple[Result, Samples]:
    res = Result(wl.name, spec.name.format(compiler=ctx.compiler),
                 spec.family, spec.kind, spec.compiled, spec.baseline, wl.steps, note=spec.opts.get("note", ""))
    model = copy.deepcopy(wl.model)  # peers patch modules in place: each method gets its own copy
    torch._dynamo.reset()
    gc.collect()
    samples: Samples = {}
    try:
        with PeakMemory() as mem, DynamoWatch() as dyn:
            prep = RUNNERS[spec.kind](spec, model, wl, ctx)
            samples = _generations(wl, prep, res, reps)
        dyn.fill(prep.stats)
        _record(res, prep, call, wl.steps)
        res.peak_mib = mem.peak_bytes / 2**20
    except Exception as err:  # noqa: BLE001 -- a method that fails is a row that says so
        res.status = error_status(err)
    finally:
        del model
        torch._dynamo.reset()
    return res, samples
