"""What an exported package costs and saves, beside torch.compile(backend="asymrnr").

    python -m bench.export_cost [--workloads fixture] [--steps 50] [--rounds 5]

Per workload (the trained fixture; also `compile_cost`'s cogvideox-2b and cogvideox-2b-scaled), under the
published CogVideoX-2B base schedule (the method of `compile_cost --warm-start`):
- export: seconds of `asymrnr_fx.export` (trace + one AOTInductor compile per program), in its own
  process; package size and program count;
- process start -> first denoising step done: a fresh process loading the package, against the
  compiled path cold (empty Inductor cache) and warm (a second process on the filled cache);
- steady state: ms/step of whole generations, loaded package vs compiled path in one process,
  interleaved over `--rounds` rounds (median and spread), after a warm-up generation each.
Never run beside another job: the timings are wall clock on a shared CPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from tabulate import tabulate

import asymrnr_fx
from asymrnr_fx import AsymRnRConfig

from .compile_cost import _spawn, _warm_model


def _config(workload: str, steps: int, layers: int) -> tuple:
    model, run, schedule, every = _warm_model(workload, layers, steps)
    return model, run, AsymRnRConfig(schedule=schedule, matching_every=every)


def _example(workload: str, model: torch.nn.Module, run) -> dict:
    """The first call's keyword arguments of the workload's generation."""
    seen: dict = {}

    class Seen(Exception):
        pass

    def record(**kwargs):
        seen.update(kwargs)
        raise Seen

    try:
        run(record, lambda i: None)
    except Seen:
        pass
    return seen


def _export_child(workload: str, steps: int, layers: int, out: str) -> dict:
    model, run, cfg = _config(workload, steps, layers)
    start = time.perf_counter()
    path = asymrnr_fx.export(model, cfg, _example(workload, model, run), steps, out)
    manifest = asymrnr_fx.package.read_manifest(path)
    return {"export_s": time.perf_counter() - start, "mib": path.stat().st_size / 2**20,
            "programs": len(manifest["programs"])}


def _load_child(workload: str, steps: int, layers: int, package: str, t0: float) -> dict:
    from torch._dynamo.utils import counters

    _, run, _ = _config(workload, steps, layers)
    loaded = asymrnr_fx.load_exported(package)
    marks: list[float] = []
    run(loaded, lambda i: marks.append(time.time()))
    compiled_anything = bool(counters["inductor"]) or counters["stats"]["calls_captured"] > 0
    return {"start_to_first_step_s": marks[1] - t0, "generation_s": time.time() - marks[0], "compiled": compiled_anything}


def _child(kind: str, workload: str, args: argparse.Namespace, *extra: str) -> dict:
    cmd = [sys.executable, "-m", "bench.export_cost", f"--{kind}-child", workload, *extra,
           "--steps", str(args.steps), "--layers", str(args.layers), "--t0", repr(time.time())]
    done = subprocess.run(cmd, check=False, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    if done.returncode != 0:
        raise RuntimeError(f"{kind} child for {workload} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def steady_state(workload: str, package: str, args: argparse.Namespace) -> dict[str, list[float]]:
    """ms/step of whole generations, package and compiled path interleaved."""
    model, run, cfg = _config(workload, args.steps, args.layers)
    methods = {"package": asymrnr_fx.load_exported(package), "torch.compile": asymrnr_fx.compile(model, cfg)}
    for call in methods.values():
        run(call, lambda i: None)  # warm-up (compiles the compiled path)
    times: dict[str, list[float]] = {name: [] for name in methods}
    for r in range(args.rounds):
        for name in (list(methods) if r % 2 == 0 else list(methods)[::-1]):
            start = time.perf_counter()
            run(methods[name], lambda i: None)
            times[name].append(1000 * (time.perf_counter() - start) / args.steps)
    return times


def measure(workload: str, args: argparse.Namespace, folder: Path) -> list[list]:
    package = str(folder / f"{workload}.pt2")
    exported = _child("export", workload, args, package)
    load = _child("load", workload, args, package)
    if load["compiled"]:
        raise RuntimeError("the package's process compiled something")
    with tempfile.TemporaryDirectory(prefix="asymrnr-export-") as cache_dir:
        cold, warm = (_spawn(workload, "asymrnr", args, cache_dir) for _ in range(2))
    times = steady_state(workload, package, args)
    med = {k: statistics.median(v) for k, v in times.items()}
    spread = {k: (max(v) - min(v)) / med[k] for k, v in times.items()}
    return [
        [workload, "export (trace + AOTInductor)", exported["export_s"], f"{exported['mib']:.1f} MiB, {exported['programs']} programs", "", ""],
        [workload, "package: load + first step", load["start_to_first_step_s"], "", med["package"], f"{spread['package']:.0%}"],
        [workload, "torch.compile cold", cold["start_to_first_step_s"], "", "", ""],
        [workload, "torch.compile warm (Inductor caches)", warm["start_to_first_step_s"], "",
         med["torch.compile"], f"{spread['torch.compile']:.0%}"],
        [workload, "package ms/step / compiled ms/step", "", "", med["package"] / med["torch.compile"], "target <= 1.05"],
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workloads", default="fixture")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--export-child", nargs=2, metavar=("WORKLOAD", "OUT"), help=argparse.SUPPRESS)
    p.add_argument("--load-child", nargs=2, metavar=("WORKLOAD", "PACKAGE"), help=argparse.SUPPRESS)
    p.add_argument("--t0", type=float, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.export_child:
        print(json.dumps(_export_child(args.export_child[0], args.steps, args.layers, args.export_child[1])))
        return
    if args.load_child:
        print(json.dumps(_load_child(args.load_child[0], args.steps, args.layers, args.load_child[1], args.t0)))
        return
    with tempfile.TemporaryDirectory(prefix="asymrnr-packages-") as folder:
        rows = [row for w in args.workloads.split(",") for row in measure(w, args, Path(folder))]
    print(f"export: {args.steps} steps, published CogVideoX-2B base schedule, {torch.get_num_threads()} threads")
    print(tabulate(rows, headers=["workload", "what", "s (process start -> step 1 done)", "size", "ms/step (median)", "spread"],
                   floatfmt=".3g", tablefmt="github"))


if __name__ == "__main__":
    main()
