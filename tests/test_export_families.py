"""Export per family beyond CogVideoX and HunyuanVideo (test_export): Wan 2.1, LTX-Video, Allegro,
Latte, HunyuanDiT, CogVideoX 1.5, Mochi and HunyuanVideo 1.5 (both prepared), built tiny from their configs. For each, a short generation
from the loaded package must equal the `asymrnr_fx.compile` path with Inductor, same config; the
reduction (and, for Wan and HunyuanDiT, the block cache) must really have run, in the package as
in the compiled path, and the loaded module must compile nothing."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from test_models_hunyuan_dit import inputs as hunyuan_dit_inputs
from test_models_hunyuan_dit import tiny_hunyuan_dit
from test_models_mochi_latte_v15 import (
    cogvideox15_inputs,
    hunyuan15_inputs,
    latte_inputs,
    mochi_inputs,
    tiny_cogvideox15,
    tiny_hunyuan15,
    tiny_latte,
    tiny_mochi,
)
from test_models_wan_ltx_allegro import (
    allegro_inputs,
    ltx_inputs,
    tiny_allegro,
    tiny_ltx,
    tiny_wan,
    wan_inputs,
)

import asymrnr_fx
from asymrnr_fx import AsymRnRConfig, BlockCache, SkipCache

pytestmark = pytest.mark.inductor  # AOTInductor programs: every test compiles and loads them

REDUCE = {"q_ratio": 0.5, "kv_ratio": 0.3}
TIMESTEPS = [900.0, 880.0, 860.0, 840.0]


@dataclass(frozen=True)
class Family:
    name: str
    build: Callable[[], torch.nn.Module]
    inputs: Callable[[], dict]  # every keyword argument of one call but the timestep
    config: AsymRnRConfig
    sites_reduced: int  # reducible self-attention sites in the tiny model


FAMILIES = [
    Family("wan21", lambda: tiny_wan(num_layers=2), wan_inputs,
           AsymRnRConfig(**REDUCE, cache=BlockCache(threshold=0.5, full_first=1, full_last=0)), 2),
    Family("ltx_video", lambda: tiny_ltx(num_layers=1), ltx_inputs, AsymRnRConfig(**REDUCE), 1),
    Family("allegro", lambda: tiny_allegro(num_layers=1), allegro_inputs, AsymRnRConfig(**REDUCE), 1),
    Family("latte", lambda: tiny_latte(num_layers=1), latte_inputs, AsymRnRConfig(**REDUCE), 2),  # spatial + temporal
    Family("hunyuan_dit", lambda: tiny_hunyuan_dit(num_layers=4), hunyuan_dit_inputs,
           AsymRnRConfig(**REDUCE, cache=SkipCache(interval=2, full_above=1000.0, full_below=0.0)), 4),
    Family("cogvideox15", lambda: tiny_cogvideox15(num_layers=1), cogvideox15_inputs, AsymRnRConfig(**REDUCE), 1),
    Family("mochi", lambda: tiny_mochi(num_layers=1), mochi_inputs, AsymRnRConfig(**REDUCE), 1),
    Family("hunyuan_video15", lambda: tiny_hunyuan15(num_layers=1), hunyuan15_inputs, AsymRnRConfig(**REDUCE), 1),
]


def _calls(fam: Family) -> list[dict]:
    """One generation's transformer calls: the same inputs, decreasing timesteps."""
    inputs = fam.inputs()
    batch = inputs["hidden_states"].shape[0]
    return [{**inputs, "timestep": torch.full((batch,), t), "return_dict": False} for t in TIMESTEPS]


def _generate(model: torch.nn.Module, calls: list[dict]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(**kw)[0] for kw in calls]


@pytest.mark.parametrize("fam", FAMILIES, ids=[f.name for f in FAMILIES])
def test_generation_from_package_equals_compiled_path(fam, tmp_path):
    model, calls = fam.build(), _calls(fam)
    compiled = asymrnr_fx.compile(model, fam.config)
    reference = _generate(compiled, calls)
    path = asymrnr_fx.export(model, fam.config, calls[0], num_steps=len(calls), path=tmp_path / f"{fam.name}.pt2")
    loaded = asymrnr_fx.load_exported(path)
    for got, want in zip(_generate(loaded, calls), reference):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    dense = _generate(model, calls[:1])[0]
    assert (reference[0] - dense).abs().max() > 1e-3  # the reduction changed the output
    _assert_same_work(loaded, compiled.asymrnr, fam)


def _assert_same_work(loaded: torch.nn.Module, compiled_rt, fam: Family) -> None:
    """The package reduced the same sites and cached the same steps as the compiled path, on the
    grid it was built for, without compiling anything."""
    rt = loaded.asymrnr
    assert rt.rewrites["sites_reduced"] == compiled_rt.rewrites["sites_reduced"] == fam.sites_reduced
    assert rt.stats["compiles"] == 0 and rt.step == len(TIMESTEPS) - 1
    assert loaded.manifest["grid"] == list(compiled_rt.info.grid)
    assert rt.cache_log == compiled_rt.cache_log
    assert rt.stats["cache_hits"] == compiled_rt.stats["cache_hits"]
    if fam.config.cache is not None:
        assert rt.stats["cache_hits"] > 0  # cached steps were served by the package
