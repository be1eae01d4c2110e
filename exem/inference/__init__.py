"""Whole-volume inference: plan → block IO → engine → resumable output, and the tasks built on them.

``plan`` (blocks and patches, computed once), ``blockio`` (read ahead, write behind, done-markers), ``engine``
(a network over a plan), ``output`` (resumable outputs), ``job`` (the shared first half of every run);
``translate`` (ExM → virtual EM) and ``uncertainty`` (reliability maps) use them, as does
:mod:`exem.analysis.segment`. ``exem.inference.blend`` is light (torch only); the rest (Lightning, zarr) is
imported on first use of its names.
"""

from __future__ import annotations

from exem.inference.blend import BlendAccumulator, ZStreamBlender, gaussian_window
from exem.lazy import lazy_attributes

_LAZY = {
    "Block": "exem.inference.plan",
    "BlockPlan": "exem.inference.plan",
    "plan_blocks": "exem.inference.plan",
    "plan_volume": "exem.inference.plan",
    "BlockDataset": "exem.inference.blockio",
    "BlockDataModule": "exem.inference.blockio",
    "BlockWriter": "exem.inference.blockio",
    "BlockPredictor": "exem.inference.engine",
    "BlockwiseResult": "exem.inference.engine",
    "run_blockwise": "exem.inference.engine",
    "TranslateResult": "exem.inference.translate",
    "translate_volume": "exem.inference.translate",
    "weights_fingerprint": "exem.inference.translate",
    "reliability_map": "exem.inference.uncertainty",
}

__all__ = ["BlendAccumulator", "ZStreamBlender", "gaussian_window", *_LAZY]


__getattr__, __dir__ = lazy_attributes(
    __name__, _LAZY, ["BlendAccumulator", "ZStreamBlender", "gaussian_window"]
)
