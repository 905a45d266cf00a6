"""Find the attention calls of a Dynamo graph and decide which ones to reduce.

Pure analysis: reads the graph, changes nothing. A site is reducible only when every check
passes (fail closed): it sits in a block the adapter knows, in a self-attention module over
video, with equal query and key lengths, no causal mask, no dropout, and a mask (if any) whose
key axis spans the whole sequence.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass

import torch
from torch import fx

from asymrnr_fx.tokens import Grid, Layout

from ..models.adapter import ModelAdapter, UnsupportedModelError

SDPA_TARGETS = (torch._C._nn.scaled_dot_product_attention, torch.nn.functional.scaled_dot_product_attention)
SDPA_PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_SKIP_TOKENS = {"self", "__dict__", "_modules", "_parameters", "_buffers"}


def clean_path(source: str) -> str:
    """`L['self'].__dict__['_modules']['blocks'].0.attn1` -> `blocks.0.attn1`."""
    tokens = [a or b for a, b in re.findall(r"\['([^']+)'\]|\.(\w+)", source)]
    if "__self__" in tokens:  # reached through a wrapped forward (a diffusers hook): the module follows
        tokens = tokens[len(tokens) - tokens[::-1].index("__self__") :]
    return ".".join(t for t in tokens if t not in _SKIP_TOKENS)


def is_sdpa(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in SDPA_TARGETS


def sdpa_arguments(node: fx.Node) -> dict:
    """The call's arguments by name, positional or keyword, defaults filled in."""
    args = dict(zip(SDPA_PARAMS, node.args))
    args.update(node.kwargs)
    defaults = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}
    return {**defaults, **args}


