"""Workloads: the trained fixture (speed and fidelity) and ratio-preserving shapes of the
published models with random weights (speed only).

Ratio preservation: attention costs ~N^2 d and the linear layers ~N d^2 per block, so scaling
the hidden size d and the token count N (visual and text) by the same factor s multiplies both
by s^3 and keeps their ratio. Head dim stays 64; the head count follows from d.

Published schedules are (blocks x steps) tables. Where a run uses fewer blocks or steps than
the published model, the table is subsampled: evenly spaced rows per block container (first and
last kept) and evenly spaced step columns (first and last kept), and the matching window is
scaled with the steps: max(1, round(window * steps / published_steps)).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from asymrnr_fx import Schedule

REFERENCE = Path(os.environ.get(
    "ASYMRNR_REFERENCE", Path(__file__).resolve().parents[2] / "shared" / "reference" / "asymrnr-official"
))

Call = Callable[..., Any]


@dataclass(frozen=True)
class Published:
    """A released schedule: tier file, base / fast thresholds, matching window, blocks per container."""

    tiers: str
    base: str
    fast: str
    window: int
    blocks: tuple[int, ...]
    steps: int


COGVIDEOX_2B = Published("euclidean_cogvideox-2b_cache5.safetensors", "cogvideox-2b_cache5_0.yaml",
                         "cogvideox-2b_cache5_1.yaml", 5, (30,), 50)
HUNYUAN_VIDEO = Published("euclidean_hyvideo_cache3.safetensors", "hyvideo_cache3_0.yaml",
                          "hyvideo_cache3_1.yaml", 3, (20, 40), 30)
# No AsymRnR schedule was released for Wan: empty file names (constant-ratio rows only). Wan 2.1
# runs 50 steps by default; window 5 as CogVideoX.
WAN21_1_3B = Published("", "", "", 5, (30,), 50)


@dataclass(frozen=True)
class ScaledSpec:
    """A published model scaled by `scale` in hidden size and tokens, head dim 64."""

    name: str
    family: str  # "cogvideox" | "hunyuan_video" | "wan"
    real: str
    scale: str
    heads: int
    grid: tuple[int, int, int]  # latent (frames, height, width) in tokens, after patching
    n_text: int
    published: Published
    head_dim: int = 64


SCALED = {
    "cogvideox-2b": ScaledSpec(
        "cogvideox-2b", "cogvideox",
        "CogVideoX-2B: 30x64 = 1920 hidden, 30 blocks, grid 13x30x45 = 17550 + 226 text, 50 steps",
        "1/15", heads=2, grid=(13, 6, 15), n_text=16, published=COGVIDEOX_2B),
    "hunyuanvideo": ScaledSpec(
        "hunyuanvideo", "hunyuan_video",
        "HunyuanVideo: 24x128 = 3072 hidden, 20+40 blocks, grid 33x34x60 = 67320 + 256 text, 30 steps",
        "1/48", heads=1, grid=(9, 10, 16), n_text=5, published=HUNYUAN_VIDEO),
    # Width as published (12 x 128 = 1536, FFN 8960), so the ratio is NOT preserved: only the
    # tokens shrink, to 144 + 16, for a 50-step generation of a few minutes on 2 CPU cores
    # (~1.2e11 FLOPs per visual token per generation, at 30 blocks); attention is ~1% of it here.
    "wan2.1-1.3b": ScaledSpec(
        "wan2.1-1.3b", "wan",
        "Wan 2.1 T2V-1.3B: 12x128 = 1536 hidden, 30 blocks, grid 21x30x52 = 32760 + 512 text, 50 steps",
        "1 (hidden), 1/228 (tokens)", heads=12, grid=(3, 6, 8), n_text=16, published=WAN21_1_3B, head_dim=128),
}


@dataclass
class Workload:
    """A model, its generation loop and its schedules. `generate(call, i)` runs generation `i`
    (prompt / seed i % prompts) through `call` and returns (frames, latents) when quality is
    measured. `calibrate(call)`: one generation on a prompt and seed no timed generation uses, for
    methods that calibrate (MagCache); None where no method needs it. `memo`: what such methods
    computed once per workload (shared by their eager and compiled rows)."""

    name: str
    model: torch.nn.Module
    steps: int
    generate: Callable[[Call, int], tuple[torch.Tensor, torch.Tensor] | None]
    example_call: Callable[[Call], Any]
    schedules: dict[str, tuple[Schedule, int] | str]
    quality: bool
    prompts: int = 1
    calibrate: Callable[[Call], None] | None = None
    describe: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    memo: dict[str, Any] = field(default_factory=dict)


# ---- schedules ----------------------------------------------------------------------------------
def evenly(n_from: int, n: int) -> list[int]:
    """`n` evenly spaced indices of range(n_from), first and last included."""
    if n >= n_from:
        return list(range(n_from))
    if n == 1:
        return [0]
    return [round(i * (n_from - 1) / (n - 1)) for i in range(n)]


def block_rows(published: tuple[int, ...], used: tuple[int, ...]) -> list[int]:
    """Rows of the published table for `used` blocks per container (containers in order)."""
    rows, offset = [], 0
    for n_pub, n in zip(published, used, strict=True):
        rows += [offset + i for i in evenly(n_pub, n)]
        offset += n_pub
    return rows


def subsample(schedule: Schedule, rows: list[int], cols: list[int]) -> Schedule:
    """The schedule restricted to the given block rows and step columns."""
    def pick(t: float | torch.Tensor) -> float | torch.Tensor:
        return t[rows][:, cols] if isinstance(t, torch.Tensor) else t

    return Schedule(q=pick(schedule.q), kv=pick(schedule.kv), h=pick(schedule.h), name=schedule.name)


def published_schedules(pub: Published, blocks: tuple[int, ...], steps: int) -> dict[str, tuple[Schedule, int] | str]:
    """{"base": (schedule, matching_every), "fast": ...} fitted to `blocks` and `steps`; an
    error message instead of the pair when the reference files cannot be read."""
    if not pub.tiers:
        return dict.fromkeys(("base", "fast"), "no AsymRnR schedule was published for this model")
    try:
        return _published(pub, blocks, steps)
    except (OSError, ValueError) as err:
        msg = f"published schedule unavailable ({type(err).__name__}: {err}); set ASYMRNR_REFERENCE"
        return {"base": msg, "fast": msg}


def _published(pub: Published, blocks: tuple[int, ...], steps: int) -> dict[str, tuple[Schedule, int]]:
    rows, cols = block_rows(pub.blocks, blocks), evenly(pub.steps, steps)
    every = max(1, round(pub.window * steps / pub.steps))
    out = {}
    for label, yaml in (("base", pub.base), ("fast", pub.fast)):
        full = Schedule.from_published(REFERENCE / pub.tiers, REFERENCE / yaml)
        out[label] = (subsample(full, rows, cols), every)
    return out


def schedule_note(pub: Published, blocks: tuple[int, ...], steps: int) -> str:
    if not pub.tiers:
        return "no published schedule for this model: constant-ratio rows only"
    if blocks == pub.blocks and steps == pub.steps:
        return f"published schedules used as released ({sum(pub.blocks)} blocks x {pub.steps} steps)"
    every = max(1, round(pub.window * steps / pub.steps))
    rows = (f"published {sum(pub.blocks)}x{pub.steps} schedules subsampled to rows "
            f"{block_rows(pub.blocks, blocks)}")
    if steps == pub.steps:
        return f"{rows}, all {steps} steps as released; matching window {pub.window}"
    return f"{rows} and {steps} evenly spaced steps; matching window {pub.window} -> {every}"


# ---- random-weight models -----------------------------------------------------------------------
def cogvideox_model(spec: ScaledSpec, blocks: tuple[int, ...]) -> tuple[torch.nn.Module, dict]:
    from diffusers import CogVideoXTransformer3DModel

    f, h, w = spec.grid
    model = CogVideoXTransformer3DModel(
        num_attention_heads=spec.heads, attention_head_dim=64, in_channels=16, out_channels=16,
        time_embed_dim=128, text_embed_dim=256, num_layers=blocks[0], sample_width=2 * w, sample_height=2 * h,
        sample_frames=4 * (f - 1) + 1, patch_size=2, max_text_seq_length=spec.n_text,
        use_rotary_positional_embeddings=False,  # as CogVideoX-2B (sincos positions)
    )
    g = torch.Generator().manual_seed(1)
    inputs = {"hidden_states": torch.randn(1, f, 16, 2 * h, 2 * w, generator=g),
              "encoder_hidden_states": torch.randn(1, spec.n_text, 256, generator=g)}
    return model, inputs


def hunyuan_model(spec: ScaledSpec, blocks: tuple[int, ...]) -> tuple[torch.nn.Module, dict]:
    from diffusers import HunyuanVideoTransformer3DModel

    f, h, w = spec.grid
    model = HunyuanVideoTransformer3DModel(
        in_channels=16, out_channels=16, num_attention_heads=spec.heads, attention_head_dim=64,
        num_layers=blocks[0], num_single_layers=blocks[1], num_refiner_layers=2, patch_size=2, patch_size_t=1,
        text_embed_dim=64, pooled_projection_dim=16, rope_axes_dim=(16, 24, 24), guidance_embeds=True,
    )
    g = torch.Generator().manual_seed(1)
    inputs = {"hidden_states": torch.randn(1, 16, f, 2 * h, 2 * w, generator=g),
              "encoder_hidden_states": torch.randn(1, spec.n_text, 64, generator=g),
              "encoder_attention_mask": torch.ones(1, spec.n_text),
              "pooled_projections": torch.randn(1, 16, generator=g),
              "guidance": torch.full((1,), 6000.0)}
    return model, inputs


def wan_model(spec: ScaledSpec, blocks: tuple[int, ...]) -> tuple[torch.nn.Module, dict]:
    """Wan 2.1 at its published width; latent (1, 16, F, 2H, 2W) with (1, 2, 2) patches."""
    from diffusers import WanTransformer3DModel

    f, h, w = spec.grid
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=spec.heads, attention_head_dim=spec.head_dim, in_channels=16,
        out_channels=16, text_dim=256, freq_dim=256, ffn_dim=8960, num_layers=blocks[0],
    )
    g = torch.Generator().manual_seed(1)
    inputs = {"hidden_states": torch.randn(1, 16, f, 2 * h, 2 * w, generator=g),
              "encoder_hidden_states": torch.randn(1, spec.n_text, 256, generator=g)}
    return model, inputs


BUILDERS = {"cogvideox": cogvideox_model, "hunyuan_video": hunyuan_model, "wan": wan_model}


def denoise(call: Call, inputs: dict, steps: int, on_step: Callable[[int], None] | None = None) -> torch.Tensor:
    """Euler steps with a timestep decreasing from 999 to 0; the latent evolves with the output.
    `on_step(i)` runs before step i's call."""
    x, ts = inputs["hidden_states"], torch.linspace(999.0, 0.0, steps + 1, device=inputs["hidden_states"].device)
    for i in range(steps):
        if on_step is not None:
            on_step(i)
        out = call(**{**inputs, "hidden_states": x}, timestep=ts[i : i + 1], return_dict=False)[0]
        x = x + (ts[i + 1] - ts[i]) / 1000 * out
    return x


