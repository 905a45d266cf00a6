"""The `asymrnr` torch.compile backend.

    Dynamo graph --find sites--> cut at reducible attention calls --> per segment, per
    (reduced lengths) variant: rewrite attention, compile with Inductor (lazily, cached)

Why segments: reduced lengths change per block and per step, and a static graph per step
pattern would recompile the whole model for every new pattern. A segment spans one block, so a
variant compiled for one (q, kv) length pair serves every block of that structure; the number
of compilations is bounded by the distinct length pairs of the schedule, not by the steps.
Matchings are computed eagerly between segments (once per cache window) from the site's
query / value inputs and passed to the compiled segment as explicit index inputs.
"""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import fx

from . import tokens
from .config import AsymRnRConfig
from .models.adapter import UnsupportedModelError, adapter_for_classes
from .passes import reduce_attention as ra
from .passes import segment, sites
from .passes import symmetric as sym
from .runtime import AsymRnRRuntime, register_runtime, runtime_for_anchor
from .tokens import reduced_length

CompiledFn = Callable[..., Any]


def inner_compile(gm: fx.GraphModule, inputs: Sequence[Any], cfg: AsymRnRConfig, rt: AsymRnRRuntime) -> CompiledFn:
    """Compile one graph with the configured inner compiler, counting and timing it."""
    start = time.perf_counter()
    if cfg.compiler == "inductor":
        from torch._inductor import list_mode_options
        from torch._inductor.compile_fx import compile_fx

        patches = {**(list_mode_options(cfg.mode) if cfg.mode else {}), **cfg.inductor_options}
        fn = compile_fx(gm, list(inputs), config_patches=patches)
    elif cfg.compiler == "aot_eager":
        fn = torch._dynamo.lookup_backend("aot_eager")(gm, list(inputs))
    else:
        fn = gm.forward
    rt.compile_seconds += time.perf_counter() - start
    rt.stats["compiles"] += 1
    return fn


def _ensure_tuple_output(gm: fx.GraphModule) -> bool:
    """Make gm return a tuple (compilers want one); True if it returned a single value."""
    out = gm.graph.output_node()
    if isinstance(out.args[0], (tuple, list)):
        return False
    out.args = ((out.args[0],),)
    gm.recompile()
    return True


def _contiguous_outputs(gm: fx.GraphModule) -> None:
    """Return contiguous tensors, so every segment of one structure sees the same input strides
    whichever segment produced them (a slice of the prologue's output would otherwise force a
    second compilation). Free for values Inductor computes, one copy for pure views."""
    out = gm.graph.output_node()
    with gm.graph.inserting_before(out):
        values = [gm.graph.call_method("contiguous", (v,)) if isinstance(v, fx.Node) else v for v in out.args[0]]
    out.args = (tuple(values),)
    gm.recompile()


def _layout(x: torch.Tensor) -> tuple[int, ...]:
    """Strides that matter: Inductor's input checks ignore the stride of a size-1 dim."""
    return tuple(st if size > 1 else 0 for size, st in zip(x.shape, x.stride()))


class _Segment:
    """One segment of the cut graph: compiles on first use, keyed by activation strides."""

    def __init__(self, gm: fx.GraphModule, cfg: AsymRnRConfig, rt: AsymRnRRuntime, activations: list[int]):
        self.gm, self.cfg, self.rt = gm, cfg, rt
        self.single = _ensure_tuple_output(gm)
        self.structure = segment.structure_key(gm.graph)
        self.activations = activations

    def _key(self, args: Sequence[Any], variant: Any) -> tuple:
        strides = tuple(_layout(args[i]) for i in self.activations if isinstance(args[i], torch.Tensor))
        return (self.structure, variant, strides)

    def _compiled(self, args: Sequence[Any], variant: Any, build: Callable[[], fx.GraphModule], extra: list) -> CompiledFn:
        key = self._key(args, variant)
        fn = self.rt.compiled.get(key)
        if fn is None:
            fn = self.rt.compiled[key] = inner_compile(build(), [*args, *extra], self.cfg, self.rt)
        return fn

    def _copy(self) -> fx.GraphModule:
        """A private copy of the segment for one variant's rewrite."""
        return fx.GraphModule(self.gm, copy.deepcopy(self.gm.graph))

    def _finish(self, out: Any) -> Any:
        return out[0] if self.single else tuple(out)

    def __call__(self, *args: Any) -> Any:
        return self._finish(self._compiled(args, None, lambda: self.gm, [])(*args))


