"""Receive the diffusers pipeline's call contexts: `transformer.cache_context(name, step_index=...)`.

diffusers 0.42 pipelines name every transformer call ("cond", "uncond", "cond_uncond") and some
give the step index; the names reach each *stateful* `ModelHook` registered on the model through
the `StateManager`s it holds (diffusers/hooks/hooks.py). Our hook changes nothing in the forward
pass (Dynamo traces an identity), it only forwards the context to the runtime.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from diffusers.hooks.hooks import BaseState, HookRegistry, ModelHook, StateManager

HOOK_NAME = "asymrnr_context"


class ContextReceiver(StateManager):
    """A StateManager whose only job is to pass each context on to the runtimes of every model
    compiled from this module (held weakly: a dropped compiled model is forgotten)."""

    def __init__(self) -> None:
        super().__init__(BaseState)
        self.runtimes: weakref.WeakSet = weakref.WeakSet()

    def set_context(self, context: Any) -> None:
        super().set_context(context)
        for runtime in list(self.runtimes):
            runtime.set_pipeline_context(context)


class ContextHook(ModelHook):
    """Stateful, so that `cache_context` reaches it; `reset_stateful_hooks()` resets the runtimes."""

    _is_stateful = True

    def __init__(self) -> None:
        super().__init__()
        self.receiver = ContextReceiver()

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        for runtime in list(self.receiver.runtimes):
            runtime.reset()
        return module


def attach(model: torch.nn.Module, runtime: Any) -> bool:
    """Register the context hook on a diffusers model (before it is compiled) and add `runtime`
    to the ones it informs; False if `model` is not a diffusers model."""
    if not hasattr(model, "cache_context"):
        return False
    registry = HookRegistry.check_if_exists_or_initialize(model)
    hook = registry.get_hook(HOOK_NAME)
    if hook is None:
        hook = ContextHook()
        registry.register_hook(hook, HOOK_NAME)
    hook.receiver.runtimes.add(runtime)
    return True
