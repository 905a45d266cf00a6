"""Inductor compile cost of a whole generation under a changing schedule.

    python -m bench.compile_cost [--layers 30] [--steps 50]
    python -m bench.compile_cost --warm-start [--workloads fixture,cogvideox-2b] [--steps 50]

A tiny CogVideoX with the published block count runs a 50-step generation under the published
CogVideoX-2B base schedule (ratios differ across blocks and cache windows). Reported: the dense
baseline's single Inductor compile (the same compile_fx call on the unmodified graph) beside
the total Inductor compile time and count of the asymrnr generation, and Dynamo recompiles.

--warm-start: what a restarted process pays. Per workload (the trained fixture; the tiny
CogVideoX above; `cogvideox-2b-scaled`, the bench's scaled CogVideoX-2B shape) and method (dense Inductor; asymrnr under the published base schedule), one
process fills an empty Inductor cache directory and a second process, started afresh on the same
directory, is measured: seconds from process start to the first denoising step done, Inductor
compile seconds of the whole first generation, and the FX graph / AOTAutograd cache hits,
misses and bypasses from torch._dynamo.utils.counters.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import CogVideoXTransformer3DModel
from tabulate import tabulate

import asymrnr_fx
from asymrnr_fx import AsymRnRConfig, Schedule

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "asymrnr-official"


def tiny(layers: int) -> CogVideoXTransformer3DModel:
    torch.manual_seed(0)
    return CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=4, time_embed_dim=64,
        text_embed_dim=32, num_layers=layers, sample_width=16, sample_height=16, sample_frames=9,
        patch_size=2, max_text_seq_length=8, use_rotary_positional_embeddings=True,
    ).eval()


def generation(model, steps: int) -> float:
    """Run `steps` calls with a decreasing timestep; returns wall seconds."""
    g = torch.Generator().manual_seed(0)
    x, e = torch.randn(1, 4, 4, 16, 16, generator=g), torch.randn(1, 8, 32, generator=g)
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(steps):
            model(hidden_states=x, encoder_hidden_states=e, timestep=torch.tensor([999.0 - 19 * i]), return_dict=False)
    return time.perf_counter() - start


def measure(layers: int, steps: int, schedule: Schedule) -> list[list]:
    model = tiny(layers)
    dense = asymrnr_fx.compile(model, AsymRnRConfig(q_ratio=0.0, kv_ratio=0.0))
    wall_dense = generation(dense, 1)
    rt_dense = dense.asymrnr
    torch._dynamo.reset()
    fast = asymrnr_fx.compile(model, AsymRnRConfig(schedule=schedule, matching_every=5))
    frames_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    wall_fast = generation(fast, steps)
    rt = fast.asymrnr
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"] - frames_before
    pairs = sorted({v for d in rt.used_lengths.values() for v in d.values()})
    return [
        ["dense (one compile_fx of the full graph)", rt_dense.stats["compiles"], rt_dense.compile_seconds, 1.0, wall_dense, "-"],
        [f"asymrnr, {schedule.name}, {steps} steps", rt.stats["compiles"], rt.compile_seconds,
         rt.compile_seconds / rt_dense.compile_seconds, wall_fast, f"{graphs} Dynamo graph(s); {len(pairs)} (Lq, Lkv) pairs"],
    ]


WARM_WORKLOADS = ("fixture", "cogvideox-2b", "cogvideox-2b-scaled")
WARM_METHODS = ("dense", "asymrnr")


def _warm_model(workload: str, layers: int, steps: int) -> tuple[torch.nn.Module, Callable, Schedule, int]:
    """(eager transformer, run(call, on_step) for one generation, base schedule, matching_every)."""
    if workload == "fixture":
        from asymrnr_fx.models import fixture

        from .workloads import COGVIDEOX_2B, published_schedules

        fixture_model = fixture.load()
        schedule, every = published_schedules(COGVIDEOX_2B, (fixture_model.transformer.config.num_layers,), steps)["base"]

        def run_fixture(call, on_step: Callable[[int], None]) -> None:
            fixture_model.sample(fixture.PROMPTS[0], steps=steps, seed=0, transformer=call,
                                 callback=lambda i, t: on_step(i))

        return fixture_model.transformer, run_fixture, schedule, every
    if workload == "cogvideox-2b-scaled":
        return _scaled_model(steps)
    schedule = Schedule.from_published(
        REFERENCE / "euclidean_cogvideox-2b_cache5.safetensors", REFERENCE / "cogvideox-2b_cache5_0.yaml"
    )
    g = torch.Generator().manual_seed(0)
    x, e = torch.randn(1, 4, 4, 16, 16, generator=g), torch.randn(1, 8, 32, generator=g)

    def run_tiny(call, on_step: Callable[[int], None]) -> None:
        with torch.no_grad():
            for i in range(steps):
                on_step(i)
                call(hidden_states=x, encoder_hidden_states=e, timestep=torch.tensor([999.0 - 19 * i]), return_dict=False)

    return tiny(layers), run_tiny, schedule, 5


def _scaled_model(steps: int) -> tuple[torch.nn.Module, Callable, Schedule, int]:
    """The bench's scaled CogVideoX-2B shape (30 blocks x 2 heads x 64, 1170 visual tokens)."""
    from .workloads import BUILDERS, SCALED, denoise, published_schedules

    spec = SCALED["cogvideox-2b"]
    torch.manual_seed(0)
    model, inputs = BUILDERS[spec.family](spec, (30,))
    schedule, every = published_schedules(spec.published, (30,), steps)["base"]

    def run_scaled(call, on_step: Callable[[int], None]) -> None:
        with torch.no_grad():
            denoise(call, inputs, steps, on_step)

    return model.eval(), run_scaled, schedule, every


