"""Skip-DiT fine-tuning with the fixture trainer (a few seconds per stage on the shipped 4-block
fixture): stage 1 (`--skip-dit --train branches`) changes only the branches and starts from a
model equal to the plain one; stage 2 (`--train all`) continues from the converted checkpoint and
changes the rest; `fixture.load` restores the twin with its branches."""

from __future__ import annotations

import json

import pytest
import torch

from asymrnr_fx import skip_dit
from asymrnr_fx.errors import ConfigError
from asymrnr_fx.models import fixture
from asymrnr_fx.models.fixture import train

BASE = ["--minutes", "0.02", "--checkpoint-minutes", "10", "--threads", "1", "--batch", "2", "--warmup", "1"]


def _run(*argv: str) -> None:
    train.train(train.parse_args([*BASE, *argv]))


def _base_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("skip_branches.")}


def test_two_stage_skip_dit_fine_tuning(tmp_path):
    plain = fixture.load()
    stage1, stage2 = tmp_path / "stage1", tmp_path / "stage2"
    _run("--init", str(fixture.WEIGHTS), "--out", str(stage1), "--skip-dit", "--train", "branches")
    twin = fixture.load(path=stage1)
    assert skip_dit.skips_of(twin.transformer) == [(1, 2), (0, 3)]
    for k, v in _base_weights(plain.transformer).items():  # stage 1 froze everything but the branches
        assert torch.equal(v, twin.transformer.state_dict()[k]), k
    branches = [p for p in skip_dit.branch_parameters(twin.transformer) if p.dim() == 2]
    assert any(p.abs().max() > 0 for p in branches)  # the zero-initialised branches moved
    meta = json.loads((stage1 / "training.json").read_text())
    assert meta["stages"][-1]["args"]["train"] == "branches" and meta["stages"][-1]["steps"] >= 1

    _run("--init", str(stage1), "--out", str(stage2), "--train", "all", "--seed", "1")
    after = fixture.load(path=stage2)
    changed = [k for k, v in _base_weights(twin.transformer).items() if not torch.equal(v, after.transformer.state_dict()[k])]
    assert changed and skip_dit.skips_of(after.transformer) == [(1, 2), (0, 3)]
    assert len(json.loads((stage2 / "training.json").read_text())["stages"]) == 3  # plain, stage 1, stage 2


def test_branch_stage_without_branches_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="no Skip-DiT long skips"):
        _run("--init", str(fixture.WEIGHTS), "--out", str(tmp_path), "--train", "branches")
