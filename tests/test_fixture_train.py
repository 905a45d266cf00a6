"""The fixture trainer's checkpoints: an interrupted stage resumes where it stopped."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import time

import pytest

from asymrnr_fx.models.fixture import train

BUDGET_S, CHECKPOINT_S = 15, 9
FLAGS = ["--minutes", str(BUDGET_S / 60), "--checkpoint-minutes", str(CHECKPOINT_S / 60), "--threads", "1", "--batch", "2", "--warmup", "1",
         "--num-layers", "1", "--head-dim", "16"]


def _interrupted(out) -> int:
    """Start a stage in a process, kill it once it has written a checkpoint; the checkpoint's step."""
    proc = subprocess.Popen([sys.executable, "-m", "asymrnr_fx.models.fixture.train", *FLAGS, "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (out / train.RESUME).exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        time.sleep(0.5)  # let the checkpoint finish writing
    finally:
        proc.kill()
        proc.wait()
    assert (out / train.RESUME).exists(), "the stage ended before its first checkpoint"
    return json.loads((out / "training.json").read_text())["stages"][-1]["steps"]


def test_an_interrupted_stage_resumes_where_it_stopped(tmp_path):
    before = _interrupted(tmp_path)
    start = time.perf_counter()
    train.train(train.parse_args([*FLAGS, "--out", str(tmp_path), "--resume"]))
    assert time.perf_counter() - start < BUDGET_S - CHECKPOINT_S + 4  # only what was left of the budget
    meta = json.loads((tmp_path / "training.json").read_text())
    assert len(meta["stages"]) == 1 and meta["stages"][0]["finished"]  # one stage, continued
    assert meta["stages"][0]["steps"] > before and not (tmp_path / train.RESUME).exists()
    with open(tmp_path / "loss.csv", newline="") as f:
        rows = list(csv.reader(f))[1:]
    steps, elapsed = [int(r[0]) for r in rows], [float(r[1]) for r in rows]
    assert steps == list(range(1, len(steps) + 1))  # the log goes on from the checkpoint, no gap or restart
    assert elapsed == sorted(elapsed) and elapsed[before] >= CHECKPOINT_S - 1  # resumed rows carry on the clock


def test_resume_with_other_flags_or_nothing_to_resume_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        train.train(train.parse_args([*FLAGS, "--out", str(tmp_path), "--resume"]))
    _interrupted(tmp_path)
    with pytest.raises(ValueError, match=r"flags differ .*\['lr'\]"):
        train.train(train.parse_args([*FLAGS, "--out", str(tmp_path), "--resume", "--lr", "1e-3"]))
