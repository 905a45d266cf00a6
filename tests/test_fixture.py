"""The shipped fixture DiT: data generator, weights loading, and that samples follow their prompt.

Samples are checked by measurement (``data.measure``), not by eye: the measurement itself is first
validated on rendered ground-truth clips, then applied to generations of the trained model.
"""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
from diffusers import CogVideoXTransformer3DModel

from asymrnr_fx.models import fixture
from asymrnr_fx.models.fixture import data, evaluate
from asymrnr_fx.models.fixture.evaluate import frame_motion, looks_like_clip
from asymrnr_fx.models.fixture.model import FixtureConfig

STEPS = 20
SEED = 0
SEEDS = (0, 1)


@pytest.fixture(scope="module")
def fixture_model() -> fixture.Fixture:
    return fixture.load(path=fixture.WEIGHTS)


@pytest.fixture(scope="module")
def samples(fixture_model: fixture.Fixture) -> dict[tuple[str, int], torch.Tensor]:
    """Every evaluation prompt at two seeds, 20 Euler steps, no CFG (~10 s on one core)."""
    return {(p, s): fixture_model.generate(p, steps=STEPS, seed=s) for p in fixture.PROMPTS for s in SEEDS}


# --- data: prompts and measurement ------------------------------------------------------------


def test_prompt_round_trip() -> None:
    for attrs in data.all_attributes():
        assert data.parse_prompt(attrs.prompt) == attrs
    assert data.parse_prompt("red circle moving right") == data.Attributes(0, 0, 1)


@pytest.mark.parametrize(
    "bad", ["red circle", "purple circle static", "red blob moving up", "red circle moving static"]
)
def test_bad_prompt_raises(bad: str) -> None:
    with pytest.raises(ValueError, match="prompt"):
        data.parse_prompt(bad)


def test_config_validation_names_the_field() -> None:
    with pytest.raises(ValueError, match="VideoSpec"):
        data.VideoSpec(height=8, width=8)
    with pytest.raises(ValueError, match="height/width"):
        FixtureConfig(height=15)
    with pytest.raises(ValueError, match="Attributes.colour"):
        data.Attributes(0, 7, 0)


def test_render_is_deterministic_with_static_background() -> None:
    spec = data.VideoSpec()
    attrs = data.parse_prompt("blue triangle moving left")
    a = data.render_video(attrs, spec, torch.Generator().manual_seed(5))
    b = data.render_video(attrs, spec, torch.Generator().manual_seed(5))
    assert a.shape == (8, 3, 16, 16) and torch.equal(a, b)
    assert a.min() >= -1 and a.max() <= 1
    assert looks_like_clip(a)


def test_measure_recovers_ground_truth_attributes() -> None:
    g = torch.Generator().manual_seed(7)
    for attrs in data.all_attributes():
        m = data.measure(data.render_video(attrs, data.VideoSpec(), g))
        truth = (
            data.COLOUR_NAMES[attrs.colour],
            data.SHAPES[attrs.shape],
            data.DIRECTION_NAMES[attrs.direction],
        )
        assert (m.colour, m.shape, m.direction) == truth, attrs.prompt


def test_evaluator_passes_every_ground_truth_clip() -> None:
    g = torch.Generator().manual_seed(3)
    for prompt in evaluate.all_prompts():
        video = data.render_video(data.parse_prompt(prompt), data.VideoSpec(), g)
        assert all(evaluate.judge(prompt, video).values()), (prompt, evaluate.judge(prompt, video))
    assert len(evaluate.all_prompts()) == 60


def test_noise_is_not_a_clip() -> None:
    noise = fixture.initial_noise((1, 8, 3, 16, 16), seed=0)[0].clamp(-1, 1)
    assert not looks_like_clip(noise)


# --- shipped weights --------------------------------------------------------------------------


