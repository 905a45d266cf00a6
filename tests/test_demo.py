"""`make demo`'s pieces: interleaving, the blocks-skipped count, the labelled GIF, and one cheap
end-to-end run (aot_eager, 2 prompts x 3 steps)."""

from __future__ import annotations

import math
import re

import torch
from PIL import Image, ImageFont

from asymrnr_fx import demo, quality
from asymrnr_fx.models import fixture


def test_rotated_runs_every_method_once_per_round_and_changes_who_goes_first() -> None:
    methods = ["a", "b", "c"]
    rounds = [demo.rotated(methods, k) for k in range(4)]
    assert all(sorted(r) == methods for r in rounds)
    assert [r[0] for r in rounds] == ["a", "b", "c", "a"]


def test_blocks_skipped_counts_blocks_not_calls() -> None:
    log = {(0, 0): (4, 0), (1, 0): (1, 3), (2, 0): (1, 3), (3, 0): (4, 0)}
    assert demo.blocks_skipped(log) == (6, 16)
    assert demo.blocks_skipped({}) == (0, 0)


def test_finite_psnr_leaves_identical_prompts_out_of_the_mean_and_counts_them() -> None:
    metrics = {"a": quality.Metrics(math.inf, 1.0, 0.0), "b": quality.Metrics(30.0, 0.9, 0.1),
               "c": quality.Metrics(40.0, 0.95, 0.05)}
    report = quality.Report(metrics, quality.mean_metrics(metrics.values()))
    assert report.mean.psnr == math.inf  # why the demo does not show the plain mean
    assert demo.finite_psnr(report) == (35.0, 1)
    same = quality.Report({"a": metrics["a"]}, metrics["a"])
    assert demo.finite_psnr(same) == (math.inf, 1)


def test_wrap_fits_the_width_and_keeps_every_word() -> None:
    font = ImageFont.load_default()
    text = "asymrnr cache t=0.1 + q=0.5 kv=0.3"
    lines = demo.wrap(text, font, 60)
    assert len(lines) > 1
    assert " ".join(lines) == text
    assert all(font.getlength(line) <= 60 for line in lines if " " in line)


def _clip(value: float) -> fixture.Sample:
    frames = torch.full((8, 3, 16, 16), value)
    frames[:, :, 0, 0] = torch.linspace(-1, 1, 8)[:, None]  # frames differ, or the GIF merges them
    return fixture.Sample(frames, frames[None])


def test_gif_has_a_label_strip_prompt_names_and_each_clip_in_its_cell(tmp_path) -> None:
    prompts = ["red circle moving right", "blue circle static"]
    columns = [demo.Column(f"method {j}", ("1.0 ms/step", "PSNR 30 dB"), {p: _clip(j - 1.0) for p in prompts})
               for j in range(3)]  # column j is uniformly grey level j / 2
    path = tmp_path / "demo.gif"
    demo.write_gif(columns, path, scale=6)
    gif = Image.open(path)
    assert gif.n_frames == 8
    image = gif.convert("RGB")
    cell, gap = 96, 6
    left, top = gif.width - 3 * (cell + gap), gif.height - 2 * (cell + gap)
    assert left >= cell and top > 0  # room for the prompt names and the headings
    grey = [image.getpixel((left + j * (cell + gap) + cell // 2, top + cell + gap + cell // 2))[0] for j in range(3)]
    assert grey[0] < 5 and abs(grey[1] - 128) < 5 and grey[2] > 250
    heading = image.crop((left, 0, gif.width, top)).convert("L")
    names = image.crop((0, top, left, gif.height)).convert("L")
    assert heading.getextrema()[0] < 100 and names.getextrema()[0] < 100  # text was drawn


def test_demo_runs_end_to_end_with_the_cache_rows(tmp_path, capsys) -> None:
    demo.main(["--prompts", "2", "--steps", "3", "--compiler", "aot_eager", "--cache-threshold", "10",
               "--out", str(tmp_path)])
    out = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ")}
    cache_row = rows["asymrnr cache t=10.0"]
    assert len(rows) == 6  # header + 5 methods
    assert float(cache_row.split("|")[-2]) == 0.25  # steps 0 and 2 full; step 1 skips blocks 1-3 of 4
    assert rows["asymrnr q=0.5 kv=0.3"].split("|")[-2].strip() == "-"
    assert re.search(r"asymrnr cache t=10.0: .* cache hits 2/6 calls", out)
    assert Image.open(tmp_path / "demo.gif").n_frames == 8
