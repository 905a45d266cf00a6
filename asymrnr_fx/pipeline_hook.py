"""Receive the diffusers pipeline's call contexts: `transformer.cache_context(name, step_index=...)`.

diffusers 0.42 pipelines name every transformer call ("cond", "uncond", "cond_uncond") and some
give the step index; the names reach each *stateful* `ModelHook` registered on the model through
the `StateManager`s it holds (diffusers/hooks/hooks.py). Our hook changes nothing in the forward
pass (Dynamo traces an identity), it only forwards the context to the runtime.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.hooks.hooks import BaseState, HookRegistry, ModelHook, StateManager

HOOK_NAME = "asymrnr_context"


class ContextReceiver(StateManager):
    """A StateManager whose only job is to pass each context on to the runtime."""

    def __init__(self, runtime: Any) -> None:
        super().__init__(BaseState)
        self.runtime = runtime

    def set_context(self, context: Any) -> None:
        super().set_context(context)
        self.runtime.set_pipeline_context(context)


class ContextHook(ModelHook):
    """Stateful, so that `cache_context` reaches it; `reset_stateful_hooks()` resets the runtime."""

    _is_stateful = True

    def __init__(self, runtime: Any) -> None:
        super().__init__()
        self.receiver = ContextReceiver(runtime)

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.receiver.runtime.reset()
        return module


def attach(model: torch.nn.Module, runtime: Any) -> bool:
    """Register the context hook on a diffusers model (before it is compiled); False if `model`
    is not a diffusers model. Re-attaching points the existing hook at `runtime`."""
    if not hasattr(model, "cache_context"):
        return False
    registry = HookRegistry.check_if_exists_or_initialize(model)
    existing = registry.get_hook(HOOK_NAME)
    if existing is not None:
        existing.receiver.runtime = runtime
    else:
        registry.register_hook(ContextHook(runtime), HOOK_NAME)
    return True
