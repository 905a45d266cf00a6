"""`python -m bench --smoke`: the benchmark end to end on its minimal config (aot_eager, a few
minutes on 2 cores). Checks what the results file and JSON say, not only that they exist: every
row of ours and every dense row must run, a block cache must reuse its span, and the timed
generations must be interleaved across methods."""

from __future__ import annotations

import importlib.util
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

from bench.compare import caching_targets
from bench.flops import (
    AttentionCall,
    CallFlops,
    SiteLengths,
    cached_call_flops,
    ideal_speedup,
    reduced_call_flops,
    symmetric_ratio,
)
from bench.methods import printed_mag_ratios
from bench.report import frontier, place_labels
from bench.run import Result, round_order
from bench.workloads import block_rows, evenly, subsample

# deterministic: at 4 steps (t = 1000, 667, 334, 1) only step 1 falls between the bands, and is cached
CACHING_ROW = "asymrnr SkipCache N2-700-50"


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


def test_every_dense_row_and_every_row_of_ours_ran(smoke):
    _, payload = smoke
    run = [r for r in payload["results"]
           if r["family"] in ("dense", "ours") and not r["status"].startswith("skipped")]
    assert {r["workload"] for r in run} == {"fixture", "cogvideox-2b"}
    assert [r["method"] for r in run if r["status"] != "ok"] == []  # an error in any of them fails the test
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
    assert base["dynamo_graphs"] == 1 and base["graph_breaks"] == 0 and base["recompiles"] == 0
    (ours,) = _rows(payload, workload="fixture", method="asymrnr q=0.5 kv=0.3")
    dense_flops = base["flops_per_step"][0]
    assert all(0 < f < dense_flops for f in ours["flops_per_step"])  # attention really shrank
    assert ours["ideal"] > 1.0 and ours["efficiency"] == pytest.approx(ours["speedup"] / ours["ideal"])
    assert ours["compiles"] >= 1 and ours["matchings"] >= 1 and ours["recompiles"] == 0
    # reduced output differs from dense (finite PSNR) but is still a picture of the same clip
    assert ours["psnr"] is not None and 10 < ours["psnr"] < 200 and 0 < ours["ssim"] < 1
    assert base["psnr"] is None  # identical to itself: infinite PSNR, written as null


def test_block_cache_row_reuses_its_span_and_logs_blocks_per_step(smoke):
    _, payload = smoke
    (base,) = _rows(payload, workload="fixture", baseline=True)
    (row,) = _rows(payload, workload="fixture", method=CACHING_ROW)
    assert _timed(row) and row["num_blocks"] == 4 and row["cache_span"] == [1, 3]
    assert row["cache_hits"] > 0 and row["cache_misses"] > 0
    assert row["blocks_per_step"] == [4, 2, 4, 4]  # step 1 runs blocks 0 and 3 only
    assert len(row["blocks_by_generation"]) == 1 + len(row["gen_s"])  # the warm-up, then every timed one
    assert row["graph_breaks"] == 0 and row["recompiles"] == 0
    # the cached step costs half the blocks' FLOPs, and the FLOP model says so
    assert row["flops_per_step"][0] == base["flops_per_step"][0] > row["flops_per_step"][1]
    assert 1.0 < row["ideal"] < 4 / 3.5 + 0.01
    assert row["psnr"] is not None and row["psnr"] < 200  # reusing residuals changes the output
    (composed,) = _rows(payload, workload="fixture", method=CACHING_ROW + " + q=0.3 kv=0.3")
    assert composed["status"] == "ok" and composed["cache_hits"] > 0 and composed["ideal"] > row["ideal"]


def test_timed_generations_are_interleaved_across_methods(smoke):
    _, payload = smoke
    (fixture,) = [w for w in payload["workloads"] if w["name"] == "fixture"]
    ran = {r["method"] for r in _rows(payload, workload="fixture") if r["status"] == "ok"}
    assert fixture["reps"] == 2 and len(fixture["rounds"]) == 2
    assert all(set(order) == ran for order in fixture["rounds"])  # every method once per round
    assert fixture["rounds"][1] == fixture["rounds"][0][1:] + fixture["rounds"][0][:1]  # rotated by one
    assert all(len(r["gen_s"]) == 2 for r in _rows(payload, workload="fixture") if r["status"] == "ok")


