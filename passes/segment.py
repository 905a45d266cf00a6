"""Cut a Dynamo graph into segments that each begin at a reducible attention call.

Segment 0 is everything before the first reducible site; segment k >= 1 starts with site k's
attention and runs up to the next site. Partition ids follow the graph's node order, which is
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


def split_at_sites(gm: fx.GraphModule, site_names: list[str]) -> tuple[fx.GraphModule, list[str]]:
    """Top-level module calling `submod_<k>` in order, and the submodule names (k ascending)."""
    work = fx.GraphModule(gm, copy.deepcopy(gm.graph))
    ids = partition_ids(work.graph, set(site_names))
    top = split_module(work, gm, lambda n: ids[n.name], keep_original_order=True, keep_original_node_name=True)
    names = sorted((n for n, _ in top.named_children() if n.startswith("submod_")), key=lambda s: int(s[7:]))
    return top, names


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
