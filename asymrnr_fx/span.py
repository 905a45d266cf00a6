"""The block cache between compiled segments (FX plumbing; the decisions are in `cache.py`).

The segments of a model are grouped as prologue and head blocks [0, a) | span [a, b) | tail
blocks [b, n) and epilogue. Each group is a GraphModule calling its segments; the span's group is
replaced by `CachedSpan`, which runs it or returns its inputs plus the stored residuals (on a
model with long skips: the stored outputs, the deep feature of Skip-Cache). Every
decision is taken here, in Python, between compiled code: Dynamo's graph has no break and no
guard on it, so caching adds neither graph breaks nor recompiles.

Streams: the span's outputs (the values its blocks hand to the tail) are paired with the span's
inputs that nothing after the span reads (the values they replace), by shape, dtype and device,
on the first full step. The adaptive policy's signal, the head's residual on the visual stream,
is computed inside the compiled head and handed to the span as an input (`blocks.insert_signal`).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import fx

from . import cache
from .errors import ConfigError
from .models.adapter import UnsupportedModelError
from .passes import segment


def _span_only_inputs(outer: fx.GraphModule, name: str) -> list[int]:
    """Positions of group `name`'s inputs that are computed values read by this group only."""
    call = segment.call_of(outer, name)
    return [
        i for i, a in enumerate(call.args)
        if isinstance(a, fx.Node) and a.op != "placeholder" and set(a.users) == {call}
    ]


def _pair(outputs: Sequence[Any], inputs: Sequence[Any], candidates: list[int]) -> list[int] | None:
    """For each output, the first unused candidate input of the same shape, dtype and device."""
    free, pairs = list(candidates), []
    for out in outputs:
        key = (out.shape, out.dtype, out.device)
        match = next((i for i in free if (inputs[i].shape, inputs[i].dtype, inputs[i].device) == key), None)
        if match is None:
            return None
        free.remove(match)
        pairs.append(match)
    return pairs


class CachedSpan:
    """The span's group: computes it and stores its residuals (`outputs`: its outputs), or reuses
    them. `signal`: the position among its inputs of the head's residual on the visual stream
    (None: no signal)."""

    def __init__(self, gm: fx.GraphModule, config: cache.CacheConfig, rt: Any, bounds: tuple[int, int],
                 positions: list[int], signal: int | None, outputs: bool = False) -> None:
        self.gm, self.config, self.rt, self.bounds, self.positions = gm, config, rt, bounds, positions
        self.signal, self.outputs = signal, outputs
        self.extrapolates = isinstance(config, cache.BlockCache) and config.extrapolates
        self.pairs: list[int] | None = None  # output j <- input pairs[j]
        self.as_tuple = True
        self.disabled = ""

    def __call__(self, *args: Any) -> Any:
        ctx = self.rt.state
        if ctx.cache is None:
            ctx.cache = cache.SpanState()
        signal = args[self.signal] if self.signal is not None else self._indicator(args)
        decision = self._decide(ctx.cache, signal)
        if decision is None:
            return self._compute(args, ctx.cache, signal)
        return self._reuse(args, ctx, signal, *decision)

    def _indicator(self, args: Sequence[Any]) -> torch.Tensor | None:
        """("spectral") SeaCache's indicator of the visual stream entering the span, on its grid."""
        if not (isinstance(self.config, cache.BlockCache) and self.config.policy == "spectral"):
            return None
        grid = self.rt.info.grid
        n = grid[0] * grid[1] * grid[2]
        x = next((args[i] for i in self.positions if args[i].dim() == 3 and args[i].shape[1] == n), None)
        if x is None:
            raise UnsupportedModelError(f"BlockCache(policy='spectral'): no stream of the {n} visual tokens enters the span")
        sigma = (self.rt.timestep if self.rt.timestep is not None else 500.0) / 1000.0
        return cache.sea_filter(x.reshape(x.shape[0], *grid, x.shape[-1]), sigma, self.config.power)

    def _decide(self, state: cache.SpanState, signal: torch.Tensor | None) -> tuple[float, float] | None:
        """(change, accumulated magnitude ratio) to record when this step reuses the span; None:
        compute it."""
        rt, cfg = self.rt, self.config
        if self.disabled or rt.compute_all or cache.forced_full(cfg, state, rt.step, rt.num_steps):
            return None
        if isinstance(cfg, cache.SkipCache):
            return (0.0, 1.0) if cache.skip_cache_decides(cfg, state, rt.timestep) else None
        if cfg.policy == "magnitude":
            ratios = cfg.ratios or rt.cache_ratios().get(rt.context_key)
            if not ratios:
                return None  # calibrating: this generation runs in full
            change, ratio = cache.magnitude_change(state, cache.ratio_at(ratios, rt.step, rt.num_steps))
            return (change, ratio) if change < cfg.threshold else None
        if signal is None or state.signal is None:
            return None
        change = cache.block_cache_change(cfg, state, signal)
        return (change, 1.0) if change < cfg.threshold else None

    def _compute(self, args: Sequence[Any], state: cache.SpanState, signal: torch.Tensor | None) -> Any:
        out = self.gm(*args)
        outs = list(out) if isinstance(out, (tuple, list)) else [out]
        if self.pairs is None and not self.disabled:
            self._bind(outs, args)
        if not self.disabled:
            cache.record_full(state, self._stored(outs, args), signal, self.rt.step, keep_older=self.extrapolates)
            if isinstance(self.config, cache.BlockCache) and self.config.policy == "magnitude":
                self.rt.record_calibration(max(state.stored, key=torch.Tensor.numel))
        self._log(skipped=False)
        return out

    def _stored(self, outs: list[torch.Tensor], args: Sequence[Any]) -> list[torch.Tensor]:
        """What a cached step reuses: residuals (new tensors), or copies of the outputs (a compiled
        segment's output may be a buffer its next run overwrites: CUDA graphs)."""
        if self.outputs:
            return [o.detach().clone() for o in outs]
        return [o - args[i] for o, i in zip(outs, self.pairs)]

    def _reuse(self, args: Sequence[Any], ctx: Any, signal: torch.Tensor | None, change: float, ratio: float) -> Any:
        stored = cache.extrapolated(ctx.cache, self.rt.step) if self.extrapolates else ctx.cache.stored
        outs = list(stored) if self.outputs else [args[i] + r for i, r in zip(self.pairs, stored)]
        cache.record_cached(ctx.cache, signal, change, ratio)
        for block in range(*self.bounds):
            ctx.skipped[block] += 1
        self._log(skipped=True)
        return tuple(outs) if self.as_tuple else outs[0]

    def _bind(self, outs: list[torch.Tensor], args: Sequence[Any]) -> None:
        """Pair the span's outputs with the inputs they replace (outputs stored: no pairing)."""
        self.pairs = [] if self.outputs else _pair(outs, args, self.positions)
        if self.pairs is None:
            self.disabled = "the span's outputs do not pair with its inputs by shape"
            self.rt.stats["cache_disabled"] += 1
            warnings.warn(f"asymrnr: block cache off for this graph: {self.disabled}", stacklevel=2)
            return
        self.as_tuple = len(outs) > 1 or isinstance(self.gm.graph.output_node().args[0], (tuple, list))

    def _log(self, skipped: bool) -> None:
        rt, (a, b) = self.rt, self.bounds
        rt.stats["cache_hits" if skipped else "cache_misses"] += 1
        n = rt.info.num_blocks
        rt.cache_log[(rt.step, rt.context_key)] = (n - (b - a), b - a) if skipped else (n, 0)