def test_peers_and_skipped_methods_are_rows_not_gaps(smoke):
    _, payload = smoke
    # diffusers is a dependency of the package: its hooks must run, not merely be listed
    for name in ("diffusers FirstBlockCache t=0.2", "diffusers MagCache (calibrated)",
                 "diffusers SeaCache (defaults)"):
        (peer,) = _rows(payload, workload="fixture", method=name)
        assert _timed(peer), peer["status"]
    skipped = _rows(payload, workload="fixture", method="asymrnr kv-only 0.5")
    assert skipped and skipped[0]["status"] == "skipped in --smoke" and skipped[0]["gen_s"] == []
    assert not _rows(payload, workload="cogvideox-2b", family="peer")  # peers run on the trained fixture only
    assert not _rows(payload, workload="cogvideox-2b", method=CACHING_ROW)  # nor do our caches


def test_markdown_and_plots_are_written(smoke):
    out, payload = smoke
    (md,) = out.glob("*-smoke.md")
    text = md.read_text()
    for needle in ("## Main table", "## Ours vs peers on fixture, at equal PSNR", "## Targets",
                   "## Caching comparison: fixture (", "## Caching targets",
                   "1. ours Pareto-dominates every peer: ",
                   "2. >= 2.5x vs compiled dense at PSNR >= 30 dB: ",
                   "3. 0 graph breaks and 0 recompiles in every row of ours: met", CACHING_ROW,
                   "asymrnr q=0.5 kv=0.3", "aot_eager dense (baseline)", "## Workloads"):
        assert needle in text
    for plot in ("pareto", "steps", "blocks"):
        assert (out / md.name.replace(".md", f"-{plot}.png")).stat().st_size > 1000
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


def test_cached_steps_drop_the_span_blocks_and_their_sites_savings():
    # two blocks of 1000 FLOPs each (attention 400 of them, one site per block) + 100 outside the blocks
    attention = (AttentionCall(1, 10, 10), AttentionCall(1, 10, 10))
    call = CallFlops(1300, attention, {}, ("blk.0", "blk.1"), (1000, 1000))
    assert call.dense == 2100
    assert call.in_blocks("blk.1.attn", 1, 2) and not call.in_blocks("blk.10.attn", 1, 2)
    half = [SiteLengths("blk.0.attn", 2, 8, 4, 4), SiteLengths("blk.1.attn", 2, 8, 4, 4)]
    saved = 4 * (10 * 10 - 6 * 6)
    assert reduced_call_flops(call, half) == 2100 - 2 * saved
    # block 1 skipped: its site's saving is not counted on top of the whole block
    assert cached_call_flops(call, half, (1, 2)) == 2100 - saved - 1000
    assert cached_call_flops(call, [], (0, 2)) == 100


def test_schedule_subsampling_keeps_first_and_last_rows_per_container():
    assert evenly(30, 4) == [0, 10, 19, 29] and evenly(50, 50) == list(range(50)) and evenly(5, 1) == [0]
    assert block_rows((20, 40), (1, 2)) == [0, 20, 59] and block_rows((30,), (30,)) == list(range(30))
    table = torch.arange(60 * 30, dtype=torch.float64).reshape(60, 30) / 10_000
    small = subsample(Schedule(q=table, kv=0.3), [0, 20, 59], [0, 29])
    assert small.shape == (3, 2) and small.ratio("q", 2, 1) == table[59, 29] and small.kv == 0.3


def test_pareto_frontier_keeps_only_undominated_points():
    pts = [(1.0, 40.0), (1.5, 35.0), (1.2, 30.0), (2.0, 20.0), (0.8, 45.0)]
    assert frontier(pts) == [(0.8, 45.0), (1.0, 40.0), (1.5, 35.0), (2.0, 20.0)]


def _row(method: str, family: str, speedup: float, psnr: float, **kw: object) -> Result:
    r = Result("fixture-50", method, family, "k", True, method == "dense", 50, gen_s=[1.0 / speedup], **kw)
    r.speedup, r.psnr = speedup, psnr
    return r


def test_caching_targets_say_met_or_missed_with_the_numbers():
    rows = [_row("dense", "dense", 1.0, math.inf, graph_breaks=0, recompiles=0),
            _row("ours A", "ours", 2.6, 31.0, graph_breaks=0, recompiles=0),
            _row("ours B", "ours", 3.5, 26.0, graph_breaks=0, recompiles=0),
            _row("peer P", "peer", 2.0, 30.0), _row("peer Q", "peer", 3.0, 25.0)]
    lines = "\n".join(caching_targets(rows, "fixture-50", threads=2))
    assert "2 threads" in lines
    assert "1. ours Pareto-dominates every peer: met: 2 of 2" in lines
    assert "2. >= 2.5x vs compiled dense at PSNR >= 30 dB: met: our fastest at >= 30 dB is ours A, 2.60x" \
        in lines
    assert "3. 0 graph breaks and 0 recompiles in every row of ours: met: 2 of 2 rows clean" in lines
    rows[1].speedup, rows[2].recompiles = 1.9, 3  # peer P now wins at its PSNR; B recompiles
    lines = "\n".join(caching_targets(rows, "fixture-50", threads=2))
    assert "1. ours Pareto-dominates every peer: MISSED: 1 of 2" in lines
    assert "peer P (2.00x at 30.0 dB" in lines
    assert "2. >= 2.5x vs compiled dense at PSNR >= 30 dB: MISSED" in lines
    assert "MISSED: 1 of 2 rows clean; with breaks or recompiles: ours B (0 graph breaks, 3 recompiles)" \
        in lines


