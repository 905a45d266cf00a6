"""Rewrite one attention call into reduce -> attend -> restore, with the plan as graph inputs.

    sdpa(q, k, v, mask)                       # (B, H, N, D) each
becomes
    q_r = gather(q, q_keep)                   # or a mean-merge, (B, H, Lq, D)
    k_r, v_r = gather(k, kv_keep), gather(v, kv_keep)
    mask_r = mask[..., kv_keep] (and [q_keep] rows for a per-query mask)
    o = gather(sdpa(q_r, k_r, v_r, mask_r), restore)   # back to (B, H, N, D): one gather

The index tensors are new placeholders appended after the graph's inputs, in the order of
`plan_input_names`; the runner passes the cached plan there. Nothing else in the graph changes.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from torch import fx

from asymrnr_fx import tokens

from .sites import SDPA_PARAMS, sdpa_arguments


@dataclass(frozen=True)
class Variant:
    """What one compiled version of a site segment reduces. mean: merge instead of drop."""

    reduce_q: bool
    reduce_kv: bool
    mean: bool

    @property
    def dense(self) -> bool:
        return not (self.reduce_q or self.reduce_kv)


_MERGE_FIELDS = ("drop", "drop_slot", "count")


def _plan_fields(v: Variant) -> list[tuple[str, str]]:
    """(side, Plan field) of every index input, in placeholder order."""
    fields = []
    for side, on in (("q", v.reduce_q), ("kv", v.reduce_kv)):
        if on:
            fields += [(side, "keep")] + [(side, f) for f in _MERGE_FIELDS if v.mean]
    return fields + ([("q", "restore")] if v.reduce_q else [])


def plan_input_names(v: Variant) -> list[str]:
    return ["restore" if f == "restore" else f"{side}_{f}" for side, f in _plan_fields(v)]


def plan_inputs(v: Variant, plans: dict[str, tokens.Plan]) -> list:
    """The tensors for the placeholders of `plan_input_names(v)`, from plans keyed "q" / "kv"."""
    return [getattr(plans[side], f) for side, f in _plan_fields(v)]


def _add_placeholders(graph: fx.Graph, names: list[str]) -> dict[str, fx.Node]:
    last = list(graph.find_nodes(op="placeholder"))[-1]
    out = {}
    with graph.inserting_after(last):
        for name in reversed(names):
            out[name] = graph.placeholder(f"asymrnr_{name}")
    return out


def _reduce(graph: fx.Graph, x: fx.Node, side: str, p: dict[str, fx.Node], mean: bool) -> fx.Node:
    if mean:
        args = (x, p[f"{side}_keep"], p[f"{side}_drop"], p[f"{side}_drop_slot"], p[f"{side}_count"])
        return graph.call_function(tokens.merge_tokens, args)
    return graph.call_function(tokens.gather_tokens, (x, p[f"{side}_keep"]))


def rewrite_site(gm: fx.GraphModule, node_name: str, v: Variant, counters: Counter) -> fx.GraphModule:
    """Rewrite the attention node `node_name` of gm in place for variant v; returns gm."""
    if v.dense:
        return gm
    graph = gm.graph
    node = next(n for n in graph.nodes if n.name == node_name)
    a = sdpa_arguments(node)
    before = len(graph.nodes)
    p = _add_placeholders(graph, plan_input_names(v))
    with graph.inserting_before(node):
        q = _reduce(graph, a["query"], "q", p, v.mean) if v.reduce_q else a["query"]
        k = _reduce(graph, a["key"], "kv", p, v.mean) if v.reduce_kv else a["key"]
        val = _reduce(graph, a["value"], "kv", p, v.mean) if v.reduce_kv else a["value"]
        mask = a["attn_mask"]
        if isinstance(mask, fx.Node):
            mask = graph.call_function(tokens.reduce_mask, (mask, p.get("kv_keep"), p.get("q_keep")))
        kwargs = {name: a[name] for name in SDPA_PARAMS[3:] if name in a}
        kwargs["attn_mask"] = mask
        out = graph.call_function(node.target, (q, k, val), kwargs)
        if v.reduce_q:
            out = graph.call_function(tokens.gather_tokens, (out, p["restore"]))
    node.replace_all_uses_with(out)
    graph.erase_node(node)
    graph.lint()
    counters["sites_rewritten"] += 1
    counters["nodes_inserted"] += len(graph.nodes) - before + 1
    gm.recompile()
    return gm
