"""Inductor compile cost of a whole generation under a changing schedule.

    python -m bench.compile_cost [--layers 30] [--steps 50]

A tiny CogVideoX with the published block count runs a 50-step generation under the published
CogVideoX-2B base schedule (ratios differ across blocks and cache windows). Reported: the dense
baseline's single Inductor compile (the same compile_fx call on the unmodified graph) beside
the total Inductor compile time and count of the asymrnr generation, and Dynamo recompiles.
"""

from __future__ import annotations

import argparse
import time
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--steps", type=int, default=50)
    args = p.parse_args()
    schedule = Schedule.from_published(
        REFERENCE / "euclidean_cogvideox-2b_cache5.safetensors", REFERENCE / "cogvideox-2b_cache5_0.yaml"
    )
    rows = measure(args.layers, args.steps, schedule)
    headers = ["run", "Inductor compiles", "compile s", "x dense compile", "wall s (incl. compile)", "notes"]
    print(f"tiny CogVideoX, {args.layers} blocks, grid (4, 8, 8), {torch.get_num_threads()} threads; target <= 2x")
    print(tabulate(rows, headers=headers, floatfmt=".3g", tablefmt="github"))


if __name__ == "__main__":
    main()
