"""Tables, the results markdown, the JSON with every number, and the plots."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tabulate import tabulate

from .run import Result

MAIN_HEADERS = ["workload", "method", "ms/step", "total s", "spread s", "warm-up s", "x vs compiled dense", "x vs same-backend dense",
                "FLOP-ideal x", "efficiency", "PSNR dB", "SSIM", "compile s", "compiles", "Dynamo graphs",
                "recompiles", "peak MiB", "status / note"]


def _num(x: float | None, fmt: str = ".3g") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    return format(x, fmt)


def _status(r: Result) -> str:
    return r.note if r.ok else (f"{r.status}" + (f" ({r.note})" if r.note else ""))


def main_rows(results: Sequence[Result]) -> list[list[str]]:
    rows = []
    for r in results:
        timed = r.ok and bool(r.gen_s)
        rows.append([
            r.workload, r.method, _num(r.ms_per_step if timed else None), _num(r.total_s if timed else None),
            _num(r.spread_s if timed else None, ".2g"), _num(r.warmup_s if timed else None, ".3g"), _num(r.speedup, ".2f"), _num(r.speedup_same_backend, ".2f"),
            _num(r.ideal, ".2f"), _num(r.efficiency, ".2f"), _num(r.psnr, ".1f"), _num(r.ssim, ".4f"),
            _num(r.compile_s, ".1f"), _num(r.compiles, "d"), _num(r.dynamo_graphs, "d"), _num(r.recompiles, "d"),
            _num(r.peak_mib, ".0f"), _status(r),
        ])
    return rows


def main_table(results: Sequence[Result], fmt: str = "github") -> str:
    return tabulate(main_rows(results), headers=MAIN_HEADERS, tablefmt=fmt, disable_numparse=True)


WORKLOAD_HEADERS = ["workload", "modelled on", "scale", "hidden (heads x 64)", "grid (f, h, w)", "visual + text tokens",
                    "blocks used", "steps used", "dense GFLOP/step", "attention share", "notes"]


def workload_rows(workloads: Sequence[dict[str, Any]]) -> list[list[str]]:
    return [[w["name"], w["real"], w["scale"], f"{w['hidden']} ({w['heads']} x 64)", "x".join(map(str, w["grid"])),
             f"{w['visual_tokens']} + {w['text_tokens']}", w["blocks"], w["steps"], _num(w["gflop_per_step"], ".2f"),
             _num(w["attention_share"], ".0%"), "; ".join(w["notes"])] for w in workloads]


def site_table(rows: Sequence[dict], fmt: str = "github") -> str:
    cols = ["q_ratio", "kv_ratio", "Lq", "Lkv", "matching_every", "dense_ms", "reduced_attn_ms", "matching_ms",
            "total_ms", "speedup", "ideal", "efficiency"]
    return tabulate([[r[c] for c in cols] for r in rows], headers=cols, floatfmt=".3g", tablefmt=fmt)


def markdown(meta: dict[str, Any], results: Sequence[Result], workloads: Sequence[dict], site: dict,
             findings: dict[str, list[str]], plots: dict[str, str]) -> str:
    """The results file: setup, findings first (the most useful part), then the tables."""
    lines = [f"# asymrnr_fx benchmark: {meta['date']} on {meta['device']} ({meta['mode']} mode)", "",
             *(f"- {k}: {v}" for k, v in meta.items() if k not in ("date",)), ""]
    for title, items in findings.items():
        lines += [f"## {title}", "", *(items or ["- none"]), ""]
    run = [r for r in results if not r.status.startswith("skipped")]
    lines += ["## Main table", "", _legend(), ""]
    for wl in dict.fromkeys(r.workload for r in results):
        lines += [f"### {wl}", "", main_table([r for r in run if r.workload == wl]), ""]
    skipped = [f"{r.workload} / {r.method} ({r.status})" for r in results if r.status.startswith("skipped")]
    if skipped:
        lines += ["Not run in this mode: " + "; ".join(skipped) + ".", ""]
    lines += ["## Workloads", "", tabulate(workload_rows(workloads), headers=WORKLOAD_HEADERS, tablefmt="github"), ""]
    if site.get("rows"):
        lines += [f"## One attention site (bench.site: {site['args']})", "", site_table(site["rows"]), ""]
    lines += [f"![{name}]({Path(p).name})" for name, p in plots.items()]
    return "\n".join(lines) + "\n"


def _legend() -> str:
    return ("Times: warm-up generation excluded; median over the timed generations, spread = max - min. "
            "`x vs compiled dense`: the baseline's median / this row's. `x vs same-backend dense`: eager rows "
            "against eager dense, compiled rows against the compiled baseline. warm-up s: the first generation "
            "(Dynamo, compilation, first matchings), excluded from the timings. FLOP-ideal: dense FLOPs / this "
            "method's FLOPs over the generation (linear layers + attention at each site's reduced lengths); "
            "efficiency = measured / ideal. PSNR / SSIM: frames vs the baseline's, same prompt and seed, mean over "
            "prompts. compile s / compiles: inner-compiler (Inductor) calls and seconds; Dynamo graphs counts graph "
            "breaks too; recompiles: Dynamo recompilations. Peak MiB: peak above the level before the method "
            "(process RSS sampled every 5 ms on CPU, CUDA allocator peak on GPU), compile included.")


def _clean(x: Any) -> Any:
    """JSON without NaN / Infinity literals: non-finite floats become null."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.write_text(json.dumps(_clean(payload), indent=1, default=str))


