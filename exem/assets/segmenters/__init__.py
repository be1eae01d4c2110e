"""TorchScript EM segmenters + sidecars made by ``exem-train-segmenter`` (see ``exem.analysis.segmenter``)."""
