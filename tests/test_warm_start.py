"""Warm starts: a second process serves the backend's segments from Inductor's on-disk caches.

Each generation runs in a fresh subprocess (the caches under test are per process in memory and
on disk per directory); all files go to pytest's temporary directories.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.inductor

TESTS = Path(__file__).resolve().parent

# One asymrnr generation of two steps on the tiny CogVideoX: a prologue segment and two reduced
# site segments, each compiled for the call that matches (step 0) and the one that reuses (step 1).
_GENERATE = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import torch
from conftest import cogvideox_inputs, run, tiny_cogvideox
import asymrnr_fx
from asymrnr_fx import AsymRnRConfig, inductor_cache, tokens

args = json.loads(sys.argv[2])
if args.get("load"):
    torch.compiler.load_cache_artifacts(open(args["load"], "rb").read())
if args.get("changed_restore"):  # stands for an edit of tokens.py: restore scales by 2
    def gather_tokens(x, index):
        return 2 * x.gather(2, index.unsqueeze(-1).expand(*index.shape, x.shape[-1]))
    gather_tokens.__module__ = tokens.__name__
    tokens.gather_tokens = gather_tokens
# cut at sites unless asked: pieces to tell apart
cfg = {"q_ratio": args["q_ratio"], "kv_ratio": 0.3, "matching_every": 2, "segments": args.get("segments", "sites")}
model, x = tiny_cogvideox(), cogvideox_inputs()
fast = asymrnr_fx.compile(model, AsymRnRConfig(**cfg))
outs = [run(fast, x, t) for t in (900.0, 890.0)]
torch.save(outs, args["out"])
if args.get("save"):
    artifacts = torch.compiler.save_cache_artifacts()
    open(args["save"], "wb").write(artifacts[0])
lengths = sorted({v for d in fast.asymrnr.used_lengths.values() for v in d.values()})
print(json.dumps({**inductor_cache.counts(), "compiles": fast.asymrnr.stats["compiles"], "lengths": lengths}))
"""


def _generate(cache_dir: Path, out: Path, **args) -> dict:
    """Run one generation in a fresh process with `cache_dir` as Inductor's cache; its counters."""
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache_dir), "TORCHINDUCTOR_FORCE_DISABLE_CACHES": "0",
           "XDG_CACHE_HOME": str(cache_dir / "xdg")}
    cmd = [sys.executable, "-c", _GENERATE, str(TESTS), json.dumps({**args, "out": str(out)})]
    done = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def first(tmp_path_factory) -> dict:
    """A cold first process: fills a cache directory and saves the mega-cache artifacts."""
    root = tmp_path_factory.mktemp("warm_start")
    cache, out, mega = root / "cache", root / "first.pt", root / "mega.bin"
    counts = _generate(cache, out, q_ratio=0.5, save=str(mega))
    return {"counts": counts, "cache": cache, "out": out, "mega": mega, "root": root}


def _assert_all_hits(c: dict) -> None:
    assert c["compiles"] == 1 + 2 * 2  # prologue + a reduced segment per block structure x (matching, reuse)
    assert c["fxgraph_hit"] == c["aot_hit"] == c["compiles"], c
    assert c["fxgraph_miss"] == c["fxgraph_bypass"] == c["aot_miss"] == c["aot_bypass"] == 0, c


def test_first_process_compiles_and_stores_every_segment(first):
    c = first["counts"]
    assert c["compiles"] == 1 + 2 * 2 and c["fxgraph_hit"] == c["aot_hit"] == 0, c
    assert c["fxgraph_miss"] == c["aot_miss"] == c["compiles"], c  # stored, not bypassed
    assert c["fxgraph_bypass"] == c["aot_bypass"] == 0, c


def test_second_process_hits_both_caches_and_equals_first(first):
    out = first["root"] / "second.pt"
    c = _generate(first["cache"], out, q_ratio=0.5)
    _assert_all_hits(c)
    assert c["lengths"] == first["counts"]["lengths"]
    for got, want in zip(torch.load(out), torch.load(first["out"])):
        assert torch.equal(got, want)


def test_other_reduced_lengths_miss_instead_of_a_wrong_hit(first):
    out = first["root"] / "other.pt"
    c = _generate(first["cache"], out, q_ratio=0.3)
    assert c["lengths"] != first["counts"]["lengths"]
    assert c["fxgraph_hit"] == c["aot_hit"] == 1, c  # the prologue: no lengths in it
    assert c["aot_miss"] == c["fxgraph_miss"] == c["compiles"] - 1, c
    reference = _generate(first["root"] / "cold", first["root"] / "cold.pt", q_ratio=0.3)
    assert reference["aot_hit"] == 0  # an empty cache: compiled from scratch
    for got, want in zip(torch.load(out), torch.load(first["root"] / "cold.pt")):
        assert torch.equal(got, want)


def test_changed_token_code_is_a_miss_not_the_stale_graph(first):
    """The same graph shapes with other code in tokens.py must not reuse the stored segments."""
    out = first["root"] / "changed.pt"
    c = _generate(first["cache"], out, q_ratio=0.5, changed_restore=True)
    assert c["lengths"] == first["counts"]["lengths"]
    # the prologue has no restore: it hits; the site segments miss
    assert c["aot_hit"] == 1 and c["aot_miss"] == c["compiles"] - 1, c
    got, want = torch.load(out), torch.load(first["out"])
    assert not torch.equal(got[0], want[0])  # the edit is in effect


def test_mega_cache_artifacts_warm_start_an_empty_cache(first):
    assert first["mega"].stat().st_size > 0
    out = first["root"] / "mega.pt"
    c = _generate(first["root"] / "empty", out, q_ratio=0.5, load=str(first["mega"]))
    _assert_all_hits(c)
    for got, want in zip(torch.load(out), torch.load(first["out"])):
        assert torch.equal(got, want)


def test_uncut_graph_warm_starts_both_of_its_programs(tmp_path):
    """The uncut graph's two programs (the call that matches, the call that reuses) are served
    from the cache a first process filled, and give its output."""
    cold = _generate(tmp_path / "cache", tmp_path / "cold.pt", q_ratio=0.5, segments="auto")
    assert cold["compiles"] == 2 and cold["fxgraph_miss"] == cold["aot_miss"] == 2 and cold["aot_hit"] == 0, cold
    warm = _generate(tmp_path / "cache", tmp_path / "warm.pt", q_ratio=0.5, segments="auto")
    assert warm["compiles"] == 2 and warm["fxgraph_hit"] == warm["aot_hit"] == 2, warm
    assert warm["fxgraph_miss"] == warm["aot_miss"] == warm["fxgraph_bypass"] == warm["aot_bypass"] == 0, warm
    for got, want in zip(torch.load(tmp_path / "warm.pt"), torch.load(tmp_path / "cold.pt"), strict=True):
        assert torch.equal(got, want)
