"""Symmetric (ToMe-style) reduction: the hidden state is reduced *before* the Q/K/V projections
and the attention output restored *after* the output projection, so the projections run on
fewer tokens too.

Between those two points everything that carries the token axis must shrink with it: the
projection input X, the RoPE tables (their video-token axis, wherever it is: (N, D), (1, N, 1, D),
(B, N, D), position ids (1, N)), the attention mask's key axis, and the token
counts Dynamo baked into shape arguments (HunyuanVideo's RoPE traces as `reshape(q, 1, 192, 2)`,
CogVideoX's as `reshape(q, 1, 2, 192, -1, 2)`). One matching per site is shared by the whole
batch (a RoPE table with a batch axis is gathered along its token axis for every sample).
Anything unexpected makes the site unreducible in this mode, with the reason (fail closed).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from asymrnr_fx import tokens

from .sites import Site, is_sdpa, module_path, sdpa_arguments

_PROJECTIONS = ("to_q", "to_k", "to_v")
_SHAPE_METHODS = {"view", "reshape", "expand"}


@dataclass(frozen=True)
class SymmetricPoints:
    """Node names of one site's rewrite points. x_full: X spans text + video (else video only);
    restore_axis: token axis of the restore node's output (1 after to_out, 2 after SDPA)."""

    cut: str
    x: str
    x_full: bool
    rope: tuple[tuple[str, int], ...]  # (input, token axis) of each RoPE table / position input
    mask: str | None
    restore: str
    restore_axis: int
    restore_full: bool


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    ev = node.meta.get("example_value")
    return tuple(ev.shape) if isinstance(ev, torch.Tensor) else None


def _region(graph: fx.Graph, path: str) -> list[fx.Node]:
    """Computation nodes of the attention module at `path` and its submodules."""
    return [
        n for n in graph.nodes
        if n.op != "placeholder" and (module_path(n) == path or module_path(n).startswith(path + "."))
    ]


def _token_axis(shape: tuple[int, ...], n_tokens: tuple[int, ...]) -> int | None:
    """The one axis of `shape` whose size is a token count, None when there is none; ValueError
    when several are (the rewrite could not tell which axis carries the tokens)."""
    axes = [i for i, size in enumerate(shape) if size in n_tokens]
    if len(axes) > 1:
        raise ValueError(f"{tuple(shape)}: several axes equal a token count {n_tokens}")
    return axes[0] if axes else None


def _outside_inputs(region: list[fx.Node], known: set[str]) -> list[fx.Node]:
    """Tensor inputs of the region produced outside it, parameters and `known` ones left out."""
    inside, found = {n.name for n in region}, {}
    for node in region:
        for a in node.all_input_nodes:
            if a.name not in inside and a.name not in known and _shape(a) and not _is_parameter(a):
                found.setdefault(a.name, a)
    return list(found.values())


def _rope_inputs(region: list[fx.Node], known: set[str], n_visual: int, n_total: int) -> tuple[tuple[str, int], ...] | str:
    """(name, token axis) of each outside input of the region that carries the video tokens
    along one axis: RoPE tables (N, D) (CogVideoX, HunyuanVideo), (1, N, 1, D) (Wan), (B, N, D)
    (LTX-Video), position ids (1, N) (Allegro); or the reason one cannot be followed (fail
    closed): a token axis over text and video, or several axes of a token count."""
    found = []
    for a in _outside_inputs(region, known):
        shape = _shape(a)
        try:
            axis = _token_axis(shape, (n_visual, n_total))
        except ValueError as err:
            return f"input {a.name} {err}: the symmetric rewrite cannot tell its token axis"
        if axis is not None and shape[axis] != n_visual:
            return f"input {a.name} {tuple(shape)} has a token axis the symmetric rewrite does not follow"
        if axis is not None:
            found.append((a.name, axis))
    return tuple(found)


def _is_parameter(node: fx.Node) -> bool:
    return isinstance(node.meta.get("example_value"), torch.nn.Parameter)


def find_points(graph: fx.Graph, site: Site) -> SymmetricPoints | str:
    """The rewrite points of `site`, or the reason the symmetric mode cannot reduce it."""
    lay = site.layout
    n_total = lay.n_text + lay.n_visual
    region = _region(graph, site.path)
    names = {f"{site.path}.{p}" for p in _PROJECTIONS}
    proj = [n for n in region if n.op == "call_function" and module_path(n) in names]
    if len(proj) != 3 or len({p.args[0] for p in proj}) != 1:
        return "Q, K and V are not three projections of one input"
    x = proj[0].args[0]
    if (_shape(x) or (0, 0))[1] not in (n_total, lay.n_visual):
        return f"projection input {_shape(x)} has no token axis of {n_total} or {lay.n_visual}"
    sdpa = next(n for n in region if is_sdpa(n))
    features = {_shape(x)[-1], *(_shape(sdpa_arguments(sdpa)["query"]) or ())[1:2], (_shape(sdpa) or (0,))[-1]}
    if clash := features & {n_total, lay.n_visual}:
        return f"a token count equals a feature size ({sorted(clash)}): shape arguments could not be told apart"
    mask_arg = sdpa_arguments(sdpa)["attn_mask"]
    known = {x.name} | ({mask_arg.name} if isinstance(mask_arg, fx.Node) else set())
    after_cut = region[region.index(proj[0]):]  # what the rewrite runs on reduced tokens
    rope = _rope_inputs(after_cut, known, lay.n_visual, n_total)
    if isinstance(rope, str):
        return rope
    out = [n for n in region if module_path(n) == f"{site.path}.to_out.0" and n.op == "call_function"]
    restore, axis = (out[0], 1) if out else (sdpa, 2)
    mask = sdpa_arguments(sdpa)["attn_mask"]
    if isinstance(mask, fx.Node) and (_shape(mask) or (1, 1))[-2] != 1:
        return "attention mask with a row per query"
    return SymmetricPoints(
        cut=proj[0].name, x=x.name, x_full=_shape(x)[1] == n_total, rope=rope,
        mask=mask.name if isinstance(mask, fx.Node) else None, restore=restore.name, restore_axis=axis,
        restore_full=_shape(restore)[axis] == n_total,
    )