# ---- plots ------------------------------------------------------------------------------------------
PSNR_CAP = 60.0
FAMILY_STYLE = {"ours": ("tab:red", "o"), "peer": ("tab:blue", "s"), "dense": ("black", "^")}


def frontier(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """Pareto-optimal (speedup, psnr) points, by increasing speedup: none faster and as good."""
    out, best = [], -math.inf
    for x, y in sorted(points, key=lambda p: (-p[0], -p[1])):
        if y > best:
            out.append((x, y))
            best = y
    return out[::-1]


def pareto_plot(results: Sequence[Result], path: Path, workload: str = "fixture") -> bool:
    """Speedup vs PSNR of every measured method on `workload` (infinite PSNR drawn at the top)."""
    pts = [r for r in results if r.workload == workload and r.ok and r.psnr is not None and r.speedup]
    if not pts:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    top = PSNR_CAP + 5  # identical or visually identical (>= the cap) results are drawn on this line
    fig, ax = plt.subplots(figsize=(9, 6))
    for r in pts:
        colour, marker = FAMILY_STYLE[r.family]
        y = min(r.psnr, top)
        ax.scatter(r.speedup, y, marker=marker, edgecolors=colour, facecolors=colour if r.compiled else "none")
        ax.annotate(r.method, (r.speedup, y), fontsize=6, xytext=(3, 2), textcoords="offset points")
    for family in ("ours", "peer"):
        front = frontier([(r.speedup, min(r.psnr, top)) for r in pts if r.family == family])
        if front:
            ax.step(*zip(*front), where="post", color=FAMILY_STYLE[family][0], lw=0.8, alpha=0.6)
    ax.axhline(top, color="grey", lw=0.5, ls=":")
    ax.set(xlabel="speedup vs compiled dense", ylabel=f"PSNR vs dense, dB (top line: > {PSNR_CAP} dB or identical)",
           title=f"{workload}: speed vs fidelity (filled: compiled; red ours, blue peers)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def steps_plot(results: Sequence[Result], path: Path) -> bool:
    """Per-step time along the generation, one panel per workload."""
    workloads = list(dict.fromkeys(r.workload for r in results if r.ok and r.step_ms))
    if not workloads:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(workloads), 1, figsize=(9, 3.2 * len(workloads)), squeeze=False)
    for ax, wl in zip(axes[:, 0], workloads):
        for r in results:
            if r.workload == wl and r.ok and r.step_ms and (r.family != "peer" or r.compiled):
                ax.plot(range(len(r.step_ms)), r.step_ms, label=r.method, lw=2 if r.family == "dense" else 1)
        ax.set(title=wl, xlabel="denoising step", ylabel="ms per call (median)")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