def _produced_as(top: fx.GraphModule, name: str) -> str | None:
    """The `top` node that carries the value of node `name` of a segment's graph out of it."""
    for call in top.graph.find_nodes(op="call_module"):
        outs = getattr(top, call.target).gm.graph.output_node().args[0]
        names = [(o.args[0] if o.op == "call_method" and o.target == "contiguous" else o).name for o in outs]
        if name in names:
            i = names.index(name)
            users = [u for u in call.users if u.op == "call_function" and u.args[1] == i]
            return users[0].name if users else call.name
    return None


def _signal_position(top: fx.GraphModule, outer: fx.GraphModule, signal: str) -> int | None:
    """Position among the span group's inputs of the signal node (split_module names each group
    input after the `top` node that carries it)."""
    carried = _produced_as(top, signal)
    inputs = [n.name for n in outer.submod_1.graph.find_nodes(op="placeholder")]
    return inputs.index(carried) if carried in inputs else None


def span_of(config: cache.CacheConfig, adapter: Any, num_blocks: int) -> tuple[int, int]:
    """The cached span [a, b) of blocks. Where the adapter's containers interleave (Latte: a
    spatial then a temporal block make one layer, each reading the sequences of its own axes), the
    head and the tail grow to whole layers: a span starting inside a layer would be handed another
    sequence layout than block 0's."""
    a, b = config.span(num_blocks)
    if adapter.interleaved:
        layer = len(adapter.block_containers)
        a, b = -(-a // layer) * layer, b // layer * layer
        if a >= b:
            raise ConfigError(
                f"{config} leaves no whole layer to skip in {adapter.family} ({num_blocks} blocks, layers of "
                f"{layer}: head and tail grow to whole layers). Compute fewer blocks at the ends."
            )
    return a, b


def wrap(top: fx.GraphModule, part_blocks: dict[str, int], config: cache.CacheConfig, num_blocks: int,
         rt: Any, signal: str | None) -> fx.GraphModule:
    """Group `top`'s segments around the cache's span and put the cache on the span's group;
    `signal` names the node (an input of the span) holding the adaptive policy's signal."""
    a, b = span_of(config, rt.info.adapter, num_blocks)

    def group(block: int) -> int:
        return 0 if block < a else 1 if block < b else 2

    outer, _ = segment.split_groups(top, {name: group(blk) for name, blk in part_blocks.items()})
    at = _signal_position(top, outer, signal) if signal is not None else None
    if isinstance(config, cache.BlockCache) and config.needs_signal and at is None:
        raise UnsupportedModelError("block cache: no visual stream enters both block 0 and the span")
    streams = [i for i in _span_only_inputs(outer, "submod_1") if i != at]  # the signal is no stream
    outputs = rt.info.adapter.long_skips
    if outputs and isinstance(config, cache.BlockCache) and config.policy == "magnitude":
        raise ConfigError(
            f"BlockCache(policy='magnitude') calibrates on the span's residuals, but {rt.info.adapter.family} "
            "has long skips and caches the span's output (its deep feature). Use SkipCache() or "
            "BlockCache(policy='first_block' or 'accumulated')."
        )
    cached = CachedSpan(outer.submod_1, config, rt, (a, b), streams, at, outputs)
    delattr(outer, "submod_1")
    outer.submod_1 = cached
    rt.rewrites["cache_spans"] += 1
    return outer
