"""Tables, the results markdown, the JSON with every number, and the plots."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tabulate import tabulate

from .run import Result

MAIN_HEADERS = ["workload", "method", "ms/step", "total s", "spread s", "warm-up s", "x vs compiled dense",
                "x vs same-backend dense", "FLOP-ideal x", "efficiency", "PSNR dB", "SSIM", "compile s",
                "compiles", "Dynamo graphs", "graph breaks", "recompiles", "peak MiB", "status / note"]


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
            _num(r.compile_s, ".1f"), _num(r.compiles, "d"), _num(r.dynamo_graphs, "d"),
            _num(r.graph_breaks, "d"), _num(r.recompiles, "d"), _num(r.peak_mib, ".0f"), _status(r),
        ])
    return rows


def main_table(results: Sequence[Result], fmt: str = "github") -> str:
    return tabulate(main_rows(results), headers=MAIN_HEADERS, tablefmt=fmt, disable_numparse=True)


# ---- the caching comparison (one fidelity workload) ------------------------------------------------
CACHING_HEADERS = ["#", "method", "ms/step", "spread %", "x vs compiled dense", "PSNR dB", "SSIM",
                   "graph breaks", "recompiles", "compiles", "blocks computed", "cache hits / calls"]


def numbered(results: Sequence[Result], workload: str) -> list[tuple[int, Result]]:
    """The rows of `workload` that ran, numbered in table order: the numbers of the Pareto plot."""
    rows = [r for r in results if r.workload == workload and r.ok and r.gen_s]
    return list(enumerate(rows, 1))


def _cache_cells(r: Result) -> list[str]:
    share, span = r.blocks_computed, r.cache_span
    blocks = f"{share:.0%} (span {span[0]}-{span[1] - 1} of {r.num_blocks})" if share is not None else "-"
    calls = (r.cache_hits or 0) + (r.cache_misses or 0)
    return [blocks, f"{r.cache_hits} / {calls}" if r.cache_hits is not None else "-"]


def caching_table(results: Sequence[Result], workload: str, fmt: str = "github") -> str:
    rows = [[str(n), r.method, _num(r.ms_per_step), _num(100 * r.spread_s / r.total_s, ".0f"),
             _num(r.speedup, ".2f"), _num(r.psnr, ".1f"), _num(r.ssim, ".4f"), _num(r.graph_breaks, "d"),
             _num(r.recompiles, "d"), _num(r.compiles, "d"), *_cache_cells(r)]
            for n, r in numbered(results, workload)]
    return tabulate(rows, headers=CACHING_HEADERS, tablefmt=fmt, disable_numparse=True)


def _caching_legend() -> str:
    return ("Rows that ran, numbered as in the Pareto plot. spread %: (max - min) / median of the timed "
            "generations. graph breaks: breaks Dynamo recorded while compiling this method; recompiles: "
            "compilations of a Python frame this method had already compiled; compiles: inner-compiler "
            "(Inductor) calls, for ours one per segment variant. blocks computed: share of the dense block "
            "evaluations the timed generations ran (our block cache; its span is the blocks a cached step "
            "skips); cache hits / calls: calls that reused the span, over every generation run (warm-ups "
            "included). Rows that failed are listed under failures and in the main table.")


WORKLOAD_HEADERS = ["workload", "modelled on", "scale", "hidden (heads x head dim)", "grid (f, h, w)", "visual + text tokens",
                    "blocks used", "steps used", "dense GFLOP/step", "attention share", "notes"]


def workload_rows(workloads: Sequence[dict[str, Any]]) -> list[list[str]]:
    return [[w["name"], w["real"], w["scale"], f"{w['hidden']} ({w['heads']} x {w['hidden'] // w['heads']})", "x".join(map(str, w["grid"])),
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
    for w in reversed([w["name"] for w in workloads if w.get("fidelity")]):
        lines += [f"## Caching comparison: {w} ({meta['threads']} threads)", "", _caching_legend(), "",
                  caching_table(results, w), ""]
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
    return ("Times: median over the timed generations (one per interleaved round), spread = max - min; "
            "warm-up generations excluded. `x vs compiled dense`: the baseline's median / this row's. "
            "`x vs same-backend dense`: eager rows against eager dense, compiled rows against the compiled "
            "baseline. warm-up s: the first generation (Dynamo, compilation, first matchings). FLOP-ideal: "
            "dense FLOPs / this method's FLOPs over the generation (linear layers + attention at each site's "
            "reduced lengths; blocks a cached step skipped count nothing); efficiency = measured / ideal. "
            "PSNR / SSIM: frames vs the baseline's, same prompt and seed, mean over prompts. compile s / "
            "compiles: inner-compiler (Inductor) calls and seconds; Dynamo graphs counts graph breaks too; "
            "graph breaks: breaks Dynamo recorded; recompiles: compilations of a frame this method had "
            "already compiled (first turn; see bench/README.md). Peak MiB: peak above the level before the "
            "method (process RSS sampled every 5 ms on CPU, CUDA allocator peak on GPU), compile included.")


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


LABEL_OFFSETS = [(4, 3), (4, -9), (-12, 3), (-12, -9), (4, 12), (-12, 12), (4, -18), (-12, -18), (12, -3),
                 (-20, -3), (4, 21), (-12, 21), (4, -27), (-12, -27)]


def _apart(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    """Boxes (x0, y0, x1, y1) that do not overlap."""
    return a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]


def place_labels(points: Sequence[tuple[float, float]], widths: Sequence[float], height: float = 8.0
                 ) -> list[tuple[float, float]]:
    """Offsets (display points) for one label per point so that no two labels overlap where one of
    LABEL_OFFSETS allows it (greedy, in order; the first offset where all are taken)."""
    taken: list[tuple[float, float, float, float]] = []
    out = []
    for (x, y), w in zip(points, widths):
        boxes = [(o, (x + o[0], y + o[1], x + o[0] + w, y + o[1] + height)) for o in LABEL_OFFSETS]
        (dx, dy), b = next(((o, b) for o, b in boxes if all(_apart(b, t) for t in taken)), boxes[0])
        taken.append(b)
        out.append((dx, dy))
    return out


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def pareto_plot(results: Sequence[Result], path: Path, workload: str = "fixture") -> bool:
    """Speedup vs PSNR of every measured method on `workload` (infinite PSNR drawn at the top);
    points carry the numbers of the caching table, and the legend maps them to methods."""
    pts = [(n, r) for n, r in numbered(results, workload) if r.psnr is not None and r.speedup]
    if not pts:
        return False
    plt = _plt()
    from matplotlib.lines import Line2D

    top = PSNR_CAP + 5  # identical or visually identical (>= the cap) results are drawn on this line
    fig, ax = plt.subplots(figsize=(14, max(6.0, 0.13 * len(pts) / (1 if len(pts) <= 45 else 2) + 1.5)))
    handles = []
    for n, r in pts:
        colour, marker = FAMILY_STYLE[r.family]
        face = colour if r.compiled else "none"
        ax.scatter(r.speedup, min(r.psnr, top), marker=marker, edgecolors=colour, facecolors=face, s=22)
        handles.append(Line2D([], [], marker=marker, ls="", markeredgecolor=colour, markerfacecolor=face,
                              label=f"{n}  {r.method}"))
    for family in ("ours", "peer"):
        front = frontier([(r.speedup, min(r.psnr, top)) for _, r in pts if r.family == family])
        if front:
            ax.step(*zip(*front), where="post", color=FAMILY_STYLE[family][0], lw=0.8, alpha=0.6)
    ax.axhline(top, color="grey", lw=0.5, ls=":")
    ax.set(xlabel="speedup vs compiled dense", ylabel=f"PSNR vs dense, dB (top line: > {PSNR_CAP} dB or identical)",
           title=f"{workload}: speed vs fidelity (filled: compiled; red ours, blue peers; numbers: legend)")
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=6, frameon=False,
              ncol=1 if len(pts) <= 45 else 2, handletextpad=0.3, borderaxespad=0.0)
    fig.tight_layout()
    fig.canvas.draw()  # final layout, so that data -> display coordinates hold for the labels
    xy = ax.transData.transform([(r.speedup, min(r.psnr, top)) for _, r in pts]) * 72 / fig.dpi
    offsets = place_labels([tuple(p) for p in xy], [4.0 * len(str(n)) + 1 for n, _ in pts])
    for (n, r), (dx, dy) in zip(pts, offsets):
        ax.annotate(str(n), (r.speedup, min(r.psnr, top)), fontsize=6, xytext=(dx, dy),
                    textcoords="offset points", color=FAMILY_STYLE[r.family][0])
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def blocks_plot(results: Sequence[Result], path: Path, workload: str) -> bool:
    """Blocks computed at each step (mean over the timed generations), one panel per caching row of
    ours on `workload`, numbered as in the caching table."""
    rows = [(n, r) for n, r in numbered(results, workload) if r.blocks_per_step]
    if not rows:
        return False
    plt = _plt()
    cols = min(4, len(rows))
    nrows = -(-len(rows) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.6 * cols, 1.9 * nrows + 0.6), squeeze=False, sharex=True,
                             sharey=True)
    for ax, (n, r) in zip(axes.flat, rows):
        steps = range(len(r.blocks_per_step))
        blocks = [b if b is not None else float("nan") for b in r.blocks_per_step]
        ax.plot(steps, blocks, lw=1, color="tab:red", marker=".", ms=3)
        ax.set_title(f"{n}. {r.method.removeprefix('asymrnr ')}", fontsize=7)
        ax.set_ylim(0, r.num_blocks + 0.5)
        ax.yaxis.get_major_locator().set_params(integer=True)
        ax.tick_params(labelsize=6)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(rows):]:
        ax.set_visible(False)
    dense = rows[0][1].num_blocks
    fig.suptitle(f"{workload}: blocks computed per step (mean over timed generations; dense = {dense})",
                 fontsize=9)
    fig.supxlabel("denoising step", fontsize=8)
    fig.supylabel("blocks computed", fontsize=8)
    fig.tight_layout(rect=(0.015, 0.0, 1.0, 1.0 - 0.35 / fig.get_figheight()))  # room for the suptitle
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def steps_plot(results: Sequence[Result], path: Path) -> bool:
    """Per-step time along the generation, one panel per workload (eager peers left out); lines
    numbered as in the caching table where the workload has one."""
    workloads = list(dict.fromkeys(r.workload for r in results if r.ok and r.step_ms))
    if not workloads:
        return False
    plt = _plt()
    panels = []
    for wl in workloads:
        number = {id(r): n for n, r in numbered(results, wl)}
        lines = [(number.get(id(r)), r) for r in results
                 if r.workload == wl and r.ok and r.step_ms and (r.family != "peer" or r.compiled)]
        panels.append((wl, lines))
    heights = [max(3.2, 0.1 * len(lines) / (1 if len(lines) <= 40 else 2) + 1.0) for _, lines in panels]
    fig, axes = plt.subplots(len(panels), 1, figsize=(14, sum(heights)), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    for ax, (wl, lines) in zip(axes[:, 0], panels):
        for n, r in lines:
            ax.plot(range(len(r.step_ms)), r.step_ms, label=f"{n}  {r.method}" if n else r.method,
                    lw=2 if r.family == "dense" else 0.8, color="black" if r.baseline else None)
        ax.set(title=wl, xlabel="denoising step", ylabel="ms per call (median)")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.legend(fontsize=5.5, ncol=1 if len(lines) <= 40 else 2, loc="upper left",
                  bbox_to_anchor=(1.01, 1.0), frameon=False, borderaxespad=0.0)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
