"""Skip-DiT conversion (`asymrnr_fx.skip_dit`): a converted model starts equal to the original,
stage-1 training moves the branches only, save / load round trip, clear errors, fullgraph
compilation with reduction and no recompile, and Skip-Cache on a converted model (non-zero
branches) against a plain eager Skip-DiT Skip-Cache written here."""

from __future__ import annotations

import pytest
import torch
from conftest import cogvideox_inputs, hunyuan_inputs, run, skip_dit_reuse, tiny_cogvideox, tiny_hunyuan
from diffusers import FluxTransformer2DModel, HunyuanVideoTransformer3DModel

import asymrnr_fx
from asymrnr_fx import AsymRnRConfig, BlockCache, ConfigError, SkipCache, skip_dit
from asymrnr_fx.models import UnsupportedModelError

TIMESTEPS = [900.0, 800.0, 700.0, 600.0, 500.0, 400.0, 300.0, 200.0, 100.0, 40.0, 10.0]


def tiny_hunyuan4(seed: int = 0) -> HunyuanVideoTransformer3DModel:
    """2 double-stream + 2 single-stream blocks: skips 1 -> 2 (double to single) and 0 -> 3."""
    return tiny_hunyuan(seed, double=2, single=2)


FAMILIES = {
    "cogvideox": (lambda: tiny_cogvideox(num_layers=4), cogvideox_inputs),
    "hunyuan_video": (tiny_hunyuan4, hunyuan_inputs),
}


def build(family: str, randomise: bool = False):
    make, inputs = FAMILIES[family]
    model = skip_dit.convert(make())
    if randomise:
        set_branches(model)
    return model, inputs()


def set_branches(model, seed: int = 3, std: float = 0.2) -> None:
    """Non-zero branch weights (as after fine-tuning), the same for a given seed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in skip_dit.branch_parameters(model):
            p.add_(torch.randn(p.shape, generator=g) * std)


def cheap(**kw) -> AsymRnRConfig:
    return AsymRnRConfig(compiler="aot_eager", **kw)


# ---- conversion ---------------------------------------------------------------------------------

@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_converted_model_starts_equal_and_keeps_block_paths(family):
    make, inputs = FAMILIES[family]
    original, x = make(), inputs()
    paths = [name for name, _ in original.named_modules()]
    want = run(original, x, 900.0)
    model = skip_dit.convert(original)
    torch.testing.assert_close(run(model, x, 900.0), want, rtol=0, atol=1e-6)
    assert skip_dit.skips_of(model) == [(1, 2), (0, 3)] and model.config.skip_dit_skips == [[1, 2], [0, 3]]
    assert sorted(model.skip_branches) == ["2", "3"]
    assert set(paths) <= {name for name, _ in model.named_modules()}  # nothing renamed, branches added
    assert model._skip_dit_saved.outputs == {}  # every saved skip was consumed


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_branches_fuse_the_partner_blocks_output(family):
    """With non-zero branches, block i's input is x + branch(x, output of block L-1-i): checked
    against a plain eager recomputation from the blocks' recorded inputs and outputs."""
    model, x = build(family, randomise=True)
    blocks = skip_dit.blocks_of(model, skip_dit.adapter_of(model))
    seen = {}

    def record(i):
        def pre(module, args, kwargs):
            seen[("in", i)] = args[0] if args else kwargs["hidden_states"]

        def post(module, args, output):
            seen[("out", i)] = output[0]
        return pre, post

    for i, block in enumerate(blocks):  # registered after the conversion's: they see the fused input
        pre, post = record(i)
        block.register_forward_pre_hook(pre, with_kwargs=True)
        block.register_forward_hook(post)
    run(model, x, 900.0)
    with torch.no_grad():
        for source, target in skip_dit.skips_of(model):
            plain = seen[("out", target - 1)]
            skip = seen[("out", source)]
            h = torch.nn.functional.layer_norm(torch.cat([plain, skip], -1), (2 * plain.shape[-1],),
                                               model.skip_branches[str(target)].norm.weight,
                                               model.skip_branches[str(target)].norm.bias, 1e-6)
            want = plain + torch.nn.functional.linear(h, model.skip_branches[str(target)].linear.weight,
                                                      model.skip_branches[str(target)].linear.bias)
            torch.testing.assert_close(seen[("in", target)], want, rtol=1e-5, atol=1e-5)
            assert (want - plain).abs().max() > 1e-3


def test_stage_one_step_moves_the_branches_only():
    model, x = build("cogvideox")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    want = run(model, x, 900.0)
    for p in model.parameters():
        p.requires_grad_(False)
    branch = skip_dit.branch_parameters(model)
    for p in branch:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(branch, lr=1e-2)
    t = torch.full((1,), 900.0)
    out = model(**x, timestep=t, return_dict=False)[0]
    torch.nn.functional.mse_loss(out, torch.randn_like(out, generator=torch.Generator().manual_seed(0))).backward()
    opt.step()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("skip_branches.") for k in changed)
    assert {"skip_branches.2.linear.weight", "skip_branches.3.linear.weight"} <= changed
    assert (run(model, x, 900.0) - want).abs().max() > 1e-4


# ---- save / load --------------------------------------------------------------------------------

