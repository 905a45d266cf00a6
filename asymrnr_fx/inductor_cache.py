"""What Inductor's caches need from a backend that calls `compile_fx` itself.

Two on-disk caches let a new process warm-start: the AOTAutograd cache, keyed on the code of the
torch-level graph and its inputs' metadata, and the FX graph cache, keyed on the traced ATen
graph. A segment compiled by the backend missed both:

- The FX graph cache reads the shape environment of the active `TracingContext`. Dynamo sets one
  while it compiles, but segments compile lazily at their first call, outside Dynamo: without a
  context of our own the cache is bypassed ("No shape env").
- The AOTAutograd cache accepts only calls it can key by their code: ATen operators and public
  torch functions. The rewrite inserts plain Python functions (`tokens.gather_tokens`, ...), whose
  code the key cannot see, and the graph was bypassed. `lower_for_cache` replaces each such call
  by the ATen operators it runs (traced with `make_fx`), so the key is the operators themselves:
  a change in `tokens.py` changes the graph's code, hence the key, and a stale entry can never be
  served. AOTAutograd would trace the same operators from the Python call, so the compiled code is
  the same. Method calls are keyed only when their receiver has an `example_value`: inserted
  nodes get one.
"""

from __future__ import annotations

import contextlib
import copy
import types
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import fx
from torch._guards import TracingContext, tracing
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx.experimental.symbolic_shapes import ShapeEnv
from torch.utils import _pytree as pytree

_OWN_PACKAGE = __name__.split(".")[0]


@contextlib.contextmanager
def tracing_context() -> Iterator[FakeTensorMode | None]:
    """A TracingContext with a fresh fake mode and ShapeEnv, unless one is active already (a
    graph compiled during Dynamo's own compile keeps Dynamo's: the two must not mix); yields the
    new fake mode (None when Dynamo's is kept). The ShapeEnv only lets the FX graph cache key and
    guard the graph: inputs must be faked with static shapes (`static_inputs`), or AOTAutograd
    gives every size a symbol and Inductor generates dynamic-shape code."""
    if TracingContext.try_get() is not None:
        yield None
        return
    mode = FakeTensorMode(allow_non_fake_inputs=True, shape_env=ShapeEnv())
    with tracing(TracingContext(mode)):
        yield mode


def static_inputs(inputs: Sequence[Any], mode: FakeTensorMode | None) -> list[Any]:
    """The compile's example inputs as fakes of `mode` with static shapes (unchanged without a mode):
    segments are compiled for one shape each, like Dynamo's static graphs."""
    if mode is None:
        return list(inputs)
    return [mode.from_tensor(x, static_shapes=True) if isinstance(x, torch.Tensor) else x for x in inputs]


def _is_own_function(target: Any) -> bool:
    """A plain Python function of this package (what the rewrite inserts)."""
    return isinstance(target, types.FunctionType) and target.__module__.split(".")[0] == _OWN_PACKAGE


def _fill_placeholders(graph: fx.Graph, inputs: Sequence[Any], mode: FakeTensorMode) -> None:
    """Inputs added by the rewrite (matchings, plans) have no example value: fake their real tensors."""
    for node, value in zip(graph.find_nodes(op="placeholder"), inputs):
        if "example_value" not in node.meta and isinstance(value, torch.Tensor):
            node.meta["example_value"] = mode.from_tensor(value, static_shapes=True)


def _graph_fake_mode(graph: fx.Graph) -> FakeTensorMode:
    """The fake mode of the graph's own example values (a new one when it has none)."""
    for node in graph.find_nodes(op="placeholder"):
        if isinstance(node.meta.get("example_value"), FakeTensor):
            return node.meta["example_value"].fake_mode
    return FakeTensorMode(allow_non_fake_inputs=True)


def _examples(values: Any) -> Any:
    return pytree.tree_map_only(fx.Node, lambda n: n.meta["example_value"], values)