def _between(graph: fx.Graph, first: str, last: str) -> list[fx.Node]:
    nodes, inside = [], False
    for n in graph.nodes:
        inside = inside or n.name == first
        if inside:
            nodes.append(n)
        if n.name == last:
            return nodes
    return nodes


def _resize(node: fx.Node, counts: dict[int, int]) -> int:
    """Rewrite token counts baked into a view/reshape/expand; returns how many args changed."""
    shape = _shape(node)
    sizes = list(node.args[1:])
    if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
        sizes = list(sizes[0])
    if shape is None or len(sizes) != len(shape):
        return 0
    hits = [i for i, s in enumerate(sizes) if isinstance(s, int) and s in counts and shape[i] == s]
    if len(hits) > 1:
        raise ValueError(f"{node.format_node()}: several axes equal a token count, cannot tell which is tokens")
    for i in hits:
        sizes[i] = counts[sizes[i]]
    node.args = (node.args[0], *sizes)
    return len(hits)


def rewrite_symmetric(
    gm: fx.GraphModule, p: SymmetricPoints, layout: tokens.Layout, lengths: tuple[int, int], mean: bool
) -> int:
    """Rewrite gm for one site; returns the number of nodes inserted or changed.

    Placeholders appended: keep_full (L,), keep_vis (Lv,), restore (N or Nv,) and, for mean,
    drop / drop_slot / count in X's token space. `lengths` = (L, Lv) kept in total / visual.
    """
    g = gm.graph
    names = ["keep_full", "keep_vis", "restore"] + (["drop", "drop_slot", "count"] if mean else [])
    last = list(g.find_nodes(op="placeholder"))[-1]
    with g.inserting_after(last):
        ph = {n: g.placeholder(f"asymrnr_h_{n}") for n in reversed(names)}
    node = {n.name: n for n in g.nodes}
    changed = 0
    x = node[p.x]
    keep_x = ph["keep_full"] if p.x_full else ph["keep_vis"]
    with g.inserting_before(node[p.cut]):
        args = (x, keep_x, ph["drop"], ph["drop_slot"], ph["count"]) if mean else (x, keep_x)
        x_r = g.call_function(tokens.merge_seq if mean else tokens.gather_seq, args)
    changed += _replace_in(x, x_r, _region_users(g, p)) + 1
    for name, axis in p.rope:
        rope = node[name]
        with _inserting_for(g, rope, node[p.cut]):
            rope_r = g.call_function(torch.index_select, (rope, axis, ph["keep_vis"]))
        changed += _replace_in(rope, rope_r, _region_users(g, p)) + 1
    if p.mask:
        mask = node[p.mask]
        with _inserting_for(g, mask, node[p.cut]):
            mask_r = g.call_function(torch.index_select, (mask, -1, ph["keep_full"]))
        changed += _replace_in(mask, mask_r, _region_users(g, p)) + 1
    counts = {layout.n_text + layout.n_visual: lengths[0], layout.n_visual: lengths[1]}
    for n in _between(g, p.cut, p.restore):
        if n.op == "call_method" and n.target in _SHAPE_METHODS:
            changed += _resize(n, counts)
    restore = node[p.restore]
    with g.inserting_after(restore):
        out = g.call_function(torch.index_select, (restore, p.restore_axis, ph["restore"]))
    restore.replace_all_uses_with(out, delete_user_cb=lambda u: u is not out)
    g.lint()
    gm.recompile()
    return changed + 1


def _inserting_for(g: fx.Graph, source: fx.Node, cut: fx.Node):
    """Where the reduced copy of `source` goes: before the cut, or right after `source` when the
    block builds it past the cut (Mochi's key mask is built inside the attention)."""
    order = {n: i for i, n in enumerate(g.nodes)}
    return g.inserting_after(source) if order[source] > order[cut] else g.inserting_before(cut)


def _region_users(g: fx.Graph, p: SymmetricPoints) -> set[str]:
    return {n.name for n in _between(g, p.cut, p.restore)}


def _replace_in(old: fx.Node, new: fx.Node, users: set[str]) -> int:
    targets = [u for u in old.users if u.name in users and u is not new]
    for u in targets:
        u.replace_input_with(old, new)
    return len(targets)


def plan_inputs(full: tokens.Plan, vis: tokens.Plan, p: SymmetricPoints, mean: bool) -> list[torch.Tensor]:
    """Tensors for `rewrite_symmetric`'s placeholders from batch-shared (1, 1, .) plans over the
    whole sequence (`full`) and over the video tokens alone (`vis`)."""
    x_plan = full if p.x_full else vis
    restore = full if p.restore_full else vis
    out = [full.keep[0, 0], vis.keep[0, 0], restore.restore[0, 0]]
    if mean:
        out += [x_plan.drop[0, 0], x_plan.drop_slot[0, 0], x_plan.count[0, 0]]
    return out
