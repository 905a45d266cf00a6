"""The pure token algorithms: split, match, plan, reduce, restore."""

from __future__ import annotations

import pytest
import torch

from asymrnr_fx import tokens


@pytest.mark.parametrize("grid,stride", [((3, 8, 8), (2, 2, 2)), ((5, 7, 3), (2, 2, 2)), ((1, 1, 3), (2, 4, 4)), ((13, 6, 9), (6, 2, 2))])
def test_split_one_destination_per_window(grid, stride):
    dst, src = tokens.window_split(grid, stride, generator=torch.Generator().manual_seed(3))
    f, h, w = grid
    coords = torch.stack([dst // (h * w), (dst // w) % h, dst % w], dim=1)
    windows = coords // torch.tensor(stride)
    n_windows = [-(-g // s) for g, s in zip(grid, stride)]
    assert len({tuple(x) for x in windows.tolist()}) == len(dst) == n_windows[0] * n_windows[1] * n_windows[2]
    assert tokens.count_windows(grid, stride) == len(dst)
    assert sorted(torch.cat([dst, src]).tolist()) == list(range(f * h * w))
    assert src.tolist() == sorted(src.tolist())


def test_split_random_is_seeded_and_fixed_takes_window_start():
    a = tokens.window_split((4, 6, 6), (2, 2, 2), generator=torch.Generator().manual_seed(7))[0]
    b = tokens.window_split((4, 6, 6), (2, 2, 2), generator=torch.Generator().manual_seed(7))[0]
    c = tokens.window_split((4, 6, 6), (2, 2, 2), generator=torch.Generator().manual_seed(8))[0]
    fixed = tokens.window_split((4, 6, 6), (2, 2, 2), fixed=True)[0]
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert fixed.tolist()[:3] == [0, 2, 4]


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_match_equals_brute_force_and_chunking_is_exact(metric):
    x = torch.randn(2, 3, 48, 8, generator=torch.Generator().manual_seed(0))
    dst, src = tokens.window_split((3, 4, 4), (2, 2, 2), fixed=True)
    m = tokens.match_sources(x, dst, src, metric=metric)
    small = tokens.match_sources(x, dst, src, metric=metric, max_elements=7)  # one source at a time
    xs, xd = x[:, :, src], x[:, :, dst]
    if metric == "cosine":
        d = 1 - torch.nn.functional.cosine_similarity(xs.unsqueeze(3), xd.unsqueeze(2), dim=-1)
    else:
        d = ((xs.unsqueeze(3) - xd.unsqueeze(2)) ** 2).sum(-1)
    best, nearest = d.min(-1)
    assert torch.equal(m.nearest, nearest) and torch.equal(small.nearest, nearest)
    ranked = best.gather(2, m.order)
    assert bool((ranked[..., :-1] >= ranked[..., 1:] - 1e-5).all())  # farthest first
    assert torch.equal(m.order, small.order)


@pytest.mark.parametrize("n_visual,n_dst,ratio,want", [(192, 24, 0.5, 96), (192, 24, 0.9, 24), (100, 13, 0.3, 70), (17550, 2520, 0.8, 3509)])
def test_reduced_length_is_published_formula(n_visual, n_dst, ratio, want):
    # int(17550 * (1 - 0.8)) is 3509 in floating point: the published rule, kept as it is
    assert tokens.reduced_length(n_visual, n_dst, ratio) == want


@pytest.mark.parametrize("text_first", [True, False])
@pytest.mark.parametrize("mode", ["replace", "mean"])
def test_plan_keeps_text_and_restores_every_position(text_first, mode):
    g = torch.Generator().manual_seed(1)
    layout = tokens.Layout(n_text=5, n_visual=48, text_first=text_first)
    x = torch.randn(2, 2, 53, 4, generator=g)
    vis = x.narrow(2, layout.visual_offset, 48)
    dst, src = tokens.window_split((3, 4, 4), (2, 2, 2), generator=g)
    m = tokens.match_sources(vis, dst, src)
    plan = tokens.make_plan(m, 20, layout, mode)
    text = list(range(5)) if text_first else list(range(48, 53))
    assert plan.keep.shape == (2, 2, 25)
    for row in plan.keep.reshape(-1, 25).tolist():
        assert set(text) <= set(row) and len(set(row)) == 25
    reduced = tokens.gather_tokens(x, plan.keep)
    restored = tokens.gather_tokens(reduced, plan.restore)
    kept = torch.zeros(2, 2, 53, dtype=torch.bool).scatter_(2, plan.keep, True)
    assert torch.equal(restored[kept], x[kept])  # kept tokens come back unchanged
    assert torch.equal(restored[:, :, text], x[:, :, text])  # text is never touched
    if mode == "mean":
        merged = tokens.merge_tokens(x, plan.keep, plan.drop, plan.drop_slot, plan.count)
        # every token lands in exactly one slot: slot means weighted by their counts sum to the total
        assert torch.allclose((merged * plan.count.unsqueeze(-1)).sum(2), x.sum(2), atol=1e-4)
        assert int(plan.count.sum()) == 2 * 2 * 53


def test_mask_reduction_follows_keys_and_query_rows():
    mask = torch.arange(6.0).reshape(1, 1, 1, 6) > 2
    idx = torch.tensor([[[5, 0, 3]]])
    assert tokens.reduce_mask(mask, idx, None).tolist() == [[[[True, False, True]]]]
    full = torch.arange(36.0).reshape(1, 1, 6, 6)
    out = tokens.reduce_mask(full, idx, idx)
    assert out[0, 0].tolist() == [[35, 30, 33], [5, 0, 3], [23, 18, 21]]
