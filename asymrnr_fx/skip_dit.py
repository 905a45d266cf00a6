"""Skip-DiT conversion: long skip branches added in place to a supported video DiT.

For L blocks (numbered across the adapter's containers in execution order), block i of the
second half (i >= ceil(L / 2)) fuses, before it runs, its visual hidden state x (B, N, D) with the
visual hidden state that block L - 1 - i returned (the first element a block returns):

    x <- x + Linear_2D->D(LayerNorm_2D,fp32(cat(x, skip)))         (`SkipBranch`)

Deviation from the issue's formula `x <- Linear(LayerNorm(cat(x, skip)))`: that form cannot start
equal to the original model whatever the Linear holds, because the LayerNorm of the
concatenation already changes x (it re-centres and re-scales it jointly with the skip). The
residual form keeps the release's fused (norm, linear) branch and, with the Linear zero-initialised
(weight and bias), starts exactly equal to the original; training moves it away from identity.

Mechanism: the branches live on the model (`model.skip_branches`, a ModuleDict keyed by the target
block's number) and run from forward hooks on the blocks, so every block keeps its module path and
class (the backend classifies attention by `transformer_blocks.3.attn1` and by block class), and
Dynamo traces the hooks with no graph break. A source block's forward hook saves its output; the
target's forward pre-hook pops it, so the per-forward state holds at most L / 2 tensors and is
empty after each forward; a forward pre-hook on the model clears it, so a forward that raised
leaves nothing stale for the next. The pairs are recorded in the model's config (`skip_dit_skips`:
[[source, target], ...]), which `save` / `load` carry, and the backend recognises a converted model
by the `SkipBranch` modules in its traced graph (it then caches the deep feature: Skip-Cache).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import diffusers
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from .errors import ConfigError
from .models import ADAPTERS, ModelAdapter, UnsupportedModelError

CONFIG_KEY = "skip_dit_skips"
SUPPORTED = ("cogvideox", "hunyuan_video")  # families whose blocks take and return the visual state first
WEIGHTS = "diffusion_pytorch_model.safetensors"


class SkipBranch(nn.Module):
    """One long skip: (x, skip), both (B, N, D) -> x + Linear(LayerNorm_fp32(cat(x, skip))), (B, N, D).
    The norm runs in float32 whatever the model's dtype (as the release's); the Linear starts at
    zero, so a fresh branch is the identity on x."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(2 * dim, eps=eps)
        self.linear = nn.Linear(2 * dim, dim)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        h = torch.cat([x, skip], dim=-1).float()
        norm = self.norm
        h = F.layer_norm(h, norm.normalized_shape, norm.weight.float(), norm.bias.float(), norm.eps)
        return x + self.linear(h.to(self.linear.weight.dtype)).to(x.dtype)


class _Saved:
    """Per forward: source block -> its visual output, until its target block pops it."""

    def __init__(self) -> None:
        self.outputs: dict[int, torch.Tensor] = {}


