"""Token split, matching, reduction and restoration: pure torch, no FX, no models.

Shapes use B = batch, H = heads, N = tokens of the whole attention sequence (text + visual),
Nv = visual tokens, Nd / Ns = destination / source tokens (Nd + Ns = Nv), D = head dim,
L = reduced sequence length.

A *matching* is computed once per cache window from features of one attention site: every
source token gets its nearest destination and a distance; sources are ranked farthest first.
A *plan* turns a matching and a keep count into the index tensors that the compiled graph
takes as inputs: which tokens to keep, and for each full position which reduced slot it reads
back on restore.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

Grid = tuple[int, int, int]


def reduced_length(n_visual: int, n_dst: int, ratio: float) -> int:
    """Visual tokens kept at `ratio`: all destinations plus the farthest sources (published rule)."""
    return max(n_dst, int(n_visual * (1 - ratio)))


@functools.lru_cache(maxsize=64)
def _window_starts(grid: Grid, stride: Grid) -> tuple[torch.Tensor, torch.Tensor]:
    """Start corner (n_windows, 3) and extent (n_windows, 3) of every stride window of `grid`.
    Cached: a matching step would otherwise rebuild them; callers must not modify them."""
    axes = [torch.arange(0, size, step) for size, step in zip(grid, stride)]
    starts = torch.cartesian_prod(*axes).reshape(-1, 3)
    sizes = torch.tensor(grid).unsqueeze(0)
    extent = (sizes - starts).clamp(max=torch.tensor(stride))
    return starts, extent


def count_windows(grid: Grid, stride: Grid) -> int:
    """Number of stride windows of `grid`, i.e. of destination tokens (Nd)."""
    count = 1
    for size, step in zip(grid, stride):
        count *= -(-size // step)
    return count


def window_split(
    grid: Grid, stride: Grid, *, generator: torch.Generator | None = None, fixed: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """One destination per stride window of the (F, H, W) grid; every other token is a source.

    Windows at the edge of a grid that the stride does not divide are smaller, and a grid
    smaller than the stride is one window. `fixed` takes each window's first token; otherwise
    the position inside the window is drawn from `generator` (CPU).

    Returns dst (Nd,) and src (Ns,): flat positions in the grid, row-major over (F, H, W).
    """
    starts, extent = _window_starts(grid, stride)
    if fixed:
        offset = torch.zeros_like(starts)
    else:
        u = torch.rand(starts.shape, generator=generator, dtype=torch.float64)
        offset = (u * extent).long()
    coords = starts + offset  # a new tensor: the cached starts stay untouched
    _, height, width = grid
    dst = coords[:, 0] * (height * width) + coords[:, 1] * width + coords[:, 2]
    is_src = torch.ones(grid[0] * height * width, dtype=torch.bool)
    is_src[dst] = False
    return dst, is_src.nonzero().squeeze(1)


@dataclass(frozen=True)
class Matching:
    """Nearest-destination matching of one site, reusable for any keep count.

    dst (Nd,), src (Ns,): visual positions; nearest (B, H, Ns): index into dst of each source's
    nearest destination; order (B, H, Ns): sources ranked by distance, farthest first.
    """

    dst: torch.Tensor
    src: torch.Tensor
    nearest: torch.Tensor
    order: torch.Tensor


def _nearest(xs: torch.Tensor, xd: torch.Tensor, xd_sq: torch.Tensor, metric: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest destination of each source: distance (B, H, S) and index into dst (B, H, S).

    xs (B, H, S, D), xd (B, H, Nd, D); for cosine both are unit vectors. Euclidean uses
    |s - d|^2 = |s|^2 + |d|^2 - 2 s.d: the |s|^2 term does not change the argmin, so one
    fused matmul-with-bias (baddbmm) gives the scores and |s|^2 is added to the minimum only.
    """
    b, heads, s, dim = xs.shape
    flat_s, flat_d = xs.reshape(b * heads, s, dim), xd.reshape(b * heads, -1, dim)
    if metric == "cosine":
        sim, idx = torch.bmm(flat_s, flat_d.transpose(1, 2)).max(dim=-1)
        return (1.0 - sim).reshape(b, heads, s), idx.reshape(b, heads, s)
    scores = torch.baddbmm(xd_sq.reshape(b * heads, 1, -1), flat_s, flat_d.transpose(1, 2), alpha=-2.0)
    best, idx = scores.min(dim=-1)
    return (best.reshape(b, heads, s) + xs.pow(2).sum(-1)), idx.reshape(b, heads, s)


