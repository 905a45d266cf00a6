"""Reduction ratios per (feature, block, step): constant, a table, or the published tier files.

Features: "q" (queries, restored after attention), "kv" (keys and values, one matching on V),
"h" (symmetric mode). The published release stores integer redundancy *tiers* per
(block, step) and YAML thresholds `{feature: {tier_threshold: ratio}}`; the ratio applied is the
largest one whose threshold <= tier, none meaning 0. Its feature "v" is our "kv"; "k" is unused.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch

FEATURES = ("q", "kv", "h")
_PUBLISHED_FEATURES = {"q": "q", "v": "kv", "h": "h", "k": None}
_TIERS_FILE = "euclidean_<model>_cache<N>.safetensors"
_THRESHOLDS_FILE = "<model>_cache<N>_<k>.yaml"
_ENTRIES_FORM = "{tier (int): ratio in [0, 1)}"


class ScheduleError(ValueError):
    """A schedule does not fit the model or the generation it is used for."""


def _ratio_error(name: str, got: str) -> ScheduleError:
    return ScheduleError(
        f"schedule[{name!r}] must be a ratio in [0, 1) or a (num_blocks, num_steps) table of them, {got}. "
        f"Use e.g. Schedule({name}=0.5) or Schedule({name}=torch.full((num_blocks, num_steps), 0.5))."
    )


def _as_table(name: str, value: float | torch.Tensor) -> float | torch.Tensor:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not 0.0 <= value < 1.0:
            raise _ratio_error(name, f"got {value!r}")
        return float(value)
    try:
        table = torch.as_tensor(value, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError):
        raise _ratio_error(name, f"got {value!r}") from None
    if table.dim() != 2:
        raise _ratio_error(name, f"got {value!r}" if table.dim() == 0 else f"got shape {tuple(table.shape)}")
    _check_entries(name, table)
    return table


def _check_entries(name: str, table: torch.Tensor) -> None:
    """Every entry a ratio in [0, 1); NaN named apart, as no comparison catches it."""
    nan = table.isnan()
    if nan.any():
        count, (block, step) = int(nan.sum()), nan.nonzero()[0].tolist()
        raise ScheduleError(
            f"schedule[{name!r}] has {count} NaN {'entry' if count == 1 else 'entries'}, the first at "
            f"(block={block}, step={step}). Replace NaN with 0.0 (no reduction) or a ratio in [0, 1)."
        )
    outside = (table < 0) | (table >= 1)
    if outside.any():
        block, step = outside.nonzero()[0].tolist()
        raise _ratio_error(name, f"got {table[block, step].item():g} at (block={block}, step={step})")


@dataclass(frozen=True, eq=False)
class Schedule:
    """Ratios for q, kv and h: each a float (every block and step) or a (blocks, steps) table."""

    q: float | torch.Tensor = 0.0
    kv: float | torch.Tensor = 0.0
    h: float | torch.Tensor = 0.0
    name: str = "custom"

    def __post_init__(self) -> None:
        for feat in FEATURES:
            object.__setattr__(self, feat, _as_table(feat, getattr(self, feat)))
        shapes = {tuple(t.shape) for t in self._tables()}
        if len(shapes) > 1:
            raise ScheduleError(f"schedule tables disagree in shape: {sorted(shapes)}.")
        if self._uses("h") and (self._uses("q") or self._uses("kv")):
            raise ScheduleError("a schedule reduces either h (symmetric) or q/kv (asymmetric), not both.")

    def _tables(self) -> list[torch.Tensor]:
        return [t for t in (self.q, self.kv, self.h) if isinstance(t, torch.Tensor)]

    def _uses(self, feat: str) -> bool:
        value = getattr(self, feat)
        return bool((value > 0).any()) if isinstance(value, torch.Tensor) else value > 0

    @property
    def symmetric(self) -> bool:
        """True when the schedule reduces h (the hidden state before the projections)."""
        return self._uses("h")

    @property
    def all_zero(self) -> bool:
        return not any(self._uses(f) for f in FEATURES)

    @property
    def shape(self) -> tuple[int, int] | None:
        """(num_blocks, num_steps) of the tables, or None for a constant schedule."""
        tables = self._tables()
        return tuple(tables[0].shape) if tables else None

    @property
    def step_patterns(self) -> int:
        """How many different columns of ratios (q, kv and h of every block) the steps use: 1 for
        a constant schedule; an upper bound on the distinct patterns of reduced lengths."""
        numbers = self._numbers
        tables = [numbers[f] for f in FEATURES if isinstance(numbers[f], list)]
        if not tables:
            return 1
        return len({tuple(tuple(row[step] for row in t) for t in tables) for step in range(len(tables[0][0]))})

    @classmethod
    def constant(cls, q: float = 0.0, kv: float = 0.0, h: float = 0.0) -> Schedule:
        return cls(q=q, kv=kv, h=h, name=f"constant(q={q}, kv={kv}, h={h})")

    def check_blocks(self, num_blocks: int, model: str) -> None:
        shape = self.shape
        if shape is not None and shape[0] != num_blocks:
            raise ScheduleError(
                f"schedule {self.name!r} has shape (blocks={shape[0]}, steps={shape[1]}) but the model "
                f"{model} has {num_blocks} attention blocks. Use a schedule made for this model."
            )

    @functools.cached_property
    def _numbers(self) -> dict[str, float | list[list[float]]]:
        """Each feature's ratios as Python numbers: `ratio` runs per site and step, and indexing
        a tensor there costs an operator call each time."""
        return {f: v.tolist() if isinstance(v, torch.Tensor) else v for f in FEATURES for v in [getattr(self, f)]}

    def ratio(self, feature: str, block: int, step: int) -> float:
        value = self._numbers[feature]
        if not isinstance(value, list):
            return value
        if step >= len(value[0]):
            blocks, steps = getattr(self, feature).shape
            raise ScheduleError(
                f"denoising step {step} is outside schedule {self.name!r} of shape "
                f"(blocks={blocks}, steps={steps}): the generation has more steps "
                "than the schedule. Use as many inference steps as the schedule has, or fewer."
            )
        return value[block][step]

    @classmethod
    def from_published(cls, tiers: str | Path, thresholds: str | Path) -> Schedule:
        """Load a released `euclidean_<model>_cache<N>.safetensors` + `<model>_cache<N>_<k>.yaml`."""
        tiers, thresholds = Path(tiers), Path(thresholds)
        tier = _read_tiers(tiers)
        ratios = {}
        for feat, entries in _read_thresholds(thresholds).items():
            if feat not in tier:
                raise ScheduleError(f"{thresholds} names feature {feat!r} but {tiers} has only {sorted(tier)}.")
            if tier[feat].dim() != 2:
                raise ScheduleError(
                    f"{tiers}: tiers[{feat!r}] must be a (num_blocks, num_steps) table, got shape "
                    f"{tuple(tier[feat].shape)}. Pass the released {_TIERS_FILE}."
                )
            ratios[_PUBLISHED_FEATURES[feat]] = tiers_to_ratios(tier[feat], entries)
        return cls(**ratios, name=f"{tiers.stem}+{thresholds.stem}")


def tiers_to_ratios(tiers: torch.Tensor, entries: dict[int, float]) -> torch.Tensor:
    """(blocks, steps) int tiers -> ratios: the largest ratio whose threshold <= tier, else 0."""
    out = torch.zeros(tiers.shape, dtype=torch.float64)
    for threshold, ratio in entries.items():
        hit = tiers >= threshold
        out = torch.where(hit, torch.clamp(out, min=float(ratio)), out)
    return out


def _require_file(path: Path, kind: str, released: str) -> None:
    if not path.is_file():
        raise ScheduleError(f"{kind} file {path} does not exist or is not a file. Pass the released {released}.")


def _read_tiers(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    _require_file(path, "tiers", _TIERS_FILE)
    try:
        return load_file(str(path))
    except SafetensorError as err:
        raise ScheduleError(
            f"{path} is not a safetensors file of tiers ({err}). Pass the released {_TIERS_FILE}; "
            "a torch.save / pickle file of (num_blocks, num_steps) int tiers can be converted with "
            "safetensors.torch.save_file."
        ) from None


def _load_yaml(path: Path) -> object:
    import yaml

    _require_file(path, "thresholds", _THRESHOLDS_FILE)
    try:
        return yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ScheduleError(
            f"{path} is not valid YAML ({err}). Pass the released {_THRESHOLDS_FILE}: "
            f"feature -> {_ENTRIES_FORM}."
        ) from None


def _entries_error(path: Path, feat: str, what: str) -> ScheduleError:
    return ScheduleError(
        f"{path}: feature {feat!r} {what}. Expected {feat}: {_ENTRIES_FORM}, e.g. {feat}: {{6: 0.4, 7: 0.8}}."
    )


def _read_entries(path: Path, feat: str, entries: object) -> dict[int, float]:
    """One feature's {tier_threshold: ratio}, checked entry by entry."""
    if not isinstance(entries, dict):
        raise _entries_error(path, feat, f"maps to {entries!r}, not to thresholds and ratios")
    for threshold, ratio in entries.items():
        if isinstance(threshold, bool) or not isinstance(threshold, int):
            raise _entries_error(path, feat, f"has threshold {threshold!r}, not an int")
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= ratio < 1.0:
            raise _entries_error(path, feat, f"maps threshold {threshold} to {ratio!r}, not to a ratio in [0, 1)")
    return {threshold: float(ratio) for threshold, ratio in entries.items()}


def _read_thresholds(path: Path) -> dict[str, dict[int, float]]:
    data = _load_yaml(path) or {}
    if not isinstance(data, dict):
        raise ScheduleError(f"{path}: expected a mapping feature -> {{threshold: ratio}}, got {type(data).__name__}.")
    out = {}
    for feat, entries in data.items():
        if feat not in _PUBLISHED_FEATURES:
            raise ScheduleError(f"{path}: unknown feature {feat!r}; expected one of {sorted(_PUBLISHED_FEATURES)}.")
        if _PUBLISHED_FEATURES[feat] is None:
            continue  # the release loads k tiers but never applies them: K follows V
        out[feat] = _read_entries(path, feat, entries)
    return out
