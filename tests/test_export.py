"""Compiled model export: `asymrnr_fx.export` writes an AOTInductor package, `load_exported` runs it.

Every test here compiles real AOTInductor programs (the thing under test), so each package is
built once per module and shared; a generation from the package must equal the
`torch.compile(backend="asymrnr")` path with Inductor, same config and seed.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import (
    cogvideox_generate,
    cogvideox_inputs,
    hunyuan_inputs,
    tiny_cogvideox,
    tiny_cogvideox_pipeline,
    tiny_hunyuan,
)

import asymrnr_fx
from asymrnr_fx import AsymRnRConfig, BlockCache, ExportError, SkipCache
from asymrnr_fx.models import fixture
from asymrnr_fx.package import MANIFEST

pytestmark = pytest.mark.inductor  # AOTInductor programs: every test compiles or loads them

REDUCE_AND_SKIP = AsymRnRConfig(q_ratio=0.5, kv_ratio=0.3, cache=SkipCache(interval=2, full_above=1000, full_below=0))
TIMESTEPS = [900.0, 700.0, 500.0]


def _compiled_generation(model, cfg: AsymRnRConfig, calls: list[dict]) -> list[torch.Tensor]:
    compiled = asymrnr_fx.compile(model, cfg)
    with torch.no_grad():
        return [compiled(**kw)[0] for kw in calls]


def _calls(example: dict, timesteps: list[float]) -> list[dict]:
    batch = example["hidden_states"].shape[0]
    return [{**example, "timestep": torch.full((batch,), t)} for t in timesteps]


@pytest.fixture(scope="module")
def fixture_package(tmp_path_factory):
    fx_model = fixture.load()
    steps = 6
    compiled = asymrnr_fx.compile(fx_model.transformer, REDUCE_AND_SKIP)
    reference = fx_model.sample("red circle moving right", steps=steps, seed=3, transformer=compiled).latents
    example = fx_model.first_call("red circle moving right", steps=steps, seed=3)
    path = asymrnr_fx.export(fx_model.transformer, REDUCE_AND_SKIP, example, num_steps=steps,
                             path=tmp_path_factory.mktemp("pkg") / "fixture.pt2")
    return fx_model, path, reference, compiled.asymrnr


def test_fixture_generation_from_package_equals_compiled_path(fixture_package):
    fx_model, path, reference, compiled_rt = fixture_package
    loaded = asymrnr_fx.load_exported(path)
    out = fx_model.sample("red circle moving right", steps=6, seed=3, transformer=loaded).latents
    torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-5)
    rt = asymrnr_fx.runtime_of(loaded)
    assert rt.stats["cache_hits"] == compiled_rt.stats["cache_hits"] > 0  # the cache rule ran, the same way
    assert rt.rewrites["sites_reduced"] > 0 and rt.stats["compiles"] == 0
    assert rt.cache_log == compiled_rt.cache_log


def test_package_loads_and_runs_in_a_fresh_process_without_compiling(fixture_package, tmp_path):
    _fx_model, path, reference, _ = fixture_package
    torch.save(reference, tmp_path / "reference.pt")
    script = textwrap.dedent(f"""
        import torch, asymrnr_fx
        from torch._dynamo.utils import counters
        from asymrnr_fx.models import fixture
        loaded = asymrnr_fx.load_exported({str(path)!r})
        out = fixture.load().sample("red circle moving right", steps=6, seed=3, transformer=loaded).latents
        torch.testing.assert_close(out, torch.load({str(tmp_path / "reference.pt")!r}), rtol=1e-4, atol=1e-5)
        assert not counters["inductor"] and not counters["aot_autograd"], dict(counters)
        assert counters["stats"]["calls_captured"] == 0, dict(counters["stats"])
        print("ok", asymrnr_fx.runtime_of(loaded).stats["cache_hits"])
    """)
    done = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("ok")


def test_package_manifest_says_what_it_serves(fixture_package):
    _, path, _, _ = fixture_package
    manifest = asymrnr_fx.package.read_manifest(path)
    assert manifest["num_steps"] == 6 and manifest["device"] == "cpu" and manifest["dtype"] == "float32"
    assert manifest["versions"]["torch"] == torch.__version__
    shapes = {tuple(i["path"]): tuple(i["shape"]) for i in manifest["inputs"]}
    assert shapes[("hidden_states",)] == (1, 8, 3, 16, 16) and ("image_rotary_emb", 0) in shapes
    variants = [p["variant"] for p in manifest["programs"].values()]
    # every segment holds a site (the graph is cut at the cache's blocks only): reduced programs,
    # one that matches inside itself (the window's first call) and one that reuses the matching
    assert all("Variant" in v for v in variants)
    assert any("frozenset()" in v for v in variants) and any("frozenset({" in v for v in variants)


def test_cogvideox_pipeline_with_package_equals_compiled_path(tmp_path):
    """A tiny CogVideoXPipeline (batch-2 CFG, `cache_context("cond_uncond")`), reduction + the
    adaptive block cache; two generations in a row (the pipeline resets the runtime)."""
    cfg = AsymRnRConfig(q_ratio=0.5, kv_ratio=0.5, cache=BlockCache(threshold=0.5, full_first=1, full_last=0))
    pipe = tiny_cogvideox_pipeline(tiny_cogvideox(num_layers=3))
    transformer = pipe.transformer
    example = asymrnr_fx.exporter.capture_call(pipe, **_pipeline_call(steps=4))
    path = asymrnr_fx.export(transformer, cfg, example, num_steps=4, path=tmp_path / "cog.pt2")
    pipe.transformer = asymrnr_fx.compile(transformer, cfg)
    reference = cogvideox_generate(pipe, steps=4)
    pipe.transformer = asymrnr_fx.load_exported(path)
    first, second = cogvideox_generate(pipe, steps=4), cogvideox_generate(pipe, steps=4)
    torch.testing.assert_close(first, reference, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(second, first, rtol=0, atol=0)
    assert pipe.transformer.asymrnr.stats["cache_hits"] > 0


def _pipeline_call(steps: int) -> dict:
    g = torch.Generator().manual_seed(0)
    emb, neg = torch.randn(1, 4, 16, generator=g), torch.randn(1, 4, 16, generator=g)
    return {"prompt_embeds": emb, "negative_prompt_embeds": neg, "height": 64, "width": 64, "num_frames": 9,
                "num_inference_steps": steps, "guidance_scale": 6.0, "output_type": "latent"}


def test_hunyuan_package_equals_compiled_path(tmp_path):
    cfg = AsymRnRConfig(q_ratio=0.5, kv_ratio=0.3)
    model = tiny_hunyuan(double=1, single=1)
    example = {**hunyuan_inputs(), "timestep": torch.full((1,), TIMESTEPS[0]), "return_dict": False}
    calls = _calls(example, TIMESTEPS)
    reference = _compiled_generation(model, cfg, calls)
    loaded = asymrnr_fx.load_exported(asymrnr_fx.export(model, cfg, example, num_steps=3, path=tmp_path / "hy.pt2"))
    for got, want in zip([loaded(**kw)[0] for kw in calls], reference):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert loaded.asymrnr.rewrites["sites_reduced"] > 0


# ---- errors ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_package(tmp_path_factory):
    """Block cache alone on a 2-block CogVideoX: few programs, for the error cases."""
    model = tiny_cogvideox(num_layers=2)
    example = {**cogvideox_inputs(), "timestep": torch.full((1,), 900.0), "attention_kwargs": None, "return_dict": False}
    cfg = AsymRnRConfig(cache=BlockCache(threshold=0.1))
    path = asymrnr_fx.export(model, cfg, example, num_steps=3, path=tmp_path_factory.mktemp("small") / "small.pt2")
    return path, example


def _wrong_calls(example: dict) -> dict:
    bigger = cogvideox_inputs(size=24)
    return {
        "resolution": ({**example, **bigger}, "hidden_states is \\(1, 3, 4, 24, 24\\).*built for \\(1, 3, 4, 16, 16\\)"),
        "batch": ({**example, **cogvideox_inputs(batch=2), "timestep": torch.full((2,), 900.0)}, "built for \\(1, 3, 4"),
        "dtype": ({**example, "hidden_states": example["hidden_states"].bfloat16()}, "torch.bfloat16.*float32"),
        "missing input": ({k: v for k, v in example.items() if k != "encoder_hidden_states"}, "missing input encoder_hidden_states"),
        "new argument": ({**example, "timestep_cond": torch.zeros(1, 4)}, "'timestep_cond' was not given at export"),
        "python value": ({**example, "attention_kwargs": {"scale": 2.0}}, "attention_kwargs=.*exported with attention_kwargs=None"),
    }


@pytest.mark.parametrize("case", ["resolution", "batch", "dtype", "missing input", "new argument", "python value"])
def test_call_the_package_was_not_built_for_is_a_clear_error(small_package, case):
    path, example = small_package
    kwargs, message = _wrong_calls(example)[case]
    with pytest.raises(ExportError, match=message):
        asymrnr_fx.load_exported(path)(**kwargs)


def test_more_steps_than_the_package_serves_is_a_clear_error(small_package):
    path, example = small_package
    loaded = asymrnr_fx.load_exported(path)
    calls = _calls(example, [900.0, 700.0, 500.0, 300.0])
    for kw in calls[:3]:
        loaded(**kw)
    with pytest.raises(ExportError, match="step 3 .*serves 3 steps"):
        loaded(**calls[3])


def _rewritten(path: Path, out: Path, edit) -> Path:
    """A copy of the package with its manifest passed through `edit`."""
    from torch.export.pt2_archive._package import PT2ArchiveReader, PT2ArchiveWriter

    with PT2ArchiveReader(str(path)) as src, PT2ArchiveWriter(str(out)) as dst:
        for name in src.get_file_names():
            data = src.read_bytes(name)
            if name == f"extra/{MANIFEST}":
                data = json.dumps(edit(json.loads(data))).encode()
            if not name.endswith((".data/version", "archive_version", "archive_format", ".data/serialization_id")):
                dst.write_bytes(name, data)
    return out


def test_package_from_another_torch_is_refused(small_package, tmp_path):
    path, _ = small_package
    other = _rewritten(path, tmp_path / "other.pt2", lambda m: {**m, "versions": {**m["versions"], "torch": "2.99.0"}})
    with pytest.raises(ExportError, match=re.escape(f"built with torch 2.99.0, this is torch {torch.__version__}")):
        asymrnr_fx.load_exported(other)


def test_missing_corrupt_or_foreign_files_are_clear_errors(small_package, tmp_path):
    path, _ = small_package
    with pytest.raises(FileNotFoundError, match="no asymrnr package at"):
        asymrnr_fx.load_exported(tmp_path / "absent.pt2")
    truncated = tmp_path / "truncated.pt2"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ExportError, match="not a readable asymrnr package"):
        asymrnr_fx.load_exported(truncated)
    foreign = tmp_path / "foreign.pt2"
    from torch.export.pt2_archive._package import package_pt2

    package_pt2(str(foreign), extra_files={"note.txt": "not ours"})
    with pytest.raises(ExportError, match="has no asymrnr manifest"):
        asymrnr_fx.load_exported(foreign)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"num_steps": 0}, ValueError, "num_steps must be a positive int"),
        ({"path": "model.zip"}, ValueError, "must end in .pt2"),
        ({"example_inputs": [1, 2]}, TypeError, "example_inputs must be a dict"),
        ({"config": AsymRnRConfig(q_ratio=0.0, kv_ratio=0.0)}, ExportError, "nothing of asymrnr to export"),
    ],
)
def test_export_requests_that_cannot_work_are_clear_errors(tmp_path, kwargs, error, message):
    model = tiny_cogvideox(num_layers=1)
    request = {"config": AsymRnRConfig(q_ratio=0.5), "num_steps": 2, "path": tmp_path / "x.pt2",
               "example_inputs": {**cogvideox_inputs(), "timestep": torch.full((1,), 900.0)}}
    request.update(kwargs)
    with pytest.raises(error, match=message):
        asymrnr_fx.export(model, **request)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_package_equals_compiled_path(tmp_path):
    cfg = AsymRnRConfig(q_ratio=0.5, kv_ratio=0.3, cache=BlockCache(threshold=0.3))
    model = tiny_cogvideox(num_layers=3).cuda()
    example = {k: v.cuda() for k, v in cogvideox_inputs().items()}
    example = {**example, "timestep": torch.full((1,), 900.0, device="cuda"), "return_dict": False}
    calls = [{**example, "timestep": torch.full((1,), t, device="cuda")} for t in TIMESTEPS]
    reference = _compiled_generation(model, cfg, calls)
    loaded = asymrnr_fx.load_exported(asymrnr_fx.export(model, cfg, example, num_steps=3, path=tmp_path / "c.pt2"))
    assert loaded.device.type == "cuda"
    for got, want in zip([loaded(**kw)[0] for kw in calls], reference):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4)


def test_command_line_shows_a_package(fixture_package, capsys):
    from asymrnr_fx.__main__ import main

    main(["show", str(fixture_package[1])])
    shown = json.loads(capsys.readouterr().out)
    assert shown["num_steps"] == 6 and shown["programs"] and shown["versions"]["torch"] == torch.__version__