def long_skip_pairs(num_blocks: int) -> list[tuple[int, int]]:
    """(source, target) for every target i >= ceil(L / 2): source L - 1 - i (the middle block of an
    odd L has no partner). L = 4: [(1, 2), (0, 3)]."""
    return [(num_blocks - 1 - i, i) for i in range((num_blocks + 1) // 2, num_blocks)]


def adapter_of(model: nn.Module) -> ModelAdapter:
    """The family adapter of `model`, if Skip-DiT conversion supports it."""
    found = next((a for a in ADAPTERS.values() if isinstance(model, a.model_class)), None)
    if found is None or found.family not in SUPPORTED:
        name = type(model).__name__ if found is None else f"{type(model).__name__} ({found.family})"
        raise UnsupportedModelError(
            f"Skip-DiT conversion does not support {name}. Supported families: {list(SUPPORTED)}."
        )
    return found


def blocks_of(model: nn.Module, adapter: ModelAdapter) -> list[nn.Module]:
    """The model's transformer blocks, numbered across the adapter's containers in execution order."""
    return [block for name, _ in adapter.block_containers for block in getattr(model, name)]


def skips_of(model: nn.Module) -> list[tuple[int, int]]:
    """The (source, target) long skips recorded in a converted model's config; [] if unconverted."""
    config = getattr(model, "config", None) or {}
    return [tuple(p) for p in config.get(CONFIG_KEY) or []]


def _hidden_width(model: nn.Module) -> int:
    return model.config.num_attention_heads * model.config.attention_head_dim


def _save_output(saved: _Saved, source: int, module: nn.Module, args: tuple, output: Any) -> None:
    saved.outputs[source] = output[0] if isinstance(output, (tuple, list)) else output


def _fuse_skip(saved: _Saved, branch: SkipBranch, source: int, module: nn.Module, args: tuple,
               kwargs: dict) -> tuple[tuple, dict]:
    """Replace the block's visual input (first positional argument or `hidden_states=`)."""
    skip = saved.outputs.pop(source)
    if args:
        return (branch(args[0], skip), *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": branch(kwargs["hidden_states"], skip)}


def _clear(saved: _Saved, module: nn.Module, args: tuple) -> None:
    saved.outputs.clear()


def _attach(model: nn.Module, blocks: list[nn.Module], pairs: list[tuple[int, int]]) -> None:
    saved = _Saved()
    model._skip_dit_saved = saved  # for inspection only: the hooks hold it
    model.register_forward_pre_hook(functools.partial(_clear, saved))
    for source, target in pairs:
        branch = model.skip_branches[str(target)]
        blocks[source].register_forward_hook(functools.partial(_save_output, saved, source))
        blocks[target].register_forward_pre_hook(functools.partial(_fuse_skip, saved, branch, source), with_kwargs=True)


def convert(model: nn.Module) -> nn.Module:
    """Add Skip-DiT long skips to `model` in place (zero-initialised: outputs unchanged) and
    return it. Raises UnsupportedModelError for an unsupported family, ConfigError if converted."""
    adapter = adapter_of(model)
    if skips_of(model) or hasattr(model, "skip_branches"):
        raise ConfigError(f"{type(model).__name__} already has Skip-DiT long skips ({skips_of(model)}); convert it once.")
    blocks = blocks_of(model, adapter)
    pairs = long_skip_pairs(len(blocks))
    if not pairs:
        raise ConfigError(f"{type(model).__name__} has {len(blocks)} block(s): a long skip needs >= 2.")
    param = next(model.parameters())
    model.skip_branches = nn.ModuleDict({str(t): SkipBranch(_hidden_width(model)) for _, t in pairs})
    model.skip_branches.to(device=param.device, dtype=param.dtype)
    model.register_to_config(**{CONFIG_KEY: [list(p) for p in pairs]})
    _attach(model, blocks, pairs)
    return model


def branch_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The skip branches' parameters (Skip-DiT's stage 1 trains only these)."""
    if not skips_of(model):
        raise ConfigError(f"{type(model).__name__} has no Skip-DiT long skips: call skip_dit.convert(model) first.")
    return list(model.skip_branches.parameters())


def save(model: nn.Module, path: str | Path, **kwargs: Any) -> None:
    """`model.save_pretrained(path)` (config.json recording the skips, safetensors weights with
    the branches); kwargs go to save_pretrained."""
    if not skips_of(model):
        raise ConfigError(f"{type(model).__name__} has no Skip-DiT long skips: save it with save_pretrained.")
    model.save_pretrained(path, safe_serialization=True, **kwargs)


def _load_weights(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a save_pretrained safetensors checkpoint, one file or sharded."""
    index = path / f"{WEIGHTS}.index.json"
    if not index.exists():
        return load_file(path / WEIGHTS)
    files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    return {k: v for f in files for k, v in load_file(path / f).items()}


def load(path: str | Path, torch_dtype: torch.dtype | None = None) -> nn.Module:
    """The converted model saved by `save` at `path`: built from its config, converted with the
    recorded skips, then every weight (branches included) loaded strictly. dtype: the
    checkpoint's (that of its first floating tensor) unless `torch_dtype` is given."""
    path = Path(path)
    config = json.loads((path / "config.json").read_text())
    if CONFIG_KEY not in config:
        raise ConfigError(f"{path} is not a Skip-DiT checkpoint (no {CONFIG_KEY!r} in its config.json): "
                          "use from_pretrained.")
    cls = getattr(diffusers, config["_class_name"])
    model = cls.from_config({k: v for k, v in config.items() if k != CONFIG_KEY})
    convert(model)
    if skips_of(model) != [tuple(p) for p in config[CONFIG_KEY]]:
        raise ConfigError(f"{path}: recorded skips {config[CONFIG_KEY]} differ from the conversion's {skips_of(model)}.")
    state = _load_weights(path)
    model.load_state_dict(state, strict=True)
    dtype = torch_dtype or next((v.dtype for v in state.values() if v.is_floating_point()), None)
    return model.to(dtype).eval() if dtype is not None else model.eval()


__all__ = ["SkipBranch", "branch_parameters", "convert", "load", "long_skip_pairs", "save", "skips_of"]
