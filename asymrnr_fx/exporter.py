"""Compiled model export: one AOTInductor package with the reduction and the cache baked in.

    path = asymrnr_fx.export(pipe.transformer, cfg, example_inputs, num_steps=50, path="cog.pt2")
    pipe.transformer = asymrnr_fx.load_exported("cog.pt2")      # a fresh process: no Dynamo compile

How: the backend traces the model once (Dynamo, `fullgraph=True`) and runs one generation of
`num_steps` steps with a recording segment compiler and every cached span computing, so that each
segment variant the schedule needs (prologue, each block structure dense and at each reduced
length pair, epilogue) is seen once with real inputs. Each variant is exported with
`torch.export` and compiled by AOTInductor into one program of the package; Python calls the
rewrite inserted are traced into ATen ops, so the programs hold no Python custom op. The wiring
between programs, the reducers' sites and the cache span are stored as data (`package.py`);
matchings, step tracking and cache decisions run between programs, in the same runtime code as
the compiled path. Weights are inputs of the programs (one program serves every block of a
structure, as in the compiled path) and are stored once.
"""

from __future__ import annotations

import copy
import functools
import inspect
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import fx

from . import package
from .backend import AsymRnRCompiled, asymrnr_backend
from .config import AsymRnRConfig
from .errors import ExportError
from .models import prepare_model
from .runtime import AsymRnRRuntime

_SOURCE = re.compile(r"\[(?:'([^']*)'|(\d+))\]")
_WHOLE_SOURCE = re.compile(r"L(?:\[(?:'[^']*'|\d+)\])+")


@dataclass
class Trace:
    """One traced generation: the compiled model, its runtime, Dynamo's graph and the segment
    variants it ran (program name -> (compile key, graph, example inputs))."""

    compiled: AsymRnRCompiled
    rt: AsymRnRRuntime
    graph: fx.GraphModule
    graph_inputs: list
    input_sources: list[str]  # Dynamo's source of each graph input, e.g. L['kwargs']['hidden_states']
    records: dict[str, tuple[tuple, fx.GraphModule, list]] = field(default_factory=dict)


def export(model: torch.nn.Module, config: AsymRnRConfig | None, example_inputs: dict[str, Any], num_steps: int,
           path: str | Path, *, progress: Callable[[str], None] | None = None) -> Path:
    """Write a package serving `num_steps`-step generations of calls shaped like `example_inputs`
    (the keyword arguments of one transformer call, as the pipeline passes them)."""
    config, path = config or AsymRnRConfig(), Path(path)
    _check_request(model, example_inputs, num_steps, path)
    say = progress or (lambda _: None)
    start = time.perf_counter()
    trace = trace_generation(model, config, example_inputs, num_steps)
    say(f"traced {num_steps} steps: {len(trace.records)} programs to compile")
    programs = {}
    for name, (_, gm, inputs) in trace.records.items():
        programs[name] = compile_program(gm, inputs, config)
        say(f"compiled {name} ({len(programs)}/{len(trace.records)})")
    forward = list(inspect.signature(model.forward).parameters)
    sources = graph_sources(trace, model, forward)
    weights = {s[1]: t.detach() for s, t in zip(sources, trace.graph_inputs) if s[0] == "weight"}
    manifest = package.manifest(model, config, example_inputs, num_steps, trace, sources)
    manifest["export_seconds"] = round(time.perf_counter() - start, 1)
    state = package.state_of(trace, sources, forward)
    package.write(path, programs, weights, state, manifest)
    return path


def _check_request(model: Any, example_inputs: Any, num_steps: Any, path: Path) -> None:
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"export needs the transformer module, got {type(model).__name__}.")
    if not isinstance(example_inputs, dict) or not example_inputs:
        raise TypeError(
            "example_inputs must be a dict of the transformer's keyword arguments for one call, e.g. "
            "{'hidden_states': ..., 'encoder_hidden_states': ..., 'timestep': ...}; got "
            f"{type(example_inputs).__name__}."
        )
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive int (the generation length served), got {num_steps!r}.")
    if path.suffix != ".pt2":
        raise ValueError(f"package path must end in .pt2, got {str(path)!r}.")


def trace_generation(model: torch.nn.Module, config: AsymRnRConfig, example_inputs: dict, num_steps: int) -> Trace:
    """Run one `num_steps` generation through the backend, recording every segment variant."""
    prepare_model(model)
    rt = AsymRnRRuntime(config)
    rt.compute_all, rt.num_steps = True, num_steps
    records: dict[str, tuple] = {}
    rt.segment_compiler = lambda key, build, inputs: _record(records, key, build(), inputs)
    graphs: list[tuple] = []

    def capture(gm: fx.GraphModule, inputs: list) -> Any:
        sources = [_source_text(n) for n in gm.graph.find_nodes(op="placeholder")]  # Dynamo drops them later
        fn = asymrnr_backend(gm, inputs, options={"config": config, "runtime": rt})
        graphs.append((gm, list(inputs), fn, sources))
        return fn

    compiled = torch.compile(model, backend=capture, fullgraph=True, dynamic=False)
    with torch.no_grad():
        for step in range(num_steps):
            rt.set_step(step)
            _traced_call(compiled, example_inputs)
    return _one_graph(graphs, rt, records)