CALIBRATION_SEED = 10_000  # no timed generation uses it (they use seeds 0 .. prompts - 1)


def _discard(_: object) -> None:
    """Random-weight outputs are not compared (speed only)."""


def scaled_workload(spec: ScaledSpec, blocks: tuple[int, ...], steps: int, device: str, dtype: torch.dtype) -> Workload:
    torch.manual_seed(0)
    model, inputs = BUILDERS[spec.family](spec, blocks)
    model = model.to(device, dtype).eval()
    inputs = {k: v.to(device, dtype if v.is_floating_point() else v.dtype) for k, v in inputs.items()}
    pub = spec.published
    n_visual = spec.grid[0] * spec.grid[1] * spec.grid[2]
    noise = torch.randn(inputs["hidden_states"].shape, generator=torch.Generator().manual_seed(CALIBRATION_SEED))
    calibration = {**inputs, "hidden_states": noise.to(device, dtype)}  # a latent no timed generation starts from
    return Workload(
        name=spec.name, model=model, steps=steps, quality=False,
        generate=lambda call, i: _discard(denoise(call, inputs, steps)),
        calibrate=lambda call: _discard(denoise(call, calibration, steps)),
        example_call=lambda call: call(**inputs, timestep=torch.tensor([999.0], device=device), return_dict=False),
        schedules=published_schedules(pub, blocks, steps),
        describe={"real": spec.real, "scale": spec.scale, "hidden": spec.head_dim * spec.heads, "heads": spec.heads,
                  "grid": spec.grid, "visual_tokens": n_visual, "text_tokens": spec.n_text,
                  "blocks": f"{sum(blocks)} of {sum(pub.blocks)}", "steps": f"{steps} of {pub.steps}"},
        notes=[schedule_note(pub, blocks, steps)],
    )


