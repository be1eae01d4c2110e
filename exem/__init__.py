"""exem: expansion microscopy (ExM) to virtual electron microscopy (EM) with a 3D CycleGAN.

Public API (imported lazily, so ``import exem`` stays fast)::

    exem.AnisotropicUNet3D, exem.MultiScaleDiscriminator3D   # models
    exem.ExEMModule, exem.ExEMDataModule                      # Lightning module and data
    exem.open_volume, exem.PatchGrid                          # volumes and the patch grid
    exem.load_generator, exem.export_generator                # generators from checkpoints / exports / .pth
    exem.TrainedGenerator                                     # a generator with the facts of its training
    exem.translate_volume, exem.reliability_map               # whole-volume ExM → virtual EM (+ where to trust it)
    exem.segment_volume, exem.load_segmenter                  # EM-trained segmenters on (virtual) EM
    exem.compose_config, exem.train                           # the exem-train job from Python
"""

from __future__ import annotations

from exem.lazy import lazy_attributes

__version__ = "0.1.0"

_LAZY = {
    "AnisotropicUNet3D": "exem.models",
    "MultiScaleDiscriminator3D": "exem.models",
    "ExEMModule": "exem.module",
    "ExEMDataModule": "exem.data",
    "open_volume": "exem.data",
    "PatchGrid": "exem.data",
    "train": "exem.train",
    "compose_config": "exem.config",
    "translate_volume": "exem.inference",
    "reliability_map": "exem.inference",
    "segment_volume": "exem.analysis.segment",
    "load_segmenter": "exem.analysis.segment",
    "load_generator": "exem.checkpoints",
    "export_generator": "exem.export",
    "TrainedGenerator": "exem.trained",
}

__all__ = [*_LAZY, "__version__"]


__getattr__, __dir__ = lazy_attributes(__name__, _LAZY, ["__version__"])