class _SiteSegment(_Segment):
    """A segment that starts with a reducible attention call."""

    def __init__(self, gm, cfg, rt, activations, site: sites.Site, grid):
        super().__init__(gm, cfg, rt, activations)
        self.site, self.grid = site, grid
        node = next(n for n in gm.graph.nodes if n.name == site.node_name)
        args = sites.sdpa_arguments(node)
        placeholders = [n.name for n in gm.graph.find_nodes(op="placeholder")]
        self.pos = {f: placeholders.index(args[name].name) for f, name in (("q", "query"), ("v", "value"))}
        self.n_dst = tokens.count_windows(grid, cfg.dst_stride)

    def lengths(self) -> tuple[int, int]:
        """Visual tokens kept for queries and for keys/values at the runtime's current step."""
        return site_lengths(self.rt, self.site, self.n_dst)

    def _variant_gm(self, variant: ra.Variant) -> fx.GraphModule:
        gm = self._copy()
        return ra.rewrite_site(gm, self.site.node_name, variant, self.rt.rewrites)

    def _plan_inputs(self, args: Sequence[Any], variant: ra.Variant, nq: int, nkv: int) -> list[torch.Tensor]:
        """Cached plans for this step: queries matched on Q, keys and values together on V."""
        plans = {}
        for side, feature, n_keep, on in (("q", "q", nq, variant.reduce_q), ("kv", "v", nkv, variant.reduce_kv)):
            if on:
                x = args[self.pos[feature]]
                cached = self.rt.matching(self.site.index, feature, lambda x=x: x, self.site.layout, self.grid)
                plans[side] = self.rt.plan(cached, n_keep, self.site.layout)
        return ra.plan_inputs(variant, plans)

    def __call__(self, *args: Any) -> Any:
        nq, nkv = self.lengths()
        nv = self.site.layout.n_visual
        self.rt.record(self.site, nq, nkv)
        variant = ra.Variant(nq < nv, nkv < nv, self.cfg.reduce_mode == "mean")
        extra = [] if variant.dense else self._plan_inputs(args, variant, nq, nkv)
        fn = self._compiled(args, (variant, nq, nkv), lambda: self._variant_gm(variant), extra)
        return self._finish(fn(*args, *extra))


class _SymmetricSegment(_Segment):
    """A segment that starts at a site's Q/K/V projections (symmetric mode)."""

    def __init__(self, gm, cfg, rt, activations, site: sites.Site, points: sym.SymmetricPoints, grid):
        super().__init__(gm, cfg, rt, activations)
        self.site, self.points, self.grid = site, points, grid
        placeholders = [n.name for n in gm.graph.find_nodes(op="placeholder")]
        self.x_pos = placeholders.index(points.x)
        self.n_dst = tokens.count_windows(grid, cfg.dst_stride)
        lay = site.layout
        self.x_layout = lay if points.x_full else tokens.Layout(0, lay.n_visual, True)

    def _variant_gm(self, n_keep: int) -> fx.GraphModule:
        gm = self._copy()
        lay, mean = self.site.layout, self.cfg.reduce_mode == "mean"
        changed = sym.rewrite_symmetric(gm, self.points, lay, (lay.n_text + n_keep, n_keep), mean)
        self.rt.rewrites["sites_rewritten"] += 1
        self.rt.rewrites["nodes_inserted"] += changed
        return gm

    def _plan_inputs(self, args: Sequence[Any], n_keep: int) -> list[torch.Tensor]:
        def batch_mean() -> torch.Tensor:  # (1, 1, N, C): one matching for the whole batch
            return args[self.x_pos].mean(0, keepdim=True).unsqueeze(1)

        cached = self.rt.matching(self.site.index, "h", batch_mean, self.x_layout, self.grid)
        full = self.rt.plan(cached, n_keep, self.site.layout)
        vis = self.rt.plan(cached, n_keep, tokens.Layout(0, self.site.layout.n_visual, True))
        return sym.plan_inputs(full, vis, self.points, self.cfg.reduce_mode == "mean")

    def __call__(self, *args: Any) -> Any:
        n_keep, _ = site_lengths(self.rt, self.site, self.n_dst)
        self.rt.record(self.site, n_keep, n_keep)
        if n_keep == self.site.layout.n_visual:
            return super().__call__(*args)  # this step leaves the site dense
        extra = self._plan_inputs(args, n_keep)
        fn = self._compiled(args, ("h", n_keep), lambda: self._variant_gm(n_keep), extra)
        return self._finish(fn(*args, *extra))


def site_lengths(rt: AsymRnRRuntime, site: sites.Site, n_dst: int) -> tuple[int, int]:
    q, kv, h = rt.ratios(site.block)
    nv = site.layout.n_visual
    if h > 0:
        n = reduced_length(nv, n_dst, h)
        return n, n
    return (reduced_length(nv, n_dst, q) if q > 0 else nv), (reduced_length(nv, n_dst, kv) if kv > 0 else nv)


class AsymRnRCompiled:
    """What the backend returns to Dynamo: reads the timestep, then runs the segments."""

    def __init__(self, top: fx.GraphModule, rt: AsymRnRRuntime, timestep_index: int):
        self.top, self.rt, self.timestep_index = top, rt, timestep_index

    def __call__(self, *args: Any) -> Any:
        with self.rt.lock:
            self.rt.begin_call(args[self.timestep_index])
            return self.top(*args)


