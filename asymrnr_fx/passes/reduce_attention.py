"""Rewrite one attention call into plan -> reduce -> attend -> restore, with the matchings as
graph inputs.

    sdpa(q, k, v, mask)                       # (B, H, N, D) each
becomes
    q_keep, restore = plan(q matching, Lq)    # index tensors built in the graph (tokens.plan_fields)
    kv_keep = plan(v matching, Lkv)
    q_r = gather(q, q_keep)                   # or a mean-merge, (B, H, Lq, D)
    k_r, v_r = gather(k, kv_keep), gather(v, kv_keep)
    mask_r = mask[..., kv_keep] (and [q_keep] rows for a per-query mask)
    o = gather(sdpa(q_r, k_r, v_r, mask_r), restore)   # back to (B, H, N, D): one gather

The matching tensors (dst, src, nearest, order per reduced side) are new placeholders appended
after the graph's inputs, in the order of `matching_input_names`; the runner passes the cached
matchings there. The plan is built inside the compiled code (its shapes depend on the lengths of
the variant only), so no index tensor is built between segments. A side matched inside the
graph (`matched`) takes only dst and src, computes nearest and order from its query (q) or value
(kv), and returns them after the graph's outputs. Nothing else changes.
"""

from __future__ import annotations

import operator
from collections import Counter
from typing import NamedTuple

import torch
from torch import fx

from asymrnr_fx import tokens

from .sites import SDPA_PARAMS, sdpa_arguments


class Variant(NamedTuple):
    """What one compiled version of a site segment reduces. mean: merge instead of drop.
    A tuple: it is part of the key a segment looks its compiled code up by at every call, and a
    tuple hashes and compares in C (a frozen dataclass runs Python code for both)."""

    reduce_q: bool
    reduce_kv: bool
    mean: bool

    @property
    def dense(self) -> bool:
        return not (self.reduce_q or self.reduce_kv)


_MATCHING_FIELDS = ("dst", "src", "nearest", "order")  # of tokens.Matching


def _sides(v: Variant) -> list[str]:
    return [side for side, on in (("q", v.reduce_q), ("kv", v.reduce_kv)) if on]


_SPLIT_FIELDS = _MATCHING_FIELDS[:2]  # what a side matched inside the graph takes as inputs
_FEATURE_OF_SIDE = {"q": "query", "kv": "value"}  # the sdpa argument each side is matched on


def _inputs_of(side: str, matched: frozenset[str]) -> tuple[str, ...]:
    return _SPLIT_FIELDS if side in matched else _MATCHING_FIELDS


def matching_input_names(v: Variant, matched: frozenset[str] = frozenset()) -> list[str]:
    """Placeholder names of the matching inputs; sides in `matched` take their split only."""
    return [f"{side}_{f}" for side in _sides(v) for f in _inputs_of(side, matched)]


def matched_sides(v: Variant, matched: frozenset[str]) -> list[str]:
    """The sides whose (nearest, order) the rewritten graph returns, in output order."""
    return [side for side in _sides(v) if side in matched]


def matching_inputs(v: Variant, matchings: dict[str, tokens.Matching]) -> list:
    """The tensors for the placeholders of `matching_input_names(v)`, from matchings keyed "q" / "kv"."""
    return [t for side in _sides(v) for t in side_inputs(matchings[side])]


def side_inputs(matching: tokens.Matching) -> list[torch.Tensor]:
    """The tensors one side not matched in the graph takes, in placeholder order."""
    return [getattr(matching, f) for f in _MATCHING_FIELDS]


def _add_placeholders(graph: fx.Graph, names: list[str], site: str) -> dict[str, fx.Node]:
    """New last inputs, in the order of `names`, named after the site (a graph may reduce several)."""
    last = list(graph.find_nodes(op="placeholder"))[-1]
    out = {}
    with graph.inserting_after(last):
        for name in reversed(names):
            out[name] = graph.placeholder(f"asymrnr_{site}_{name}")
    return out


