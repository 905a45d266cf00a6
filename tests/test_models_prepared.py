"""Families that `asymrnr_fx.prepare` makes static, with output equal to diffusers': Mochi (a
masked attention in place of the per-sample text selection) and HunyuanVideo 1.5 (a static
forward and a key-mask attention). For each: one static graph, sites and layout, the eager
reference at each site with batch-2 text masks, symmetric mode against diffusers' own processor
on the kept tokens, ratio 0 equal to the baseline, caching under fail_on_recompile, and export's
own preparation. The unprepared models fail closed (tests/test_models_mochi_latte_v15.py)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from conftest import run
from diffusers.models.attention_processor import MochiAttnProcessor2_0
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


def _batch2(one: dict, text: dict[str, tuple[int, list[int | tuple[int, ...]]]], image: bool = False) -> dict:
    """Batch 2 from a one-sample input: a second latent and text, each text mask valid on its
    first k tokens (k per sample, as the pipelines' tokenizers pad) or on the given positions;
    `image`: image embeddings."""
    g = torch.Generator().manual_seed(7)
    out = {"hidden_states": torch.cat([one["hidden_states"], torch.randn(one["hidden_states"].shape, generator=g)])}
    for name, (width, valid) in text.items():
        mask = torch.zeros(2, len(one[name.replace("hidden_states", "attention_mask")][0]))
        for i, k in enumerate(valid):
            mask[i, list(k) if isinstance(k, tuple) else slice(k)] = 1
        out[name] = torch.randn(2, mask.shape[1], width, generator=g)
        out[name.replace("hidden_states", "attention_mask")] = mask
    if "image_embeds" in one:
        out["image_embeds"] = torch.randn(2, 2, 12, generator=g) if image else torch.zeros(2, 2, 12)
    return out


def mochi_batch2(image: bool = False) -> dict:
    return _batch2(mochi_inputs(), {"encoder_hidden_states": (16, [4, 2])})


def hunyuan15_batch2(image: bool = False) -> dict:
    return _batch2(hunyuan15_inputs(), {"encoder_hidden_states": (16, [4, 1]), "encoder_hidden_states_2": (8, [2, 3])}, image)


@dataclass(frozen=True)
class Prepared:
    name: str
    build: Callable[..., torch.nn.Module]  # build(num_layers=...)
    inputs: Callable[[], dict]  # one sample
    batch2: Callable[[bool], dict]
    n_text: int  # text tokens in the attention's sequence, padding included
    attn: str  # the block's self-attention module
    diffusers_processor: type
    changed: int  # modules `prepare` changes in the 2-block model

    def attention(self, block) -> torch.nn.Module:
        return getattr(block, self.attn)


MOCHI = Prepared("mochi", tiny_mochi, mochi_inputs, mochi_batch2, 6, "attn1", MochiAttnProcessor2_0, 2)
HUNYUAN15 = Prepared("hunyuan_video15", tiny_hunyuan15, hunyuan15_inputs, hunyuan15_batch2, 2 + 3 + 6, "attn",
                     HunyuanVideo15AttnProcessor2_0, 3)  # image, ByT5, MLLM tokens; forward + 2 blocks
FAMILIES = [MOCHI, HUNYUAN15]
each_family = pytest.mark.parametrize("fam", FAMILIES, ids=[f.name for f in FAMILIES])


def test_condition_tokens_put_valid_tokens_first_in_group_order():
    a, b = torch.arange(3.0).view(1, 3, 1) + 1, torch.arange(2.0).view(1, 2, 1) + 10
    tokens, mask = condition_tokens([a, b], [torch.tensor([[1, 0, 1]]), torch.tensor([[0, 1]])], [False, True])
    assert tokens.flatten().tolist() == [1.0, 3.0, 11.0, 2.0, 0.0] and mask.tolist() == [[True, True, True, False, False]]


def mochi_masks_with_gaps() -> dict:
    """Text masks not of the tokenizer's prefix form: diffusers packs the valid text rows first
    whatever the mask, and so must the prepared attention."""
    return _batch2(mochi_inputs(), {"encoder_hidden_states": (16, [(0, 2, 5), (1, 4)])})


@pytest.mark.parametrize("fam,make_inputs", [
    (MOCHI, mochi_batch2), (MOCHI, mochi_masks_with_gaps),
    (HUNYUAN15, hunyuan15_batch2), (HUNYUAN15, lambda: hunyuan15_batch2(image=True)),
], ids=["mochi", "mochi-masks-with-gaps", "hunyuan_video15-t2v", "hunyuan_video15-i2v"])
def test_prepared_model_equals_diffusers_in_one_static_graph(fam, make_inputs):
    model, inputs = fam.build(), make_inputs()
    want = run(model, inputs, 900.0)
    assert asymrnr_fx.prepare(model) == fam.changed and asymrnr_fx.prepare(model) == 0
    torch.testing.assert_close(run(model, inputs, 900.0), want, rtol=1e-5, atol=1e-5)
    assert len(dynamo_graphs(model, inputs)) == 1
    torch._dynamo.reset()
    options = {"compiler": "aot_eager", "q_ratio": 0.0, "kv_ratio": 0.0}
    full = torch.compile(model, backend="asymrnr", fullgraph=True, dynamic=False, options=options)
    torch.testing.assert_close(run(full, inputs, 900.0), want, rtol=1e-5, atol=1e-5)


@each_family
def test_sites_found_and_reduced_with_the_text_mask(fam):
    compiled = asymrnr_fx.compile(fam.build(), cheap(q_ratio=0.5, kv_ratio=0.3))
    run(compiled, fam.inputs(), 900.0)
    info = compiled.asymrnr.info
    assert info.grid == (3, 8, 8) and reasons(info) == ["not inside a transformer block", "", ""]
    assert [s.layout for s in info.sites[1:]] == [asymrnr_fx.tokens.Layout(fam.n_text, 192, False)] * 2
    assert compiled.asymrnr.used_lengths[(0, 0)] == {f"transformer_blocks.{i}.{fam.attn}": (96, 134) for i in range(2)}


@each_family
@pytest.mark.parametrize("q,kv,mode", [(0.5, 0.3, "replace"), (0.4, 0.6, "mean")])
def test_matches_reference_with_batch2_text_masks(fam, q, kv, mode):
    """The key mask is reduced with the keys."""
    model, inputs = fam.build(), fam.batch2(False)
    got = run(asymrnr_fx.compile(model, cheap(q_ratio=q, kv_ratio=kv, reduce_mode=mode, split="fixed")), inputs, 900.0)
    with reference_attention(192 + fam.n_text, fam.n_text, False, (3, 8, 8), q, kv, "euclidean", mode) as calls:
        want = run(model, inputs, 900.0)  # the model was prepared by compile
    assert len(calls) == 2
    assert (got - run(model, inputs, 900.0)).abs().max() > 1e-3
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@each_family
def test_symmetric_mode_matches_diffusers_attention_on_the_kept_video_tokens(fam):
    """The prepared attention builds its key mask inside the site; the reference is diffusers'
    own processor run on the kept video tokens, all text kept."""
    model, inputs = fam.build(), fam.batch2(False)
    dense = run(model, inputs, 900.0)
    compiled = asymrnr_fx.compile(model, cheap(q_ratio=0.0, kv_ratio=0.0, h_ratio=0.5, split="fixed"))
    got = run(compiled, inputs, 900.0)
    rt = compiled.asymrnr
    assert rt.rewrites["sites_reduced"] == 2 and "sites_not_symmetric" not in rt.rewrites
    assert (got - dense).abs().max() > 1e-3
    reduce_rope = lambda rope, rows: tuple(e[rows] for e in rope)  # (cos, sin), rows = video tokens
    refs = [RefSymmetric(fam.diffusers_processor(), 0.5, "image_rotary_emb", reduce_rope) for _ in range(2)]
    for block, ref in zip(model.transformer_blocks, refs):
        fam.attention(block).processor = ref
    want = run(model, inputs, 900.0)
    assert [r.calls for r in refs] == [1, 1]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@each_family
def test_ratio_zero_equals_baseline_and_caches_without_recompile(fam):
    model, inputs = fam.build(), fam.inputs()
    dense = asymrnr_fx.compile(model, cheap(q_ratio=0.0, kv_ratio=0.0))
    for got, want in zip(generate(dense, inputs), baseline(model, inputs)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()
    cached = asymrnr_fx.compile(fam.build(num_layers=4), cheap(q_ratio=0.5, kv_ratio=0.3, cache=BlockCache(threshold=1.0, full_last=0)))
    generate(cached, inputs)
    rt = cached.asymrnr
    assert rt.step == 3 and rt.stats["cache_hits"] == 3 and (1, 3) in rt.cache_log.values() and rt.stats["matchings"] > 0


@each_family
def test_export_prepares_the_model_itself(fam):
    """`export` traces with fullgraph=True, which an unprepared model breaks: it prepares the
    model first. Traced only here; packages are built in tests/test_export_families.py."""
    model = fam.build(num_layers=1)
    call = {**fam.inputs(), "timestep": torch.full((1,), 900.0), "return_dict": False}
    trace = trace_generation(model, AsymRnRConfig(q_ratio=0.5, kv_ratio=0.3), call, num_steps=1)
    assert asymrnr_fx.prepare(model) == 0 and trace.rt.rewrites["sites_reduced"] == 1
