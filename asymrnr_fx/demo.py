"""`make demo`: the shipped fixture video DiT, dense (Inductor) vs backend="asymrnr" in its modes.

    python -m asymrnr_fx.demo [--q 0.5] [--kv 0.3] [--cache-threshold 0.2] [--steps 20] [--prompts 10]
                              [--matching-every 5] [--out out] [--compiler inductor]

Rows: eager dense (the numeric floor), Inductor dense (the baseline, and the reference of every
metric), then asymrnr's modes: token reduction (--q / --kv, matching every 5 steps, the published
CogVideoX window), feature caching alone (`BlockCache(threshold=--cache-threshold)`: block 0 always
runs; on a cache hit blocks 1-3 of the fixture's 4 are skipped and their stored residual reused)
and both together (the same BlockCache with the same --q / --kv, so that each of the last three
rows differs from another in one thing only). "blocks skipped" is the fraction of block
evaluations the cache skipped, over all calls of all generations.

Timing is interleaved: each method first generates the first prompt (the warm-up, which absorbs
compilation; its clip counts for quality, its time does not), then every further prompt is generated
by each method in turn, the order rotating from prompt to prompt, so that drift of the machine falls
on all methods alike. ms/step is the median over those prompts. Generations: 5 methods x --prompts
(50 of --steps 20 with the defaults).

Writes out/demo.gif: one row per prompt (named at its left), columns Inductor dense | each asymrnr
mode, each headed by its method, ms/step and PSNR against dense.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw, ImageFont
from tabulate import tabulate
from tqdm import tqdm

import asymrnr_fx
from asymrnr_fx import AsymRnRConfig, AsymRnRRuntime, BlockCache, quality
from asymrnr_fx.models import fixture

HEADERS = ["method", "ms/step", "speedup vs inductor", "PSNR dB", "SSIM", "rel L2 (latents)", "blocks skipped"]


@dataclass
class Method:
    """One row: how it generates (`model` None: the eager transformer) and what it produced."""

    label: str
    model: Any = None
    runtime: AsymRnRRuntime | None = None
    samples: dict[str, fixture.Sample] = field(default_factory=dict)
    seconds_per_step: list[float] = field(default_factory=list)  # timed generations only
    blocks: list[tuple[int, int]] = field(default_factory=list)  # per generation: (skipped, all)

    @property
    def caches(self) -> bool:
        return self.runtime is not None and self.runtime.config.cache is not None


@dataclass(frozen=True)
class Row:
    """What the table and the GIF say about one method (metrics against Inductor dense)."""

    label: str
    ms_per_step: float
    speedup: float
    metrics: quality.Metrics  # means over the prompts
    psnr: float  # mean over the prompts whose clip differs from dense (inf when none does)
    identical: int  # prompts whose clip equals dense's (PSNR inf, left out of `psnr`)
    prompts: int
    skipped: float | None  # fraction of block evaluations skipped; None without a cache

    def psnr_text(self, unit: str = "") -> str:
        """PSNR, and how many prompts were identical when some, not all, were."""
        text = f"{self.psnr:.3g}{unit}"
        return text + (f" ({self.identical}/{self.prompts} identical)" if 0 < self.identical < self.prompts else "")


def blocks_skipped(cache_log: dict[Any, tuple[int, int]]) -> tuple[int, int]:
    """(blocks skipped, blocks in all calls) of one generation from `runtime.cache_log`, whose
    values are (blocks run, blocks skipped) per (step, context)."""
    skipped = sum(s for _, s in cache_log.values())
    return skipped, sum(r + s for r, s in cache_log.values())


def rotated(items: Sequence[Any], k: int) -> list[Any]:
    """`items` starting at position k (mod len): round k's order, so no method is always first."""
    k %= len(items)
    return [*items[k:], *items[:k]]


def _asymrnr(label: str, fixture_model: fixture.Fixture, config: AsymRnRConfig, steps: int) -> Method:
    compiled = asymrnr_fx.compile(fixture_model.transformer, config)
    compiled.asymrnr.num_steps = steps  # BlockCache keeps the last step full when it knows the length
    return Method(label, compiled, compiled.asymrnr)


def build_methods(fixture_model: fixture.Fixture, args: argparse.Namespace) -> list[Method]:
    """All methods, compiled models created up front. They coexist: each `asymrnr_fx.compile` has
    its own runtime and Dynamo guards each cache entry on its backend. `torch._dynamo.reset()`
    drops every model's compiled code, so it runs once here, before any of them, and never between."""
    torch._dynamo.reset()
    dense = torch.compile(fixture_model.transformer, backend=args.compiler, dynamic=False)
    reduction = {"q_ratio": args.q, "kv_ratio": args.kv, "matching_every": args.matching_every}
    no_reduction = {"q_ratio": 0.0, "kv_ratio": 0.0}
    block_cache = BlockCache(threshold=args.cache_threshold)
    red, cached = f"q={args.q} kv={args.kv}", f"cache t={args.cache_threshold}"
    modes = [
        (f"asymrnr {red}", reduction, None),
        (f"asymrnr {cached}", no_reduction, block_cache),
        (f"asymrnr {cached} + {red}", reduction, block_cache),  # the same q / kv: one change per row
    ]
    return [
        Method("eager dense (numeric floor)"),
        Method(f"{args.compiler} dense (baseline)", dense),
        *(_asymrnr(label, fixture_model, AsymRnRConfig(**ratios, cache=c, compiler=args.compiler), args.steps)
          for label, ratios, c in modes),
    ]


