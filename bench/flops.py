"""FLOP model of one transformer call: linear layers (counted) plus attention (from shapes).

Attention of one call is 4 * B * H * Nq * Nkv * D FLOPs (Q K^T and P V, 2 FLOPs per multiply-
add), the convention of torch.utils.flop_counter for matmuls. On CPU the flop counter has no
entry for the SDPA kernel, so attention calls are recorded from their shapes instead, and the
counter supplies everything else (linear layers, patch convolutions).

A reduced step shortens the sequences of every reducible site to n_text + kept visual tokens,
for queries and for keys/values separately. The asymmetric modes reduce at the attention, after
the projections, so the linear FLOPs stay dense; the symmetric mode reduces the hidden state
before the site's Q/K/V projections and restores after its output projection, so those
projections (`to_q`, `to_k`, `to_v`, `to_out.0` where present) shrink with the kept tokens too.

A step on which the block cache reuses its span runs no block of the span: their FLOPs (linear
layers and attention, counted per block) are taken out, and their sites save nothing more.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import FlopCounterMode


@dataclass(frozen=True)
class AttentionCall:
    """One SDPA call: batch * heads * head_dim (`width`), query and key lengths."""

    width: int
    n_q: int
    n_kv: int

    @property
    def flops(self) -> int:
        return 4 * self.width * self.n_q * self.n_kv


PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")


@dataclass(frozen=True)
class CallFlops:
    """FLOPs of one dense transformer call, split into counted (non-attention) and attention.
    `projections`: module path -> (FLOPs, tokens it ran on) for every attention projection."""

    linear: int
    attention: tuple[AttentionCall, ...]
    projections: dict[str, tuple[int, int]] = field(default_factory=dict)
    block_paths: tuple[str, ...] = ()  # transformer blocks in the runtime's numbering (execution order)
    blocks: tuple[int, ...] = ()  # dense FLOPs of each of them, attention included

    @property
    def dense(self) -> int:
        return self.linear + sum(a.flops for a in self.attention)

    @property
    def attention_share(self) -> float:
        return 1.0 - self.linear / self.dense

    def width_at(self, n_total: int) -> int:
        """batch * heads * head_dim of the self-attention over `n_total` tokens."""
        for a in self.attention:
            if a.n_q == a.n_kv == n_total:
                return a.width
        raise LookupError(f"no dense attention call over {n_total} tokens was recorded.")

    def in_blocks(self, path: str, first: int, stop: int) -> bool:
        """True when module `path` lies inside one of blocks [first, stop)."""
        return any(path.startswith(b + ".") for b in self.block_paths[first:stop])


@dataclass(frozen=True)
class SiteLengths:
    """One reducible site (attention module path) at one step: text tokens, visual tokens,
    visual queries / keys kept."""

    path: str
    n_text: int
    n_visual: int
    kept_q: int
    kept_kv: int


def _projection_savings(call: CallFlops, s: SiteLengths) -> int:
    """Projection FLOPs the symmetric mode saves at one site: each projection runs on
    `kept_q` instead of `n_visual` visual tokens (its text tokens, if any, stay)."""
    saved = 0
    for name in PROJECTIONS:
        flops, seen = call.projections.get(f"{s.path}.{name}", (0, 1))
        saved += flops * (s.n_visual - s.kept_q) // seen
    return saved


def reduced_call_flops(call: CallFlops, sites: Iterable[SiteLengths], symmetric: bool = False) -> int:
    """FLOPs of one call whose reducible sites keep the given lengths (all else dense)."""
    saved = 0
    for s in sites:
        width, n = call.width_at(s.n_text + s.n_visual), s.n_text + s.n_visual
        saved += 4 * width * (n * n - (s.n_text + s.kept_q) * (s.n_text + s.kept_kv))
        saved += _projection_savings(call, s) if symmetric else 0
    return call.dense - saved


def cached_call_flops(call: CallFlops, sites: list[SiteLengths], span: tuple[int, int],
                      symmetric: bool = False) -> int:
    """FLOPs of one call whose block cache reuses blocks [span[0], span[1]): those blocks cost
    nothing, the sites outside them keep the given lengths."""
    first, stop = span
    outside = [s for s in sites if not call.in_blocks(s.path, first, stop)]
    return reduced_call_flops(call, outside, symmetric) - sum(call.blocks[first:stop])


def ideal_speedup(dense_per_step: int, reduced_per_step: Iterable[int]) -> float:
    """Dense FLOPs of a generation over its reduced FLOPs (one call per step)."""
    steps = list(reduced_per_step)
    return dense_per_step * len(steps) / sum(steps)


def symmetric_ratio(q_ratio: float, kv_ratio: float) -> float:
    """h with the attention FLOPs of (q, kv): (1 - h)^2 = (1 - q)(1 - kv)."""
    return 1.0 - ((1.0 - q_ratio) * (1.0 - kv_ratio)) ** 0.5


class _RecordAttention(TorchFunctionMode):
    """Records the shapes of every scaled_dot_product_attention call made inside it, and the
    block (index into `block_paths`, or None) each was made in."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[AttentionCall] = []
        self.call_blocks: list[int | None] = []
        self.block: int | None = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention:
            q = args[0] if args else kwargs["query"]
            k = args[1] if len(args) > 1 else kwargs["key"]
            # (B, H, N, D): batch * heads * head_dim, query length, key length
            self.calls.append(AttentionCall(q.shape[0] * q.shape[1] * q.shape[-1], q.shape[-2], k.shape[-2]))
            self.call_blocks.append(self.block)
        return func(*args, **kwargs)