def _activation_positions(top: fx.GraphModule, name: str) -> list[int]:
    """Inputs of submodule `name` that are produced by other submodules (not graph inputs)."""
    call = next(n for n in top.graph.nodes if n.op == "call_module" and n.target == name)
    return [i for i, a in enumerate(call.args) if isinstance(a, fx.Node) and a.op != "placeholder"]


def _symmetric_points(gm: fx.GraphModule, info: sites.ModelInfo, rt: AsymRnRRuntime) -> dict[int, sym.SymmetricPoints]:
    """Rewrite points of every site the symmetric mode can reduce; the others are counted."""
    points = {}
    for site in info.sites:
        if site.reducible:
            found = sym.find_points(gm.graph, site)
            if isinstance(found, str):
                rt.rewrites["sites_not_symmetric"] += 1
                warnings.warn(f"asymrnr: {site.path} stays dense in symmetric mode: {found}", stacklevel=4)
            else:
                points[site.index] = found
    return points


def build_segments(gm: fx.GraphModule, info: sites.ModelInfo, cfg: AsymRnRConfig, rt: AsymRnRRuntime):
    symmetric = rt.schedule.symmetric
    points = _symmetric_points(gm, info, rt) if symmetric else {}
    reducible = [s for s in info.sites if s.reducible and (not symmetric or s.index in points)]
    cuts = [points[s.index].cut if symmetric else s.node_name for s in reducible]
    rt.active_sites = {s.path for s in reducible}
    rt.symmetric_points = {s.path: points[s.index] for s in reducible if symmetric}
    top, names = segment.split_at_sites(gm, cuts)
    for k, name in enumerate(names):
        sub = getattr(top, name)
        acts = _activation_positions(top, name)
        if k == 0:
            seg = _Segment(sub, cfg, rt, acts)
        elif symmetric:
            site = reducible[k - 1]
            seg = _SymmetricSegment(sub, cfg, rt, acts, site, points[site.index], info.grid)
        else:
            seg = _SiteSegment(sub, cfg, rt, acts, reducible[k - 1], info.grid)
        if k < len(names) - 1:
            _contiguous_outputs(sub)
        delattr(top, name)
        setattr(top, name, seg)
    return top


def _has_symbolic_shapes(gm: fx.GraphModule) -> bool:
    for node in gm.graph.find_nodes(op="placeholder"):
        ev = node.meta.get("example_value")
        if isinstance(ev, torch.SymInt) or (
            isinstance(ev, torch.Tensor) and any(isinstance(s, torch.SymInt) for s in ev.shape)
        ):
            return True
    return False


def _runtime(cfg: AsymRnRConfig, options: dict, example_inputs: Sequence[Any]) -> AsymRnRRuntime:
    rt = options.get("runtime")
    anchor = next((x for x in example_inputs if isinstance(x, torch.nn.Parameter)), None)
    if rt is None and anchor is not None:
        rt = runtime_for_anchor(anchor)
        rt = rt if rt is not None and rt.config == cfg else None
    rt = rt or AsymRnRRuntime(cfg)
    if anchor is not None:
        register_runtime(anchor, rt)
    return rt


def _dense(gm, example_inputs, cfg, rt, why: str) -> CompiledFn:
    if why:
        warnings.warn(f"asymrnr: running this graph unreduced: {why}", stacklevel=3)
    rt.stats["dense_graphs"] += 1
    return inner_compile(gm, example_inputs, cfg, rt)


def asymrnr_backend(gm: fx.GraphModule, example_inputs: list, *, options: dict | None = None, mode: str | None = None):
    """torch.compile backend: `torch.compile(model, backend="asymrnr", options={...})`."""
    options = dict(options or {})  # torch mutates the caller's dict
    cfg = AsymRnRConfig.from_options(options, mode=mode)
    rt = _runtime(cfg, options, example_inputs)
    if not cfg.enabled:
        return _dense(gm, example_inputs, cfg, rt, "")
    try:
        adapter = adapter_for_classes(sites.module_classes(gm))
        info = sites.model_info(gm, adapter, example_inputs)
    except UnsupportedModelError as err:
        if cfg.on_unsupported == "error":
            raise
        return _dense(gm, example_inputs, cfg, rt, str(err))
    if _has_symbolic_shapes(gm):
        return _dense(gm, example_inputs, cfg, rt, "dynamic shapes; compile with dynamic=False")
    rt.bind(info)
    if not any(s.reducible for s in info.sites):
        return _dense(gm, example_inputs, cfg, rt, "no reducible self-attention found")
    return AsymRnRCompiled(build_segments(gm, info, cfg, rt), rt, info.timestep_index)


__all__ = ["AsymRnRCompiled", "asymrnr_backend"]
