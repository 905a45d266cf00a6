"""Every bad input the user can give, in one table: the error type, and a message that names the
field (or file), the bad value and the fix.

A row is `bad(id, make, error, starts, *contains)`: `make(tmp_path)` must raise `error` whose
message starts with `starts` and contains every string of `contains`; "{tmp}" in them stands
for tmp_path (the files of a row are written there).
"""

from __future__ import annotations

import pickle
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from conftest import REFERENCE, cogvideox_inputs, run, tiny_cogvideox

import asymrnr_fx
from asymrnr_fx import AsymRnRConfig, ConfigError, Schedule, ScheduleError

needs_reference = pytest.mark.skipif(not REFERENCE.exists(), reason="shared/reference not beside the repo")
TIERS = "euclidean_cogvideox-2b_cache5.safetensors"
THRESHOLDS = "cogvideox-2b_cache5_0.yaml"
EXPECTED_ENTRIES = "{tier (int): ratio in [0, 1)}, e.g. q: {6: 0.4, 7: 0.8}"


def bad(case_id: str, make: Callable[[Path], Any], error: type, starts: str, *contains: str, marks=()):
    return pytest.param(make, error, starts, contains, id=case_id, marks=marks)


def bad_file(case_id: str, make: Callable[[Path], Any], starts: str, *contains: str):
    """A row that reads copies of the released files."""
    return bad(case_id, make, ScheduleError, starts, *contains, marks=needs_reference)


def config(**kwargs: Any) -> Callable[[Path], Any]:
    return lambda _: AsymRnRConfig(**kwargs)


def schedule(**tables: Any) -> Callable[[Path], Any]:
    return lambda _: Schedule(**tables)


def with_nan(shape: tuple[int, int], *where: tuple[int, int]) -> torch.Tensor:
    table = torch.zeros(shape)
    for block, step in where:
        table[block, step] = float("nan")
    return table


# ---- published files: copies of the release in tmp_path, one of them replaced ---------------
def published(tiers: bytes | None = None, thresholds: str | None = None) -> Callable[[Path], Any]:
    """from_published on copies of the released files, with `tiers` / `thresholds` replaced."""

    def make(tmp: Path) -> Schedule:
        return Schedule.from_published(write(tmp, TIERS, tiers), write(tmp, THRESHOLDS, thresholds))

    return make


def write(tmp: Path, name: str, content: bytes | str | None) -> Path:
    path = tmp / name
    if content is None:
        shutil.copy(REFERENCE / name, path)
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return path


def missing(which: str) -> Callable[[Path], Any]:
    def make(tmp: Path) -> Schedule:
        tiers = tmp / "gone.safetensors" if which == "tiers" else write(tmp, TIERS, None)
        thresholds = tmp / "gone.yaml" if which == "thresholds" else write(tmp, THRESHOLDS, None)
        return Schedule.from_published(tiers, thresholds)

    return make


RANDOM_BYTES = bytes(range(7, 250, 3)) * 5  # fixed, but no safetensors header: its length field is huge
PICKLED_TIERS = pickle.dumps({"q": torch.zeros(30, 50, dtype=torch.int64)})
FLAT_TIERS = safetensors.torch.save({f: torch.zeros(50, dtype=torch.int64) for f in ("q", "v")})


def swapped(tmp: Path) -> Schedule:
    return Schedule.from_published(write(tmp, THRESHOLDS, None), write(tmp, TIERS, None))


# ---- torch.compile and the runtime -------------------------------------------------------
def compile_with(options: dict) -> Callable[[Path], Any]:
    def make(_: Path) -> None:
        compiled = torch.compile(tiny_cogvideox(), backend="asymrnr", options=options)
        run(compiled, cogvideox_inputs(), 900.0)

    return make


def runtime(called: bool = False) -> asymrnr_fx.AsymRnRRuntime:
    compiled = asymrnr_fx.compile(tiny_cogvideox(), AsymRnRConfig(compiler="aot_eager"))
    if called:
        run(compiled, cogvideox_inputs(), 900.0)
    return compiled.asymrnr


def enter_context(name: Any) -> Callable[[Path], Any]:
    def make(_: Path) -> None:
        with runtime().context(name):
            pass

    return make


