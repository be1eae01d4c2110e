"""exem in napari (an npe2 plugin; ``pip install exem[napari]``).

- :mod:`exem.napari.reader`: opens exem outputs (virtual EM, reliability maps, segmentation folders) as layers
  with their voxel size in nm and all their pyramid levels; other paths are left to other readers.
- :mod:`exem.napari.widgets`: the dock widgets "Translate ExM", "Segment with an EM model" and "Content groups
  preview", thin over :func:`exem.translate_volume`, :func:`exem.reliability_map` and :func:`exem.segment_volume`.
- :mod:`exem.napari.tasks`: what the widgets run in a worker thread (no Qt), with block progress.
- :mod:`exem.napari.layers`: a napari layer as an exem input; the one check that a layer is a 3D volume.
- :mod:`exem.napari.groups`: the content-loss intensity groups of an ExM volume as labels.

The manifest is ``napari.yaml`` next to this file (entry point ``napari.manifest``). Importing this package
imports neither napari nor Qt.
"""

from __future__ import annotations
