"""The adapter record and its registry."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from torch import fx

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
    graph_grid: instead of the two above, grid(graph) read from the traced graph itself, for
    families whose forward() takes the grid as Python ints, which Dynamo bakes into the graph
    (LTX-Video: packed tokens (B, N, C) plus num_frames / height / width), or whose patch weight
    does not determine it (CogVideoX 1.5: a Linear over C * pt * p * p values).
    interleaved: the containers' blocks alternate in execution order (Latte: spatial 0, temporal
    0, spatial 1, ...); blocks are then numbered in that order (spatial j = 2j, temporal j = 2j + 1)
    and every container must hold the same number of blocks.
    sequence_axes: (container, axes) for containers whose attention runs over part of the (F, H, W)
    grid, the other axes folded into the batch: axes "hw" = one sequence per frame (Latte's spatial
    blocks), "f" = one per position (its temporal blocks). Unlisted containers: "fhw". The first
    container's axes give the grid the backend reduces on; other sites stay dense.
    long_skips: blocks of the second half read the outputs of first-half blocks (U-ViT style long
    skip branches: HunyuanDiT, Skip-DiT models); a cached step then hands the tail the deep
    feature stored at the last full step, which it fuses with the fresh shallow skips (Skip-Cache).
    prepare: makes a model of the family traceable as one static graph (Mochi: a masked attention
    processor instead of diffusers' data-dependent text selection), called on the user's model
    before compiling (`asymrnr_fx.prepare`); returns how many modules it changed.
    """

    family: str
    model_class: type
    block_containers: tuple[tuple[str, type], ...]
    self_attention: tuple[str, ...]
    text_first: bool
    patch_weight: str = ""
    grid: Callable[[tuple[int, ...], tuple[int, ...]], Grid] | None = None
    latent_input: str = "hidden_states"
    timestep_input: str = "timestep"
    graph_grid: Callable[[fx.GraphModule], Grid] | None = None
    interleaved: bool = False
    sequence_axes: tuple[tuple[str, str], ...] = ()
    long_skips: bool = False
    prepare: Callable[[torch.nn.Module], int] | None = None

    def __post_init__(self) -> None:
        if (self.graph_grid is not None) == bool(self.patch_weight and self.grid):
            raise ValueError(f"adapter {self.family!r}: give patch_weight and grid, or graph_grid (one of them).")

    @property
    def block_classes(self) -> tuple[type, ...]:
        return tuple(cls for _, cls in self.block_containers)

    def axes(self, container: str) -> str:
        """Grid axes ("f", "h", "w") that one attention sequence of `container`'s blocks runs over."""
        return dict(self.sequence_axes).get(container, "fhw")

    def sequence_grid(self, grid: Grid, container: str) -> Grid:
        """The part of the (F, H, W) grid one sequence of `container` covers; 1 on folded axes."""
        axes = self.axes(container)
        return tuple(size if axis in axes else 1 for size, axis in zip(grid, "fhw"))


def nodes_in(gm: fx.GraphModule, module_class: type) -> Iterator[fx.Node]:
    """The nodes of `gm` whose innermost module (Dynamo's `nn_module_stack`) is a `module_class`."""
    for node in gm.graph.nodes:
        stack = node.meta.get("nn_module_stack") or {}
        if stack and list(stack.values())[-1][1] is module_class:
            yield node


def conv3d_grid(latent: tuple[int, ...], weight: tuple[int, ...]) -> Grid:
    """(B, C, F, H, W) latent and Conv3d patch weight (O, C, pt, ph, pw) -> (F/pt, H/ph, W/pw)
    (HunyuanVideo, Wan, SkyReels-V2)."""
    _, _, frames, height, width = latent
    return frames // weight[-3], height // weight[-2], width // weight[-1]


ADAPTERS: dict[type, ModelAdapter] = {}


def register(adapter: ModelAdapter) -> ModelAdapter:
    for cls in adapter.block_classes:
        ADAPTERS[cls] = adapter
    return adapter


def adapter_for_model(model: torch.nn.Module) -> ModelAdapter | None:
    """The adapter of `model`'s class, None for a class no adapter names."""
    return next((a for a in ADAPTERS.values() if isinstance(model, a.model_class)), None)


def prepare_model(model: torch.nn.Module) -> int:
    """Make `model` traceable as one static graph where its family needs it (the adapter's
    `prepare`); returns the number of modules changed (0 for families that need nothing)."""
    adapter = adapter_for_model(model)
    return adapter.prepare(model) if adapter is not None and adapter.prepare is not None else 0


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
        f"{families}. Pass options={{'on_unsupported': 'warn'}} to run it unreduced.{_prepare_hint()}"
    )


def _prepare_hint() -> str:
    """For a graph without blocks: the families whose forward() Dynamo splits unless prepared."""
    needing = sorted({a.family for a in ADAPTERS.values() if a.prepare is not None})
    return (f" A {' / '.join(needing)} model must be prepared first (data-dependent shapes break its graph): "
            f"asymrnr_fx.prepare(model) before torch.compile, or asymrnr_fx.compile(model, config)." if needing else "")
