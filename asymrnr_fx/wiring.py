"""The top level of a segmented graph as data, for a package that must run without FX code.

`backend.build_segments` returns GraphModules whose generated code only calls segments in order
and picks items of their outputs. A package cannot pickle that code (FX re-traces it on load, and
our segments are not modules), so `Wiring` keeps the same calls as a list: each call reads graph
inputs, earlier results or items of them, and the output is a structure of such references.
Running it is what the generated code does, one Python call per segment.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

from torch import fx

from .errors import ExportError

Ref = tuple  # ("in", i) | ("call", k) | ("item", ref, j) | ("const", value) | ("seq", type, refs)


class Wiring:
    """Calls of `gm`'s segments in graph order; nested GraphModules (cache groups) become Wirings
    too, through `convert` applied to every callee."""

    def __init__(self, gm: fx.GraphModule, convert: Callable[[Any], Any]) -> None:
        self.calls: list[tuple[Any, tuple[Ref, ...]]] = []
        slots: dict[str, Ref] = {}
        for node in gm.graph.nodes:
            slots[node.name] = self._slot(gm, node, slots, convert)

    def _slot(self, gm: fx.GraphModule, node: fx.Node, slots: dict[str, Ref], convert: Callable) -> Ref:
        if node.op == "placeholder":
            return ("in", sum(1 for r in slots.values() if r[0] == "in"))
        if node.op == "call_module" and not node.kwargs:
            self.calls.append((convert(getattr(gm, node.target)), tuple(_refs(a, slots) for a in node.args)))
            return ("call", len(self.calls) - 1)
        if node.op == "call_function" and node.target is operator.getitem:
            return ("item", slots[node.args[0].name], node.args[1])
        if node.op == "output":
            self.output = _refs(node.args[0], slots)
            return ("out",)
        raise ExportError(f"cannot package a segment graph with node {node.format_node()}: expected segment calls only")

    def __call__(self, *args: Any) -> Any:
        results: list[Any] = []
        for fn, refs in self.calls:
            results.append(fn(*(_value(r, args, results) for r in refs)))
        return _value(self.output, args, results)


def _refs(arg: Any, slots: dict[str, Ref]) -> Any:
    if isinstance(arg, fx.Node):
        return slots[arg.name]
    if isinstance(arg, (tuple, list)):
        return ("seq", type(arg), tuple(_refs(a, slots) for a in arg))
    return ("const", arg)


def _value(ref: Ref, args: tuple, results: list) -> Any:
    kind = ref[0]
    if kind == "in":
        return args[ref[1]]
    if kind == "call":
        return results[ref[1]]
    if kind == "item":
        return _value(ref[1], args, results)[ref[2]]
    if kind == "seq":
        return ref[1](_value(r, args, results) for r in ref[2])
    if kind == "const":
        return ref[1]
    raise ExportError(f"corrupt wiring reference {ref!r}")