def module_path(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    return clean_path(list(stack.values())[-1][0]) if stack else ""


def module_classes(gm: fx.GraphModule) -> set[type]:
    return {cls for n in gm.graph.nodes for _, cls in (n.meta.get("nn_module_stack") or {}).values()}


def input_names(gm: fx.GraphModule, adapter: ModelAdapter) -> list[str]:
    """Name of every placeholder: a forward() argument name, or a parameter's module path."""
    params = [p for p in inspect.signature(adapter.model_class.forward).parameters if p != "self"]
    names = []
    for node in gm.graph.find_nodes(op="placeholder"):
        source = getattr(getattr(node, "_dynamo_source", None), "name", node.name)
        source = source() if callable(source) else source
        if m := re.fullmatch(r"L\['args'\]\[(\d+)\]", source):
            names.append(params[int(m.group(1))])
        elif m := re.fullmatch(r"L\['kwargs'\]\['(\w+)'\]|L\['(\w+)'\]", source):
            names.append(m.group(1) or m.group(2))
        else:
            names.append(clean_path(source))
    return names


@dataclass(frozen=True)
class Site:
    """One attention call. `block` numbers blocks across the adapter's containers; `grid`: the
    (F, H, W) grid its visual tokens lie on (1 on axes folded into the batch), None outside blocks."""

    index: int
    node_name: str
    path: str
    block: int | None
    layout: Layout | None
    reason: str  # "" when reducible, else why not
    grid: Grid | None = None

    @property
    def reducible(self) -> bool:
        return not self.reason


@dataclass(frozen=True)
class ModelInfo:
    adapter: ModelAdapter
    grid: Grid  # the first container's sequence grid (every site carries its own: `Site.grid`)
    num_blocks: int
    timestep_index: int
    latent_index: int
    sites: tuple[Site, ...]
    block_offsets: dict[str, int]  # global index of each container's block 0 (see block_number)


def block_number(adapter: ModelAdapter, offsets: dict[str, int], container: str, j: int) -> int:
    """Global index of block j of `container`, in execution order: container after container, or
    alternating between containers when the adapter says they interleave."""
    step = len(adapter.block_containers) if adapter.interleaved else 1
    return offsets[container] + step * j


def _block_of(path: str, adapter: ModelAdapter, offsets: dict[str, int]) -> tuple[int, str, str] | None:
    """(global block index, attention name, container) of a module path inside a known block."""
    for container, _ in adapter.block_containers:
        if m := re.fullmatch(rf"{container}\.(\d+)\.(\w+)", path):
            return block_number(adapter, offsets, container, int(m.group(1))), m.group(2), container
    return None


def _block_offsets(paths: list[str], adapter: ModelAdapter) -> tuple[dict[str, int], int]:
    counts = {}
    for container, _ in adapter.block_containers:
        idx = {int(m.group(1)) for p in paths if (m := re.match(rf"{container}\.(\d+)\.", p))}
        counts[container] = max(idx) + 1 if idx else 0
    if not adapter.interleaved:
        starts = [sum(list(counts.values())[:i]) for i in range(len(counts))]
        return dict(zip(counts, starts)), sum(counts.values())
    if len(set(counts.values())) != 1:
        raise UnsupportedModelError(
            f"{adapter.family}: its block containers interleave and must hold as many blocks each; found {counts}."
        )
    return {c: i for i, c in enumerate(counts)}, sum(counts.values())


def _why_not(node: fx.Node, attn: str, adapter: ModelAdapter, n_visual: int) -> str:
    a = sdpa_arguments(node)
    q, k = (a[x].meta["example_value"] for x in ("query", "key"))
    if attn not in adapter.self_attention:
        return f"attention module {attn!r} is not self-attention over video"
    if not all(isinstance(n, int) for n in (*q.shape, *k.shape)):
        return f"sequence length {q.shape[-2]} depends on the data (e.g. text picked by a mask): plans need a static length"
    if q.dim() != 4 or q.shape[-2] != k.shape[-2]:
        return f"query/key lengths differ ({tuple(q.shape)} vs {tuple(k.shape)}): cross-attention"
    if a["is_causal"] or a["dropout_p"]:
        return "causal or dropout attention"
    if q.shape[-2] < n_visual:
        return f"sequence of {q.shape[-2]} tokens is shorter than the {n_visual} visual tokens"
    mask = a["attn_mask"]
    if isinstance(mask, fx.Node) and mask.meta["example_value"].shape[-1] != k.shape[-2]:
        return "attention mask does not span the key sequence"
    if isinstance(mask, fx.Node) and mask.meta["example_value"].dim() >= 2 and mask.meta["example_value"].shape[-2] > 1:
        return "attention mask varies per query (e.g. block-causal): merged tokens would read across it"
    return ""


def reduction_grid(adapter: ModelAdapter, grid: Grid) -> Grid:
    """The grid of the first container's sequences (the model's grid for most families)."""
    return adapter.sequence_grid(grid, adapter.block_containers[0][0])


def _site_reason(node: fx.Node, where: tuple[int, str, str], adapter: ModelAdapter, grid: Grid) -> str:
    """Why the site at `where` (block, attention, container) is not reducible, "" if it is. Each
    site is reduced on the grid of its own sequences (Latte's temporal blocks: (F, 1, 1))."""
    own = adapter.sequence_grid(grid, where[2])
    return _why_not(node, where[1], adapter, own[0] * own[1] * own[2])


def find_sites(gm: fx.GraphModule, adapter: ModelAdapter, grid: Grid) -> tuple[list[Site], dict[str, int], int]:
    """Every SDPA call of the graph, classified; each container's block offset; the block count.
    `grid`: the model's whole (F, H, W) latent grid."""
    nodes = [n for n in gm.graph.nodes if is_sdpa(n)]
    paths = [module_path(n) for n in nodes]
    offsets, num_blocks = _block_offsets(paths, adapter)
    sites = []
    for i, (node, path) in enumerate(zip(nodes, paths)):
        where = _block_of(path, adapter, offsets)
        reason = "not inside a transformer block" if where is None else _site_reason(node, where, adapter, grid)
        own = None if where is None else adapter.sequence_grid(grid, where[2])
        layout = None if reason else _layout(node, own, adapter)
        sites.append(Site(i, node.name, path, where and where[0], layout, reason, own))
    return sites, offsets, num_blocks


def _layout(node: fx.Node, grid: Grid, adapter: ModelAdapter) -> Layout:
    n_total = sdpa_arguments(node)["query"].meta["example_value"].shape[-2]
    n_visual = grid[0] * grid[1] * grid[2]
    return Layout(n_total - n_visual, n_visual, adapter.text_first)


def model_info(gm: fx.GraphModule, adapter: ModelAdapter, example_inputs: list) -> ModelInfo:
    names = input_names(gm, adapter)
    weight_input = () if adapter.graph_grid else (adapter.patch_weight,)  # a graph_grid needs no weight
    for needed in (adapter.latent_input, adapter.timestep_input, *weight_input):
        if needed not in names:
            hint = " Pass the timestep as a tensor: a Python number is baked into the graph." if needed == adapter.timestep_input else ""
            raise UnsupportedModelError(
                f"{adapter.family}: the traced graph has no input {needed!r}; inputs seen: {names[:6]}...{hint}"
            )
    latent = names.index(adapter.latent_input)
    if adapter.graph_grid:
        grid = adapter.graph_grid(gm)
    else:
        weight = example_inputs[names.index(adapter.patch_weight)]
        grid = adapter.grid(tuple(example_inputs[latent].shape), tuple(weight.shape))
    sites, offsets, num_blocks = find_sites(gm, adapter, grid)
    return ModelInfo(adapter, reduction_grid(adapter, grid), num_blocks, names.index(adapter.timestep_input), latent, tuple(sites), offsets)
