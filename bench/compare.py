"""Cross-method numbers (speedups, fidelity) and the plain-language findings, from results only."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

from asymrnr_fx import quality

from .run import Result, Samples

TARGET_SITE = 0.90
TARGET_PUBLISHED = 0.90


def _rows(results: Iterable[Result], workload: str) -> list[Result]:
    return [r for r in results if r.workload == workload and r.ok and r.gen_s]


def fill_speedups(results: Sequence[Result]) -> None:
    """Speedup vs the compiled dense baseline, vs the dense run of the same backend (eager rows
    vs eager dense), and efficiency (measured / FLOP-ideal) for our rows."""
    for wl in dict.fromkeys(r.workload for r in results):
        rows = _rows(results, wl)
        base = next((r for r in rows if r.baseline), None)
        eager = next((r for r in rows if r.family == "dense" and not r.compiled), None)
        for r in rows:
            same = base if r.compiled else eager
            r.speedup = base.total_s / r.total_s if base else None
            r.speedup_same_backend = same.total_s / r.total_s if same else None
            if r.family == "ours" and r.ideal and r.speedup:
                r.efficiency = r.speedup / r.ideal


def reference_row(rows: Sequence[Result], samples: dict[str, Samples]) -> Result | None:
    """The baseline if it produced samples, else eager dense."""
    for pick in (lambda r: r.baseline, lambda r: r.family == "dense"):
        row = next((r for r in rows if pick(r) and samples.get(r.method)), None)
        if row is not None:
            return row
    return None


def fill_quality(results: Sequence[Result], workload: str, samples: dict[str, Samples]) -> str | None:
    """PSNR / SSIM / relative L2 of every row against the reference row's samples (same prompt
    and seed); returns the reference's name."""
    rows = _rows(results, workload)
    ref_row = reference_row(rows, samples)
    if ref_row is None:
        return None
    ref = samples[ref_row.method]
    for r in rows:
        mine = samples.get(r.method, {})
        common = sorted(set(mine) & set(ref))
        if common:
            report = quality.compare_sets({str(i): mine[i] for i in common}, {str(i): ref[i] for i in common})
            r.psnr, r.ssim, r.rel_l2 = report.mean.psnr, report.mean.ssim, report.mean.rel_l2
    return ref_row.method


# ---- findings -------------------------------------------------------------------------------------
def _fmt_psnr(p: float) -> str:
    return "identical" if math.isinf(p) else f"{p:.1f} dB"


def within_spread(a: Result, b: Result) -> bool:
    """True when two rows' speedups differ by less than either row's relative timing spread."""
    rel = max(a.spread_s / a.total_s, b.spread_s / b.total_s)
    return abs(a.speedup - b.speedup) <= rel * b.speedup


def _ours_for_fidelity(rows: Sequence[Result]) -> list[Result]:
    """Our measured configurations; ratio 0 is one of them: it is the compiled dense baseline (a
    disabled reduction and no cache leave the graph untouched)."""
    return [r for r in rows
            if (r.family == "ours" or r.baseline) and r.ok and r.psnr is not None and r.speedup]


def _measured(p: Result) -> bool:
    return p.ok and p.psnr is not None and p.speedup is not None


def peer_matches(results: Sequence[Result], workload: str) -> list[tuple[Result, Result | None]]:
    """Each peer row run on `workload`, with our fastest configuration that has at least its PSNR
    (None where none has, or where the peer has no measurement)."""
    rows = [r for r in results if r.workload == workload]
    ours = _ours_for_fidelity(rows)
    out = []
    for p in (r for r in rows if r.family == "peer" and not r.status.startswith("skipped")):
        better = [o for o in ours if _measured(p) and o.psnr >= p.psnr]
        out.append((p, max(better, key=lambda o: o.speedup) if better else None))
    return out


def _beaten(p: Result, best: Result | None) -> bool:
    return _measured(p) and best is not None and best.speedup > p.speedup