def _traced_call(compiled: Callable, example_inputs: dict) -> Any:
    try:
        return compiled(**example_inputs)
    except torch._dynamo.exc.Unsupported as err:
        raise ExportError(f"export needs the model as one graph, but Dynamo breaks it: {err}") from err


def _one_graph(graphs: list, rt: AsymRnRRuntime, records: dict) -> Trace:
    if len(graphs) != 1:
        raise ExportError(
            f"export needs one Dynamo graph for the whole generation, got {len(graphs)} (a recompile: "
            "an input changed dtype, shape or a Python value between calls, or the recompile limit was hit)."
        )
    gm, inputs, fn, sources = graphs[0]
    if not isinstance(fn, AsymRnRCompiled):
        raise ExportError(
            "nothing of asymrnr to export: this config or model runs dense "
            f"({dict(rt.stats)}); export the model with torch.export directly."
        )
    outputs = gm.graph.output_node().args[0]
    if len(outputs) != 1:  # the loaded module returns the sample as the transformer does
        raise ExportError(f"export expects the transformer's graph to return one tensor (the sample), got {len(outputs)}.")
    return Trace(fn, rt, gm, inputs, sources, records)


def _record(records: dict, key: tuple, gm: fx.GraphModule, inputs: Sequence[Any]) -> Callable:
    records[f"segment{len(records):03d}"] = (key, gm, list(inputs))
    return gm.forward


def compile_program(gm: fx.GraphModule, inputs: Sequence[Any], config: AsymRnRConfig) -> list:
    """AOTInductor's files for one segment variant (`torch.export`, then `aot_compile`)."""
    args = tuple(inputs)
    ep = torch.export.export(_plain_attributes(gm), args, strict=False)
    options = {**config.inductor_options, "aot_inductor.package": True}
    return torch._inductor.aot_compile(ep.module(check_guards=False), args, options=options)


def _plain_attributes(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of `gm` with plain names for what torch.export lifts: its constants (get_attr) get
    plain attribute names, and Dynamo's module stacks are dropped (export names a tensor created
    inside a block after them, e.g. `L['function_reference'].forward.__self__...lifted_tensor_0`,
    a name it then cannot assign back when it unlifts the program)."""
    out = fx.GraphModule(torch.nn.Module(), copy.deepcopy(gm.graph))
    for node in out.graph.nodes:
        node.meta.pop("nn_module_stack", None)
    for i, node in enumerate(out.graph.find_nodes(op="get_attr")):
        value = functools.reduce(getattr, node.target.split("."), gm)
        node.target = f"asymrnr_constant_{i}"
        setattr(out, node.target, value)
    out.recompile()
    return out


def graph_sources(trace: Trace, model: torch.nn.Module, forward: list[str]) -> list[tuple]:
    """Where each input of Dynamo's graph comes from: ("weight", fully qualified name) or
    ("input", argument name, index or key, ...); `forward`: the model's forward argument names."""
    named = {id(t): n for n, t in [*model.named_parameters(), *model.named_buffers()]}
    return [
        ("weight", named[id(value)]) if id(value) in named else ("input", *_input_path(text, forward))
        for text, value in zip(trace.input_sources, trace.graph_inputs)
    ]


def _source_text(node: fx.Node) -> str:
    grapharg = node.meta.get("grapharg")
    return grapharg.source.name if grapharg is not None else ""


def _input_path(text: str, forward: list[str]) -> tuple:
    """The call argument a graph input reads, from Dynamo's source of it: L['kwargs']['x'][0],
    L['x'][0] or L['args'][2] (the forward's third argument)."""
    if not _WHOLE_SOURCE.fullmatch(text):
        raise ExportError(f"cannot package a graph input read from {text or 'an unknown source'}")
    keys = [k if k else int(i) for k, i in _SOURCE.findall(text)]
    if keys[0] == "kwargs":
        keys = keys[1:]
    elif keys[0] == "args":
        keys = [forward[keys[1]], *keys[2:]]
    return tuple(keys)


class _Captured(Exception):
    pass


def capture_call(pipe: Any, **call_kwargs: Any) -> dict[str, Any]:
    """The keyword arguments the pipeline passes to its transformer at its first call (the
    pipeline is stopped there): the `example_inputs` of `export` for that pipeline and call."""
    captured: dict[str, Any] = {}

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if args:
            raise ExportError("the pipeline calls its transformer with positional arguments; pass example_inputs yourself.")
        captured.update(torch.utils._pytree.tree_map_only(torch.Tensor, torch.clone, kwargs))
        raise _Captured

    handle = pipe.transformer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        pipe(**call_kwargs)
    except _Captured:
        return captured
    finally:
        handle.remove()
    raise ExportError("the pipeline finished without calling its transformer.")
