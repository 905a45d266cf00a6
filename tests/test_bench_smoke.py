"""`python -m bench --smoke`: the benchmark end to end on its minimal config (aot_eager, about a
minute on 2 cores). Checks what the results file and JSON say, not only that they exist."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from asymrnr_fx import Schedule

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # bench/ is a folder of the repository, not an installed package
    sys.path.insert(0, str(ROOT))

from bench.flops import (
    AttentionCall,
    CallFlops,
    SiteLengths,
    ideal_speedup,
    reduced_call_flops,
    symmetric_ratio,
)
from bench.report import frontier
from bench.workloads import block_rows, evenly, subsample


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run([sys.executable, "-m", "bench", "--smoke", "--out", str(out)], cwd=ROOT, check=False,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (payload,) = [json.loads(p.read_text()) for p in out.glob("*-smoke.json")]
    return out, payload


def _rows(payload: dict, **match: object) -> list[dict]:
    return [r for r in payload["results"] if all(r[k] == v for k, v in match.items())]


def _timed(row: dict) -> bool:
    times = [row["total_s"], row["ms_per_step"], *row["gen_s"]]
    return row["status"] == "ok" and all(t is not None and math.isfinite(t) and t > 0 for t in times)


def test_dense_and_ours_rows_have_finite_positive_timings(smoke):
    _, payload = smoke
    for workload in ("fixture", "cogvideox-2b"):
        dense = _rows(payload, workload=workload, family="dense")
        assert {r["method"] for r in dense} == {"eager dense", "aot_eager dense (baseline)"}
        assert all(_timed(r) for r in dense)
        ours = _rows(payload, workload=workload, method="asymrnr q=0.5 kv=0.3")
        assert len(ours) == 1 and _timed(ours[0])
        assert len(ours[0]["step_ms"]) == ours[0]["steps"]


def test_ours_has_flop_model_compile_counts_and_fidelity(smoke):
    _, payload = smoke
    (base,) = _rows(payload, workload="fixture", baseline=True)
    assert base["speedup"] == pytest.approx(1.0) and base["ideal"] == 1.0
    (ours,) = _rows(payload, workload="fixture", method="asymrnr q=0.5 kv=0.3")
    dense_flops = base["flops_per_step"][0]
    assert all(0 < f < dense_flops for f in ours["flops_per_step"])  # attention really shrank
    assert ours["ideal"] > 1.0 and ours["efficiency"] == pytest.approx(ours["speedup"] / ours["ideal"])
    assert ours["compiles"] >= 1 and ours["matchings"] >= 1 and ours["recompiles"] == 0
    # reduced output differs from dense (finite PSNR) but is still a picture of the same clip
    assert ours["psnr"] is not None and 10 < ours["psnr"] < 200 and 0 < ours["ssim"] < 1
    assert base["psnr"] is None  # identical to itself: infinite PSNR, written as null


def test_peers_and_skipped_methods_are_rows_not_gaps(smoke):
    _, payload = smoke
    (fbc,) = _rows(payload, workload="fixture", method="diffusers FirstBlockCache t=0.2")
    assert fbc["status"] == "ok" or fbc["status"].startswith(("error:", "not installed:"))
    skipped = _rows(payload, workload="fixture", method="asymrnr kv-only 0.5")
    assert skipped and skipped[0]["status"] == "skipped in --smoke" and skipped[0]["gen_s"] == []
    assert not _rows(payload, workload="cogvideox-2b", family="peer")  # peers run on the trained fixture only


def test_markdown_and_plots_are_written(smoke):
    out, payload = smoke
    (md,) = out.glob("*-smoke.md")
    text = md.read_text()
    for needle in ("## Main table", "## Ours vs peers on the fixture, at equal PSNR", "## Targets",
                   "asymrnr q=0.5 kv=0.3", "aot_eager dense (baseline)", "## Workloads"):
        assert needle in text
    assert (out / md.name.replace(".md", "-pareto.png")).stat().st_size > 1000
    assert (out / md.name.replace(".md", "-steps.png")).stat().st_size > 1000
    assert payload["meta"]["mode"] == "smoke" and payload["workloads"][0]["gflop_per_step"] > 0


# ---- the pure parts of the harness, checked by hand ---------------------------------------------------
def test_flop_model_counts_attention_by_hand_and_projections_only_when_symmetric():
    # one site: 2 text + 8 visual tokens, width (batch * heads * head_dim) 4; q/k/v/out projections on 10 tokens
    call = CallFlops(1000, (AttentionCall(4, 10, 10),), {f"blk.attn.{p}": (200, 10) for p in ("to_q", "to_k", "to_v")})
    assert call.dense == 1000 + 4 * 4 * 10 * 10
    full = SiteLengths("blk.attn", 2, 8, 8, 8)
    assert reduced_call_flops(call, [full]) == call.dense  # nothing kept out: dense, also when symmetric
    assert reduced_call_flops(call, [full], symmetric=True) == call.dense
    half = SiteLengths("blk.attn", 2, 8, 4, 4)
    attention = 4 * 4 * (2 + 4) * (2 + 4)
    assert reduced_call_flops(call, [half]) == 1000 + attention
    assert reduced_call_flops(call, [half], symmetric=True) == 1000 - 3 * 200 * 4 // 10 + attention
    assert ideal_speedup(call.dense, [call.dense, 1000 + attention]) == pytest.approx(2 * 2600 / (2600 + 1576))
    h = symmetric_ratio(0.5, 0.3)
    assert (1 - h) ** 2 == pytest.approx(0.5 * 0.7)


def test_schedule_subsampling_keeps_first_and_last_rows_per_container():
    assert evenly(30, 4) == [0, 10, 19, 29] and evenly(50, 50) == list(range(50)) and evenly(5, 1) == [0]
    assert block_rows((20, 40), (1, 2)) == [0, 20, 59] and block_rows((30,), (30,)) == list(range(30))
    table = torch.arange(60 * 30, dtype=torch.float64).reshape(60, 30) / 10_000
    small = subsample(Schedule(q=table, kv=0.3), [0, 20, 59], [0, 29])
    assert small.shape == (3, 2) and small.ratio("q", 2, 1) == table[59, 29] and small.kv == 0.3


def test_pareto_frontier_keeps_only_undominated_points():
    pts = [(1.0, 40.0), (1.5, 35.0), (1.2, 30.0), (2.0, 20.0), (0.8, 45.0)]
    assert frontier(pts) == [(0.8, 45.0), (1.0, 40.0), (1.5, 35.0), (2.0, 20.0)]
