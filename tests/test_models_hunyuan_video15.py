"""HunyuanVideo 1.5 once prepared (`asymrnr_fx.prepare`: a static forward and a key-mask
attention, equal to diffusers'): one static graph, sites and layout, the eager reference at
each site, symmetric mode against diffusers' own processor on the kept tokens, ratio 0 equal to
the baseline, caching under fail_on_recompile. The unprepared model fails closed
(tests/test_models_mochi_latte_v15.py)."""

from __future__ import annotations

import pytest
import torch
from conftest import run
from diffusers.models.transformers.transformer_hunyuan_video15 import HunyuanVideo15AttnProcessor2_0
from test_models_mochi_latte_v15 import (
    baseline,
    cheap,
    dynamo_graphs,
    generate,
    hunyuan15_inputs,
    mochi_inputs,
    reasons,
    tiny_hunyuan15,
    tiny_mochi,
)
from test_reference import reference_attention
from test_symmetric import RefSymmetric

import asymrnr_fx
from asymrnr_fx import AsymRnRConfig, BlockCache
from asymrnr_fx.exporter import trace_generation
from asymrnr_fx.models.hunyuan_video15 import condition_tokens

N_TEXT = 2 + 3 + 6  # image, ByT5 and MLLM tokens, all kept in the sequence (padding masked)


def batch2_inputs(image: bool = False) -> dict:
    """Two prompts of different lengths (MLLM 4 and 1 valid of 6, ByT5 2 and 3 of 3); with
    `image`, image embeddings (image-to-video: image tokens valid)."""
    x = hunyuan15_inputs()
    g = torch.Generator().manual_seed(7)
    mask, mask_2 = torch.zeros(2, 6), torch.zeros(2, 3)
    mask[0, :4], mask[1, :1], mask_2[0, :2], mask_2[1, :] = 1, 1, 1, 1
    return {"hidden_states": torch.cat([x["hidden_states"], torch.randn(x["hidden_states"].shape, generator=g)]),
            "encoder_hidden_states": torch.randn(2, 6, 16, generator=g), "encoder_attention_mask": mask,
            "encoder_hidden_states_2": torch.randn(2, 3, 8, generator=g), "encoder_attention_mask_2": mask_2,
            "image_embeds": torch.randn(2, 2, 12, generator=g) if image else torch.zeros(2, 2, 12)}


def test_condition_tokens_put_valid_tokens_first_in_group_order():
    a, b = torch.arange(3.0).view(1, 3, 1) + 1, torch.arange(2.0).view(1, 2, 1) + 10
    tokens, mask = condition_tokens([a, b], [torch.tensor([[1, 0, 1]]), torch.tensor([[0, 1]])], [False, True])
    assert tokens.flatten().tolist() == [1.0, 3.0, 11.0, 2.0, 0.0] and mask.tolist() == [[True, True, True, False, False]]


@pytest.mark.parametrize("image", [False, True], ids=["t2v", "i2v"])
def test_prepared_hunyuan15_equals_diffusers_in_one_static_graph(image):
    model, inputs = tiny_hunyuan15(), batch2_inputs(image)
    want = run(model, inputs, 900.0)
    assert asymrnr_fx.prepare(model) == 3 and asymrnr_fx.prepare(model) == 0  # forward + 2 blocks
    torch.testing.assert_close(run(model, inputs, 900.0), want, rtol=1e-5, atol=1e-5)
    assert len(dynamo_graphs(model, inputs)) == 1
    torch._dynamo.reset()
    options = {"compiler": "aot_eager", "q_ratio": 0.0, "kv_ratio": 0.0}
    full = torch.compile(model, backend="asymrnr", fullgraph=True, dynamic=False, options=options)
    torch.testing.assert_close(run(full, inputs, 900.0), want, rtol=1e-5, atol=1e-5)


