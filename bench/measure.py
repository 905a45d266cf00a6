"""Measuring instruments: per-call timers, peak memory, Dynamo and Inductor compile counts.

All of them are plumbing around the run of one method; the numbers they produce are summarised
by `summary` (median and spread) and compared across methods by bench.report.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from typing_extensions import Self  # typing.Self needs Python 3.11; torch depends on this


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def summary(values: Sequence[float]) -> tuple[float, float]:
    """Median and spread (max - min) of `values`; (nan, nan) when empty."""
    if not values:
        return float("nan"), float("nan")
    return statistics.median(values), max(values) - min(values)


class CallTimer:
    """Wraps a transformer-like callable and records the wall time of every call (seconds)."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self.times: list[float] = []

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        synchronize()
        start = time.perf_counter()
        out = self.fn(*args, **kwargs)
        synchronize()
        self.times.append(time.perf_counter() - start)
        return out


def per_step_median(generations: Sequence[Sequence[float]]) -> list[float]:
    """Median call time at each step index over several generations of equal length."""
    return [statistics.median(col) for col in zip(*generations)] if generations else []


# ---- memory ------------------------------------------------------------------------------------
def _rss_bytes() -> int:
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except ImportError:  # psutil is in the bench extra; /proc works on Linux without it
        with open(f"/proc/{os.getpid()}/status") as f:
            line = next(s for s in f if s.startswith("VmRSS:"))
        return int(line.split()[1]) * 1024


class PeakMemory:
    """Peak memory above the level at entry, in bytes: CUDA allocator on GPU, sampled RSS on CPU.

    RSS is sampled every `interval` seconds by a thread, so a spike shorter than that can be missed.
    """

    def __init__(self, interval: float = 0.005) -> None:
        self.interval, self.peak_bytes = interval, 0
        self._stop = threading.Event()
        self.cuda = torch.cuda.is_available()

    def __enter__(self) -> Self:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
            return self
        self._base = self._max = _rss_bytes()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._max = max(self._max, _rss_bytes())

    def __exit__(self, *exc: object) -> None:
        if self.cuda:
            self.peak_bytes = torch.cuda.max_memory_allocated() - self._base
            return
        self._stop.set()
        self._thread.join()
        self.peak_bytes = max(self._max, _rss_bytes()) - self._base


# ---- compilation ---------------------------------------------------------------------------------
@dataclass
class CompileStats:
    """Inner-compiler (Inductor or other) calls and their seconds, filled by `timed_backend`."""

    compiles: int = 0
    seconds: float = 0.0


def timed_backend(stats: CompileStats, compiler: str = "inductor") -> Callable:
    """A torch.compile backend equal to `compiler` that counts and times each inner compile.

    For "inductor" this is the same `compile_fx(gm, inputs)` call the stock backend makes.
    """

    def backend(gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        start = time.perf_counter()
        if compiler == "inductor":
            from torch._inductor.compile_fx import compile_fx

            fn = compile_fx(gm, example_inputs)
        else:
            fn = torch._dynamo.lookup_backend(compiler)(gm, example_inputs)
        stats.seconds += time.perf_counter() - start
        stats.compiles += 1
        return fn

    return backend


@dataclass
class DynamoTally:
    """What Dynamo did for one method, summed over the `DynamoWatch` blocks its calls ran in.

    graphs: Dynamo graphs (one per graph break more); graph_breaks: breaks Dynamo recorded
    (torch._dynamo.utils.counters["graph_break"]); recompiles: compilations of a Python frame
    this method had already compiled. Counting per method and frame, not Dynamo's own
    `recompile_reason`, matters because every method runs in one process: the first compile of a
    method on a frame another method compiled before carries a BACKEND_MATCH reason, and is no
    recompilation of this method."""

    graphs: int = 0
    graph_breaks: int = 0
    break_reasons: Counter = field(default_factory=Counter)
    recompiles: int = 0
    reasons: list[str] = field(default_factory=list)
    frames: Counter = field(default_factory=Counter)  # (file, line, name) -> compilations

    def watch(self) -> DynamoWatch:
        return DynamoWatch(self)


def _frame(m: Any) -> tuple[Any, Any, Any]:
    return m.co_filename, m.co_firstlineno, m.co_name


class DynamoWatch:
    """Adds what Dynamo compiles inside a `with` block to a `DynamoTally`."""

    def __init__(self, tally: DynamoTally) -> None:
        self.tally = tally

    def __enter__(self) -> Self:
        from torch._dynamo import utils

        utils.set_compilation_metrics_limit(1 << 14)
        utils.clear_compilation_metrics()
        self._graphs = utils.counters["stats"]["unique_graphs"]
        self._breaks = Counter(utils.counters["graph_break"])
        return self

    def __exit__(self, *exc: object) -> None:
        from torch._dynamo import utils

        t = self.tally
        t.graphs += utils.counters["stats"]["unique_graphs"] - self._graphs
        new = Counter(utils.counters["graph_break"]) - self._breaks
        t.graph_breaks += sum(new.values())
        t.break_reasons.update(new)
        for m in utils.get_compilation_metrics():
            if m.compile_id is None:  # an Inductor compile outside any Dynamo frame (our lazy segments)
                continue
            if t.frames[_frame(m)]:
                t.recompiles += 1
                t.reasons.append(m.recompile_reason or "(no reason recorded)")
            t.frames[_frame(m)] += 1
