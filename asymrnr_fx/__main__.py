"""Command line: export a package, or show what one serves.

    python -m asymrnr_fx export --model fixture --steps 50 --out fixture.pt2 --options '{"q_ratio": 0.5}'
    python -m asymrnr_fx export --model path/to/transformer --inputs call.pt --steps 50 --out cog.pt2
    python -m asymrnr_fx show cog.pt2

`--model`: "fixture", "fixture-deep" or a diffusers transformer folder (`save_pretrained`);
`--inputs`: a `torch.save`d dict of the transformer's keyword arguments for one call (e.g. from
`asymrnr_fx.exporter.capture_call(pipe, ...)`); the fixtures supply their own. `--options`: the
backend's options as JSON (the same keys as `torch.compile(..., options=...)`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from . import exporter, package
from .config import AsymRnRConfig


def _model_and_inputs(name: str, inputs: str | None) -> tuple[torch.nn.Module, dict]:
    if name in ("fixture", "fixture-deep"):
        from .models import fixture

        fx_model = fixture.load(path=fixture.DEEP_WEIGHTS if name == "fixture-deep" else fixture.WEIGHTS)
        return fx_model.transformer, fx_model.first_call()
    if inputs is None:
        raise SystemExit("--inputs is required with a model folder: a torch.save'd dict of one call's keyword arguments.")
    from diffusers import AutoModel

    model = AutoModel.from_pretrained(name, low_cpu_mem_usage=False).eval()
    return model, torch.load(inputs, weights_only=True)


def _export(args: argparse.Namespace) -> None:
    model, example = _model_and_inputs(args.model, args.inputs)
    config = AsymRnRConfig.from_options(json.loads(args.options))
    path = exporter.export(model, config, example, args.steps, args.out, progress=lambda s: print(s, flush=True))
    found = package.read_manifest(path)
    print(f"{path}: {path.stat().st_size / 2**20:.1f} MiB, {len(found['programs'])} programs, "
          f"exported in {found['export_seconds']} s")


def _show(args: argparse.Namespace) -> None:
    print(json.dumps(package.read_manifest(args.package), indent=1))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m asymrnr_fx", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    ex = commands.add_parser("export", help="write an AOTInductor package")
    ex.add_argument("--model", required=True)
    ex.add_argument("--inputs")
    ex.add_argument("--steps", type=int, default=50)
    ex.add_argument("--out", type=Path, required=True)
    ex.add_argument("--options", default="{}", help="backend options as JSON")
    ex.set_defaults(run=_export)
    show = commands.add_parser("show", help="print a package's manifest")
    show.add_argument("package", type=Path)
    show.set_defaults(run=_show)
    args = parser.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main(sys.argv[1:])