def generate(fixture_model: fixture.Fixture, method: Method, prompt: str, seed: int, steps: int) -> float:
    """One clip into `method`; returns its seconds per denoising step."""
    start = time.perf_counter()
    method.samples[prompt] = fixture_model.sample(prompt, steps=steps, seed=seed, transformer=method.model)
    seconds = (time.perf_counter() - start) / steps
    if method.caches:  # the log holds this generation's calls until the next one starts
        method.blocks.append(blocks_skipped(method.runtime.cache_log))
    return seconds


def run_interleaved(fixture_model: fixture.Fixture, methods: list[Method], prompts: list[str], steps: int) -> None:
    """Prompt 0 by every method (warm-up, untimed), then prompt i by every method in rotated order."""
    bar = tqdm(total=len(methods) * len(prompts), desc="generations", unit="clip")
    for i, prompt in enumerate(prompts):
        for method in rotated(methods, i):
            bar.set_postfix_str(method.label)
            seconds = generate(fixture_model, method, prompt, seed=i, steps=steps)
            if i > 0:
                method.seconds_per_step.append(seconds)
            bar.update()
    bar.close()


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _report(samples: dict[str, fixture.Sample], reference: dict[str, fixture.Sample]) -> quality.Report:
    pairs = {p: (s.frames, s.latents) for p, s in samples.items()}
    refs = {p: (s.frames, s.latents) for p, s in reference.items()}
    return quality.compare_sets(pairs, refs)


def finite_psnr(report: quality.Report) -> tuple[float, int]:
    """(mean PSNR over the prompts that differ, prompts identical). The plain mean is inf as soon as
    one prompt is identical, which a cache with few hits makes likely and which hides the others."""
    values = [m.psnr for m in report.per_prompt.values()]
    finite = [v for v in values if math.isfinite(v)]
    return (statistics.fmean(finite) if finite else math.inf), len(values) - len(finite)


def summarize(methods: list[Method], baseline: Method) -> list[Row]:
    t_base = _median(baseline.seconds_per_step)
    rows = []
    for m in methods:
        t = _median(m.seconds_per_step)
        skipped, total = map(sum, zip(*m.blocks)) if m.blocks else (0, 0)
        fraction = skipped / total if total else None
        report = _report(m.samples, baseline.samples)
        psnr, identical = finite_psnr(report)
        rows.append(Row(m.label, 1e3 * t, t_base / t, report.mean, psnr, identical, len(m.samples), fraction))
    return rows


def table(rows: list[Row]) -> str:
    body = [
        [r.label, r.ms_per_step, r.speedup, r.psnr_text(), r.metrics.ssim, r.metrics.rel_l2,
         "-" if r.skipped is None else f"{r.skipped:.2f}"]
        for r in rows
    ]
    return tabulate(body, headers=HEADERS, floatfmt=".3g", tablefmt="github")


def runtime_line(method: Method) -> str:
    """Compile counts, matchings and sites reduced (as before), plus cache hits for the caching modes."""
    rt = method.runtime
    line = (f"{method.label}: {rt.stats['compiles']} {rt.config.compiler} compilations "
            f"({rt.compile_seconds:.1f} s), "
            f"{rt.stats['matchings']} matchings, sites reduced {rt.rewrites['sites_reduced']}"
            f"/{rt.rewrites['sites_found']}")
    if method.caches:
        hits, calls = rt.stats["cache_hits"], rt.stats["cache_hits"] + rt.stats["cache_misses"]
        line += f", cache hits {hits}/{calls} calls"
        if hits == 0:  # e.g. the fixture's first prompt at 20 steps: every step changes it by > 0.1
            line += " (none: every change of block 0's residual reached the threshold; raise --cache-threshold)"
    return line


# ---- the GIF -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Column:
    """One GIF column: `title` (wrapped to the column), `caption` lines under it, clips by prompt."""

    title: str
    caption: tuple[str, ...]
    samples: dict[str, fixture.Sample]


def wrap(text: str, font: Any, width: float) -> list[str]:
    """Greedy word wrap to `width` pixels (a word wider than that gets a line of its own)."""
    lines: list[str] = []
    for word in text.split():
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] += f" {word}"
        else:
            lines.append(word)
    return lines


def _upscaled(frames: torch.Tensor, scale: int) -> list[Image.Image]:
    """(F, 3, H, W) in [-1, 1] -> F RGB images, H and W times `scale` (NEAREST: pixels stay pixels)."""
    video = quality.to_unit(frames).mul(255).byte()
    size = (frames.shape[-1] * scale, frames.shape[-2] * scale)
    return [Image.fromarray(f.permute(1, 2, 0).numpy()).resize(size, Image.NEAREST) for f in video]


