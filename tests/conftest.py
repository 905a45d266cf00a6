"""Tiny diffusers video transformers built from their configs (no weights are downloaded)."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from diffusers import CogVideoXTransformer3DModel, HunyuanVideoTransformer3DModel

# Inductor's on-disk caches start empty for every test run: a cache warmed by other code (an earlier
# run, another checkout) would hide pass bugs. Within the run they are shared, as in CI's fresh
# machine. A directory already set is kept: the warm-start tests' subprocesses import this file
# with their own. (Setting TORCHINDUCTOR_FORCE_DISABLE_CACHES here had no effect: diffusers has
# imported Inductor's config by now; a test that needs a cold trace patches `force_disable_caches`.)
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = _INDUCTOR_CACHE = tempfile.mkdtemp(prefix="asymrnr-tests-inductor-")
    atexit.register(shutil.rmtree, _INDUCTOR_CACHE, ignore_errors=True)

# `make test` runs two pytest-xdist workers (CI has two cores). Each computes on one thread, it and the
# subprocesses its tests start: two workers of two OpenMP threads each would oversubscribe the cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "asymrnr-official"


def tiny_cogvideox(num_layers: int = 2, heads: int = 2, seed: int = 0) -> CogVideoXTransformer3DModel:
    torch.manual_seed(seed)
    return CogVideoXTransformer3DModel(
        num_attention_heads=heads, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=32,
        text_embed_dim=16, num_layers=num_layers, sample_width=16, sample_height=16, sample_frames=9,
        patch_size=2, max_text_seq_length=4, use_rotary_positional_embeddings=True,
    ).eval()


def cogvideox_inputs(batch: int = 1, frames: int = 3, size: int = 16, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "hidden_states": torch.randn(batch, frames, 4, size, size, generator=g),
        "encoder_hidden_states": torch.randn(batch, 4, 16, generator=g),
    }


def tiny_hunyuan(seed: int = 0, double: int = 1, single: int = 1) -> HunyuanVideoTransformer3DModel:
    """`double` double-stream then `single` single-stream blocks."""
    torch.manual_seed(seed)
    return HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=double,
        num_single_layers=single, num_refiner_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=16,
        pooled_projection_dim=8, rope_axes_dim=(4, 6, 6),
    ).eval()


def hunyuan_inputs(batch: int = 1, seed: int = 1, n_text: int = 6, n_valid: int = 4) -> dict:
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(batch, n_text)
    mask[:, :n_valid] = 1
    return {
        "hidden_states": torch.randn(batch, 4, 3, 16, 16, generator=g),
        "encoder_hidden_states": torch.randn(batch, n_text, 16, generator=g),
        "encoder_attention_mask": mask,
        "pooled_projections": torch.randn(batch, 8, generator=g),
        "guidance": torch.full((batch,), 6000.0),
    }


def run(model, inputs: dict, t: float) -> torch.Tensor:
    batch = inputs["hidden_states"].shape[0]
    with torch.no_grad():
        t = torch.full((batch,), t, device=inputs["hidden_states"].device)
        return model(**inputs, timestep=t, return_dict=False)[0]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def tiny_cogvideox_pipeline(transformer=None):
    """A CogVideoXPipeline from tiny configs (as diffusers' pipeline tests build it); prompts are
    given as embeddings, so no tokenizer or text encoder is needed. Call `cogvideox_generate`."""
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline

    torch.manual_seed(0)
    vae = AutoencoderKLCogVideoX(
        in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), latent_channels=4,
        layers_per_block=1, norm_num_groups=2, temporal_compression_ratio=4,
    ).eval()
    return CogVideoXPipeline(
        tokenizer=None, text_encoder=None, vae=vae, transformer=transformer or tiny_cogvideox(),
        scheduler=CogVideoXDDIMScheduler(timestep_spacing="trailing"),  # as the released CogVideoX: every run starts at 999
    )


def cogvideox_generate(pipe, steps: int = 3, size: int = 64, seed: int = 0, **kwargs) -> torch.Tensor:
    """Latents of one classifier-free-guided generation (batch-2 CFG: one call per step)."""
    g = torch.Generator().manual_seed(seed)
    emb, neg = torch.randn(1, 4, 16, generator=g), torch.randn(1, 4, 16, generator=g)
    return pipe(
        prompt_embeds=emb, negative_prompt_embeds=neg, height=size, width=size, num_frames=9,
        num_inference_steps=steps, guidance_scale=6.0, generator=torch.Generator().manual_seed(seed),
        output_type="latent", **kwargs,
    ).frames


def dynamo_code(model, inputs: dict, t: float = 900.0) -> list[str]:
    """The code of the graphs Dynamo hands to a backend for this call (a capturing backend)."""
    codes = []

    def capture(gm, example_inputs):
        codes.append(gm.code)
        return gm.forward

    torch._dynamo.reset()
    run(torch.compile(model, backend=capture, dynamic=False), inputs, t)
    torch._dynamo.reset()
    return codes


def inner_compiled_code(monkeypatch) -> list[str]:
    """Collects the code of every graph the asymrnr backend passes to its inner compiler."""
    from asymrnr_fx import backend

    codes, real = [], backend.inner_compile

    def spy(gm, inputs, cfg, rt):
        codes.append(gm.code)
        return real(gm, inputs, cfg, rt)

    monkeypatch.setattr(backend, "inner_compile", spy)
    return codes


def skip_dit_reuse(timesteps: list[float], interval: int) -> list[bool]:
    """Skip-DiT's release rule, written plainly: a step reuses the deep feature unless t >= 700 or
    t <= 50, or it is every `interval`-th step since the last full one."""
    reuse, since_full = [], 0
    for t in timesteps:
        reuse.append(50 < t < 700 and since_full % interval != 0)
        since_full = since_full + 1 if reuse[-1] else 1
    return reuse
