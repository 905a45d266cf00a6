"""The `asymrnr` torch.compile backend.

    Dynamo graph --find sites--> cut into spans of blocks --> per segment, per (reduced lengths,
    matched sides) variant: rewrite its attention sites, compile with Inductor (lazily, cached)

Why spans: reduced lengths change per block and per step, and a static graph per step pattern
would recompile the whole model for every new pattern. Consecutive blocks whose sites see few
patterns over the steps form one span (`span_starts`): one program per pattern reduces all of
its sites, and on the call that opens a matching window computes their matchings inside the
graph and returns them; the calls that reuse them pass them back in, and the segment builds its
index tensors (the plan for its lengths) itself. A constant schedule gives one span, the uncut
graph (two programs: one that matches, one that reuses); a schedule whose pattern changes in
every block gives one span per block. `segments="sites"` cuts at every site instead (segments
of identical blocks share compiled code). The symmetric mode cuts at every site, and matches
between segments by one compiled matching program per shape.
"""

from __future__ import annotations

import copy
import dataclasses
import operator
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import fx

from . import inductor_cache, skip_dit, span, tokens
from .cache import BlockCache
from .config import AsymRnRConfig, BackendConfigError, ConfigError
from .models.adapter import ModelAdapter, UnsupportedModelError, adapter_for_classes
from .passes import blocks, segment, sites
from .passes import reduce_attention as ra
from .passes import symmetric as sym
from .runtime import AsymRnRRuntime, register_runtime, runtime_for_anchor

CompiledFn = Callable[..., Any]

# Inductor options of every lazily compiled graph (the user's `inductor_options` override them).
# size_asserts: the code would check every input's size and stride at every call, weights
# included (a segment takes its block's weights as inputs, so that one program serves every block
# of a structure): ~20 checks per block and step. The runtime keys compiled code by its inputs'
# shapes and layouts instead (`_input_signature`, and activation layouts per call), and Dynamo's
# guards pin the graph inputs, so no call reaches code compiled for other shapes or strides.
SEGMENT_OPTIONS = {"size_asserts": False}


def inner_compile(gm: fx.GraphModule, inputs: Sequence[Any], cfg: AsymRnRConfig, rt: AsymRnRRuntime) -> CompiledFn:
    """Compile one graph with the configured inner compiler, counting and timing it."""
    start = time.perf_counter()
    if cfg.compiler == "inductor":
        from torch._inductor import list_mode_options
        from torch._inductor.compile_fx import compile_fx

        patches = {**SEGMENT_OPTIONS, **(list_mode_options(cfg.mode) if cfg.mode else {}), **cfg.inductor_options}
        # Lazy compiles run outside Dynamo: without these, both of Inductor's on-disk caches are
        # bypassed and every new process recompiles every segment (see inductor_cache).
        with inductor_cache.tracing_context() as mode:
            lowered = inductor_cache.lower_for_cache(gm, inputs, mode)
            fn = compile_fx(lowered, inductor_cache.static_inputs(inputs, mode), config_patches=patches)
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


def _input_signature(args: Sequence[Any]) -> tuple:
    """What a compiled segment is specialised on besides its graph: grad mode and every tensor
    input's dtype, device, shape and layout. Inductor's compiled code checks sizes and strides when
    called, but not dtypes: reused for a bfloat16 input, a segment compiled for a float32 one reads
    the bfloat16 bytes as float32 (and past the end of the buffer)."""
    def one(a: Any) -> tuple | None:
        return (a.dtype, a.device, tuple(a.shape), _layout(a)) if isinstance(a, torch.Tensor) else None

    return (torch.is_grad_enabled(), tuple(one(a) for a in args))


