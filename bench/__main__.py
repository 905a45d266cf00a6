"""`python -m bench`: speed, fidelity, compile cost and memory of asymrnr beside its peers.

    python -m bench            # full: published block and step counts (estimated ~3 hours on 2 CPU cores)
    python -m bench --quick    # reduced blocks / steps / methods
    python -m bench --smoke    # minimal config with aot_eager, for the test suite
    python -m bench --workloads fixture-50 --reps 3    # the caching comparison alone (+ dense rows)

Every method runs in this one process, on the same model and machine, against the same compiled
dense baseline; the timed generations of a workload's methods are interleaved in rounds. Writes
bench/results/<date>-<device>[-quick|-smoke][-<workloads>][-methods-<regex>].{md,json} and PNG plots.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from . import compare, report
from .flops import count_call
from .methods import METHODS, MethodSpec, RunContext
from .run import Result, new_result, run_methods
from .workloads import SCALED, Workload, fixture_workload, scaled_workload

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class RunPlan:
    """What one mode runs. `fixtures`: workload -> (steps, prompts); by default one generation
    per prompt, the first the warm-up. `scaled`: workload -> (blocks per container, steps)."""

    fixtures: dict[str, tuple[int, int]]
    scaled: dict[str, tuple[tuple[int, ...], int]]
    scaled_reps: int
    compiler: str
    site: tuple[int, int, int] | None  # bench.site (tokens, heads, reps)
    scaled_core_only: bool = True  # random-weight workloads run only the core methods


# fixture-50: CogVideoXPipeline's default step count, where the published 50-step schedules apply
# without step subsampling; 3 prompts (fixture, at 20 steps, uses all 10).
PLANS = {
    "smoke": RunPlan({"fixture": (4, 3)}, {"cogvideox-2b": ((2,), 3)}, 1, "aot_eager", None),
    "quick": RunPlan({"fixture": (20, 4)}, {"cogvideox-2b": ((4,), 10), "hunyuanvideo": ((1, 2), 10)}, 2,
                  "inductor", (1000, 2, 5)),
    "full": RunPlan({"fixture": (20, 10), "fixture-50": (50, 3), "deep-50": (50, 3), "deep-skip-50": (50, 3)}, {"cogvideox-2b": ((30,), 50),
                 "hunyuanvideo": ((20, 40), 30), "wan2.1-1.3b": ((30,), 50)}, 3, "inductor", (4096, 6, 7),
                 scaled_core_only=False),
}


def workload_names(plan: RunPlan) -> list[str]:
    return [*plan.fixtures, *plan.scaled]


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", dest="mode", action="store_const", const="quick")
    mode.add_argument("--smoke", dest="mode", action="store_const", const="smoke")
    p.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    p.add_argument("--workloads", default="",
                   help="comma-separated subset: fixture,fixture-50,cogvideox-2b,hunyuanvideo,wan2.1-1.3b "
                        "(fixture-50, wan2.1-1.3b: full mode)")
    p.add_argument("--methods", default="", help="regex: run only methods whose name matches (dense always runs)")
    p.add_argument("--reps", type=int, default=None,
                   help="timed rounds: generations per method, interleaved across methods (default: by mode)")
    p.add_argument("--warm-cache", action="store_true",
                   help="use the normal Inductor cache (default: a fresh one, so compile times are cold)")
    args = p.parse_args(argv)
    if args.reps is not None and args.reps < 1:
        p.error(f"--reps must be >= 1 (timed rounds), got {args.reps}.")
    return args


def device_name() -> str:
    if torch.cuda.is_available():
        return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")
    return "cpu"


def versions() -> dict[str, str]:
    out = {}
    for pkg in ("torch", "diffusers", "cache-dit", "para-attn", "psutil"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def selected_workloads(arg: str, mode: str, plan: RunPlan) -> set[str]:
    """The names --workloads asks for; an error naming the valid ones for any other."""
    only = {w.strip() for w in arg.split(",") if w.strip()}
    unknown = sorted(only - set(workload_names(plan)))
    if unknown:
        hint = " (fixture-50 runs in full mode: drop --quick / --smoke)." if "fixture-50" in unknown else "."
        raise SystemExit(f"bench: --workloads {','.join(unknown)}: not a workload of {mode} mode. "
                         f"Use one of {','.join(workload_names(plan))}{hint}")
    return only


def build_workloads(plan: RunPlan, only: set[str], device: str, dtype: torch.dtype) -> Iterator[Callable[[], Workload]]:
    """Builders, in table order; each workload is built when its turn comes and freed after."""
    for name, (steps, prompts) in plan.fixtures.items():
        if not only or name in only:
            yield lambda n=name, s=steps, k=prompts: fixture_workload(s, k, device, dtype, name=n)
    for name, (blocks, steps) in plan.scaled.items():
        if not only or name in only:
            yield lambda s=SCALED[name], b=blocks, n=steps: scaled_workload(s, b, n, device, dtype)


def selected(spec: MethodSpec, mode: str, wl: Workload, plan: RunPlan, pattern: str) -> str | None:
    """None to run; else why the row is skipped. Rows of another workload are not shown."""
    if spec.workloads is not None and wl.name not in spec.workloads:
        return "n/a"
    if mode not in spec.modes or (not wl.quality and plan.scaled_core_only and not spec.core):
        return "skipped: full mode only" if mode == "quick" else f"skipped in --{mode}"
    if pattern and spec.family != "dense" and not re.search(pattern, spec.name):
        return "skipped: --methods"
    return None


def _progress(res: Result, phase: str) -> None:
    if phase == "warm-up":
        tqdm.write(f"  {res.workload:>14} | {res.method:<56} | "
                   + (f"warm-up {res.warmup_s:7.1f} s" if res.ok else res.status[:100]))
    else:
        tqdm.write(f"  {res.workload:>14} | {res.method:<56} | "
                   + (f"{res.ms_per_step:8.1f} ms/step" if res.ok and res.gen_s else res.status[:100]))


def run_workload(wl: Workload, mode: str, plan: RunPlan, ctx: RunContext, reps: int, pattern: str) -> tuple[list[Result], dict]:
    call = count_call(wl.model, lambda: wl.example_call(wl.model))
    rows: list[Result | MethodSpec] = []  # table order: skipped rows in place, run ones filled in after
    for spec in METHODS:
        why = selected(spec, mode, wl, plan, pattern)
        if why != "n/a":
            rows.append(new_result(spec, wl, ctx, why) if why else spec)
    specs = [r for r in rows if isinstance(r, MethodSpec)]
    tqdm.write(f"{wl.name}: {len(specs)} methods, {reps} interleaved round(s), the first also warms each up")
    ran, rounds = run_methods(specs, wl, ctx, call, reps, report=_progress)
    done = iter(ran)
    results, samples = [], {}  # samples: method -> Samples
    for row in rows:
        if isinstance(row, MethodSpec):
            res, got = next(done)
            samples[res.method] = got
            _progress(res, "timed")
            row = res
        results.append(row)
    meta = {"name": wl.name, **wl.describe, "gflop_per_step": call.dense / 1e9, "attention_share": call.attention_share,
            "notes": list(wl.notes), "fidelity": wl.quality, "reps": reps, "rounds": rounds}
    if wl.quality:
        ref = compare.fill_quality(results, wl.name, samples)
        meta["notes"].append(f"PSNR / SSIM against: {ref}")
    return results, meta


def run_site(plan: RunPlan) -> dict[str, Any]:
    if plan.site is None:
        return {}
    from . import site

    tokens, heads, reps = plan.site
    args = argparse.Namespace(tokens=tokens, heads=heads, head_dim=64, reps=reps)
    try:
        return {"args": f"tokens={tokens} heads={heads}x64 reps={reps}", "rows": site.measure(args)}
    except Exception as err:  # noqa: BLE001 -- reported, not fatal
        return {"args": str(vars(args)), "rows": [], "error": f"{type(err).__name__}: {err}"}


def peer_findings(results: list[Result], workload: str) -> list[str]:
    beaten, lines = compare.peer_verdicts(results, workload)
    head = {None: f"- No peer was measured on {workload}.",
            True: "- Yes: at equal or better PSNR, one of our configurations is faster than every measured peer.",
            False: "- **No**: at least one peer is faster than every one of our configurations with at least its "
                   "PSNR (equal PSNR read as: ours >= the peer's PSNR). Details per peer:"}[beaten]
    return [head, *lines]


def findings(results: list[Result], site: dict, workloads: list[dict], threads: int) -> dict[str, list[str]]:
    fidelity = [w["name"] for w in workloads if w.get("fidelity")]
    failures = [f"- {r.workload} / {r.method}: {r.status}" for r in results
                if not r.ok and not r.status.startswith("skipped")]
    return {
        "Summary": compare.summary_lines(results),
        "Caching targets (issue: feature caching inside the compiled model)":
            [line for wl in reversed(fidelity) for line in compare.caching_targets(results, wl, threads)],
        **{f"Ours vs peers on {wl}, at equal PSNR": peer_findings(results, wl) for wl in reversed(fidelity)},
        "Targets": [*compare.site_targets(site.get("rows", [])), *compare.published_targets(results)]
        + ([f"- site benchmark failed: {site['error']}"] if site.get("error") else []),
        "Deviations from the published models": [f"- {w['name']}: blocks {w['blocks']}, steps {w['steps']}; "
                                                 + "; ".join(w["notes"]) for w in workloads],
        "Peers that could not be measured, and other failures": failures,
    }


def write_plots(out: Path, stem: str, results: list[Result], workloads: list[dict]) -> dict[str, Path]:
    """Title -> file of every plot drawn (a plot with nothing to show is not written)."""
    plots = {}
    for w in (w["name"] for w in workloads if w.get("fidelity")):
        suffix = "" if w == "fixture" else f"-{w}"
        if report.pareto_plot(results, out / f"{stem}-pareto{suffix}.png", w):
            plots[f"{w}: speedup vs PSNR"] = out / f"{stem}-pareto{suffix}.png"
        if report.blocks_plot(results, out / f"{stem}-blocks{suffix}.png", w):
            plots[f"{w}: blocks computed per step"] = out / f"{stem}-blocks{suffix}.png"
    if report.steps_plot(results, out / f"{stem}-steps.png"):
        plots["per-step time"] = out / f"{stem}-steps.png"
    return plots


def write_outputs(out: Path, stem: str, meta: dict, results: list[Result], workloads: list[dict], site: dict,
                  found: dict) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {"md": out / f"{stem}.md", "json": out / f"{stem}.json"}
    plots = write_plots(out, stem, results, workloads)
    paths.update(plots)
    paths["md"].write_text(report.markdown(meta, results, workloads, site, found, {k: str(v) for k, v in plots.items()}))
    report.write_json(paths["json"], {"meta": meta, "findings": found, "workloads": workloads, "site": site,
                                      "results": [r.to_json() for r in results]})
    return paths


def quiet() -> None:
    """Peers log a lot at INFO; keep the progress output readable."""
    os.environ.setdefault("CACHE_DIT_LOG_LEVEL", "warning")
    from diffusers.utils import logging as dlog

    dlog.set_verbosity_error()


def run_all(args: argparse.Namespace, mode: str, plan: RunPlan, ctx: RunContext,
            dtype: torch.dtype) -> tuple[list[Result], list[dict]]:
    """Every selected workload in table order, each built, run and freed in turn."""
    results, workloads = [], []
    for build in build_workloads(plan, selected_workloads(args.workloads, mode, plan), ctx.device, dtype):
        wl = build()
        reps = args.reps or (wl.prompts - 1 if wl.quality else plan.scaled_reps)
        rows, meta = run_workload(wl, mode, plan, ctx, reps, args.methods)
        results += rows
        workloads.append(meta)
        del wl
    compare.fill_speedups(results)
    return results, workloads


def run_meta(args: argparse.Namespace, mode: str, plan: RunPlan, dtype: torch.dtype, argv: list[str] | None,
             start: float) -> dict[str, Any]:
    return {"date": dt.date.today().isoformat(), "device": device_name(), "mode": mode,
            "threads": torch.get_num_threads(), "compiler": plan.compiler, "dtype": str(dtype).replace("torch.", ""),
            "inductor cache": "warm (user's)" if args.warm_cache else "fresh per run (cold compiles)",
            "versions": versions(), "command": "python -m bench " + " ".join(argv if argv is not None else sys.argv[1:]),
            "rounds": "timed generations interleaved across methods, order rotated by one method per round",
            "wall s": round(time.perf_counter() - start, 1)}


def result_stem(meta: dict[str, Any], args: argparse.Namespace) -> str:
    """<date>-<device>[-<mode>][-<workloads>][-methods-<regex>]: a subset run never overwrites a full one."""
    stem = f"{meta['date']}-{meta['device']}" + ("" if meta["mode"] == "full" else f"-{meta['mode']}")
    if args.workloads:
        stem += "-" + "+".join(w.strip() for w in args.workloads.split(",") if w.strip())
    if args.methods:
        stem += "-methods-" + (re.sub(r"[^A-Za-z0-9.=+-]+", "_", args.methods).strip("_")[:40] or "x")
    return stem


def print_summary(results: list[Result], found: dict[str, list[str]], meta: dict, paths: dict[str, Path]) -> None:
    shown = [r for r in results if not r.status.startswith("skipped")]
    print(report.main_table(shown, fmt="simple"))
    print(f"({len(results) - len(shown)} rows not run in this mode are listed in the results file)")
    for title, items in found.items():
        print(f"\n{title}\n" + "\n".join(items))
    print(f"\nwall {meta['wall s']} s; wrote " + ", ".join(str(p) for p in paths.values()))


def main(argv: list[str] | None = None) -> dict[str, Path]:
    args = parse(argv)
    mode = args.mode or "full"
    plan, start = PLANS[mode], time.perf_counter()
    quiet()
    if not args.warm_cache:  # cold compile times, whatever earlier runs left in the user's cache
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="asymrnr-bench-inductor-")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    print(f"bench: {mode} mode, {device_name()}, {torch.get_num_threads()} threads, compiler {plan.compiler}")
    selected_workloads(args.workloads, mode, plan)  # a misspelt workload fails before anything runs
    results, workloads = run_all(args, mode, plan, RunContext(plan.compiler, device), dtype)
    site = run_site(plan) if not args.workloads else {}  # a subset run is about its workloads only
    found = findings(results, site, workloads, torch.get_num_threads())
    meta = run_meta(args, mode, plan, dtype, argv, start)
    paths = write_outputs(args.out, result_stem(meta, args), meta, results, workloads, site, found)
    print_summary(results, found, meta, paths)
    return paths


if __name__ == "__main__":
    main()
