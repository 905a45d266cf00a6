"""Per-family model knowledge, as data: which attention is self-attention over video, where
text tokens sit, how the latent grid follows from the inputs. Adapters are keyed by the
transformer-block classes that appear in the traced graph (never by name prefixes)."""

from __future__ import annotations

from . import (  # noqa: F401  (registers the adapters)
    allegro,
    cogvideox,
    hunyuan_dit,
    hunyuan_video,
    hunyuan_video15,
    latte,
    ltx_video,
    mochi,
    skyreels_v2,
    wan,
)
from .adapter import ADAPTERS, ModelAdapter, UnsupportedModelError, adapter_for_classes, prepare_model

__all__ = ["ADAPTERS", "ModelAdapter", "UnsupportedModelError", "adapter_for_classes", "prepare_model"]