RATIO = "must be a number in [0, 1), got"
CASES = [
    # ---- AsymRnRConfig fields -----------------------------------------------------------
    bad("q_ratio-1.5", config(q_ratio=1.5), ConfigError, f"q_ratio {RATIO} 1.5", "Use e.g. q_ratio=0.5"),
    bad("kv_ratio-negative", config(kv_ratio=-0.1), ConfigError, f"kv_ratio {RATIO} -0.1"),
    bad("q_ratio-str", config(q_ratio="half"), ConfigError, f"q_ratio {RATIO} 'half'"),
    bad("h_ratio-with-q", config(h_ratio=0.5), ConfigError, "h_ratio=0.5 (symmetric mode) cannot be combined",
        "Set q_ratio=0 and kv_ratio=0, or h_ratio=0"),
    bad("dst_stride-zero", config(dst_stride=(0, 2, 2)), ConfigError,
        "dst_stride must be three positive ints (frames, height, width), got (0, 2, 2)", "dst_stride=(2, 2, 2)"),
    bad("dst_stride-two", config(dst_stride=(2, 2)), ConfigError, "dst_stride must be three positive ints"),
    bad("dst_stride-ones", config(dst_stride=(1, 1, 1)), ConfigError, "dst_stride=(1, 1, 1)",
        "every token a destination"),
    bad("matching_every-zero", config(matching_every=0), ConfigError, "matching_every must be an int >= 1, got 0",
        "Use e.g. matching_every=5"),
    bad("distance", config(distance="manhattan"), ConfigError, "distance must be one of", "got 'manhattan'"),
    bad("reduce_mode", config(reduce_mode="drop"), ConfigError, "reduce_mode must be one of", "got 'drop'"),
    bad("auto_step-str", config(auto_step="no"), ConfigError, "auto_step must be True or False, got 'no'",
        "Use auto_step=False"),
    bad("auto_step-int", config(auto_step=1), ConfigError, "auto_step must be True or False, got 1"),
    bad("max_match_elements-str", config(max_match_elements="big"), ConfigError,
        "max_match_elements must be an int >= 1, got 'big'", "Use e.g. max_match_elements=1048576"),
    bad("max_match_elements-float", config(max_match_elements=1000.5), ConfigError,
        "max_match_elements must be an int >= 1, got 1000.5"),
    bad("max_match_elements-bool", config(max_match_elements=True), ConfigError,
        "max_match_elements must be an int >= 1, got True"),
    bad("max_match_elements-zero", config(max_match_elements=0), ConfigError,
        "max_match_elements must be an int >= 1, got 0"),
    bad("seed-str", config(seed="abc"), ConfigError, "seed must be an int, got 'abc'", "Use e.g. seed=0"),
    bad("seed-float", config(seed=1.5), ConfigError, "seed must be an int, got 1.5", "Use e.g. seed=0"),
    bad("seed-bool", config(seed=False), ConfigError, "seed must be an int, got False"),
    # ---- Schedule tables ------------------------------------------------------------------
    bad("table-all-nan", schedule(q=with_nan((2, 3), *[(b, s) for b in range(2) for s in range(3)])),
        ScheduleError, "schedule['q'] has 6 NaN entries, the first at (block=0, step=0)", "Replace NaN with 0.0"),
    bad("table-one-nan", schedule(kv=with_nan((2, 3), (1, 2))), ScheduleError,
        "schedule['kv'] has 1 NaN entry, the first at (block=1, step=2)"),
    bad("table-ratio-1.5", schedule(q=torch.tensor([[0.0, 1.5, 0.2]])), ScheduleError,
        "schedule['q'] must be a ratio in [0, 1) or a (num_blocks, num_steps) table of them, "
        "got 1.5 at (block=0, step=1)"),
    bad("constant-nan", schedule(q=float("nan")), ScheduleError, "schedule['q'] must be a ratio in [0, 1)",
        "got nan"),
    # ---- published tier / threshold files -----------------------------------------------
    bad_file("tiers-random-bytes", published(tiers=RANDOM_BYTES),
        f"{{tmp}}/{TIERS} is not a safetensors file of tiers", "Pass the released euclidean_<model>_cache<N>"),
    bad_file("tiers-pickle", published(tiers=PICKLED_TIERS),
        f"{{tmp}}/{TIERS} is not a safetensors file of tiers", "safetensors.torch.save_file"),
    bad_file("tiers-1d", published(tiers=FLAT_TIERS), f"{{tmp}}/{TIERS}: tiers['q'] must be a (num_blocks, "
             "num_steps) table, got shape (50,)", "Pass the released euclidean_<model>_cache<N>"),
    bad_file("tiers-and-thresholds-swapped", swapped, f"{{tmp}}/{THRESHOLDS} is not a safetensors file of tiers"),
    bad_file("tiers-missing", missing("tiers"), "tiers file {tmp}/gone.safetensors does not exist"),
    bad_file("thresholds-missing", missing("thresholds"), "thresholds file {tmp}/gone.yaml does not exist"),
    bad_file("thresholds-not-yaml", published(thresholds="q: {6: 0.4\n"),
        f"{{tmp}}/{THRESHOLDS} is not valid YAML"),
    bad_file("thresholds-feature-to-number", published(thresholds="q: 0.5\n"),
        f"{{tmp}}/{THRESHOLDS}: feature 'q' maps to 0.5, not to thresholds", EXPECTED_ENTRIES),
    bad_file("thresholds-threshold-str", published(thresholds="q:\n  high: 0.4\n"),
        f"{{tmp}}/{THRESHOLDS}: feature 'q' has threshold 'high', not an int", EXPECTED_ENTRIES),
    bad_file("thresholds-threshold-float", published(thresholds="v:\n  6.5: 0.4\n"),
        f"{{tmp}}/{THRESHOLDS}: feature 'v' has threshold 6.5, not an int", "e.g. v: {6: 0.4, 7: 0.8}"),
    bad_file("thresholds-ratio-1.5", published(thresholds="q:\n  6: 1.5\n"),
        f"{{tmp}}/{THRESHOLDS}: feature 'q' maps threshold 6 to 1.5, not to a ratio in [0, 1)", EXPECTED_ENTRIES),
    bad_file("thresholds-ratio-str", published(thresholds="q:\n  6: lots\n"),
        f"{{tmp}}/{THRESHOLDS}: feature 'q' maps threshold 6 to 'lots', not to a ratio in [0, 1)"),
    bad_file("thresholds-unknown-feature", published(thresholds="z:\n  3: 0.5\n"),
        f"{{tmp}}/{THRESHOLDS}: unknown feature 'z'"),
    # ---- torch.compile options: the config error comes first, not Dynamo's wrapper ----------
    bad("options-typo", compile_with({"q_raito": 0.5, "compiler": "aot_eager"}), ConfigError,
        "unknown asymrnr option 'q_raito'. Did you mean 'q_ratio'?"),
    bad("options-ratio-1.5", compile_with({"q_ratio": 1.5, "compiler": "aot_eager"}), ConfigError,
        f"q_ratio {RATIO} 1.5", "Use e.g. q_ratio=0.5"),
    bad("options-config-not-a-config", compile_with({"config": {"q_ratio": 0.5}}), ConfigError,
        "options['config'] must be an AsymRnRConfig, got dict",
        "Use options={'config': AsymRnRConfig(...)}"),
    bad("options-config-and-fields", compile_with({"config": AsymRnRConfig(), "seed": 1}), ConfigError,
        "options['config'] cannot be combined with other keys, got ['seed']", "dataclasses.replace(config"),
    # ---- the runtime (its checks live in runtime.py); "" = no constraint on the start -------
    bad("set_step-str", lambda _: runtime().set_step("3"), TypeError, "", "step must be an int"),
    bad("set_step-float", lambda _: runtime().set_step(2.5), TypeError, "", "step must be an int"),
    bad("set_step-negative", lambda _: runtime().set_step(-1), ValueError, "", "step must be >= 0"),
    bad("reduced_lengths-negative", lambda _: runtime(called=True).reduced_lengths(-1), ValueError, "",
        "step must be >= 0"),
    bad("context-not-str", enter_context(0), TypeError, "", "context name must be a str"),
]