class _Segment:
    """One segment of the cut graph: compiles on first use, keyed by activation strides and the
    variant its reducer (if any) asks for at this step."""

    def __init__(self, gm: fx.GraphModule, rt: AsymRnRRuntime, activations: list[int], reducer=None):
        self.gm, self.rt, self.reducer = gm, rt, reducer
        self.single = _ensure_tuple_output(gm)
        self.structure = segment.structure_key(gm.graph)
        self.activations = activations
        self._inputs: tuple | None = None  # this segment's `_input_signature`, taken at its first call
        self._fns: dict[tuple, CompiledFn] = {}  # (variant, activation layouts) -> code: one small key per call

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fns": {}}  # compiled code is looked up again (a loaded package's programs)

    def _activation_layouts(self, args: Sequence[Any]) -> tuple | None:
        """None when every activation is contiguous (the usual case, one cheap check each),
        else their layouts."""
        acts = [args[i] for i in self.activations if isinstance(args[i], torch.Tensor)]
        return None if all(a.is_contiguous() for a in acts) else tuple(_layout(a) for a in acts)

    def _key(self, args: Sequence[Any], variant: Any) -> tuple:
        """Segments of one structure share compiled code, across blocks and across Dynamo graphs.
        A recompile (e.g. the pipeline's timestep turning from float32 to bfloat16 after the first
        step) builds new segments of the same structure: their inputs' dtypes must be in the key.
        One Dynamo graph's guards pin its inputs, so the signature is taken once per segment."""
        if self._inputs is None:
            self._inputs = _input_signature(args)
        strides = tuple(_layout(args[i]) for i in self.activations if isinstance(args[i], torch.Tensor))
        return (self.structure, variant, self._inputs, strides)

    def _compiled(self, args: Sequence[Any], variant: Any, build: Callable[[], fx.GraphModule], extra: list) -> CompiledFn:
        local = (variant, self._activation_layouts(args))
        fn = self._fns.get(local)
        if fn is None:
            fn = self._fns[local] = compiled_for(self.rt, self._key(args, variant), build, [*args, *extra])
        return fn

    def _copy(self) -> fx.GraphModule:
        """A private copy of the segment for one variant's rewrite."""
        return fx.GraphModule(self.gm, copy.deepcopy(self.gm.graph))

    def __call__(self, *args: Any) -> Any:
        chosen = self.reducer.variant(args) if self.reducer is not None else None
        if chosen is None:  # dense at this step
            out = self._compiled(args, None, lambda: self.gm, [])(*args)
        else:
            key, extra = chosen
            out = self._compiled(args, key, lambda: self.reducer.rewrite(self._copy(), key), extra)(*args, *extra)
            out = self.reducer.finish(out)
        return out[0] if self.single else tuple(out)


def compiled_for(rt: AsymRnRRuntime, key: tuple, build: Callable[[], fx.GraphModule], inputs: list) -> CompiledFn:
    """The compiled code for `key` (a segment variant, a matching), compiling `build()` for
    `inputs` at its first use: with `rt.segment_compiler` when one is set (export), else with
    the configured inner compiler."""
    fn = rt.compiled.get(key)
    if fn is None:
        compile_fn = rt.segment_compiler or (lambda _, build, inputs: inner_compile(build(), inputs, rt.config, rt))
        fn = rt.compiled[key] = compile_fn(key, build, inputs)
    return fn


MATCHING = "tokens.match_fields"  # the structure of a compiled matching's key


class CompiledMatcher:
    """Site matchings computed by compiled code (an `AsymRnRRuntime.matching` matcher): one
    program per input signature and visual layout, shared by every site and feature of that
    shape. A matching step then costs one call instead of a dozen eager operators."""

    def __init__(self, rt: AsymRnRRuntime) -> None:
        self.rt = rt

    def __call__(self, x: torch.Tensor, dst: torch.Tensor, src: torch.Tensor, layout: tokens.Layout) -> tuple:
        constants = matching_constants(self.rt, layout)
        args = [x, dst, src]
        key = (MATCHING, constants, _input_signature(args), ())
        return tuple(compiled_for(self.rt, key, lambda: _matching_graph(constants), args)(*args))


def _matching_graph(constants: tuple) -> fx.GraphModule:
    """x, dst, src -> (nearest, order): one call of `tokens.match_fields` (inlined by Inductor)."""
    graph = fx.Graph()
    x, dst, src = (graph.placeholder(name) for name in ("x", "dst", "src"))
    call = graph.call_function(tokens.match_fields, (x, dst, src, *constants))
    graph.output(tuple(graph.call_function(operator.getitem, (call, i)) for i in range(2)))
    return fx.GraphModule(torch.nn.Module(), graph)


def _placeholder_index(gm: fx.GraphModule, name: str) -> int:
    return [n.name for n in gm.graph.find_nodes(op="placeholder")].index(name)


class _Reducer:
    """What a segment's reducer does after the call: nothing unless it returns matchings."""

    def finish(self, out: Sequence[Any]) -> Sequence[Any]:
        """The segment's outputs, less what the reducer's variant added to them."""
        return out