def _projections(model: torch.nn.Module, per_module: dict[str, dict]) -> dict[str, tuple[int, int]]:
    """path -> (FLOPs, tokens) of every attention projection; tokens = FLOPs / (2 in out)."""
    prefix = type(model).__name__ + "."
    out = {}
    for key, ops in per_module.items():
        path = key.removeprefix(prefix)
        if key.startswith(prefix) and path.endswith(tuple(f".{p}" for p in PROJECTIONS)):
            w = model.get_submodule(path).weight
            flops = int(sum(ops.values()))
            out[path] = (flops, max(1, flops // (2 * w.shape[0] * w.shape[1])))
    return out


def block_paths(model: torch.nn.Module) -> list[str]:
    """Module paths of the transformer blocks, numbered as the runtime numbers them (the model
    adapter's containers in execution order); empty for a model no adapter knows."""
    from asymrnr_fx.models import UnsupportedModelError, adapter_for_classes

    try:
        adapter = adapter_for_classes({type(m) for m in model.modules()})
    except UnsupportedModelError:
        return []
    return [f"{name}.{i}" for name, _ in adapter.block_containers for i in range(len(getattr(model, name)))]


def _block_hooks(model: torch.nn.Module, paths: list[str], recorder: _RecordAttention) -> list:
    """Forward hooks that tell `recorder` which block is running."""
    handles = []
    for i, path in enumerate(paths):
        block = model.get_submodule(path)
        handles.append(block.register_forward_pre_hook(lambda *_, i=i: setattr(recorder, "block", i)))
        handles.append(block.register_forward_hook(lambda *_: setattr(recorder, "block", None)))
    return handles


def _per_block(model: torch.nn.Module, paths: list[str], counts: dict[str, dict],
               recorder: _RecordAttention) -> tuple[int, ...]:
    """Dense FLOPs of each block: its counted operations plus the attention recorded inside it."""
    prefix = type(model).__name__ + "."
    out = []
    for i, path in enumerate(paths):
        counted = sum(v for op, v in counts.get(prefix + path, {}).items() if "attention" not in str(op))
        attention = sum(a.flops for a, b in zip(recorder.calls, recorder.call_blocks) if b == i)
        out.append(int(counted + attention))
    return tuple(out)


def count_call(model: torch.nn.Module, fn: Callable[[], object]) -> CallFlops:
    """Run `fn` (one eager dense call of `model`) once and count its FLOPs."""
    recorder, paths = _RecordAttention(), block_paths(model)
    handles = _block_hooks(model, paths, recorder)
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter, recorder:
            fn()
    finally:
        for h in handles:
            h.remove()
    counts = counter.get_flop_counts()
    linear = sum(v for op, v in counts.get("Global", {}).items() if "attention" not in str(op))
    return CallFlops(int(linear), tuple(recorder.calls), _projections(model, counts), tuple(paths),
                     _per_block(model, paths, counts, recorder))
