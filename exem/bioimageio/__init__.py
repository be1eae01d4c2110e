"""bioimage.io model packages: EM segmenters in (``exem-segment model=<package>``), exem's translator out
(``exem-export formats=[bioimageio]``).

- :mod:`exem.bioimageio.package`: read a package (folder, ``rdf.yaml`` or ``.zip``; spec 0.4 / 0.5) into a
  :class:`~exem.bioimageio.package.PackageModel`.
- :mod:`exem.bioimageio.processing`: the package as a network of exem's engine (:class:`PackageNet`), with
  per-dataset preprocessing statistics, and the package's own test (:func:`reproduce_test`).
"""