class SiteDecision:
    """A site's rewrite variant and (queries, keys/values) kept at the current step, recorded at
    every call. The schedule makes it a function of the site's block and the step only, so it is
    worked out once per step (the calls of a step's other contexts look it up)."""

    def __init__(self, rt: AsymRnRRuntime, site: sites.Site, n_dst: int, mean: bool):
        self.rt, self.site, self.n_dst, self.mean = rt, site, n_dst, mean
        self._step, self._value = -1, None

    def __call__(self) -> tuple[ra.Variant, int, int]:
        if self.rt.step != self._step:
            nq, nkv = self.rt.site_lengths(self.site, self.n_dst)
            nv = self.site.layout.n_visual
            self._step, self._value = self.rt.step, (ra.Variant(nq < nv, nkv < nv, self.mean), nq, nkv)
        value = self._value
        self.rt.record(self.site, value[1], value[2])
        return value


class SymmetricReducer(_Reducer):
    """A segment that starts at a site's Q/K/V projections (symmetric mode): the hidden state is
    reduced before them, one matching on the batch mean."""

    def __init__(self, gm: fx.GraphModule, rt: AsymRnRRuntime, site: sites.Site, points, matcher: CompiledMatcher):
        self.rt, self.site, self.points, self.grid, self.matcher = rt, site, points, site.grid, matcher
        self.x_pos = _placeholder_index(gm, points.x)
        lay = site.layout
        self.x_layout = lay if points.x_full else tokens.Layout(0, lay.n_visual, True)
        self.mean = rt.config.reduction.reduce_mode == "mean"
        self.decide = SiteDecision(rt, site, tokens.count_windows(site.grid, rt.config.reduction.dst_stride), self.mean)

    def variant(self, args: Sequence[Any]) -> tuple[Any, list[torch.Tensor]] | None:
        v, n_keep, _ = self.decide()  # the hidden ratio keeps one length for queries and keys/values
        if v.dense:
            return None
        return ("h", n_keep), self._plan_inputs(args, n_keep)

    def rewrite(self, gm: fx.GraphModule, key: Any) -> fx.GraphModule:
        lay, n_keep = self.site.layout, key[1]
        changed = sym.rewrite_symmetric(gm, self.points, lay, (lay.n_text + n_keep, n_keep), self.mean)
        self.rt.rewrites["sites_rewritten"] += 1
        self.rt.rewrites["nodes_inserted"] += changed
        return gm

    def _plan_inputs(self, args: Sequence[Any], n_keep: int) -> list[torch.Tensor]:
        def batch_mean() -> torch.Tensor:  # (1, 1, N, C): one matching for the whole batch
            return args[self.x_pos].mean(0, keepdim=True).unsqueeze(1)

        cached = self.rt.matching(self.site, "h", batch_mean, self.x_layout, self.grid, self.matcher)
        full = self.rt.plan(cached, n_keep, self.site.layout)
        vis = self.rt.plan(cached, n_keep, tokens.Layout(0, self.site.layout.n_visual, True))
        return sym.plan_inputs(full, vis, self.points, self.mean)


MAX_GRAPH_PATTERNS = 2  # patterns of lengths over the steps one span's sites may see (`span_starts`)


def matching_constants(rt: AsymRnRRuntime, layout: tokens.Layout) -> tuple:
    """What `tokens.match_fields` takes after (x, dst, src) for a site of `layout`."""
    r = rt.reduction
    return layout.visual_offset, layout.n_visual, r.distance, r.max_match_elements


