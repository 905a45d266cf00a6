"""Transformer-block boundaries of a Dynamo graph, from each node's `nn_module_stack`.

Analysis, plus one insertion (`insert_signal`, the block cache's signal). A node belongs to block i when one entry of its
module stack is `{container}.{j}` for a container the adapter names (global index: `sites.block_number`,
in execution order, also where containers interleave as in Latte). Dynamo traces in program order,
so every block is a contiguous run of nodes; the nodes between two blocks (a concatenation, or
Latte's reshape from per-frame to per-position sequences) go with the block before them, and
where containers interleave, so do the layout changes right after the last block.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import fx

from ..models.adapter import ModelAdapter, UnsupportedModelError
from .sites import block_number, clean_path


@dataclass(frozen=True)
class BlockBounds:
    """starts[i]: name of block i's first node; epilogue: first node after the last block
    (None when the last block ends the graph)."""

    starts: tuple[str, ...]
    epilogue: str | None


Patterns = list[tuple[re.Pattern, Callable[[int], int]]]


def _block_patterns(adapter: ModelAdapter, offsets: dict[str, int]) -> Patterns:
    """Per container: its block path pattern and the global index of its block j."""
    def numbering(c: str) -> Callable[[int], int]:
        return lambda j: block_number(adapter, offsets, c, j)

    return [(re.compile(rf"{re.escape(c)}\.(\d+)"), numbering(c)) for c, _ in adapter.block_containers]


def node_block(node: fx.Node, patterns: Patterns) -> int | None:
    """Global block index of `node`, or None outside every block."""
    for source, _ in (node.meta.get("nn_module_stack") or {}).values():
        path = clean_path(source)
        for pattern, number in patterns:
            if m := pattern.fullmatch(path):
                return number(int(m.group(1)))
    return None


def find_bounds(graph: fx.Graph, adapter: ModelAdapter, offsets: dict[str, int], num_blocks: int) -> BlockBounds:
    """The first node of every block and of the epilogue; errors if blocks run out of their numbered
    order (interleaved containers are numbered in execution order: see `sites.block_number`)."""
    patterns = _block_patterns(adapter, offsets)
    starts: dict[int, str] = {}
    last_block, after_last = -1, None
    for node in graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        block = node_block(node, patterns)
        if block is None:
            if last_block == num_blocks - 1 and after_last is None:
                after_last = node.name
            continue
        if block < last_block or (block != last_block and block in starts):
            raise UnsupportedModelError(
                f"block {block} runs after block {last_block}: blocks run out of order (if the containers "
                "alternate, say so with the adapter's `interleaved`)"
            )
        if block != last_block:
            starts[block] = node.name
        last_block, after_last = block, None
    missing = sorted(set(range(num_blocks)) - set(starts))
    if missing:
        raise UnsupportedModelError(f"blocks {missing} have no node in the traced graph")
    if adapter.interleaved and after_last is not None:
        after_last = _after_layout_changes(graph, after_last)
    return BlockBounds(tuple(starts[i] for i in range(num_blocks)), after_last)


_LAYOUT_OPS = frozenset({"reshape", "view", "permute", "transpose", "contiguous", "flatten", "unflatten"})


def _is_layout_change(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in _LAYOUT_OPS
    return node.op == "call_function" and getattr(node.target, "__name__", None) in _LAYOUT_OPS


def _after_layout_changes(graph: fx.Graph, first: str) -> str | None:
    """The first node after the chain of layout changes that starts at node `first` and reads the
    last block's output (Latte: per-position sequences back to per-frame ones). They go with the
    last block, as between two blocks, so that the stream leaving it has block 0's layout."""
    nodes = list(graph.nodes)
    i = next(k for k, n in enumerate(nodes) if n.name == first)
    previous = nodes[i - 1]
    while nodes[i].op != "output" and _is_layout_change(nodes[i]) and nodes[i].args[0] is previous:
        previous, i = nodes[i], i + 1
    return None if nodes[i].op == "output" else nodes[i].name


def _value(node: fx.Node) -> tuple | None:
    ev = node.meta.get("example_value")
    return (tuple(ev.shape), ev.dtype) if isinstance(ev, torch.Tensor) else None


def _entering(graph: fx.Graph, start: str) -> list[fx.Node]:
    """Computed values defined before node `start` and read at or after it."""
    order = {n.name: i for i, n in enumerate(graph.nodes)}
    at = order[start]
    return [
        n for n in graph.nodes
        if n.op not in ("placeholder", "output") and order[n.name] < at
        and any(order[u.name] >= at for u in n.users)
    ]


def _streams(graph: fx.Graph, bounds: BlockBounds, a: int) -> tuple[fx.Node, fx.Node] | None:
    """(S_0, S_a): the largest value entering block 0 that another value of its shape and dtype
    has replaced by block a (the visual stream). A value that enters both unchanged (a timestep
    embedding every block reads, as Latte's per-position one, which can outgrow the video stream
    of a short clip) is no stream."""
    later = [n for n in _entering(graph, bounds.starts[a]) if _value(n)]
    pairs = []
    for s0 in (n for n in _entering(graph, bounds.starts[0]) if _value(n)):
        same = [n for n in later if _value(n) == _value(s0) and n is not s0]
        if same:
            pairs.append((s0, same[-1]))
    return max(pairs, key=lambda p: math.prod(_value(p[0])[0]), default=None)


def insert_signal(graph: fx.Graph, bounds: BlockBounds, a: int) -> str | None:
    """Insert the block cache's signal, the head's residual on the visual stream S_a - S_0, as a
    node just before block a, and a (free) use of it just inside block a, so that cutting the graph
    at block a hands it to the span as an input; returns its name, or None (fail closed) when no
    stream entering block 0 has a successor of its shape entering block a."""
    streams = _streams(graph, bounds, a)
    if streams is None:
        return None
    start = next(n for n in graph.nodes if n.name == bounds.starts[a])
    with graph.inserting_before(start):
        signal = graph.call_function(operator.sub, (streams[1], streams[0]))
    with graph.inserting_after(start):
        graph.call_method("view_as", (signal, signal))
    return signal.name
