"""Gaussian blending of overlapping patch predictions.

Each output voxel is ``Σ_p w_p · net(patch p) / Σ_p w_p`` over the patches ``p`` that cover it, with ``w`` the
Gaussian bump of :func:`gaussian_window` placed at each patch. :class:`BlendAccumulator` keeps the two sums for
one box (an output block) on the device; patches may stick out of the box (only their intersection counts).
:class:`ZStreamBlender` gives the same values while holding the sums of at most one patch depth of Z slices:
patches arrive in the global grid's order (Z outermost), so every Z slice above the current patch row is final
and is handed back as soon as the row changes. :class:`WindowSums` gives the denominators ``Σ_p w_p`` of a box at once,
bit for bit as patch-by-patch accumulation gives them, from the few distinct per-axis lists of patches over a voxel.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["BlendAccumulator", "WindowCache", "WindowSums", "ZStreamBlender", "gaussian_window", "halo_gap"]


def gaussian_window(
    patch: Sequence[int],
    sigma: float = 0.5,
    floor: float = 1e-4,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """The published ExEM blending bump ``exp(−(z² + y² + x²) / (2σ²))`` on ``[−1, 1]³``, clamped to ≥ ``floor``.

    Per axis the coordinates are ``linspace(−1, 1, n)`` (``[0.0]`` for an axis of size 1, e.g. 2D-as-3D
    patches). It is computed in float64 on the CPU and then cast, so every device gets the same values.

    Args:
        patch: patch shape (Z, Y, X) in voxels, each ≥ 1.
        sigma: width of the bump in units of the half patch (published: 0.5), > 0.
        floor: lower bound of the weights (> 0), so that every voxel of a patch has a positive weight.
        device, dtype: of the returned tensor.

    Returns:
        ``(Z, Y, X)`` tensor of weights in ``[floor, 1]``; 1 at the centre of odd-sized patches.
    """
    sizes = tuple(int(n) for n in patch)
    if len(sizes) != 3 or min(sizes) < 1:
        raise ValueError(f"gaussian_window: patch must be 3 positive sizes (z, y, x), got {list(patch)}")
    if not sigma > 0:
        raise ValueError(f"gaussian_window: sigma must be > 0, got {sigma}")
    if not floor > 0:
        raise ValueError(f"gaussian_window: floor must be > 0, got {floor}")
    axes = [
        torch.linspace(-1.0, 1.0, n, dtype=torch.float64) if n > 1 else torch.zeros(1, dtype=torch.float64)
        for n in sizes
    ]
    # along an axis whose coordinates are exact mirror images (linspace's are for even sizes) the bump is computed up
    # to the middle and mirrored: the same values from an eighth of the exps (16×256×256: 10 → 3 ms per run); the
    # eighth is cast first and the mirroring copies values of ``dtype`` (float32: half the bytes, 6–9 → 4 ms)
    halves = [a[: (len(a) + 1) // 2] if torch.equal(a, -a.flip(0)) else a for a in axes]
    r2 = halves[0][:, None, None] ** 2 + halves[1][None, :, None] ** 2 + halves[2][None, None, :] ** 2
    w = torch.exp(-r2 / (2.0 * float(sigma) ** 2)).clamp_min_(float(floor)).to(dtype)
    for ax, (a, h) in enumerate(zip(axes, halves, strict=True)):
        if len(h) < len(a):
            w = torch.cat([w, w.narrow(ax, 0, len(a) - len(h)).flip(ax)], dim=ax)
    return w.to(device=device)


def halo_gap(starts: Sequence[int], patch: int, size: int, halo: int) -> int | None:
    """The first voxel of an axis of ``size`` voxels that no patch covers outside its halo, or None.

    A patch starting at ``t`` trusts ``[t + halo, t + patch − halo)``, except that a side on the region's border
    keeps its halo voxels (the model saw the same border there as it would on the whole volume).
    """
    covered = 0
    for t in sorted(int(v) for v in starts):
        lo = t if t == 0 else t + halo
        hi = t + patch if t + patch >= size else t + patch - halo
        if lo > covered:
            return covered
        covered = max(covered, hi)
    return None if covered >= size else covered


class WindowCache:
    """The blending windows of a patch grid's patches on each device.

    Without a halo every patch gets :func:`gaussian_window`. A halo ``(hz, hy, hx)`` (voxels a model's output
    gets wrong at each side of its input, e.g. bioimage.io output axes' ``halo``) gives those voxels weight 0
    in each patch, except on the sides that lie on the region's border: every voxel is then blended only from
    patches that saw enough context, as if the model had run on the whole region at once. One window per
    device and border case (at most 4³), built on first use.

    Args:
        grid: the patch grid (a :class:`~exem.data.grid.PatchGrid`: ``shape``, ``patch``, ``starts``).
        sigma, floor: of :func:`gaussian_window`.
        halo: (z, y, x) voxels, each ≥ 0.

    Raises:
        ValueError: a halo the grid cannot honour (a voxel outside every patch's trusted part): the overlap
            must be at least twice the halo.
    """

    def __init__(
        self, grid: Any, sigma: float = 0.5, floor: float = 1e-4, halo: Sequence[int] = (0, 0, 0)
    ) -> None:
        self.patch = tuple(int(v) for v in grid.patch)
        self.shape = tuple(int(v) for v in grid.shape)
        self.sigma, self.floor = float(sigma), float(floor)
        self.halo = tuple(int(v) for v in halo)
        gaussian_window((1, 1, 1), self.sigma, self.floor)  # validate sigma / floor now; the window: in get
        for ax, (h, starts, p, n) in enumerate(
            zip(self.halo, grid.starts, self.patch, self.shape, strict=True)
        ):
            gap = halo_gap(starts, p, n, h) if h > 0 else None
            if h < 0 or gap is not None:
                name = "zyx"[ax]
                raise ValueError(
                    f"halo {list(self.halo)}: voxel {gap} of axis {name} lies in the halo of every patch over it;"
                    f" use an overlap ≥ 2 × halo ({2 * h} voxels) and a patch > 2 × halo on axis {name}"
                )
        self._windows: dict[tuple[Any, ...], Tensor] = {}

    def kept(self, axis: int, start: int) -> tuple[int, int]:
        """The offsets ``[lo, hi)`` along ``axis`` of a patch starting at ``start`` that get weight: all but its
        halo, except on the sides that lie on the region's border."""
        h, p, n = self.halo[axis], self.patch[axis], self.shape[axis]
        return (0 if start == 0 or h == 0 else h, p if start + p >= n or h == 0 else p - h)

    def get(self, device: torch.device | str, start: Sequence[int] | None = None) -> Tensor:
        """The ``(pz, py, px)`` float32 window of the patch at ``start`` (z, y, x; None: an inner patch)."""
        kept: tuple[tuple[int, int], ...] = ()
        if any(self.halo):
            starts = start if start is not None else (1, 1, 1)
            kept = tuple(self.kept(ax, int(t)) for ax, t in enumerate(starts))
        return self._window(device, kept)

    def plain(self, device: torch.device | str) -> Tensor:
        """The :func:`gaussian_window` of the grid's patch, without a halo (float32, on ``device``, cached)."""
        return self._window(device, ())

    def _window(self, device: torch.device | str, kept: tuple[tuple[int, int], ...]) -> Tensor:
        key = (torch.device(device), kept)
        if key not in self._windows:
            w = gaussian_window(self.patch, self.sigma, self.floor)  # float32, on the CPU: a fresh tensor
            for ax, (lo, hi) in enumerate(kept):
                w.narrow(ax, 0, lo).zero_()
                w.narrow(ax, hi, self.patch[ax] - hi).zero_()
            self._windows[key] = w.to(device=key[0])
        return self._windows[key]


@dataclass(frozen=True)
class _AxisLists:
    """Along one axis of a box: which patches weigh each coordinate, as classes of equal offset lists.

    ``offsets[k]``: the weighted offsets ``c − start`` of the patches over a coordinate ``c`` of class ``k``, in
    the order of their starts. Classes are numbered in the order they first occur along the axis, so that the
    coordinates of a grid step map to consecutive classes in every step: ``runs`` ``(c0, c1, k0)``, box
    coordinates ``[c0, c1)`` have classes ``k0 … k0 + c1 − c0 − 1`` (a few runs per patch).
    """

    offsets: list[tuple[int, ...]]
    runs: list[tuple[int, int, int]]

    @classmethod
    def of(cls, windows: WindowCache, axis: int, lo: int, hi: int, starts: Sequence[int]) -> _AxisLists:
        number: dict[tuple[int, ...], int] = {}  # offset list → class
        lists = []
        weighted = [(int(s), *windows.kept(axis, int(s))) for s in starts]  # (start, [k0, k1) of its offsets)
        for c in range(lo, hi):
            offs = [c - s for s, k0, k1 in weighted if k0 <= c - s < k1]
            if not offs:
                raise RuntimeError(
                    f"WindowSums: some voxels of the box are covered by no patch ({'zyx'[axis]} = {c})"
                )
            lists.append(tuple(offs))
            number.setdefault(lists[-1], len(number))
        runs: list[tuple[int, int, int]] = []
        for c, t in enumerate(lists):
            k = number[t]
            if runs and runs[-1][1] == c and runs[-1][2] + c - runs[-1][0] == k:
                runs[-1] = (runs[-1][0], c + 1, runs[-1][2])
            else:
                runs.append((c, c + 1, k))
        return cls(list(number), runs)

    def groups(self) -> list[tuple[int, int, list[slice | list[int]]]]:
        """Consecutive classes with lists of one length: ``(first class, number of classes, per position in the
        lists the offsets of those classes)``, as a slice where they are consecutive (a view of the window, no
        gather), else a list."""
        out: list[tuple[int, int, list[slice | list[int]]]] = []
        for _, members in itertools.groupby(enumerate(self.offsets), key=lambda kt: len(kt[1])):
            ks, lists = zip(*members, strict=True)
            columns: list[slice | list[int]] = []
            for i in range(len(lists[0])):
                col = [t[i] for t in lists]
                consecutive = col == list(range(col[0], col[0] + len(col)))
                columns.append(slice(col[0], col[0] + len(col)) if consecutive else col)
            out.append((ks[0], len(ks), columns))
        return out


def _take(t: Tensor, axis: int, offsets: slice | list[int]) -> Tensor:
    """``t``'s entries ``offsets`` along ``axis``: a view for a slice, a gather for a list."""
    if isinstance(offsets, slice):
        return t.narrow(axis, offsets.start, offsets.stop - offsets.start)
    return t.index_select(axis, torch.tensor(offsets, dtype=torch.long, device=t.device))


class WindowSums:
    """The blend's denominators ``Σ_p w_p`` over a box, computed at once instead of patch by patch.

    In a patch grid the patches over a voxel are the product of those over its z, y and x coordinates, blended in
    C order, and each adds its window at the voxel's offset from its start (zero in a halo away from the region's
    border: :class:`WindowCache`). So voxels whose per-axis offset lists are equal have equal sums, bit for bit,
    and along an axis the lists repeat with the grid's step: for 16×256×256 patches at 25 % overlap a box has
    ~10× fewer distinct (z, y, x) lists than voxels. Each distinct sum is computed once, adding the same float32
    terms in the same order as :class:`BlendAccumulator` does (its +0.0 terms, which change no sum, left out), so
    dividing by these sums gives its bits, without a weight buffer or a weight add per patch.

    Args:
        windows: the grid's :class:`WindowCache` (patch, region shape, halo, sigma, floor).
        box_start, box_shape: the box (z, y, x) in voxels, in the grid's coordinates.
        starts: per axis, the sorted grid starts of the patches over the box (e.g. ``Block.patch_starts``).
        device: where the sums are kept.

    Raises:
        RuntimeError: a voxel of the box that no patch weighs.
    """

    def __init__(
        self,
        windows: WindowCache,
        box_start: Sequence[int],
        box_shape: Sequence[int],
        starts: Sequence[Sequence[int]],
        device: torch.device | str,
    ) -> None:
        self.box_start = tuple(int(v) for v in box_start)
        self.box_shape = tuple(int(v) for v in box_shape)
        self.axes = [
            _AxisLists.of(windows, ax, b, b + n, s)
            for ax, (b, n, s) in enumerate(zip(self.box_start, self.box_shape, starts, strict=True))
        ]
        window = windows.plain(device)
        self.sums = torch.empty(
            tuple(len(a.offsets) for a in self.axes), dtype=torch.float32, device=window.device
        )
        zs, ys, xs = (a.groups() for a in self.axes)
        # the window's Z slices of each (group of z classes, position in their lists): taken once
        planes = [(kz, nz, [_take(window, 0, z) for z in oz]) for kz, nz, oz in zs]
        for (kz, nz, wz), (ky, ny, oy), (kx, nx, ox) in itertools.product(planes, ys, xs):
            part = self.sums[kz : kz + nz, ky : ky + ny, kx : kx + nx]
            terms = itertools.product(enumerate(wz), enumerate(oy), enumerate(ox))
            for (i, w), (j, y), (k, x) in terms:  # in the order of the patches' starts (C order)
                term = _take(_take(w, 1, y), 2, x)
                if i == j == k == 0:
                    part.copy_(term)
                else:
                    part.add_(term)

    def divide_(self, values: Tensor, z0: int = 0) -> Tensor:
        """Divide ``values`` ``(C, dz, Y, X)``, the box's Z slices ``[z0, z0 + dz)`` (relative to the box) of
        ``Σ w·out``, by their sums, in place; returns ``values``."""
        z1 = z0 + values.shape[1]
        zs, ys, xs = (a.runs for a in self.axes)
        for c0, c1, k0 in zs:
            a, b = max(c0, z0), min(c1, z1)
            if a >= b:
                continue
            for (y0, y1, ky), (x0, x1, kx) in itertools.product(ys, xs):
                part = self.sums[k0 + a - c0 : k0 + b - c0, ky : ky + y1 - y0, kx : kx + x1 - x0]
                values[:, a - z0 : b - z0, y0:y1, x0:x1].div_(part)
        return values


def _overlap(start: int, size: int, box_start: int, box_size: int) -> tuple[slice, slice] | None:
    """(slice into the box, slice into the patch) of the intersection of ``[start, start+size)`` and the box."""
    lo = max(start, box_start)
    hi = min(start + size, box_start + box_size)
    if hi <= lo:
        return None
    return slice(lo - box_start, hi - box_start), slice(lo - start, hi - start)


class BlendAccumulator:
    """Weighted sums ``Σ w·out`` and ``Σ w`` of patch predictions over one box, on one device.

    Args:
        box_start: (z, y, x) of the box's first voxel, in the same coordinates as the patch starts.
        box_shape: (Z, Y, X) of the box in voxels.
        window: ``(pz, py, px)`` float32 weights (:func:`gaussian_window`) on the target device.

    The accumulators are float32: ``acc`` is ``(C, Z, Y, X)`` (allocated at the first :meth:`add`, when the
    number of channels C is known), ``weight`` is ``(Z, Y, X)``. Per voxel the sums run in the order of the
    :meth:`add` calls, so the same patches added in the same order give bit-identical results.

    ``acc``, ``weight`` (zeroed, of those shapes) and ``scratch`` (``(C, pz, py, px)`` float32, for the weighted
    patch) may be given to reuse memory: fresh large tensors cost page faults on the CPU. ``weights=False``: only
    ``Σ w·out`` is kept (``weight`` is None; the caller divides by a :class:`WindowSums`).
    """

    def __init__(
        self,
        box_start: Sequence[int],
        box_shape: Sequence[int],
        window: Tensor,
        *,
        acc: Tensor | None = None,
        weight: Tensor | None = None,
        scratch: Tensor | None = None,
        weights: bool = True,
    ) -> None:
        self.box_start = tuple(int(v) for v in box_start)
        self.box_shape = tuple(int(v) for v in box_shape)
        self.window = window
        self.patch = tuple(int(v) for v in window.shape)
        self.acc: Tensor | None = acc
        self.weight: Tensor | None = None
        if weights:
            self.weight = (
                weight
                if weight is not None
                else torch.zeros(self.box_shape, dtype=torch.float32, device=window.device)
            )
        self.scratch = scratch

    def add(self, out: Tensor, start: Sequence[int], window: Tensor | None = None) -> None:
        """Add one patch prediction.

        Args:
            out: ``(C, pz, py, px)`` prediction of the patch (any float dtype; accumulated in float32).
            start: (z, y, x) of the patch's first voxel. Patches that miss the box are ignored.
            window: this patch's weights (:class:`WindowCache`), of the window's shape; None: the box's window.
        """
        if tuple(out.shape[1:]) != self.patch:
            raise ValueError(f"prediction shape {tuple(out.shape)} does not match the window {self.patch}")
        parts = [
            _overlap(int(s), p, b, n)
            for s, p, b, n in zip(start, self.patch, self.box_start, self.box_shape, strict=True)
        ]
        if any(p is None for p in parts):
            return
        dst = tuple(p[0] for p in parts)  # type: ignore[index]
        src = tuple(p[1] for p in parts)  # type: ignore[index]
        if self.acc is None:
            self.acc = torch.zeros(
                (out.shape[0], *self.box_shape), dtype=torch.float32, device=self.window.device
            )
        w = (self.window if window is None else window)[src]
        piece = out[(slice(None), *src)].float()
        if self.scratch is not None and self.scratch.shape[0] == piece.shape[0]:
            weighted = torch.mul(piece, w, out=self.scratch[(slice(None), *(slice(0, n) for n in w.shape))])
        else:
            weighted = piece * w
        self.acc[(slice(None), *dst)] += weighted
        if self.weight is not None:
            self.weight[dst] += w

    def result(self) -> Tensor:
        """``Σ w·out / Σ w`` as a ``(C, Z, Y, X)`` float32 tensor (computed in place: call once).

        Raises:
            RuntimeError: nothing was added, or a voxel of the box is covered by no patch.
        """
        if self.acc is None:
            raise RuntimeError("BlendAccumulator.result: no patch was added")
        if self.weight is None:
            raise RuntimeError("BlendAccumulator.result: made with weights=False (divide by WindowSums)")
        if not bool(self.weight.amin() > 0):
            raise RuntimeError("BlendAccumulator.result: some voxels of the box are covered by no patch")
        return self.acc.div_(self.weight)


class ZStreamBlender:
    """The blend of :class:`BlendAccumulator` over a box, streamed along Z with bounded memory.

    Patches must be added in non-decreasing order of their Z start (the global grid's C order). The float32
    sums are kept only for the Z slices the current patch row can touch (``[z, z + pz)`` ∩ box): when a patch
    of a new row arrives, the slices above it are final, divided and returned, and the rest is carried over.
    Per voxel the sums run over the same patches in the same order as :class:`BlendAccumulator`'s, so the
    values are bit-identical; the memory is ``2 · pz`` instead of ``2 · Z`` slices of the box (channels apart):
    one buffer of one patch depth for each sum, allocated once (no fresh memory per patch row); at a new row the
    carried slices move to its front. With ``window_sums`` only ``Σ w·out`` is kept (``pz`` slices).

    Args:
        box_start: (z, y, x) of the box's first voxel, in the coordinates of the patch starts.
        box_shape: (Z, Y, X) of the box in voxels.
        window: ``(pz, py, px)`` float32 weights (:func:`gaussian_window`) on the target device.
        consume: called with each finalised slab ``(z0, values)`` as soon as it is final. The slab is divided in
            place and is a view into the sums, valid only during the call (no copy: the engine casts it into its
            output at once); :meth:`add` and :meth:`finish` then return ``[]``. None: they return the slabs, as new
            tensors.
        window_sums: the box's :class:`WindowSums`: the slabs are divided by them, and no weight is summed per
            patch (the same bits, less work and one buffer less). None: the weights are summed patch by patch.

    Slabs are ``(z0, values)``: ``z0`` relative to the box, ``values`` a ``(C, dz, Y, X)`` float32 tensor. They
    come in order and cover the box exactly once.
    """

    def __init__(
        self,
        box_start: Sequence[int],
        box_shape: Sequence[int],
        window: Tensor,
        *,
        consume: Callable[[int, Tensor], None] | None = None,
        window_sums: WindowSums | None = None,
    ) -> None:
        self.box_start = tuple(int(v) for v in box_start)
        self.box_shape = tuple(int(v) for v in box_shape)
        self.window = window
        self.depth = int(window.shape[0])
        self.consume = consume
        if window_sums is not None and (window_sums.box_start, window_sums.box_shape) != (
            self.box_start,
            self.box_shape,
        ):
            raise ValueError(
                f"ZStreamBlender: window sums of box {window_sums.box_start} {window_sums.box_shape}"
                f" for box {self.box_start} {self.box_shape}"
            )
        self.window_sums = window_sums
        self._row: int | None = None  # Z start of the current patch row
        self._acc: BlendAccumulator | None = None  # sums of box slices [_lo, _hi) (global Z)
        self._lo = self._hi = self.box_start[0]
        self._next = self.box_start[0]  # first box slice (global Z) not handed back yet
        # the sums of one patch depth: weight now (unless window_sums), acc (C, depth, Y, X) at the first patch (when
        # C is known); each row's _move zeroes the slices it does not carry (all of them at the first row)
        self._depth_shape = (min(self.depth, self.box_shape[0]), *self.box_shape[1:])
        self._weight = (
            None
            if window_sums is not None
            else torch.empty(self._depth_shape, dtype=torch.float32, device=window.device)
        )
        self._sums: Tensor | None = None
        self._scratch: Tensor | None = None

    @property
    def _z_end(self) -> int:
        return self.box_start[0] + self.box_shape[0]

    def add(
        self, out: Tensor, start: Sequence[int], window: Tensor | None = None
    ) -> list[tuple[int, Tensor]]:
        """Add one patch prediction ``(C, pz, py, px)`` at ``start`` (z, y, x), weighted by ``window`` (this
        patch's, :class:`WindowCache`; None: the blender's); returns the slabs it finalised."""
        z = int(start[0])
        done: list[tuple[int, Tensor]] = []
        if z != self._row:
            if self._row is not None and z < self._row:
                raise ValueError(
                    f"ZStreamBlender: patch rows must come in increasing Z ({z} after {self._row})"
                )
            done = self._hand_over(self._release(min(z, self._z_end)))
            self._move(z)
        if self._acc is not None:
            if self._acc.acc is None:  # the first patch: the channel count is known now
                self._allocate(int(out.shape[0]))
                assert self._sums is not None
                self._acc.acc, self._acc.scratch = self._sums[:, : self._hi - self._lo], self._scratch
            self._acc.add(out, start, window)
        return done

    def _allocate(self, channels: int) -> None:
        device = self.window.device
        self._sums = torch.zeros((channels, *self._depth_shape), dtype=torch.float32, device=device)
        self._scratch = torch.empty((channels, *self.window.shape), dtype=torch.float32, device=device)

    def finish(self) -> list[tuple[int, Tensor]]:
        """The remaining slabs, down to the end of the box (call once, after the last :meth:`add`)."""
        return self._hand_over(self._release(self._z_end))

    def _hand_over(self, slabs: list[tuple[int, Tensor]]) -> list[tuple[int, Tensor]]:
        """Give finalised slabs to :attr:`consume` (before their memory is reused), or return them."""
        if self.consume is None:
            return slabs
        for z0, values in slabs:
            self.consume(z0, values)
        return []

    def _move(self, z: int) -> None:
        """Start patch row ``z``: a new window ``[max(z, box z0), min(z + pz, box end))`` with the carried sums
        moved to the front of the buffers and the rest zeroed."""
        lo, hi = max(z, self.box_start[0]), min(z + self.depth, self._z_end)
        old, old_lo, old_hi = self._acc, self._lo, self._hi
        self._row = z
        if hi <= lo:  # this row does not reach into the box
            self._acc, self._lo, self._hi = None, lo, lo
            return
        box = ((lo, *self.box_start[1:]), (hi - lo, *self.box_shape[1:]))
        keep = max(0, old_hi - max(lo, old_lo)) if old is not None else 0
        off = max(lo, old_lo) - old_lo
        for buf in (self._weight, self._sums):
            if buf is None:
                continue  # no patch yet: no value sums to carry
            # the carried slices go to the front, in steps of `off` slices: a step's source never overlaps its
            # destination, and later steps read only slices above it (no temporary copy, no fresh memory)
            for k in range(0, keep if off else 0, off or 1):
                n = min(off, keep - k)
                buf[..., k : k + n, :, :] = buf[..., off + k : off + k + n, :, :]
            buf[..., keep : hi - lo, :, :].zero_()
        sums = None if self._sums is None else self._sums[:, : hi - lo]
        weight = None if self._weight is None else self._weight[: hi - lo]
        acc = BlendAccumulator(
            *box, self.window, acc=sums, weight=weight, scratch=self._scratch, weights=weight is not None
        )
        self._acc, self._lo, self._hi = acc, lo, hi

    def _release(self, until: int) -> list[tuple[int, Tensor]]:
        """Divide and hand back the box slices ``[_next, until)``; they must lie in the current window."""
        if until <= self._next:
            return []
        if self._acc is None or self._acc.acc is None or self._next < self._lo or until > self._hi:
            raise RuntimeError(
                f"ZStreamBlender: box slices {self._next - self.box_start[0]}:{until - self.box_start[0]}"
                " are covered by no patch"
            )
        a, b = self._next - self._lo, until - self._lo
        z0 = self._next - self.box_start[0]
        if self.window_sums is not None:
            values = self._acc.acc[:, a:b] if self.consume else self._acc.acc[:, a:b].clone()
            self.window_sums.divide_(values, z0)
        else:
            assert self._acc.weight is not None
            weight = self._acc.weight[a:b]
            if not bool(weight.amin() > 0):
                raise RuntimeError("ZStreamBlender: some voxels of the box are covered by no patch")
            values = self._acc.acc[:, a:b].div_(weight) if self.consume else self._acc.acc[:, a:b] / weight
        self._next = until
        return [(z0, values)]
