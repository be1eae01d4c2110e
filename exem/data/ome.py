"""OME-Zarr reading and writing: the only place that knows the on-disk layout and the multiscale metadata.

exem writes OME-Zarr 0.5 on Zarr format 3 (``zarr.json``; the NGFF metadata under the ``"ome"`` attribute) by
default, and 0.4 on Zarr format 2 (``.zgroup``/``.zarray``/``.zattrs``) with ``ngff_version="0.4"``. The arrays are
created here and written by exem itself (blockwise, resumable); the NGFF metadata (``multiscales``, ``omero``,
``image-label``, ``labels``) is validated by ome-zarr-models (the OME-Zarr schemas as pydantic models) and written as
it dumps them: the attributes equal, key for key, what ome-zarr-py's writer puts there (tested), without importing
ome-zarr-py at run time (its package imports dask, xarray and pandas: 1.3 s before every run's first batch on 2
cores, against 0.15 s for ome-zarr-models). Every chunk is compressed with Blosc LZ4, level 5, byte shuffle (what
zarr-python writes by default for Zarr v2, kept for v3). Zarr v3 arrays may be sharded (``shards``: many chunks per
file). Reading (both versions, and any other writer's 0.4/0.5) is a dictionary lookup here, without either library.
"""

from __future__ import annotations

import copy
import importlib
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from exem.checks import one_of

log = logging.getLogger(__name__)

# The NGFF versions exem writes, and the Zarr format each lives on.
NGFF_VERSIONS = ("0.4", "0.5")
DEFAULT_NGFF_VERSION = "0.5"
ZARR_FORMATS = {"0.4": 2, "0.5": 3}
# The group attribute holding exem's record of an output it wrote (exem.inference.output; read back by
# exem.data.channels.recorded_ranges).
RECORD_ATTRIBUTE = "exem"
# The chunk compressor of every array written: Blosc LZ4 level 5 with byte shuffle (zarr-python's v2 default).
BLOSC = {"cname": "lz4", "clevel": 5}
# Output voxels per step of downsample_inplane: its int16 temporaries (1 MiB) stay in a core's L2 cache. 32×1024×1024
# uint8 on 2 cores: 32 → 20 ms (whole array at once: ~100 MB of temporaries through memory).
DOWNSAMPLE_STEP_VOXELS = 1 << 19
AXES = [
    {"name": "z", "type": "space", "unit": "nanometer"},
    {"name": "y", "type": "space", "unit": "nanometer"},
    {"name": "x", "type": "space", "unit": "nanometer"},
]
# Distinct RGBA colours for label images with few named labels (cycled); 0 = background is transparent.
LABEL_PALETTE = (
    (230, 25, 75, 255),
    (60, 180, 75, 255),
    (255, 225, 25, 255),
    (0, 130, 200, 255),
    (245, 130, 48, 255),
    (145, 30, 180, 255),
    (70, 240, 240, 255),
    (240, 50, 230, 255),
)
CHANNEL_AXIS = {"name": "c", "type": "channel"}
# OMERO display colours (RRGGBB) of the channels beside a virtual EM (grey): green, magenta, cyan, yellow, …
CHANNEL_COLORS = ("00FF00", "FF00FF", "00FFFF", "FFFF00", "FF8000", "0080FF")
SHARDS_NEED_V3 = "shards need Zarr v3: use ngff_version 0.5 (or shards null)"


def check_ngff_version(version: str | float) -> str:
    """``"0.4"`` or ``"0.5"`` (a YAML float such as ``0.5`` is accepted).

    Raises:
        ValueError: any other value (one line).
    """
    return one_of(str(version).strip(), NGFF_VERSIONS, "ngff_version")


def check_shards(shards: Sequence[int] | None, ngff_version: str | float) -> tuple[int, int, int] | None:
    """``shards`` as (z, y, x) positive voxels, or None (no sharding); sharding needs Zarr v3 (NGFF 0.5).

    Raises:
        ValueError: not three positive integers, or shards with NGFF 0.4 (one line).
    """
    if shards is None:
        return None
    if check_ngff_version(ngff_version) != "0.5":
        raise ValueError(SHARDS_NEED_V3)
    try:
        out = tuple(int(s) for s in shards)
    except (TypeError, ValueError):
        raise ValueError(f"shards must be 3 positive integers (z, y, x) or null, got {shards!r}") from None
    if len(out) != 3 or min(out) < 1:
        raise ValueError(f"shards must be 3 positive integers (z, y, x) or null, got {list(out)}")
    return out  # type: ignore[return-value]