@pytest.mark.parametrize("make,error,starts,contains", CASES)
def test_bad_input_is_a_clear_error(make, error, starts, contains, tmp_path):
    with pytest.raises(error) as raised:
        make(tmp_path)
    message = str(raised.value)
    assert message.startswith(starts.replace("{tmp}", str(tmp_path))), message
    for part in contains:
        assert part.replace("{tmp}", str(tmp_path)) in message, message


def test_reduction_is_its_own_config_composed_by_asymrnr_config():
    from asymrnr_fx import Reduction

    flat = AsymRnRConfig(q_ratio=0.3, kv_ratio=0.2, matching_every=3, compiler="aot_eager")
    composed = AsymRnRConfig(reduction=Reduction(q_ratio=0.3, kv_ratio=0.2, matching_every=3), compiler="aot_eager")
    assert flat == composed and flat.reduction.matching_every == 3
    with pytest.raises(ConfigError, match="give reduction=Reduction"):
        AsymRnRConfig(reduction=Reduction(), q_ratio=0.3)
    with pytest.raises(ConfigError, match="reduction must be an asymrnr_fx.Reduction, got dict"):
        AsymRnRConfig(reduction={"q_ratio": 0.3})
    with pytest.raises(ConfigError, match="Did you mean 'q_ratio'"):
        AsymRnRConfig(q_ration=0.3)
    with pytest.raises(ConfigError, match="q_ratio must be a number in"):
        Reduction(q_ratio=1.5)