class GraphReducer(_Reducer):
    """Every reducible site of an uncut graph, decided together once per call (asymmetric mode).
    The call that opens a site's matching window computes the matching inside the compiled graph
    and returns it (one program for all sites); the calls that reuse it pass it back in. Variants:
    one per pattern of lengths and matched sides, so a constant schedule compiles two."""

    def __init__(self, rt: AsymRnRRuntime, reducible: list[sites.Site]):
        self.rt, self.sites = rt, reducible
        r = rt.config.reduction
        self.decisions = [SiteDecision(rt, s, tokens.count_windows(s.grid, r.dst_stride), r.reduce_mode == "mean")
                          for s in reducible]
        self._due: list[tuple] = []  # (site, feature, dst, src) of the matchings this call computes

    def variant(self, args: Sequence[Any]) -> tuple[Any, list[torch.Tensor]] | None:
        device = next(a.device for a in args if isinstance(a, torch.Tensor))
        parts, extra, self._due = [], [], []
        for site, decide in zip(self.sites, self.decisions):
            v, nq, nkv = decide()
            parts.append((v, nq, nkv, self._site_inputs(site, v, device, extra)))
        if all(p[0].dense for p in parts):  # nothing reduced, so nothing matched: `_due` is empty
            return None
        return ("sites", tuple(parts)), extra

    def _site_inputs(self, site: sites.Site, v: ra.Variant, device: torch.device, extra: list) -> frozenset[str]:
        """Append the site's matching inputs to `extra`; the sides it matches in the graph."""
        matched = set()
        for side, feature, on in (("q", "q", v.reduce_q), ("kv", "v", v.reduce_kv)):
            cached = self.rt.cached_matching(site, feature) if on else None
            if on and cached is None:
                split = self.rt.window_split(site, site.grid, device)  # drawn once per site and window
                extra += split
                self._due.append((site, feature, *split))
                matched.add(side)
            elif on:
                extra += ra.side_inputs(cached.matching)
        return frozenset(matched)

    def rewrite(self, gm: fx.GraphModule, key: Any) -> fx.GraphModule:
        for site, (v, nq, nkv, matched) in zip(self.sites, key[1]):
            ra.rewrite_site(gm, site.node_name, v, {"q": nq, "kv": nkv}, site.layout, self.rt.rewrites,
                            matched, matching_constants(self.rt, site.layout))
        return gm

    def finish(self, out: Sequence[Any]) -> Sequence[Any]:
        """Keep the matchings the call computed (cloned: under CUDA graphs an output is a buffer
        the next replay overwrites) and return the model's outputs."""
        n = 2 * len(self._due)
        if n == 0:
            return out
        found = out[len(out) - n:]
        for i, (site, feature, dst, src) in enumerate(self._due):
            nearest, order = (t.clone() for t in found[2 * i : 2 * i + 2])
            self.rt.store_matching(site, feature, tokens.Matching(dst, src, nearest, order))
        self._due = []
        return out[: len(out) - n]


class AsymRnRCompiled:
    """What the backend returns to Dynamo: places the call (step, context), then runs the segments."""

    def __init__(self, top: fx.GraphModule, rt: AsymRnRRuntime, info: sites.ModelInfo):
        self.top, self.rt = top, rt
        self.timestep_index, self.latent_index = info.timestep_index, info.latent_index

    def __call__(self, *args: Any) -> Any:
        with self.rt.lock:
            self.place(args)
            return self.top(*args)

    def place(self, args: Sequence[Any]) -> None:
        """Tell the runtime where this call stands (generation, step, context); hold `rt.lock`."""
        latent = args[self.latent_index]
        self.rt.begin_call(args[self.timestep_index], (tuple(latent.shape), latent.dtype, latent.device))


def _activation_positions(top: fx.GraphModule, name: str) -> list[int]:
    """Inputs of submodule `name` that are produced by other submodules (not graph inputs)."""
    call = segment.call_of(top, name)
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


def _symmetric_cuts(gm: fx.GraphModule, info: sites.ModelInfo, rt: AsymRnRRuntime) -> dict[str, tuple]:
    """Symmetric mode: cut node -> (site, points) of the segment it starts, at every site."""
    points = _symmetric_points(gm, info, rt)
    reducible = [s for s in info.sites if s.reducible and s.index in points]
    rt.active_sites = {s.path for s in reducible}
    rt.symmetric_points = {s.path: points[s.index] for s in reducible}
    return {points[s.index].cut: (s, points[s.index]) for s in reducible}


def _asymmetric_cuts(gm: fx.GraphModule, info: sites.ModelInfo, cfg: AsymRnRConfig, rt: AsymRnRRuntime,
                     reducible: list[sites.Site]) -> dict[str, int]:
    """Asymmetric mode: cut node -> block of the segment it starts. `segments="sites"` cuts at
    every reducible site, "graph" nowhere, "auto" at the first block of every reduction span but
    the first (`span_starts`). One `GraphReducer` reduces the sites of each segment."""
    rt.active_sites = {s.path for s in reducible}
    if cfg.segments == "sites":
        return {s.node_name: s.block for s in reducible}
    starts = span_starts(rt, reducible) if cfg.segments == "auto" else []
    if not starts:
        return {}
    bounds = blocks.find_bounds(gm.graph, info.adapter, info.block_offsets, info.num_blocks)
    return {bounds.starts[b]: b for b in starts}