# ---- the trained fixture --------------------------------------------------------------------------


def _fixture_weights() -> dict[str, Path]:
    """Fixture workloads on other weights than the 4-block fixture's: the deep pair (plain, Skip-DiT)."""
    from asymrnr_fx.models import fixture

    return {"deep-50": fixture.DEEP_WEIGHTS, "deep-skip-50": fixture.DEEP_SKIP_WEIGHTS}


FIXTURE_WEIGHTS = _fixture_weights()


def _fixture_kind(name: str) -> str:
    kinds = {"deep-50": "deep fixture (8 blocks x width 64)", "deep-skip-50": "deep fixture, Skip-DiT twin"}
    return f"trained {kinds.get(name, 'fixture')} (CogVideoX architecture, pixel space)"


def fixture_workload(steps: int, prompts: int, device: str, dtype: torch.dtype,
                     name: str = "fixture") -> Workload:
    from asymrnr_fx.models import fixture

    fixture_model = fixture.load(device=device, dtype=dtype, path=FIXTURE_WEIGHTS.get(name, fixture.WEIGHTS))
    names = fixture.PROMPTS[:prompts]

    def generate(call: Call, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = fixture_model.sample(names[i % len(names)], steps=steps, seed=i % len(names), transformer=call)
        return s.frames.float().cpu(), s.latents.float().cpu()

    def calibrate(call: Call) -> None:
        fixture_model.sample(fixture.PROMPTS[-1], steps=steps, seed=CALIBRATION_SEED, transformer=call)

    calibration = f"'{fixture.PROMPTS[-1]}', seed {CALIBRATION_SEED}"

    x = torch.randn(fixture_model.latent_shape, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    text, rope = fixture_model.encode(names[0]), fixture_model.rotary()
    cfg = fixture_model.transformer.config
    blocks, (_, frames, _, height, width) = (cfg.num_layers,), fixture_model.latent_shape
    grid = (frames, height // cfg.patch_size, width // cfg.patch_size)
    return Workload(
        name=name, model=fixture_model.transformer, steps=steps, quality=True, generate=generate, prompts=len(names),
        calibrate=calibrate, example_call=lambda call: call(
            hidden_states=x, encoder_hidden_states=text, timestep=torch.tensor([999.0], device=device),
            image_rotary_emb=rope, return_dict=False),
        schedules=published_schedules(COGVIDEOX_2B, blocks, steps),
        describe={"real": _fixture_kind(name), "scale": "-",
                  "hidden": cfg.num_attention_heads * cfg.attention_head_dim, "heads": cfg.num_attention_heads,
                  "grid": grid, "visual_tokens": grid[0] * grid[1] * grid[2],
                  "text_tokens": cfg.max_text_seq_length, "blocks": str(cfg.num_layers), "steps": str(steps),
                  "prompts": len(names)},
        notes=["CogVideoX-2B published schedules applied to the fixture: "
               + schedule_note(COGVIDEOX_2B, blocks, steps),
               f"{len(names)} prompts (seeds 0-{len(names) - 1}); MagCache calibrates on {calibration}"],
    )