@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_save_load_round_trip(family, tmp_path):
    model, x = build(family, randomise=True)
    skip_dit.save(model, tmp_path)
    config = (tmp_path / "config.json").read_text()
    assert '"skip_dit_skips"' in config and (tmp_path / "diffusion_pytorch_model.safetensors").exists()
    loaded = skip_dit.load(tmp_path)
    assert type(loaded) is type(model) and skip_dit.skips_of(loaded) == skip_dit.skips_of(model)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    torch.testing.assert_close(run(loaded, x, 900.0), run(model, x, 900.0), rtol=0, atol=0)
    plain = type(model).from_pretrained(tmp_path)  # diffusers alone drops the branches: outputs differ
    assert (run(plain, x, 900.0) - run(model, x, 900.0)).abs().max() > 1e-4


# ---- errors -------------------------------------------------------------------------------------

def tiny_flux() -> FluxTransformer2DModel:
    return FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                  attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16,
                                  pooled_projection_dim=8, axes_dims_rope=(4, 4, 8))


def test_unsupported_model_is_a_clear_error():
    with pytest.raises(UnsupportedModelError, match=r"does not support FluxTransformer2DModel.*cogvideox"):
        skip_dit.convert(tiny_flux())


def test_converting_twice_is_a_clear_error():
    model, _ = build("cogvideox")
    with pytest.raises(ConfigError, match="already has Skip-DiT long skips"):
        skip_dit.convert(model)


def test_too_few_blocks_and_plain_checkpoints_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="a long skip needs >= 2"):
        skip_dit.convert(tiny_cogvideox(num_layers=1))
    plain = tiny_cogvideox(num_layers=2)
    with pytest.raises(ConfigError, match="no Skip-DiT long skips"):
        skip_dit.save(plain, tmp_path)
    plain.save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="not a Skip-DiT checkpoint"):
        skip_dit.load(tmp_path)


# ---- compiled -----------------------------------------------------------------------------------

def test_fullgraph_with_reduction_and_no_recompile():
    model, x = build("cogvideox", randomise=True)
    compiled = asymrnr_fx.compile(model, cheap(q_ratio=0.5, kv_ratio=0.5), fullgraph=True)
    run(compiled, x, TIMESTEPS[0])
    with torch.compiler.set_stance("fail_on_recompile"):
        outs = [run(compiled, x, t) for t in TIMESTEPS[1:4]]
    rt = compiled.asymrnr
    assert rt.info.adapter.long_skips and rt.rewrites["sites_reduced"] == 4
    assert all(torch.isfinite(o).all() for o in outs)
    assert (outs[0] - run(model, x, TIMESTEPS[1])).abs().max() > 1e-4  # reduced: not the dense output


def test_unconverted_model_has_no_long_skips():
    compiled = asymrnr_fx.compile(tiny_cogvideox(num_layers=4), cheap(q_ratio=0.0, kv_ratio=0.0,
                                                                        cache=SkipCache()))
    run(compiled, cogvideox_inputs(), 900.0)
    assert not compiled.asymrnr.info.adapter.long_skips


def test_magnitude_policy_on_a_converted_model_is_a_clear_error():
    model, x = build("cogvideox")
    compiled = asymrnr_fx.compile(model, cheap(q_ratio=0.0, kv_ratio=0.0, cache=BlockCache(policy="magnitude")))
    with pytest.raises(ConfigError, match="has long skips and caches the span's output"):
        run(compiled, x, 900.0)


class _SkippedSpan(torch.nn.Module):
    """Plain reference for blocks [1, L - 1): on a cached step the block is skipped (its skip is
    neither saved nor consumed) and the span hands on the deep feature stored by its last block at
    the last full step; block L - 1 then fuses it with the fresh output of block 0."""

    def __init__(self, block: torch.nn.Module, store: dict, last: bool):
        super().__init__()
        self.block, self.store, self.last = block, store, last

    def forward(self, *args, **kwargs):
        if self.store["reuse"]:
            return self.store["deep"]
        out = self.block(*args, **kwargs)
        if self.last:
            self.store["deep"] = out
        return out


def _eager_skip_cache(model, x: dict, interval: int) -> list[torch.Tensor]:
    """Skip-DiT's rule: full while t >= 700 and once t <= 50, else every `interval`-th step."""
    adapter = skip_dit.adapter_of(model)
    store, n = {"reuse": False}, len(skip_dit.blocks_of(model, adapter))
    k = 0
    for name, _ in adapter.block_containers:
        container = getattr(model, name)
        for j in range(len(container)):
            if 1 <= k < n - 1:
                container[j] = _SkippedSpan(container[j], store, last=k == n - 2)
            k += 1
    outs = []
    for t, reuse in zip(TIMESTEPS, skip_dit_reuse(TIMESTEPS, interval)):
        store["reuse"] = reuse
        outs.append(run(model, x, t))
    return outs


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_skip_cache_on_a_converted_model_equals_a_plain_eager_skip_dit(family):
    reference, x = build(family, randomise=True)
    want = _eager_skip_cache(reference, x, interval=2)
    model, _ = build(family, randomise=True)
    ours = asymrnr_fx.compile(model, cheap(q_ratio=0.0, kv_ratio=0.0, cache=SkipCache(interval=2)), fullgraph=True)
    got = [run(ours, x, TIMESTEPS[0])]
    with torch.compiler.set_stance("fail_on_recompile"):
        got += [run(ours, x, t) for t in TIMESTEPS[1:]]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    rt = ours.asymrnr
    assert rt.info.adapter.long_skips
    cached = [step for (step, _), (_, skipped) in rt.cache_log.items() if skipped]
    assert cached == [3, 5, 7]
    assert set(rt.cache_log.values()) == {(4, 0), (2, 2)}  # a cached step runs blocks 0 and 3 only
    plain, _ = build(family, randomise=True)
    assert (got[3] - run(plain, x, TIMESTEPS[3])).abs().max() > 1e-4  # step 3 reused the deep feature