# The chunk key encoding of each NGFF version's Zarr format (as ome-zarr-py's formats declare them).
CHUNK_KEY_ENCODINGS = {"0.4": {"name": "v2", "separator": "/"}, "0.5": {"name": "default", "separator": "/"}}


def _schema(version: str, module: str, name: str) -> Any:
    """The ome-zarr-models attributes model ``name`` of ``module`` (image, labels, image_label) for ``version``."""
    return getattr(importlib.import_module(f"ome_zarr_models.v0{version[-1]}.{module}"), name)


def _validated(
    version: str, current: Mapping[str, Any], meta: Mapping[str, Any], schema: Any
) -> dict[str, Any]:
    """NGFF attributes ``current`` with ``meta`` added (0.5: with its ``version``), validated as a whole by the
    ome-zarr-models ``schema`` and dumped as JSON.

    Raises:
        pydantic.ValidationError: the metadata break the OME-Zarr schema (a bug in exem, not in the user's input).
    """
    merged = {**current, **meta, **({"version": "0.5"} if version == "0.5" else {})}
    return schema.model_validate(merged).model_dump(mode="json", by_alias=True, exclude_none=True)


def _write_ngff(
    group: zarr.Group, version: str, ngff: Mapping[str, Any], others: Mapping[str, Any] | None = None
) -> None:
    """Write NGFF attributes (0.5: under ``"ome"``; 0.4: at the top) and ``others`` (exem's record) in one update."""
    more = dict(others or {})
    group.attrs.update({"ome": dict(ngff), **more} if version == "0.5" else {**ngff, **more})


def _put_ngff(group: zarr.Group, version: str, meta: Mapping[str, Any], schema: Any) -> None:
    """Add ``meta`` to the group's NGFF attributes, validated (:func:`_validated`) and written."""
    _write_ngff(group, version, _validated(version, ome_attributes(group), meta, schema))


def _compressor(zarr_format: int) -> Any:
    if zarr_format == 2:
        from numcodecs import Blosc

        return Blosc(shuffle=Blosc.SHUFFLE, **BLOSC)
    from zarr.codecs import BloscCodec

    return BloscCodec(shuffle="shuffle", **BLOSC)


