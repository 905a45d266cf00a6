"""The configurations, validated on construction: one per transformation (`Reduction`; the
caches in `cache.py`), composed by `AsymRnRConfig` with the compile and step-tracking settings."""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass
from typing import Any

from torch._dynamo.exc import ShortenTraceback

from .cache import BlockCache, SkipCache, cache_from_options, check_cache
from .errors import ConfigError, reject_unknown
from .schedule import Schedule

DISTANCES = ("euclidean", "cosine")
REDUCE_MODES = ("replace", "mean")
SPLITS = ("random", "fixed")
COMPILERS = ("inductor", "aot_eager", "eager")
ON_UNSUPPORTED = ("error", "warn")
SEGMENTS = ("auto", "sites", "graph")
_AUTO_STEP_FIX = (
    "Use auto_step=False to set steps with runtime.set_step() or callback_on_step_end, "
    "or auto_step=True to count them from the timestep input."
)




class BackendConfigError(ConfigError, ShortenTraceback):
    """A ConfigError in torch.compile `options=`, raised from inside the backend.

    Dynamo wraps what a backend raises in BackendCompilerFailed ("backend='asymrnr' raised:\n...")
    but re-raises ShortenTraceback subclasses as they are: the user reads the config error first,
    and `except ConfigError` still catches it.
    """

    def __init__(self, message: str) -> None:
        ShortenTraceback.__init__(self, message, first_useful_frame=None)  # None: keep every frame


def _check_int(name: str, value: Any, example: int, minimum: int | None = None) -> None:
    """An int (a bool is one in Python, but never meant as a count or a seed), >= minimum if given."""
    is_int = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if not is_int or (minimum is not None and value < minimum):
        bound = "" if minimum is None else f" >= {minimum}"
        raise ConfigError(f"{name} must be an int{bound}, got {value!r}. Use e.g. {name}={example}.")


def _check_bool(name: str, value: Any, fix: str) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be True or False, got {value!r}. {fix}")


def _check_ratio(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ConfigError(f"{name} must be a number in [0, 1), got {value!r}. Use e.g. {name}=0.5.")


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {choices}, got {value!r}.")


def _check_stride(stride: Any) -> tuple[int, int, int]:
    ok = isinstance(stride, (tuple, list)) and len(stride) == 3
    if not ok or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in stride):
        raise ConfigError(
            f"dst_stride must be three positive ints (frames, height, width), got {stride!r}. "
            "Use e.g. dst_stride=(2, 2, 2)."
        )
    if tuple(stride) == (1, 1, 1):
        raise ConfigError("dst_stride=(1, 1, 1) makes every token a destination: nothing can be reduced.")
    return tuple(stride)


@dataclass(frozen=True)
class Reduction:
    """Asymmetric reduction and restoration of attention tokens (the AsymRnR transformation).

    q_ratio / kv_ratio / h_ratio: constant reduction ratios, used when `schedule` is None.
    h_ratio > 0 selects the symmetric mode (ToMe-style: the hidden state reduced before the Q/K/V
    projections, restored after the output projection) and cannot be combined with q_ratio /
    kv_ratio. `schedule` gives a ratio per (feature, block, step). A matching is computed every
    `matching_every` steps on which its block runs, on windows of `dst_stride` (frames, height,
    width) with one destination each (`split`: "random" in the window, seeded by `seed`, or the
    first), by `distance`; `reduce_mode` "mean" averages merged tokens; `max_match_elements`
    bounds the score matrix computed at once.
    """

    q_ratio: float = 0.5
    kv_ratio: float = 0.3
    h_ratio: float = 0.0
    schedule: Schedule | None = None
    matching_every: int = 5
    dst_stride: tuple[int, int, int] = (2, 2, 2)
    split: str = "random"
    seed: int = 0
    distance: str = "euclidean"
    reduce_mode: str = "replace"
    max_match_elements: int = 1 << 20  # 4 MiB of float32 scores per chunk

    def __post_init__(self) -> None:
        for name in ("q_ratio", "kv_ratio", "h_ratio"):
            _check_ratio(name, getattr(self, name))
        if self.h_ratio > 0 and (self.q_ratio > 0 or self.kv_ratio > 0):
            raise ConfigError(
                f"h_ratio={self.h_ratio} (symmetric mode) cannot be combined with q_ratio={self.q_ratio} "
                f"or kv_ratio={self.kv_ratio}. Set q_ratio=0 and kv_ratio=0, or h_ratio=0."
            )
        if self.schedule is not None and not isinstance(self.schedule, Schedule):
            raise ConfigError(f"schedule must be an asymrnr_fx.Schedule, got {type(self.schedule).__name__}.")
        _check_int("matching_every", self.matching_every, 5, minimum=1)
        _check_int("max_match_elements", self.max_match_elements, 1 << 20, minimum=1)
        _check_int("seed", self.seed, 0)
        object.__setattr__(self, "dst_stride", _check_stride(self.dst_stride))
        _check_choice("split", self.split, SPLITS)
        _check_choice("distance", self.distance, DISTANCES)
        _check_choice("reduce_mode", self.reduce_mode, REDUCE_MODES)

    def effective_schedule(self) -> Schedule:
        if self.schedule is not None:
            return self.schedule
        return Schedule.constant(q=self.q_ratio, kv=self.kv_ratio, h=self.h_ratio)


REDUCTION_FIELDS = tuple(f.name for f in dataclasses.fields(Reduction))