def _match(graph: fx.Graph, p: dict[str, fx.Node], side: str, x: fx.Node, constants: tuple) -> None:
    """Nodes computing the side's (nearest, order) from its feature x (tokens.match_fields), put
    into `p` beside the side's dst and src."""
    call = graph.call_function(tokens.match_fields, (x, p[f"{side}_dst"], p[f"{side}_src"], *constants))
    for i, f in enumerate(_MATCHING_FIELDS[2:]):
        p[f"{side}_{f}"] = graph.call_function(operator.getitem, (call, i))


def _append_outputs(graph: fx.Graph, values: list[fx.Node]) -> None:
    out = graph.output_node()
    out.args = ((*out.args[0], *values),)


def _plan(graph: fx.Graph, p: dict[str, fx.Node], side: str, n_keep: int, layout: tokens.Layout, mean: bool) -> dict[str, fx.Node]:
    """Nodes computing the side's plan fields (keep, restore[, drop, drop_slot, count])."""
    matching = tuple(p[f"{side}_{f}"] for f in _MATCHING_FIELDS)
    mode = "mean" if mean else "replace"
    call = graph.call_function(tokens.plan_fields, (*matching, n_keep, layout.n_text, layout.n_visual, layout.text_first, mode))
    names = tokens.PLAN_FIELDS if mean else tokens.PLAN_FIELDS[:2]
    return {f: graph.call_function(operator.getitem, (call, i)) for i, f in enumerate(names)}


def _reduce(graph: fx.Graph, x: fx.Node, plan: dict[str, fx.Node], mean: bool) -> fx.Node:
    if mean:
        args = (x, *(plan[f] for f in ("keep", "drop", "drop_slot", "count")))
        return graph.call_function(tokens.merge_tokens, args)
    return graph.call_function(tokens.gather_tokens, (x, plan["keep"]))


def rewrite_site(
    gm: fx.GraphModule, node_name: str, v: Variant, lengths: dict[str, int], layout: tokens.Layout, counters: Counter,
    matched: frozenset[str] = frozenset(), match_constants: tuple = (),
) -> fx.GraphModule:
    """Rewrite the attention node `node_name` of gm in place for variant v, keeping lengths[side]
    visual tokens per reduced side ("q", "kv") of `layout`'s sequence; returns gm. Sides in
    `matched` compute their matching in the graph (`tokens.match_fields` with `match_constants`
    after x, dst, src) and return its (nearest, order) after gm's outputs (a tuple)."""
    if v.dense:
        return gm
    graph = gm.graph
    node = next(n for n in graph.nodes if n.name == node_name)
    a = sdpa_arguments(node)
    before = len(graph.nodes)
    p = _add_placeholders(graph, matching_input_names(v, matched), node_name)
    with graph.inserting_before(node):
        for side in matched_sides(v, matched):
            _match(graph, p, side, a[_FEATURE_OF_SIDE[side]], match_constants)
        plans = {side: _plan(graph, p, side, lengths[side], layout, v.mean) for side in _sides(v)}
        q = _reduce(graph, a["query"], plans["q"], v.mean) if v.reduce_q else a["query"]
        k = _reduce(graph, a["key"], plans["kv"], v.mean) if v.reduce_kv else a["key"]
        val = _reduce(graph, a["value"], plans["kv"], v.mean) if v.reduce_kv else a["value"]
        mask = a["attn_mask"]
        if isinstance(mask, fx.Node):
            keep = {side: plans[side]["keep"] if side in plans else None for side in ("q", "kv")}
            mask = graph.call_function(tokens.reduce_mask, (mask, keep["kv"], keep["q"]))
        kwargs = {name: a[name] for name in SDPA_PARAMS[3:] if name in a}
        kwargs["attn_mask"] = mask
        out = graph.call_function(node.target, (q, k, val), kwargs)
        if v.reduce_q:
            out = graph.call_function(tokens.gather_tokens, (out, plans["q"]["restore"]))
    node.replace_all_uses_with(out)
    graph.erase_node(node)
    _append_outputs(graph, [p[f"{side}_{f}"] for side in matched_sides(v, matched) for f in _MATCHING_FIELDS[2:]])
    graph.lint()
    counters["sites_rewritten"] += 1
    counters["nodes_inserted"] += len(graph.nodes) - before + 1
    gm.recompile()
    return gm