def _warm_child(workload: str, method: str, layers: int, steps: int, t0: float) -> dict:
    """One process's generation: start -> first step done, compile seconds, cache counters."""
    from torch._inductor.compile_fx import compile_fx

    from asymrnr_fx import inductor_cache

    model, run_generation, schedule, every = _warm_model(workload, layers, steps)
    seconds = {"compile": 0.0}
    if method == "dense":
        def timed_inductor(gm, example_inputs):  # what backend="inductor" calls, timed
            start = time.perf_counter()
            fn = compile_fx(gm, example_inputs)
            seconds["compile"] += time.perf_counter() - start
            return fn

        call = torch.compile(model, backend=timed_inductor, dynamic=False)
    else:
        call = asymrnr_fx.compile(model, AsymRnRConfig(schedule=schedule, matching_every=every))
    marks: list[float] = []  # wall clock at each step's start (the callback runs before the call)
    run_generation(call, lambda i: marks.append(time.time()))
    end = time.time()
    first_done = marks[1] if len(marks) > 1 else end
    compile_s = seconds["compile"] if method == "dense" else call.asymrnr.compile_seconds
    return {"start_to_first_step_s": first_done - t0, "compile_s": compile_s, "generation_s": end - marks[0],
            **inductor_cache.counts()}


def _spawn(workload: str, method: str, args: argparse.Namespace, cache_dir: str) -> dict:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache_dir, "TORCHINDUCTOR_FORCE_DISABLE_CACHES": "0"}
    cmd = [sys.executable, "-m", "bench.compile_cost", "--warm-child", workload, method,
           "--layers", str(args.layers), "--steps", str(args.steps), "--t0", repr(time.time())]
    done = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    if done.returncode != 0:
        raise RuntimeError(f"{workload}/{method} child failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_warm_start(args: argparse.Namespace) -> list[list]:
    """Rows: per workload and method, the cold process that fills the cache, then the warm one."""
    rows = []
    for workload in args.workloads.split(","):
        warm_dense = None
        for method in WARM_METHODS:
            with tempfile.TemporaryDirectory(prefix="asymrnr-warm-") as cache_dir:
                for run_name in ("cold", "warm"):
                    r = _spawn(workload, method, args, cache_dir)
                    if run_name == "warm" and method == "dense":
                        warm_dense = r["start_to_first_step_s"]
                    ratio = r["start_to_first_step_s"] / warm_dense if run_name == "warm" and warm_dense else None
                    rows.append([workload, method, run_name, r["start_to_first_step_s"], ratio, r["compile_s"],
                                 r["generation_s"], f"{r['fxgraph_hit']}/{r['fxgraph_miss']}/{r['fxgraph_bypass']}",
                                 f"{r['aot_hit']}/{r['aot_miss']}/{r['aot_bypass']}"])
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--warm-start", action="store_true", help="second-process warm-up vs dense Inductor")
    p.add_argument("--workloads", default=",".join(WARM_WORKLOADS), help=f"for --warm-start: of {WARM_WORKLOADS}")
    p.add_argument("--warm-child", nargs=2, metavar=("WORKLOAD", "METHOD"), help=argparse.SUPPRESS)
    p.add_argument("--t0", type=float, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.warm_child:
        print(json.dumps(_warm_child(*args.warm_child, args.layers, args.steps, args.t0)))
        return
    if args.warm_start:
        rows = measure_warm_start(args)
        headers = ["workload", "method", "process", "start -> step 1 done s", "x dense warm", "compile s",
                   "generation s", "FX graph hit/miss/bypass", "AOTAutograd hit/miss/bypass"]
        print(f"warm start: {args.steps} steps, tiny CogVideoX {args.layers} blocks, {torch.get_num_threads()} threads;"
              " target <= 1.5x dense warm")
        print(tabulate(rows, headers=headers, floatfmt=".3g", tablefmt="github"))
        return
    schedule = Schedule.from_published(
        REFERENCE / "euclidean_cogvideox-2b_cache5.safetensors", REFERENCE / "cogvideox-2b_cache5_0.yaml"
    )
    rows = measure(args.layers, args.steps, schedule)
    headers = ["run", "Inductor compiles", "compile s", "x dense compile", "wall s (incl. compile)", "notes"]
    print(f"tiny CogVideoX, {args.layers} blocks, grid (4, 8, 8), {torch.get_num_threads()} threads; target <= 2x")
    print(tabulate(rows, headers=headers, floatfmt=".3g", tablefmt="github"))


if __name__ == "__main__":
    main()