def match_sources(
    x: torch.Tensor,
    dst: torch.Tensor,
    src: torch.Tensor,
    *,
    metric: str = "euclidean",
    max_elements: int = 1 << 20,
) -> Matching:
    """Match every source of visual features x (B, H, Nv, D) to its nearest destination.

    The (B, H, Ns, Nd) score matrix is built `max_elements` at a time over sources, so the
    peak extra memory is bounded whatever Nv is. Distances are computed in float32.
    """
    b, heads = x.shape[:2]
    xd = x[:, :, dst.to(x.device)].float()
    if metric == "cosine":
        xd = torch.nn.functional.normalize(xd, dim=-1)
    xd_sq = xd.pow(2).sum(-1)
    chunk = max(1, max_elements // max(1, b * heads * dst.numel()))
    src_dev = src.to(x.device)
    dists, nearest = [], []
    for start in range(0, src.numel(), chunk):
        xs = x[:, :, src_dev[start : start + chunk]].float()
        xs = torch.nn.functional.normalize(xs, dim=-1) if metric == "cosine" else xs
        d, i = _nearest(xs, xd, xd_sq, metric)
        dists.append(d)
        nearest.append(i)
    dist = torch.cat(dists, dim=-1)
    order = torch.argsort(dist, dim=-1, descending=True, stable=True)
    return Matching(dst.to(x.device), src_dev, torch.cat(nearest, dim=-1), order)


@dataclass(frozen=True)
class Layout:
    """Where the visual tokens sit in an attention sequence of n_text + n_visual tokens."""

    n_text: int
    n_visual: int
    text_first: bool

    @property
    def visual_offset(self) -> int:
        return self.n_text if self.text_first else 0


@dataclass(frozen=True)
class Plan:
    """Index tensors for one site and keep count; all positions index the full sequence.

    keep (B, H, L): tokens kept, text included. restore (B, H, N): reduced slot each full
    position reads back. For `mean`: drop (B, H, n_drop) positions merged away, drop_slot
    (B, H, n_drop) the slot each merges into, count (B, H, L) tokens per slot.
    """

    keep: torch.Tensor
    restore: torch.Tensor
    drop: torch.Tensor | None = None
    drop_slot: torch.Tensor | None = None
    count: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return self.keep.shape[-1]


def _text_positions(layout: Layout, device: torch.device) -> torch.Tensor:
    start = 0 if layout.text_first else layout.n_visual
    return torch.arange(start, start + layout.n_text, device=device)


def _with_text(vis: torch.Tensor, text: torch.Tensor, text_first: bool) -> torch.Tensor:
    """Concatenate text entries (T,) broadcast over (B, H) with visual entries (B, H, V)."""
    text = text.expand(*vis.shape[:2], -1)
    return torch.cat([text, vis] if text_first else [vis, text], dim=-1)


def make_plan(m: Matching, n_keep: int, layout: Layout, mode: str = "replace") -> Plan:
    """Keep all destinations and the n_keep - Nd farthest sources of matching `m`."""
    b, heads, n_src = m.nearest.shape
    n_dst = m.dst.numel()
    kept_src = m.order[..., : n_keep - n_dst]
    dropped = m.order[..., n_keep - n_dst :]
    off = layout.visual_offset
    device = m.nearest.device
    vis_keep = torch.cat([m.dst.expand(b, heads, -1), m.src[kept_src]], dim=-1)
    slot_base = off if layout.text_first else 0
    dst_slot = slot_base + torch.arange(n_dst, device=device)
    vis_slot = torch.empty(b, heads, layout.n_visual, dtype=torch.long, device=device)
    vis_slot[..., m.dst] = dst_slot
    src_slot = slot_base + n_dst + torch.arange(n_src, device=device)  # slot of a kept rank
    vis_slot.scatter_(2, m.src[kept_src], src_slot[: kept_src.shape[-1]].expand(b, heads, -1))
    drop_slot = slot_base + m.nearest.gather(2, dropped)
    vis_slot.scatter_(2, m.src[dropped], drop_slot)
    text_pos = _text_positions(layout, device)
    text_slot = torch.arange(layout.n_text, device=device) + (0 if layout.text_first else n_keep)
    keep = _with_text(vis_keep + off, text_pos, layout.text_first)
    restore = _with_text(vis_slot, text_slot, layout.text_first)
    if mode != "mean":
        return Plan(keep, restore)
    count = torch.ones(b, heads, keep.shape[-1], device=device)
    count.scatter_add_(2, drop_slot, torch.ones_like(drop_slot, dtype=count.dtype))
    return Plan(keep, restore, m.src[dropped] + off, drop_slot, count)


def match_fields(
    x: torch.Tensor, dst: torch.Tensor, src: torch.Tensor, offset: int, n_visual: int, metric: str, max_elements: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """`match_sources` on the visual tokens x[:, :, offset : offset + n_visual] of a whole attention
    sequence x (B, H, N, D): its (nearest, order), the tensors a compiled matching returns."""
    m = match_sources(x.narrow(2, offset, n_visual), dst, src, metric=metric, max_elements=max_elements)
    return m.nearest, m.order


PLAN_FIELDS = ("keep", "restore", "drop", "drop_slot", "count")  # the order of `plan_fields`' tuple


def plan_fields(
    dst: torch.Tensor, src: torch.Tensor, nearest: torch.Tensor, order: torch.Tensor,
    n_keep: int, n_text: int, n_visual: int, text_first: bool, mode: str,
) -> tuple[torch.Tensor, ...]:
    """`make_plan` from a matching's tensors, as the flat tuple a graph computes it in: (keep,
    restore), and for `mean` (keep, restore, drop, drop_slot, count). No shape depends on data,
    so a compiled segment builds its plan in its own kernels from the matching it is given."""
    plan = make_plan(Matching(dst, src, nearest, order), n_keep, Layout(n_text, n_visual, text_first), mode)
    return tuple(getattr(plan, f) for f in (PLAN_FIELDS if mode == "mean" else PLAN_FIELDS[:2]))


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (B, H, N, D), index (B, H, L) -> (B, H, L, D)."""
    return x.gather(2, index.unsqueeze(-1).expand(*index.shape, x.shape[-1]))


def merge_tokens(
    x: torch.Tensor, keep: torch.Tensor, drop: torch.Tensor, drop_slot: torch.Tensor, count: torch.Tensor
) -> torch.Tensor:
    """Mean-reduce x (B, H, N, D): each kept slot averages itself and the tokens merged into it."""
    base = gather_tokens(x, keep)
    merged = gather_tokens(x, drop)
    idx = drop_slot.unsqueeze(-1).expand(*drop_slot.shape, x.shape[-1])
    return base.scatter_add(2, idx, merged) / count.unsqueeze(-1).to(x.dtype)


def reduce_mask(
    mask: torch.Tensor, kv_keep: torch.Tensor | None, q_keep: torch.Tensor | None
) -> torch.Tensor:
    """Reduce an attention mask like its keys (kv_keep) and, if it has a row per query, queries."""
    if kv_keep is not None:
        mask = gather_mask_keys(mask, kv_keep)
    if q_keep is not None and mask.shape[-2] > 1:
        mask = gather_mask_queries(mask, q_keep)
    return mask


def gather_mask_keys(mask: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Attention mask (b, heads, Mq, N) broadcastable to (B, H, Mq, N): keep the key columns of index."""
    b, heads, _ = index.shape
    mask = mask.expand(b, heads, mask.shape[-2], mask.shape[-1])
    return mask.gather(3, index.unsqueeze(2).expand(b, heads, mask.shape[-2], index.shape[-1]))


def gather_mask_queries(mask: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Mask (b, heads, N, K) with one row per query: keep the rows of index (B, H, L)."""
    b, heads, _ = index.shape
    mask = mask.expand(b, heads, mask.shape[-2], mask.shape[-1])
    return mask.gather(2, index.unsqueeze(-1).expand(b, heads, index.shape[-1], mask.shape[-1]))


def gather_seq(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Hidden state x (B, N, C), one index for the whole batch keep (L,) -> (B, L, C)."""
    return x.index_select(1, keep)


def merge_seq(
    x: torch.Tensor, keep: torch.Tensor, drop: torch.Tensor, drop_slot: torch.Tensor, count: torch.Tensor
) -> torch.Tensor:
    """Mean-reduce x (B, N, C) with a batch-shared plan: (L,), (n_drop,), (n_drop,), (L,)."""
    base = x.index_select(1, keep).index_add(1, drop_slot, x.index_select(1, drop))
    return base / count.to(x.dtype).view(1, -1, 1)
