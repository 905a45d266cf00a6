"""asymrnr_fx: training-free acceleration of video diffusion transformers as a torch.compile
backend. `torch.compile(transformer, backend="asymrnr", options={...})`."""

from __future__ import annotations

from typing import Any

import torch

from .config import AsymRnRConfig, ConfigError
from .runtime import AsymRnRRuntime, runtime_of
from .schedule import Schedule, ScheduleError

__all__ = [
    "AsymRnRConfig",
    "AsymRnRRuntime",
    "ConfigError",
    "Schedule",
    "ScheduleError",
    "compile",
    "runtime_of",
]


def compile(model: torch.nn.Module, config: AsymRnRConfig | None = None, **compile_kwargs: Any) -> torch.nn.Module:
    """`torch.compile(model, backend="asymrnr")` with a validated config and static shapes.

    The returned module has `.asymrnr` (its runtime: reset(), set_step(), stats, ...).
    """
    config = config or AsymRnRConfig()
    runtime = AsymRnRRuntime(config)
    compile_kwargs.setdefault("dynamic", False)
    compiled = torch.compile(model, backend="asymrnr", options={"config": config, "runtime": runtime}, **compile_kwargs)
    compiled.asymrnr = runtime
    return compiled