def _inline(graph: fx.Graph, node: fx.Node) -> None:
    """Replace a call of a Python function by the ATen operators it runs on these shapes."""
    flat, spec = pytree.tree_flatten((node.args, node.kwargs))
    where = [i for i, a in enumerate(flat) if isinstance(a, fx.Node)]

    def call(*tensors: torch.Tensor) -> Any:
        values = list(flat)
        for i, t in zip(where, tensors):
            values[i] = t
        args, kwargs = pytree.tree_unflatten(values, spec)
        return node.target(*args, **kwargs)

    traced = make_fx(call, tracing_mode="fake")(*(flat[i].meta["example_value"] for i in where))
    inputs = dict(zip(traced.graph.find_nodes(op="placeholder"), (flat[i] for i in where)))
    with graph.inserting_before(node):
        out = graph.graph_copy(traced.graph, inputs)
    for new in graph.nodes:  # the copied nodes: tell them apart by the missing example value
        if "val" in new.meta and "example_value" not in new.meta and new.op == "call_function":
            new.meta["example_value"] = new.meta["val"]
            if node.meta.get("stack_trace") is not None:  # None would break a backward trace (grad mode)
                new.meta.setdefault("stack_trace", node.meta["stack_trace"])
    if isinstance(out, (tuple, list)):  # a function returning several tensors: its getitem users read them
        for user in list(node.users):
            user.replace_all_uses_with(out[user.args[1]])
            graph.erase_node(user)
    else:
        node.replace_all_uses_with(out)
    graph.erase_node(node)


def _fill_example_value(node: fx.Node, mode: FakeTensorMode) -> None:
    """Give an inserted torch call (SDPA, index_select, a method) the value it computes."""
    args, kwargs = _examples((node.args, node.kwargs))
    with mode:
        if node.op == "call_method":
            node.meta["example_value"] = getattr(args[0], node.target)(*args[1:], **kwargs)
        else:
            node.meta["example_value"] = node.target(*args, **kwargs)


def lower_for_cache(gm: fx.GraphModule, inputs: Sequence[Any], mode: FakeTensorMode | None) -> fx.GraphModule:
    """A copy of gm that Inductor's caches accept: the package's Python calls inlined as ATen
    operators, every inserted node with an example value. gm itself is not changed.

    `mode`: the fake mode of the compile's own tracing context (`tracing_context`), in which the
    inserted nodes are traced. None while Dynamo compiles: its context's mode is then another object
    than the graph's, and the nodes Dynamo left without a value (`setitem`) are filled in the
    graph's own mode; filling them in the context's raises "Mixing fake modes"."""
    graph = copy.deepcopy(gm.graph)
    mode = mode or _graph_fake_mode(graph)
    _fill_placeholders(graph, inputs, mode)
    for node in list(graph.nodes):
        if node.op not in ("call_function", "call_method") or "example_value" in node.meta or node._erased:
            continue
        if node.op == "call_function" and _is_own_function(node.target):
            _inline(graph, node)
        else:
            _fill_example_value(node, mode)
    graph.lint()
    return fx.GraphModule(gm, graph)


def counts() -> dict[str, int]:
    """This process's cache counters (hits, misses, bypasses), by short name."""
    from torch._dynamo.utils import counters

    return {
        "fxgraph_hit": counters["inductor"]["fxgraph_cache_hit"],
        "fxgraph_miss": counters["inductor"]["fxgraph_cache_miss"],
        "fxgraph_bypass": counters["inductor"]["fxgraph_cache_bypass"],
        "aot_hit": counters["aot_autograd"]["autograd_cache_hit"],
        "aot_miss": counters["aot_autograd"]["autograd_cache_miss"],
        "aot_bypass": counters["aot_autograd"]["autograd_cache_bypass"],
    }


__all__ = ["counts", "lower_for_cache", "static_inputs", "tracing_context"]