def is_group(path: str | Path) -> bool:
    """Whether ``path`` is a local Zarr group, of format 2 (``.zgroup``) or 3 (``zarr.json`` of a group)."""
    p = Path(path)
    if (p / ".zgroup").is_file():
        return True
    try:
        meta = json.loads((p / "zarr.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("node_type") == "group"


def ngff_version_of(group: zarr.Group) -> str:
    """The NGFF version exem writes into an existing group: ``"0.5"`` on Zarr v3, ``"0.4"`` on Zarr v2."""
    return "0.5" if group.metadata.zarr_format == 3 else "0.4"


def create_group(path: str | Path, ngff_version: str | float = DEFAULT_NGFF_VERSION) -> zarr.Group:
    """A new, empty Zarr group at ``path`` (replacing one there) in the format of ``ngff_version``."""
    return zarr.open_group(str(path), mode="w", zarr_format=ZARR_FORMATS[check_ngff_version(ngff_version)])


def level_layout(
    shape: Sequence[int], factor: Sequence[int], chunks: Sequence[int], shards: Sequence[int] | None = None
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...] | None]:
    """(shape, chunks, shards) of the pyramid level downsampled by ``factor`` (z, y, x) from a level-0 ``shape``.

    The level's shape is ``shape / factor`` rounded up; its chunks are ``chunks`` capped by that shape; its shards
    cover the same region as the level-0 ``shards`` (``shards / factor``), rounded up to whole chunks of the level
    and capped by the level's shape rounded up to whole chunks (so shards are always whole chunks). Voxels.
    """
    lshape = tuple(_ceil_div(s, f) for s, f in zip(shape, factor, strict=True))
    lchunks = tuple(min(int(c), s) for c, s in zip(chunks, lshape, strict=True))
    if shards is None:
        return lshape, lchunks, None
    lshards = tuple(
        min(_ceil_div(_ceil_div(h, f), c) * c, _ceil_div(s, c) * c)
        for h, f, c, s in zip(shards, factor, lchunks, lshape, strict=True)
    )
    return lshape, lchunks, lshards


def _ceil_div(a: int, b: int) -> int:
    return -(-int(a) // int(b))


def datasets_metadata(
    voxel_size_nm: Sequence[float],
    factors: Sequence[Sequence[int]],
    origin_nm: Sequence[float] | None = None,
    channel_axis: bool = False,
) -> list[dict]:
    """The ``datasets`` of a multiscales entry: level i at path ``"i"``, scale = voxel size × ``factors[i]`` (nm),
    then, when ``origin_nm`` is given, a translation by it (nm: where the region lies in its input). With
    ``channel_axis`` the transforms lead with the channel axis (scale 1, translation 0)."""
    lead = [1.0] if channel_axis else []
    datasets = []
    for i, f in enumerate(factors):
        scale = lead + [float(v) * int(k) for v, k in zip(voxel_size_nm, f, strict=True)]
        transforms: list[dict] = [{"type": "scale", "scale": scale}]
        if origin_nm is not None:
            shift = [0.0] * len(lead) + [float(o) for o in origin_nm]
            transforms.append({"type": "translation", "translation": shift})
        datasets.append({"path": str(i), "coordinateTransformations": transforms})
    return datasets


def create_ome_zarr(
    path: str | Path,
    shape: Sequence[int],
    dtype: np.dtype | str,
    voxel_size_nm: Sequence[float],
    *,
    chunks: Sequence[int],
    factors: Sequence[Sequence[int]] = ((1, 1, 1),),
    name: str = "image",
    overwrite: bool = False,
    attributes: dict | None = None,
    ngff_version: str | float = DEFAULT_NGFF_VERSION,
    shards: Sequence[int] | None = None,
    origin_nm: Sequence[float] | None = None,
    channels: Sequence[Mapping[str, Any]] | None = None,
) -> zarr.Group:
    """Create an empty OME-Zarr image: one array per level (level i is ``shape / factors[i]``, rounded up).

    Args:
        path: the image folder (must not exist unless ``overwrite``).
        shape: level-0 (Z, Y, X) voxels; ``dtype``: of every level.
        voxel_size_nm: level-0 (z, y, x) nm.
        chunks: level-0 chunk (z, y, x) voxels (capped by each level's shape).
        factors: the cumulative downsampling factor (z, y, x) of each level relative to level 0.
        name: the multiscales name.
        overwrite: replace what is at ``path``.
        attributes: more group attributes (e.g. exem's record ``{"exem": {...}}``), beside the NGFF ones.
        ngff_version: ``"0.5"`` (Zarr v3) or ``"0.4"`` (Zarr v2).
        shards: level-0 shard (z, y, x) voxels (Zarr v3 only; see :func:`level_layout`); None: one file per chunk.
        origin_nm: (z, y, x) nm translation of the image (an ROI's place in its input); None: none.
        channels: a multi-channel image (axes c, z, y, x; one chunk and shard per channel, so channels are
            written independently): OMERO channel entries (``label``, ``color`` as RRGGBB, optional ``window``).

    Returns:
        the group; its arrays are ``group["0"]``, ``group["1"]``, …

    Raises:
        ValueError: unknown ``ngff_version``, bad ``shards`` or shards with 0.4 (one line).
    """
    version = check_ngff_version(ngff_version)
    shards = check_shards(shards, version)
    zarr_format = ZARR_FORMATS[version]
    axes = ([CHANNEL_AXIS] if channels else []) + copy.deepcopy(AXES)
    multiscale: dict[str, Any] = {
        "datasets": datasets_metadata(voxel_size_nm, factors, origin_nm, channel_axis=bool(channels)),
        "name": name,
        "axes": axes,
        **({"version": version} if version == "0.4" else {}),
    }
    meta: dict[str, Any] = {"multiscales": [multiscale]}
    if channels:
        meta["omero"] = {"channels": [dict(c) for c in channels]}
    # validated before anything is on disk; then the group, its arrays, and one attribute write with the record, so
    # a run killed in between leaves no group with data arrays but no record for long (a rerun refuses those)
    ngff = _validated(version, {}, meta, _schema(version, "image", "ImageAttrs"))
    group = zarr.open_group(str(path), mode="w" if overwrite else "w-", zarr_format=zarr_format)
    extra: dict[str, Any] = {"dimension_names": [a["name"] for a in axes]} if zarr_format == 3 else {}
    lead = (len(channels),) if channels else ()
    one = (1,) if channels else ()
    for i, f in enumerate(factors):
        lshape, lchunks, lshards = level_layout(shape, f, chunks, shards)
        group.create_array(
            str(i),
            shape=lead + lshape,
            chunks=one + lchunks,
            shards=None if lshards is None else one + lshards,
            dtype=dtype,
            fill_value=0,
            compressors=_compressor(zarr_format),
            chunk_key_encoding=CHUNK_KEY_ENCODINGS[version],
            **extra,
        )
    _write_ngff(group, version, ngff, attributes)
    return group


def label_colors(label_names: Mapping[int, str]) -> tuple[list[dict], list[dict]]:
    """NGFF ``colors`` and ``properties`` of a few named labels: 0 transparent, the others from
    :data:`LABEL_PALETTE` in increasing order; each label's property ``name``."""
    colors, properties = [], []
    values = sorted(int(k) for k in label_names)
    for value in values:
        i = values.index(value) - (0 in values)  # the first non-zero label takes the palette's first colour
        rgba = (0, 0, 0, 0) if value == 0 else LABEL_PALETTE[i % len(LABEL_PALETTE)]
        colors.append({"label-value": value, "rgba": list(rgba)})
        properties.append({"label-value": value, "name": str(label_names[value])})
    return colors, properties


def write_image_label(
    group: zarr.Group,
    *,
    parent: zarr.Group | None = None,
    source_image: str | None = None,
    label_names: Mapping[int, str] | None = None,
) -> None:
    """Make the OME-Zarr image ``group`` an NGFF label image (``image-label`` metadata, validated by ome-zarr-models).

    Args:
        group: an image made by :func:`create_ome_zarr` (integer labels, nearest-neighbour levels).
        parent: the group holding it as a direct child: its ``labels`` list names it (once), so readers that open
            ``parent`` find the labels (appended last, as ome-zarr-py's writer does). None: a stand-alone label image.
        source_image: path of the image it labels, relative to ``group`` (e.g. ``"../probabilities"``).
        label_names: a few known label values → names: they get ``colors`` (:func:`label_colors`) and
            ``properties``. None (instance ids: millions, unknown in advance): no colours, so that viewers use
            their own cycling colour maps (napari shows only the listed values of a partial list).
    """
    version = ngff_version_of(group)
    colors, properties = label_colors(label_names) if label_names else (None, None)
    meta: dict[str, Any] = {"source": {"image": source_image}} if source_image is not None else {}
    if colors:
        meta.update(colors=colors, properties=properties)
    if parent is not None:
        name = group.basename or Path(group.store.root).name  # a group opened at its own folder has no path
        if name not in parent:
            raise ValueError(f"write_image_label: {name!r} is not a member of the parent group")
        listed = [n for n in ome_attributes(parent).get("labels", []) if n != name]
        _put_ngff(parent, version, {"labels": [*listed, name]}, _schema(version, "labels", "LabelsAttrs"))
    meta["version"] = version
    _put_ngff(group, version, {"image-label": meta}, _schema(version, "image_label", "ImageLabelAttrs"))


def write_ome_zarr(
    path: str | Path,
    array: np.ndarray,
    voxel_size_nm: Sequence[float],
    *,
    chunks: Sequence[int] = (32, 128, 128),
    levels: int = 2,
    name: str = "image",
    overwrite: bool = False,
    attributes: dict | None = None,
    labels: bool = False,
    label_names: Mapping[int, str] | None = None,
    ngff_version: str | float = DEFAULT_NGFF_VERSION,
    channel_names: Sequence[str] | None = None,
) -> Path:
    """Write a whole in-memory ``(Z, Y, X)`` array as an OME-Zarr pyramid (``ngff_version`` 0.5 or 0.4); with
    ``channel_names`` a ``(C, Z, Y, X)`` array as a multi-channel image (axes c, z, y, x; OMERO labels, colours).

    Levels beyond the first halve Y and X only (ExM/EM volumes are anisotropic: Z is already coarse): images by
    2x2 mean, label volumes (``labels=True``) by nearest subsampling so that ids are never averaged; a label
    volume is an NGFF label image (:func:`write_image_label`; ``label_names`` give a few labels colours).
    """
    if array.ndim != (3 if channel_names is None else 4) or (
        channel_names and len(channel_names) != len(array)
    ):
        raise ValueError(f"write_ome_zarr: array of shape {array.shape} for channels {channel_names}")
    factors = [(1, 2**i, 2**i) for i in range(levels)]
    channels = None
    if channel_names is not None:
        channels = [
            {
                "label": str(n),
                "color": ("FFFFFF", *CHANNEL_COLORS)[i % (1 + len(CHANNEL_COLORS))],
                "active": True,
            }
            for i, n in enumerate(channel_names)
        ]
    group = create_ome_zarr(
        path,
        array.shape[-3:],
        array.dtype,
        voxel_size_nm,
        chunks=chunks,
        factors=factors,
        name=name,
        overwrite=overwrite,
        attributes=attributes,
        ngff_version=ngff_version,
        channels=channels,
    )
    if labels:
        write_image_label(group, label_names=label_names)
    level = array
    for i in range(levels):
        group[str(i)][...] = level
        if labels:
            level = level[..., ::2, ::2]
        else:
            level = (
                downsample_inplane(level)
                if level.ndim == 3
                else np.stack([downsample_inplane(c) for c in level])
            )
    log.debug("wrote %s %s %s", path, array.shape, array.dtype)
    return Path(path)


def downsample_inplane(array: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """2× mean downsampling in Y and X of a ``(Z, Y, X)`` array (odd edges padded by edge replication).

    Integers: the mean of each 2×2 square rounded half to even (``np.round``), computed exactly in integers (the
    sum in a wider type, then quotient and remainder by 4); floats: ``(a + b + c + d) · 0.25`` in the array's
    precision (float64 for float16 input). Output dtype = input dtype; ``(Z, ⌈Y/2⌉, ⌈X/2⌉)``. A few Z slices at a
    time (:data:`DOWNSAMPLE_STEP_VOXELS`), so that the wide temporaries stay in a core's cache. ``out``: an array of
    that shape and dtype to write into (e.g. one channel of a multi-channel level); else a new one.
    """
    z, y, x = array.shape
    if y % 2 or x % 2:
        array = np.pad(array, ((0, 0), (0, y % 2), (0, x % 2)), mode="edge")
    if out is None:
        out = np.empty((z, array.shape[1] // 2, array.shape[2] // 2), dtype=array.dtype)
    step = max(1, DOWNSAMPLE_STEP_VOXELS // max(1, out.shape[1] * out.shape[2]))
    for z0 in range(0, z, step):
        out[z0 : z0 + step] = _mean_2x2(array[z0 : z0 + step])
    return out


def _mean_2x2(array: np.ndarray) -> np.ndarray:
    """:func:`downsample_inplane` of an array with even Y and X."""
    corners = (array[:, 0::2, 0::2], array[:, 0::2, 1::2], array[:, 1::2, 0::2], array[:, 1::2, 1::2])
    if np.issubdtype(array.dtype, np.integer):
        wide = {1: np.int16, 2: np.int32}.get(array.dtype.itemsize, np.int64)
        total = corners[0].astype(wide)
        for c in corners[1:]:
            total += c
        # round half to even of total / 4: with total = 4q + r, (total + 1 + (q & 1)) >> 2 is q for r < 2, q + 1 for
        # r = 3, and for r = 2 the even one of q, q + 1 (floor shifts: also right for negative totals)
        odd = total >> 2
        odd &= 1
        total += odd
        total += 1
        total >>= 2
        return total.astype(array.dtype)
    work = np.float64 if array.dtype == np.float64 or array.dtype.itemsize < 4 else array.dtype
    total = corners[0].astype(work)
    for c in corners[1:]:
        total += c
    total *= 0.25
    return total.astype(array.dtype)


def ome_attributes(group: zarr.Group) -> dict:
    """The NGFF attributes of a group: ``attributes["ome"]`` (0.5, Zarr v3), else the attributes (0.4)."""
    attrs = dict(group.attrs)
    ome = attrs.get("ome")
    return dict(ome) if isinstance(ome, dict) else attrs


def read_multiscales(group: zarr.Group) -> dict | None:
    """The first ``multiscales`` entry of an OME-Zarr group (NGFF 0.4 or 0.5), or None if it is not OME-Zarr."""
    ms = ome_attributes(group).get("multiscales")
    if not ms:
        return None
    return ms[0]


def level_scale(multiscales: dict, level: int) -> tuple[str, tuple[float, ...] | None]:
    """(array path, voxel size of the spatial axes in the stored units) of one multiscale level."""
    datasets = multiscales["datasets"]
    if not 0 <= level < len(datasets):
        raise ValueError(f"OME-Zarr has {len(datasets)} level(s); level {level} does not exist")
    ds = datasets[level]
    scale = None
    for t in ds.get("coordinateTransformations", []):
        if t.get("type") == "scale":
            scale = tuple(float(v) for v in t["scale"])
    if scale is not None:
        scale = scale[-3:]
    return ds["path"], scale