def peer_verdicts(results: Sequence[Result], workload: str = "fixture") -> tuple[bool | None, list[str]]:
    """For each peer row: does our fastest configuration with at least its PSNR beat its speedup?"""
    lines = []
    matches = peer_matches(results, workload)
    for p, best in matches:
        if not _measured(p):
            lines.append(f"- {p.method}: no measurement ({p.status}).")
        elif best is None:
            lines.append(f"- {p.method}: {p.speedup:.2f}x at {_fmt_psnr(p.psnr)}: NOT beaten, none of our "
                         f"configurations reaches that PSNR.")
        else:
            verdict = "beaten" if _beaten(p, best) else "NOT beaten"
            name = f"ratio 0 (= {best.method})" if best.baseline else best.method
            noise = " (the difference is within the timing spread)" if within_spread(best, p) else ""
            lines.append(f"- {p.method}: {p.speedup:.2f}x at {_fmt_psnr(p.psnr)}: {verdict}; our best at >= "
                         f"that PSNR is {name}, {best.speedup:.2f}x at {_fmt_psnr(best.psnr)}{noise}.")
    measured = [(p, b) for p, b in matches if _measured(p)]
    return (all(_beaten(p, b) for p, b in measured) if measured else None), lines


# ---- the caching issue's targets -------------------------------------------------------------------
TARGET_CACHE_SPEEDUP = 2.5  # vs the compiled dense baseline ...
TARGET_CACHE_PSNR = 30.0  # ... at least this PSNR (dB) against it


def _verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def dominance_target(results: Sequence[Result], workload: str) -> str:
    """Target 1: at every peer's PSNR, one of ours with at least that PSNR is faster."""
    matches = peer_matches(results, workload)
    if not matches:
        return "1. ours Pareto-dominates every peer: not measured (no peer row ran)."
    lost = [f"{p.method} ({p.speedup:.2f}x at {_fmt_psnr(p.psnr)}; ours "
            + (f"{b.speedup:.2f}x at {_fmt_psnr(b.psnr)}" if b else "none at that PSNR") + ")"
            for p, b in matches if _measured(p) and not _beaten(p, b)]
    unmeasured = [p.method for p, _ in matches if not _measured(p)]
    n = len(matches) - len(unmeasured)
    line = (f"1. ours Pareto-dominates every peer: {_verdict(not lost and n > 0)}: {n - len(lost)} of {n} "
            f"measured peer rows beaten at equal or lower PSNR")
    line += f"; not beaten: {'; '.join(lost)}" if lost else ""
    return line + (f"; {len(unmeasured)} peer rows without a measurement" if unmeasured else "") + "."


def speed_target(results: Sequence[Result], workload: str) -> str:
    """Target 2: >= 2.5x vs the compiled dense baseline at >= 30 dB."""
    good = [r for r in results if r.workload == workload and r.family == "ours" and r.ok and r.speedup
            and r.psnr is not None and r.psnr >= TARGET_CACHE_PSNR]
    head = f"2. >= {TARGET_CACHE_SPEEDUP}x vs compiled dense at PSNR >= {TARGET_CACHE_PSNR:.0f} dB"
    if not good:
        return f"{head}: MISSED: no row of ours reaches {TARGET_CACHE_PSNR:.0f} dB."
    best = max(good, key=lambda r: r.speedup)
    return (f"{head}: {_verdict(best.speedup >= TARGET_CACHE_SPEEDUP)}: our fastest at >= "
            f"{TARGET_CACHE_PSNR:.0f} dB is {best.method}, {best.speedup:.2f}x at {_fmt_psnr(best.psnr)}.")