def test_hunyuan15_sites_found_and_reduced_with_the_text_mask():
    compiled = asymrnr_fx.compile(tiny_hunyuan15(), cheap(q_ratio=0.5, kv_ratio=0.3))
    run(compiled, hunyuan15_inputs(), 900.0)
    info = compiled.asymrnr.info
    assert info.grid == (3, 8, 8) and reasons(info) == ["not inside a transformer block", "", ""]
    assert [s.layout for s in info.sites[1:]] == [asymrnr_fx.tokens.Layout(N_TEXT, 192, False)] * 2
    assert compiled.asymrnr.used_lengths[(0, 0)] == {f"transformer_blocks.{i}.attn": (96, 134) for i in range(2)}


@pytest.mark.parametrize("q,kv,mode", [(0.5, 0.3, "replace"), (0.4, 0.6, "mean")])
def test_hunyuan15_matches_reference(q, kv, mode):
    """Batch 2 with different text masks: the key mask is reduced with the keys."""
    model, inputs = tiny_hunyuan15(), batch2_inputs()
    got = run(asymrnr_fx.compile(model, cheap(q_ratio=q, kv_ratio=kv, reduce_mode=mode, split="fixed")), inputs, 900.0)
    with reference_attention(192 + N_TEXT, N_TEXT, False, (3, 8, 8), q, kv, "euclidean", mode) as calls:
        want = run(model, inputs, 900.0)  # the model was prepared by compile
    assert len(calls) == 2
    assert (got - run(model, inputs, 900.0)).abs().max() > 1e-3
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_hunyuan15_symmetric_mode_matches_diffusers_attention_on_the_kept_video_tokens():
    model, inputs = tiny_hunyuan15(), batch2_inputs()
    dense = run(model, inputs, 900.0)
    compiled = asymrnr_fx.compile(model, cheap(q_ratio=0.0, kv_ratio=0.0, h_ratio=0.5, split="fixed"))
    got = run(compiled, inputs, 900.0)
    rt = compiled.asymrnr
    assert rt.rewrites["sites_reduced"] == 2 and "sites_not_symmetric" not in rt.rewrites
    assert (got - dense).abs().max() > 1e-3
    reduce_rope = lambda rope, rows: tuple(e[rows] for e in rope)  # (cos, sin), each (N, D)
    refs = [RefSymmetric(HunyuanVideo15AttnProcessor2_0(), 0.5, "image_rotary_emb", reduce_rope) for _ in range(2)]
    for block, ref in zip(model.transformer_blocks, refs):
        block.attn.processor = ref
    want = run(model, inputs, 900.0)
    assert [r.calls for r in refs] == [1, 1]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_hunyuan15_ratio_zero_equals_baseline_and_caches_without_recompile():
    model, inputs = tiny_hunyuan15(), hunyuan15_inputs()
    dense = asymrnr_fx.compile(model, cheap(q_ratio=0.0, kv_ratio=0.0))
    for got, want in zip(generate(dense, inputs), baseline(model, inputs)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()
    cached = asymrnr_fx.compile(tiny_hunyuan15(num_layers=4), cheap(q_ratio=0.5, kv_ratio=0.3, cache=BlockCache(threshold=1.0, full_last=0)))
    generate(cached, inputs)
    rt = cached.asymrnr
    assert rt.step == 3 and rt.stats["cache_hits"] == 3 and (1, 3) in rt.cache_log.values() and rt.stats["matchings"] > 0


def test_export_prepares_mochi_and_hunyuan15_itself():
    """`export` traces with fullgraph=True: on an unprepared model it must prepare it first (the
    trace would break the graph otherwise); traced only here, the packages are built in
    tests/test_export_families.py."""
    for model, inputs in ((tiny_mochi(num_layers=1), mochi_inputs()), (tiny_hunyuan15(num_layers=1), hunyuan15_inputs())):
        torch._dynamo.reset()
        call = {**inputs, "timestep": torch.full((1,), 900.0), "return_dict": False}
        trace = trace_generation(model, AsymRnRConfig(q_ratio=0.5, kv_ratio=0.3), call, num_steps=1)
        assert asymrnr_fx.prepare(model) == 0 and trace.rt.rewrites["sites_reduced"] == 1
