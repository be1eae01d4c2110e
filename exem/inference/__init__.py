"""Whole-volume inference: Gaussian blending, the blockwise engine and ExM → virtual EM translation.

``exem.inference.blend`` is light (torch only); the engine and translation (Lightning, zarr) are imported on
first use of their names.
"""

from __future__ import annotations

import importlib
from typing import Any

from exem.inference.blend import BlendAccumulator, ZStreamBlender, gaussian_window

_LAZY = {
    "BlockPlan": "exem.inference.engine",
    "BlockPredictor": "exem.inference.engine",
    "BlockWriter": "exem.inference.engine",
    "BlockDataset": "exem.inference.engine",
    "BlockDataModule": "exem.inference.engine",
    "BlockwiseResult": "exem.inference.engine",
    "plan_blocks": "exem.inference.engine",
    "run_blockwise": "exem.inference.engine",
    "TranslateResult": "exem.inference.translate",
    "translate_volume": "exem.inference.translate",
    "weights_fingerprint": "exem.inference.translate",
}

__all__ = ["BlendAccumulator", "ZStreamBlender", "gaussian_window", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'exem.inference' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