def span_starts(rt: AsymRnRRuntime, reducible: list[sites.Site]) -> list[int]:
    """Blocks that start a reduction span, the first span's excepted: consecutive blocks grouped
    so that the sites of one span see at most `MAX_GRAPH_PATTERNS` patterns of kept lengths over
    the schedule's steps (each pattern compiles the span twice: for the call that opens a
    matching window and for the calls that reuse it). A schedule of so few patterns gives one
    span (the graph is not cut); a block whose own sites see more is a span alone."""
    steps = rt.schedule.shape[1] if rt.schedule.shape is not None else 1
    by_block: dict[int, list[sites.Site]] = {}
    for s in reducible:
        by_block.setdefault(s.block, []).append(s)
    starts, span_columns = [], None
    for block in sorted(by_block):
        columns = _length_columns(rt, by_block[block], steps)
        joined = columns if span_columns is None else [a + b for a, b in zip(span_columns, columns)]
        if span_columns is not None and len(set(joined)) > MAX_GRAPH_PATTERNS:
            starts.append(block)
            joined = columns
        span_columns = joined
    return starts


def _length_columns(rt: AsymRnRRuntime, group: list[sites.Site], steps: int) -> list[tuple]:
    """Per step, the (queries, keys/values) kept at each site of `group`."""
    stride = rt.config.reduction.dst_stride
    n_dst = [tokens.count_windows(s.grid, stride) for s in group]
    return [tuple(rt.site_lengths(s, n, t) for s, n in zip(group, n_dst)) for t in range(steps)]


def _segment_reducer(sub: fx.GraphModule, rt: AsymRnRRuntime, found: tuple | None, reducible: list[sites.Site],
                     matcher: CompiledMatcher) -> _Reducer | None:
    """A symmetric site's reducer where `found` (its site and points), else a `GraphReducer` over
    the reducible sites inside `sub` (None where it has none)."""
    if found is not None:
        return SymmetricReducer(sub, rt, *found, matcher)
    names = {n.name for n in sub.graph.nodes}
    inside = [s for s in reducible if s.node_name in names]
    return GraphReducer(rt, inside) if inside else None


def _cache_cuts(gm: fx.GraphModule, info: sites.ModelInfo, cfg: AsymRnRConfig) -> tuple[dict[str, int], str | None]:
    """With the block cache on: cut node -> block it starts (num_blocks: the epilogue), at the
    span's first block and the tail's only (each cut costs a compiled wrapper call and lost
    fusion), and the name of the signal node inserted into `gm`'s graph (None: no signal)."""
    if cfg.cache is None:
        return {}, None
    bounds = blocks.find_bounds(gm.graph, info.adapter, info.block_offsets, info.num_blocks)
    a, b = span.span_of(cfg.cache, info.adapter, info.num_blocks)
    needs_signal = isinstance(cfg.cache, BlockCache) and cfg.cache.needs_signal
    signal = blocks.insert_signal(gm.graph, bounds, a) if needs_signal else None
    starts = [*bounds.starts, bounds.epilogue]
    return {starts[i]: i for i in (a, b) if starts[i] is not None}, signal


def build_segments(gm: fx.GraphModule, info: sites.ModelInfo, cfg: AsymRnRConfig, rt: AsymRnRRuntime) -> fx.GraphModule:
    """Cut at reduction spans or sites (`_asymmetric_cuts`, `_symmetric_cuts`) and at block
    boundaries for the cache; each piece becomes a lazily compiled `_Segment`; with the cache on,
    the pieces are grouped around its span."""
    gm = fx.GraphModule(gm, copy.deepcopy(gm.graph))  # Dynamo's graph stays as it was
    schedule = rt.schedule
    symmetric = _symmetric_cuts(gm, info, rt) if schedule.symmetric else {}
    asymmetric = not (schedule.symmetric or schedule.all_zero)
    reducible = [s for s in info.sites if s.reducible] if asymmetric else []
    cut_blocks = _asymmetric_cuts(gm, info, cfg, rt, reducible) if asymmetric else {}
    block_starts, signal = _cache_cuts(gm, info, cfg)
    cut_blocks.update(block_starts)
    top, names, firsts = segment.split_at(gm, [*symmetric, *cut_blocks])
    block, part_blocks, matcher = -1, {}, CompiledMatcher(rt)  # -1: the prologue
    for k, name in enumerate(names):
        sub, found = getattr(top, name), symmetric.get(firsts[name])
        block = cut_blocks.get(firsts[name], found[0].block if found is not None else block)
        part_blocks[name] = block
        reducer = _segment_reducer(sub, rt, found, reducible, matcher)
        seg = _Segment(sub, rt, _activation_positions(top, name), reducer)
        if k < len(names) - 1:
            _contiguous_outputs(sub)
        delattr(top, name)
        setattr(top, name, seg)
    rt.stats["segments"] = len(names)
    if cfg.cache is None:
        return top
    return span.wrap(top, part_blocks, cfg.cache, info.num_blocks, rt, signal)


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