def test_rounds_rotate_and_labels_do_not_overlap():
    assert [round_order(3, r) for r in (1, 2, 3, 4)] == [[0, 1, 2], [1, 2, 0], [2, 0, 1], [0, 1, 2]]
    offsets = place_labels([(100.0, 100.0)] * 4, [5.0] * 4)
    boxes = [(100 + dx, 100 + dy, 105 + dx, 108 + dy) for dx, dy in offsets]
    apart = [a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]
             for i, a in enumerate(boxes) for b in boxes[i + 1:]]
    assert len(set(offsets)) == 4 and all(apart)


def test_mag_ratios_are_read_from_what_diffusers_prints():
    text = ("noise\n[MagCache] Calibration Complete. Copy these values to MagCacheConfig(mag_ratios=...):\n"
            "[1.0, 0.5]\n")
    assert printed_mag_ratios(text, 2) == [1.0, 0.5]
    with pytest.raises(RuntimeError, match="2 ratios for 3 steps"):
        printed_mag_ratios(text, 3)
    with pytest.raises(RuntimeError, match="printed no ratios"):
        printed_mag_ratios("nothing", 2)


def test_recompiles_count_a_methods_own_frames_only(monkeypatch):
    from types import SimpleNamespace

    from torch._dynamo import utils

    from bench.measure import DynamoTally

    def metric(compile_id: str | None, line: int | None, reason: str | None = None) -> SimpleNamespace:
        return SimpleNamespace(compile_id=compile_id, co_filename="m.py" if line else None, co_firstlineno=line,
                               co_name="forward" if line else None, recompile_reason=reason)

    metrics = [metric("0/0", 10, "0/0: BACKEND_MATCH failure"),  # another method's entry on the frame: not ours
               metric(None, None), metric(None, None),  # Inductor compiles of our lazy segments, outside Dynamo
               metric("1/0", 20), metric("0/1", 10, "0/0: tensor 'x' size mismatch")]  # a real recompile
    monkeypatch.setattr(utils, "get_compilation_metrics", lambda: metrics)
    tally = DynamoTally()
    with tally.watch():
        pass
    assert tally.recompiles == 1 and tally.reasons == ["0/0: tensor 'x' size mismatch"]


def test_wan_caching_rows_run_and_only_the_peers_break_the_graph():
    """The scaled Wan shape's caching rows (3 blocks, 4 steps, aot_eager): every row runs; ours
    keep one graph, each compiled diffusers peer breaks it or recompiles at its cache decisions."""
    from bench.flops import count_call
    from bench.methods import METHODS, WAN, RunContext
    from bench.run import run_methods
    from bench.workloads import SCALED, scaled_workload

    wl = scaled_workload(SCALED["wan2.1-1.3b"], (3,), 4, "cpu", torch.float32)
    optional = {k for k in ("cache_dit", "para_attn") if importlib.util.find_spec(k) is None}  # bench extras
    specs = [s for s in METHODS if s.workloads == WAN and s.kind not in optional]
    call = count_call(wl.model, lambda: wl.example_call(wl.model))
    ran, _ = run_methods(specs, wl, RunContext("aot_eager", "cpu"), call, reps=1)
    rows = {r.method: r for r, _ in ran}
    assert len(rows) == 18 - 2 * len(optional) and all(r.ok for r in rows.values()), {m: r.status for m, r in rows.items()}
    ours = [r for r in rows.values() if r.family == "ours"]
    assert all(r.graph_breaks == 0 and r.recompiles == 0 for r in ours)
    assert rows["diffusers FirstBlockCache t=0.2 + compile"].graph_breaks > 0
    compiled_peers = [r for r in rows.values() if r.family == "peer" and r.method.endswith("+ compile")]
    assert len(compiled_peers) == 7 - len(optional)
    assert all(r.graph_breaks + r.recompiles > 0 for r in compiled_peers), [r.method for r in compiled_peers]
    # t = 999, 749, 500, 250: step 2 is the only one between the bands and not the last: its first
    # and last block run on the cached middle
    skip = rows["asymrnr SkipCache N2-700-50"]
    assert skip.blocks_per_step == [3, 3, 2, 3] and skip.cache_hits == 2  # warm-up and timed generation
