"""The adapter record and its registry."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

Grid = tuple[int, int, int]


class UnsupportedModelError(RuntimeError):
    """The traced model is not one that asymrnr knows how to reduce."""


@dataclass(frozen=True)
class ModelAdapter:
    """What the backend must know about one family of video DiTs.

    block_containers: (attribute name, block class) in execution order; blocks are numbered
    across containers in that order (HunyuanVideo: 20 double then 40 single = 60).
    self_attention: names of the attention modules inside a block that attend over video.
    text_first: text tokens precede the video tokens in the joint attention sequence.
    latent_input / timestep_input: forward() argument names.
    patch_weight: module path of the patch embedding weight; grid(latent_shape, weight_shape).
    """

    family: str
    model_class: type
    block_containers: tuple[tuple[str, type], ...]
    self_attention: tuple[str, ...]
    text_first: bool
    patch_weight: str
    grid: Callable[[tuple[int, ...], tuple[int, ...]], Grid]
    latent_input: str = "hidden_states"
    timestep_input: str = "timestep"

    @property
    def block_classes(self) -> tuple[type, ...]:
        return tuple(cls for _, cls in self.block_containers)


ADAPTERS: dict[type, ModelAdapter] = {}


def register(adapter: ModelAdapter) -> ModelAdapter:
    for cls in adapter.block_classes:
        ADAPTERS[cls] = adapter
    return adapter


def adapter_for_classes(classes: Iterable[type]) -> ModelAdapter:
    """The adapter whose block classes appear among `classes` (module classes seen in a graph)."""
    seen = set(classes)
    found = {ADAPTERS[c].family: ADAPTERS[c] for c in seen if c in ADAPTERS}
    if len(found) == 1:
        return next(iter(found.values()))
    if len(found) > 1:
        raise UnsupportedModelError(f"graph mixes blocks of several model families: {sorted(found)}.")
    families = sorted({a.family for a in ADAPTERS.values()})
    blocks = sorted({c.__name__ for c in seen if "Block" in c.__name__}) or sorted(c.__name__ for c in seen)[:8]
    raise UnsupportedModelError(
        f"asymrnr does not know this model (module classes seen: {blocks}). Supported families: "
        f"{families}. Pass options={{'on_unsupported': 'warn'}} to run it unreduced."
    )
