"""Cut a Dynamo graph into segments that each begin at a cut node: a reducible attention call
(or its symmetric rewrite point) and, with the block cache on, a block's first node.

Segment 0 is everything before the first cut; segment k >= 1 starts at cut k and runs up to the
next one. Partition ids follow the graph's node order, which is
topological, so every value flows from a lower or equal segment. The query, key, value and mask
of a site are therefore always inputs of its segment: the runner can compute matchings on them
and pass the index tensors in.

Blocks of one family give segments of identical structure; `structure_key` names that structure
so one compiled artifact serves every block with the same reduced lengths.
"""

from __future__ import annotations

import copy
import hashlib

from torch import fx
from torch.fx.passes.split_module import split_module


def partition_ids(graph: fx.Graph, cut_names: set[str]) -> dict[str, int]:
    part, ids = 0, {}
    for node in graph.nodes:
        if node.name in cut_names:
            part += 1
        ids[node.name] = part
    return ids


def split_at(gm: fx.GraphModule, cut_names: list[str]) -> tuple[fx.GraphModule, list[str], dict[str, str]]:
    """Top-level module calling `submod_<k>` in order, the submodule names (k ascending), and the
    name of each submodule's first computation node (the cut that starts it)."""
    work = fx.GraphModule(gm, copy.deepcopy(gm.graph))
    ids = partition_ids(work.graph, set(cut_names))
    top = split_module(work, gm, lambda n: ids[n.name], keep_original_order=True, keep_original_node_name=True)
    names = _submodule_names(top)
    firsts = {}
    for node in work.graph.nodes:
        if node.op not in ("placeholder", "output"):
            firsts.setdefault(f"submod_{ids[node.name]}", node.name)
    return top, names, firsts


def split_groups(top: fx.GraphModule, group_of: dict[str, int]) -> tuple[fx.GraphModule, list[str]]:
    """Group the submodule calls of a `split_at` top module: a module calling one GraphModule per
    group (k ascending, each calling its members in order); `group_of` maps member -> group."""

    def group(node: fx.Node) -> int:
        while node.op != "call_module":  # getitem of a member's output tuple
            node = node.args[0]
        return group_of[node.target]

    outer = split_module(top, top, group, keep_original_order=True, keep_original_node_name=True)
    return outer, _submodule_names(outer)


def call_of(top: fx.GraphModule, name: str) -> fx.Node:
    """The node of `top`'s graph that calls submodule `name`."""
    return next(n for n in top.graph.find_nodes(op="call_module") if n.target == name)


def _submodule_names(top: fx.GraphModule) -> list[str]:
    """`submod_<k>` children of a split_module result, k ascending."""
    return sorted((n for n, _ in top.named_children() if n.startswith("submod_")), key=lambda s: int(s[7:]))


def _describe(node: fx.Node, index: dict[str, int]) -> str:
    def arg(a: object) -> str:
        if isinstance(a, fx.Node):
            return f"%{index[a.name]}"
        if isinstance(a, (list, tuple)):
            return "(" + ",".join(arg(x) for x in a) + ")"
        if isinstance(a, dict):
            return "{" + ",".join(f"{k}:{arg(v)}" for k, v in a.items()) + "}"
        return repr(a)

    target = getattr(node.target, "__qualname__", None) or str(node.target)
    return f"{node.op}|{getattr(node.target, '__module__', '')}.{target}|{arg(node.args)}|{arg(node.kwargs)}"


def structure_key(graph: fx.Graph) -> str:
    """Hash of the graph's computation, independent of node names (inputs are positional)."""
    index = {n.name: i for i, n in enumerate(graph.nodes)}
    text = "\n".join(_describe(n, index) for n in graph.nodes if n.op != "placeholder")
    n_inputs = sum(1 for n in graph.nodes if n.op == "placeholder")
    return hashlib.sha256(f"{n_inputs}\n{text}".encode()).hexdigest()[:16]