def compile_target(results: Sequence[Result], workload: str) -> str:
    """Target 3: no graph break and no recompile in any row of ours."""
    ours = [r for r in results
            if r.workload == workload and r.family == "ours" and not r.status.startswith("skipped")]
    bad = [f"{r.method} ({r.graph_breaks} graph breaks, {r.recompiles} recompiles)" for r in ours
           if r.ok and (r.graph_breaks or r.recompiles)]
    failed = [r.method for r in ours if not r.ok or r.graph_breaks is None or r.recompiles is None]
    head = "3. 0 graph breaks and 0 recompiles in every row of ours"
    if not ours:
        return f"{head}: not measured (no row of ours ran)."
    clean = len(ours) - len(bad) - len(failed)
    line = f"{head}: {_verdict(not bad and not failed)}: {clean} of {len(ours)} rows clean"
    line += f"; with breaks or recompiles: {'; '.join(bad)}" if bad else ""
    return line + (f"; not measured (failed): {', '.join(failed)}" if failed else "") + "."


def caching_targets(results: Sequence[Result], workload: str, threads: int) -> list[str]:
    """The three targets of the caching issue on one fidelity workload, each met / MISSED."""
    base = next((r for r in results if r.workload == workload and r.baseline and r.ok and r.gen_s), None)
    ref = f"{base.method}, {base.ms_per_step:.1f} ms/step" if base else "not measured"
    return [f"- {workload} ({threads} threads; baseline {ref}):",
            *(f"  {line}" for line in (dominance_target(results, workload), speed_target(results, workload),
                                       compile_target(results, workload)))]


def published_targets(results: Sequence[Result]) -> list[str]:
    """Published schedules: measured speedup / FLOP-ideal end to end, per workload."""
    lines = []
    for r in results:
        if r.family == "ours" and "published" in r.method and not r.cache:
            if r.efficiency is None:
                lines.append(f"- {r.workload} / {r.method}: not measured ({r.status}).")
                continue
            ok = "meets" if r.efficiency >= TARGET_PUBLISHED else "MISSES"
            lines.append(f"- {r.workload} / {r.method}: {r.speedup:.2f}x of FLOP-ideal {r.ideal:.2f}x = "
                         f"efficiency {r.efficiency:.3f}: {ok} the {TARGET_PUBLISHED} target.")
    return lines


def site_targets(site_rows: Sequence[dict]) -> list[str]:
    """Attention-site efficiency (bench.site) at the published matching window of 5 steps."""
    lines = []
    for r in site_rows:
        if r["matching_every"] != 5:
            continue
        ok = "meets" if r["efficiency"] >= TARGET_SITE else "MISSES"
        lines.append(f"- site q={r['q_ratio']} kv={r['kv_ratio']} (Lq={r['Lq']}, Lkv={r['Lkv']}): {r['speedup']:.2f}x "
                     f"of ideal {r['ideal']:.2f}x = efficiency {r['efficiency']:.3f}: {ok} the {TARGET_SITE} target.")
    return lines


def _describe(r: Result) -> str:
    ideal = f" (FLOP-ideal {r.ideal:.2f}x, efficiency {r.efficiency:.2f})" if r.efficiency is not None else ""
    quality = f" at {_fmt_psnr(r.psnr)}" if r.psnr is not None else ""
    return f"{r.method}: {r.speedup:.2f}x{ideal}{quality}"


def summary_lines(results: Sequence[Result]) -> list[str]:
    """Per workload: the baseline's step time, our fastest row, the published rows, the fastest peer."""
    lines = []
    for wl in dict.fromkeys(r.workload for r in results):
        rows = [r for r in _rows(results, wl) if r.speedup]
        base = next((r for r in rows if r.baseline), None)
        if base is None:
            lines.append(f"- {wl}: no baseline measurement.")
            continue
        parts, named = [f"baseline {base.method} {base.ms_per_step:.1f} ms/step"], set()
        for label, family in (("fastest of ours", "ours"), ("fastest peer", "peer")):
            best = max((r for r in rows if r.family == family), key=lambda r: r.speedup, default=None)
            if best is not None:
                parts.append(f"{label}: {_describe(best)}")
                named.add(best.method)
        parts += [_describe(r) for r in rows
                  if r.family == "ours" and "published" in r.method and not r.cache and r.method not in named]
        lines.append(f"- {wl}: " + "; ".join(parts) + ".")
    return lines