@dataclass(frozen=True, init=False)
class AsymRnRConfig:
    """Everything `backend="asymrnr"` does to one model: the token reduction (`Reduction`), the
    feature cache (`BlockCache` / `SkipCache` / None), and how segments compile and steps are
    tracked. `segments`: "auto" cuts the model into spans of consecutive blocks whose sites see at
    most `backend.MAX_GRAPH_PATTERNS` patterns of lengths over the steps (a constant schedule:
    one span, the whole graph; `backend.span_starts`), and also at the blocks a cache needs;
    "sites" cuts it at every reducible site; "graph" never cuts it (asymmetric mode, no cache),
    at the price of compiling the whole model twice per pattern. The symmetric mode cuts at every
    site. The reduction's fields may be
    given directly, e.g. `AsymRnRConfig(q_ratio=0.3, kv_ratio=0.3, cache=BlockCache())`, or as
    `reduction=Reduction(...)` (not both)."""

    reduction: Reduction
    cache: BlockCache | SkipCache | None
    compiler: str
    mode: str | None
    inductor_options: dict[str, Any]
    on_unsupported: str
    auto_step: bool
    segments: str

    def __init__(self, reduction: Reduction | None = None, cache: BlockCache | SkipCache | None = None,
                 compiler: str = "inductor", mode: str | None = None, inductor_options: dict[str, Any] | None = None,
                 on_unsupported: str = "error", auto_step: bool = True, segments: str = "auto",
                 **reduction_fields: Any) -> None:
        reject_unknown(reduction_fields, [*REDUCTION_FIELDS, *CONFIG_FIELDS])
        if reduction is not None and reduction_fields:
            raise ConfigError(
                f"give reduction=Reduction(...) or its fields {sorted(reduction_fields)}, not both. "
                "Use e.g. AsymRnRConfig(reduction=Reduction(q_ratio=0.3, kv_ratio=0.3))."
            )
        if reduction is not None and not isinstance(reduction, Reduction):
            raise ConfigError(f"reduction must be an asymrnr_fx.Reduction, got {type(reduction).__name__}.")
        values = {"reduction": reduction if reduction is not None else Reduction(**reduction_fields), "cache": cache,
                  "compiler": compiler, "mode": mode, "inductor_options": dict(inductor_options or {}),
                  "on_unsupported": on_unsupported, "auto_step": auto_step, "segments": segments}
        for name, value in values.items():
            object.__setattr__(self, name, value)
        check_cache(cache)
        _check_bool("auto_step", auto_step, _AUTO_STEP_FIX)
        _check_choice("compiler", compiler, COMPILERS)
        _check_choice("on_unsupported", on_unsupported, ON_UNSUPPORTED)
        _check_choice("segments", segments, SEGMENTS)
        self._check_whole_graph()

    def _check_whole_graph(self) -> None:
        """`segments="graph"` needs what the uncut graph can do: no cache, the asymmetric mode."""
        if self.segments != "graph":
            return
        if self.cache is not None:
            raise ConfigError("segments='graph' keeps the graph whole, but a cache needs it cut at block "
                              "boundaries. Use segments='auto' (or 'sites') with a cache.")
        if self.effective_schedule().symmetric:
            raise ConfigError("segments='graph' reduces in the asymmetric mode only; the symmetric mode (h_ratio) "
                              "reduces before the projections, at cuts. Use segments='auto' with h_ratio.")

    @property
    def enabled(self) -> bool:
        """False when nothing can ever be reduced or cached: the backend then leaves the graph untouched."""
        return self.cache is not None or not self.effective_schedule().all_zero

    def effective_schedule(self) -> Schedule:
        return self.reduction.effective_schedule()

    @classmethod
    def from_options(cls, options: dict[str, Any] | None, mode: str | None = None) -> AsymRnRConfig:
        """Build from torch.compile `options=`: either {"config": cfg} or the fields as keys.

        Raises BackendConfigError, which Dynamo passes to the torch.compile user unwrapped.
        """
        try:
            return cls._from_options(options, mode)
        except ConfigError as err:
            raise BackendConfigError(str(err)).with_traceback(err.__traceback__) from None

    @classmethod
    def _from_options(cls, options: dict[str, Any] | None, mode: str | None) -> AsymRnRConfig:
        opts = dict(options or {})
        opts.pop("runtime", None)
        if "config" in opts:
            cfg = opts.pop("config")
            if not isinstance(cfg, cls):
                raise ConfigError(
                    f"options['config'] must be an AsymRnRConfig, got {type(cfg).__name__}. "
                    "Use options={'config': AsymRnRConfig(...)}, or the config's fields as keys."
                )
            if opts:
                raise ConfigError(
                    f"options['config'] cannot be combined with other keys, got {sorted(opts)}. "
                    "Set them on the config instead: dataclasses.replace(config, field=value)."
                )
            return dataclasses.replace(cfg, mode=mode) if mode else cfg
        cache = cache_from_options(opts)
        _reject_unknown(opts)
        opts["cache"] = cache
        if mode is not None:
            opts["mode"] = mode
        if "dst_stride" in opts and isinstance(opts["dst_stride"], list):
            opts["dst_stride"] = tuple(opts["dst_stride"])
        return cls(**opts)


CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(AsymRnRConfig))


def _reject_unknown(opts: dict[str, Any]) -> None:
    reject_unknown(opts, [*REDUCTION_FIELDS, *(f for f in CONFIG_FIELDS if f != "reduction")])