def _draw_lines(draw: ImageDraw.ImageDraw, xy: tuple[int, int], lines: Iterable[tuple[str, str]],
                font: Any, line_h: int) -> None:
    x, y = xy
    for text, fill in lines:
        draw.text((x, y), text, fill=fill, font=font)
        y += line_h


def _labelled_canvas(columns: list[Column], prompts: list[str], cell: tuple[int, int], gap: int,
                     font: Any) -> tuple[Image.Image, tuple[int, int]]:
    """White canvas with the column headings on top and the prompts at the left; returns it and
    the top-left corner of the grid of clips."""
    line_h = font.getbbox("Ag")[3] + 3
    headings = [[(t, "black") for t in wrap(c.title, font, cell[0])]
                + [(t, "dimgray") for line in c.caption for t in wrap(line, font, cell[0])] for c in columns]
    names = [wrap(p, font, cell[0]) for p in prompts]
    left, top = cell[0] + 2 * gap, max(map(len, headings)) * line_h + 2 * gap
    size = (left + len(columns) * (cell[0] + gap), top + len(prompts) * (cell[1] + gap))
    canvas = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(canvas)
    for j, lines in enumerate(headings):
        _draw_lines(draw, (left + j * (cell[0] + gap), gap), lines, font, line_h)
    for i, lines in enumerate(names):
        y = top + i * (cell[1] + gap) + (cell[1] - len(lines) * line_h) // 2
        _draw_lines(draw, (gap, y), [(t, "black") for t in lines], font, line_h)
    return canvas, (left, top)


def write_gif(columns: list[Column], path: Path, scale: int = 6, duration_ms: int = 180) -> None:
    """Rows: the prompts of the first column; columns: `columns`; frames animated."""
    prompts = list(columns[0].samples)
    clips = [[_upscaled(c.samples[p].frames, scale) for c in columns] for p in prompts]
    cell, gap = clips[0][0][0].size, scale
    canvas, (left, top) = _labelled_canvas(columns, prompts, cell, gap, ImageFont.load_default())
    images = []
    for f in range(len(clips[0][0])):
        image = canvas.copy()
        for i, row in enumerate(clips):
            for j, clip in enumerate(row):
                image.paste(clip[f], (left + j * (cell[0] + gap), top + i * (cell[1] + gap)))
        images.append(image)
    path.parent.mkdir(parents=True, exist_ok=True)
    images[0].save(path, save_all=True, append_images=images[1:], duration=duration_ms, loop=0)


def gif_columns(methods: list[Method], rows: list[Row], dense: Method) -> list[Column]:
    """Inductor dense, then every asymrnr mode, each captioned with its ms/step and PSNR."""
    by_label = {r.label: r for r in rows}
    columns = [Column(dense.label, (f"{by_label[dense.label].ms_per_step:.1f} ms/step", "reference"), dense.samples)]
    for m in methods:
        if m.runtime is not None:
            columns.append(Column(m.label, caption(by_label[m.label]), m.samples))
    return columns


def caption(row: Row) -> tuple[str, ...]:
    psnr = "PSNR inf (= dense)" if row.identical == row.prompts else f"PSNR {row.psnr_text(' dB')}"
    skipped = () if row.skipped is None else (f"{100 * row.skipped:.0f}% blocks skipped",)
    return (f"{row.ms_per_step:.1f} ms/step", psnr, *skipped)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--q", type=float, default=0.5, help="query reduction ratio")
    p.add_argument("--kv", type=float, default=0.3, help="key/value reduction ratio")
    p.add_argument("--cache-threshold", type=float, default=0.2,
                   help="BlockCache threshold: relative L1 change of block 0's residual under which blocks 1-3 are reused")
    p.add_argument("--matching-every", type=int, default=5)
    p.add_argument("--steps", type=int, default=fixture.DEFAULT_STEPS)
    p.add_argument("--prompts", type=int, default=len(fixture.PROMPTS))
    p.add_argument("--out", type=Path, default=Path("out"))
    p.add_argument("--compiler", choices=("inductor", "aot_eager"), default="inductor",
                   help="aot_eager: a quick functional check (tests); its timings mean nothing")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.manual_seed(0)
    fixture_model = fixture.load()
    prompts = list(fixture.PROMPTS[: args.prompts])
    methods = build_methods(fixture_model, args)
    print(f"fixture: {fixture_model.latent_shape} latents, {len(prompts)} prompts, {args.steps} steps, "
          f"{torch.get_num_threads()} threads; {len(methods)} methods interleaved, "
          f"{len(methods) * len(prompts)} generations")
    run_interleaved(fixture_model, methods, prompts, args.steps)
    dense = methods[1]
    rows = summarize(methods, dense)
    print(table(rows))
    for m in methods:
        if m.runtime is not None:
            print(runtime_line(m))
    gif = args.out / "demo.gif"
    write_gif(gif_columns(methods, rows, dense), gif)
    print(f"wrote {gif} (rows: prompts; columns: {dense.label}, then each asymrnr mode)")


if __name__ == "__main__":
    main()