def test_weights_load_with_from_pretrained(fixture_model: fixture.Fixture) -> None:
    direct = CogVideoXTransformer3DModel.from_pretrained(
        fixture.WEIGHTS / "transformer", low_cpu_mem_usage=False
    )
    cfg = direct.config
    assert cfg.in_channels == 3 and cfg.out_channels == 3 and cfg.patch_size == 2
    assert cfg.use_rotary_positional_embeddings and cfg.max_text_seq_length == 3
    assert fixture_model.latent_shape == (1, 8, 3, 16, 16)  # 8 x 8 x 8 = 512 visual tokens
    for a, b in zip(direct.state_dict().values(), fixture_model.transformer.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    files = list(fixture.WEIGHTS.rglob("*.safetensors"))
    assert len(files) == 2 and sum(f.stat().st_size for f in files) <= 20 * 2**20


# --- generations follow the prompt ------------------------------------------------------------


@pytest.mark.parametrize("prompt", fixture.PROMPTS)
def test_sample_is_a_clip_of_the_prompted_colour(samples: dict, prompt: str) -> None:
    for seed in SEEDS:
        video = samples[prompt, seed]
        m = data.measure(video)
        assert video.shape == (8, 3, 16, 16) and looks_like_clip(video), m
        assert m.colour == data.COLOUR_NAMES[data.parse_prompt(prompt).colour], m


def _accuracy(samples: dict, attribute: str) -> float:
    hits = [evaluate.judge(prompt, video)[attribute] for (prompt, _), video in samples.items()]
    return sum(hits) / len(hits)


def test_motion_direction_follows_prompt(samples: dict) -> None:
    # Shipped weights: 16/20 here, 91/120 over all 60 attribute combinations x 2 seeds; chance 1/5.
    assert _accuracy(samples, "direction") >= 0.7


def test_shape_follows_prompt(samples: dict) -> None:
    # Shipped weights: 10/20 here, 61/120 over all combinations x 2 seeds; chance 1/3. The weakest
    # attribute of the 60-minute recipe (README: the 122-minute three-stage run reached 83/120).
    assert _accuracy(samples, "shape") >= 0.45


def test_static_prompts_move_less_than_moving_ones(samples: dict) -> None:
    def median(values: list[float]) -> float:
        return float(torch.tensor(values).median())

    groups: dict[bool, list[torch.Tensor]] = {True: [], False: []}
    for (prompt, _), video in samples.items():
        groups[prompt.endswith("static")].append(video)
    travel = {k: median([math.hypot(*data.measure(v).displacement) for v in g]) for k, g in groups.items()}
    change = {k: median([frame_motion(v) for v in g]) for k, g in groups.items()}
    # Shipped weights: median travel 1.5 px static, 5.7 px moving (data: 0 and 4.2-7 px); two of
    # the six static samples drift.
    assert travel[True] < 2.0 and travel[False] > 4.0, travel
    assert change[False] > 1.5 * change[True], change


# --- the generation loop contract -------------------------------------------------------------


class Recorder:
    """Forwards to the real transformer and records every call's keyword arguments."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model, self.calls = model, []

    def __call__(self, **kwargs) -> tuple[torch.Tensor, ...]:
        self.calls.append(kwargs)
        return self.model(**kwargs)


def test_loop_contract_and_determinism(fixture_model: fixture.Fixture) -> None:
    prompt, steps = "green square moving left", 6
    recorder, seen = Recorder(fixture_model.transformer), []
    out = fixture_model.sample(
        prompt, steps=steps, seed=SEED, transformer=recorder, callback=lambda i, t: seen.append((i, t))
    )
    dense = fixture_model.sample(prompt, steps=steps, seed=SEED)
    assert torch.equal(out.latents, dense.latents) and torch.equal(out.frames, dense.frames)
    timesteps = [c["timestep"] for c in recorder.calls]
    assert len(recorder.calls) == steps and [i for i, _ in seen] == list(range(steps))
    assert all(t.shape == (1,) for t in timesteps)
    assert all(a.item() > b.item() for a, b in itertools.pairwise(timesteps))
    call = recorder.calls[0]
    assert call["hidden_states"].shape == (1, 8, 3, 16, 16) and call["return_dict"] is False
    assert call["encoder_hidden_states"].shape == (1, 3, fixture_model.transformer.config.text_embed_dim)


def test_passed_transformer_is_the_one_used(fixture_model: fixture.Fixture) -> None:
    def zero_velocity(**kwargs) -> tuple[torch.Tensor]:
        return (torch.zeros_like(kwargs["hidden_states"]),)

    out = fixture_model.sample("red circle static", steps=3, seed=4, transformer=zero_velocity)
    assert torch.equal(out.latents, fixture.initial_noise(fixture_model.latent_shape, seed=4))


def test_without_rotary_embedding_there_is_no_clip(fixture_model: fixture.Fixture) -> None:
    """Positions reach the model only through ``image_rotary_emb``: dropping it breaks samples."""

    def no_rope(**kwargs) -> tuple[torch.Tensor, ...]:
        return fixture_model.transformer(**{**kwargs, "image_rotary_emb": None})

    video = fixture_model.generate("red circle moving right", steps=STEPS, seed=SEED, transformer=no_rope)
    assert not looks_like_clip(video)


def test_seeds_differ_and_cfg_runs(fixture_model: fixture.Fixture) -> None:
    prompt = "yellow circle moving down"
    a, b = fixture_model.generate(prompt, steps=8, seed=1), fixture_model.generate(prompt, steps=8, seed=2)
    guided = fixture_model.generate(prompt, steps=8, seed=1, guidance_scale=3.0)
    assert not torch.equal(a, b) and not torch.equal(a, guided)
    assert data.measure(guided).colour == "yellow"


def test_deep_fixture_ships_with_its_recipe() -> None:
    """The deep fixture: >= 8 blocks, attention >= 50% of the forward FLOPs (N / (N + 6 D) for
    N tokens of width D: attention 4 N^2 D against 24 N D^2 of projections and FFN), trained by
    one recorded run within 60 minutes, and loadable like the shallow one."""
    deep = fixture.load(path=fixture.DEEP_WEIGHTS)
    cfg = deep.transformer.config
    width = cfg.num_attention_heads * cfg.attention_head_dim
    _, frames, _, height, width_px = deep.latent_shape
    n_tokens = frames * (height // cfg.patch_size) * (width_px // cfg.patch_size) + 3  # + 3 prompt tokens
    assert cfg.num_layers >= 8 and n_tokens / (n_tokens + 6 * width) >= 0.5
    meta = json.loads((fixture.DEEP_WEIGHTS / "training.json").read_text())
    assert len(meta["stages"]) == 1 and meta["stages"][0]["finished"] and meta["total_wall_s"] <= 3600
    assert "--num-layers 8" in meta["stages"][0]["command"]
