"""asymrnr_fx: training-free acceleration of video diffusion transformers as a torch.compile
backend. `torch.compile(transformer, backend="asymrnr", options={...})`."""

from __future__ import annotations

from typing import Any

import torch

from . import pipeline_hook
from .cache import BlockCache, SkipCache
from .config import AsymRnRConfig, ConfigError, Reduction
from .errors import ExportError
from .exporter import export
from .models import prepare_model
from .package import ExportedTransformer, load_exported
from .runtime import AsymRnRRuntime, runtime_of
from .schedule import Schedule, ScheduleError

__all__ = [
    "AsymRnRConfig",
    "AsymRnRRuntime",
    "BlockCache",
    "ConfigError",
    "ExportError",
    "ExportedTransformer",
    "Reduction",
    "Schedule",
    "ScheduleError",
    "SkipCache",
    "compile",
    "export",
    "load_exported",
    "prepare",
    "runtime_of",
]


def prepare(model: torch.nn.Module) -> int:
    """Make `model` traceable as one static graph where its family needs it (Mochi's text
    selection by data becomes a masked attention of equal output); returns the number of modules
    changed (0 for every other family). `compile` and `export` call it; call it yourself before a
    plain `torch.compile(model, backend="asymrnr")`."""
    return prepare_model(model)


def compile(model: torch.nn.Module, config: AsymRnRConfig | None = None, **compile_kwargs: Any) -> torch.nn.Module:
    """`torch.compile(model, backend="asymrnr")` with a validated config and static shapes.

    The returned module has `.asymrnr` (its runtime: reset(), set_step(), stats, ...). A diffusers
    model also gets a hook through which the pipeline's `cache_context(...)` reaches the runtime.
    """
    config = config or AsymRnRConfig()
    prepare(model)
    runtime = AsymRnRRuntime(config)
    pipeline_hook.attach(model, runtime)
    compile_kwargs.setdefault("dynamic", False)
    compiled = torch.compile(model, backend="asymrnr", options={"config": config, "runtime": runtime}, **compile_kwargs)
    compiled.__dict__["asymrnr"] = runtime  # on the wrapper itself: OptimizedModule forwards setattr to the model
    return compiled