_DYNAMIC = (
    "asymrnr: Dynamo recompiled this model with dynamic shapes (a shape changed and `dynamic` was "
    "not False), and asymrnr runs a dynamic graph unreduced and uncached: the speedup is lost. "
    "Compile with asymrnr_fx.compile(model, config) or torch.compile(..., dynamic=False)."
)


class _Unreduced:
    """A graph that runs without asymrnr: warns at each call (Python shows it once per place)."""

    def __init__(self, fn: CompiledFn, rt: AsymRnRRuntime, why: str) -> None:
        self.fn, self.rt, self.why = fn, rt, why

    def __call__(self, *args: Any) -> Any:
        self.rt.stats["unreduced_calls"] += 1
        warnings.warn(self.why, UserWarning, stacklevel=2)
        return self.fn(*args)


def _dense(gm, example_inputs, cfg, rt, why: str) -> CompiledFn:
    if why:
        warnings.warn(f"asymrnr: running this graph unreduced: {why}", stacklevel=3)
    rt.stats["dense_graphs"] += 1
    return inner_compile(gm, example_inputs, cfg, rt)


def asymrnr_backend(gm: fx.GraphModule, example_inputs: list, *, options: dict | None = None, mode: str | None = None):
    """torch.compile backend: `torch.compile(model, backend="asymrnr", options={...})`."""
    options = dict(options or {})  # torch mutates the caller's dict
    cfg = AsymRnRConfig.from_options(options, mode=mode)
    try:
        return _compile_model(gm, example_inputs, cfg, _runtime(cfg, options, example_inputs))
    except ConfigError as err:  # a config that does not fit this model: the user reads it first
        raise BackendConfigError(str(err)).with_traceback(err.__traceback__) from None


def _with_graph_skips(adapter: ModelAdapter, classes: set[type]) -> ModelAdapter:
    """The adapter for this graph: one with `long_skips` when the traced model carries Skip-DiT
    branches (`skip_dit.convert`: its `SkipBranch` modules are among the classes of the graph's
    module stacks, `classes`); the span cache then stores the deep feature
    (`span.CachedSpan(outputs=True)`), as on HunyuanDiT."""
    if adapter.long_skips or skip_dit.SkipBranch not in classes:
        return adapter
    return dataclasses.replace(adapter, long_skips=True)


def _compile_model(gm: fx.GraphModule, example_inputs: list, cfg: AsymRnRConfig, rt: AsymRnRRuntime) -> CompiledFn:
    if not cfg.enabled:
        return _dense(gm, example_inputs, cfg, rt, "")
    try:
        classes = sites.module_classes(gm)
        adapter = _with_graph_skips(adapter_for_classes(classes), classes)
        info = sites.model_info(gm, adapter, example_inputs)
    except UnsupportedModelError as err:
        if cfg.on_unsupported == "error":
            raise
        return _dense(gm, example_inputs, cfg, rt, str(err))
    if _has_symbolic_shapes(gm):
        return _Unreduced(_dense(gm, example_inputs, cfg, rt, ""), rt, _DYNAMIC)
    rt.bind(info)
    if cfg.cache is None and not any(s.reducible for s in info.sites):
        return _dense(gm, example_inputs, cfg, rt, "no reducible self-attention found")
    return AsymRnRCompiled(build_segments(gm, info, cfg, rt), rt, info)


__all__ = ["AsymRnRCompiled", "asymrnr_backend"]
