"""Faster stand-ins for the heavy steps of the inference preprocessing on a large CT (load, ``Spacingd``, intensity
window, foreground crop), each a subclass of the MONAI class it replaces that records the same transform history.

Measured on a 512x512x160 CT (bundle docs, Performance) MONAI spends most of the preprocessing in four places:
``LoadImaged`` inflates the ``.nii.gz`` through a stream of small reads and turns the Fortran-ordered int16 array into
a C-ordered float32 one with numpy's single-threaded strided copies; ``Spacingd`` builds a float64 grid of every
output voxel (``affine_grid``) and samples it with the 3D ``grid_sample``, which runs on one thread; the intensity
window allocates a new volume per arithmetic step; the foreground crop reduces a boolean copy of the volume axis by
axis. The classes here compute the same values faster:

- :class:`FastLoadImaged` (for ``LoadImaged``), whose NIfTI reader :class:`FastNiftiReader` inflates the gzip
  stream in one call and transposes the array in two blocked passes by torch. Same array and metadata.
- :class:`FastSpacingd` (for ``Spacingd``): when the resampling is an axis-aligned scaling (the usual case after
  ``Orientationd``) with bilinear interpolation in float64, the first axis is interpolated row by row and the other
  two by the 2D ``grid_sample`` (vectorised), slice by slice on one thread (:func:`one_thread`), from the coordinates
  ``affine_grid`` would give. The float64 result can differ from the 3D path only in rounding (the 3D kernel sums
  eight products, this one nests three linear interpolations), so after the cast to float32 a voxel is equal or one
  unit in the last place apart: on the benchmark's 512x512x160 CT all 33.8 million are equal, on random test volumes
  a few per thousand differ (``tests/test_fast_preprocess.py``). Anything else (a grid turned against the input's,
  another mode, dtype or padding, lazy resampling, the inverse) runs MONAI's own code.
- :class:`FastScaleIntensityRanged`: MONAI's arithmetic, step by step, on cache-sized slices of one output volume
  (on one thread). Bit-identical.
- :class:`FastCropForegroundd`: the bounding box of ``image > 0`` from per-axis maxima (torch reductions) when the
  crop uses the default foreground test; the crop itself is MONAI's. Bit-identical.

Records: the resampling is recorded by :class:`SeparableResample` (a ``SpatialResample``) with the same
``extra_info``, original size and affine as MONAI's, and inverted by MONAI's code; so ``Invertd`` and
:class:`scripts.transforms.InvertForegroundd` read the history as before.
"""

from __future__ import annotations

import contextlib
import warnings
import zlib
from collections.abc import Sequence
from enum import Enum
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import USE_COMPILED
from monai.data import MetaTensor, NibabelReader, get_track_meta
from monai.data.utils import AFFINE_TOL
from monai.networks.utils import to_norm_affine
from monai.transforms import (
    CropForeground,
    CropForegroundd,
    LoadImaged,
    ScaleIntensityRange,
    ScaleIntensityRanged,
    Spacingd,
    SpatialResample,
    TraceableTransform,
)
from monai.transforms.utils import is_positive
from monai.utils import LazyAttr, TraceKeys, ensure_tuple_rep, get_equivalent_dtype

__all__ = [
    "MONAI_EQUIVALENT",
    "FastCropForegroundd",
    "FastLoadImaged",
    "FastNiftiReader",
    "FastScaleIntensityRanged",
    "FastSpacingd",
    "SeparableResample",
    "c_ordered",
    "foreground_box",
    "resample_axis_aligned",
]

#: the MONAI class each dictionary transform here stands in for (benchmarks and tests build MONAI's chain from it)
MONAI_EQUIVALENT = {
    "FastLoadImaged": "LoadImaged",
    "FastSpacingd": "Spacingd",
    "FastScaleIntensityRanged": "ScaleIntensityRanged",
    "FastCropForegroundd": "CropForegroundd",
}
#: numpy dtypes converted by torch (the others by numpy)
_TORCH_DTYPES = {np.dtype(t) for t in ("int8", "uint8", "int16", "int32", "int64", "float32", "float64")}
#: elements per slice in the chunked loops: a few MiB, so that each step of a slice reuses the cache
CHUNK_ELEMENTS = 1 << 18


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on the calling thread only (restored after). The chunked loops take hundreds of small steps; with
    several threads each step waits for all of them, which on a busy machine costs more than the threads gain (the
    resampling of the benchmark's CT on a loaded 2-core machine: 0.33 s on one thread, 1.1-2.2 s on two)."""
    threads = torch.get_num_threads()
    if threads > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if threads > 1:
            torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------------------------ reading
def c_ordered(array: np.ndarray, dtype: Any = None) -> np.ndarray:
    """``array`` as a C-ordered array of ``dtype`` (None: its own), the values cast as numpy's ``astype`` casts them.

    A Fortran-ordered 3D array (what nibabel reads from a NIfTI) is transposed in two passes that each read or write
    contiguous runs: a blocked 2D transpose to (Y, X, Z) order, then the swap of the two outer axes with the cast.
    """
    dtype = np.dtype(dtype or array.dtype)
    if array.flags.c_contiguous:
        return array.astype(dtype, copy=False)
    if array.ndim != 3 or not array.flags.f_contiguous or not {array.dtype, dtype} <= _TORCH_DTYPES:
        return np.ascontiguousarray(array, dtype=dtype)
    if not array.dtype.isnative:
        return np.ascontiguousarray(array, dtype=dtype)
    x, y, z = array.shape
    with warnings.catch_warnings():  # read-only buffers (an inflated file) are only read here
        warnings.simplefilter("ignore", UserWarning)
        flat = torch.from_numpy(array.reshape(-1, order="F"))
    middle = torch.empty((y * x, z), dtype=flat.dtype)
    middle.copy_(flat.view(z, y * x).t())  # torch's blocked transpose: (Z, Y*X) -> (Y*X, Z)
    out = torch.empty((x, y, z), dtype=getattr(torch, dtype.name))
    out.copy_(middle.view(y, x, z).transpose(0, 1))  # rows of Z stay contiguous
    return out.numpy()


def inflate(path: str) -> bytes:
    """The decompressed content of the gzip file ``path`` (every member; CRC and length checked by zlib)."""
    with open(path, "rb") as f:
        raw = f.read()
    parts = []
    while raw:
        d = zlib.decompressobj(wbits=31)
        parts.append(d.decompress(raw))
        if not d.eof:
            raise zlib.error(f"{path}: the gzip stream is truncated")
        raw = d.unused_data.lstrip(b"\0")  # next member, if any (padding between members is zeros)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _unscaled_gzip_array(img: Any, filename: Any) -> np.ndarray | None:
    """The raw array of a gzip-compressed NIfTI without intensity scaling, inflated in one call; None otherwise (the
    caller then reads through nibabel)."""
    proxy = getattr(img, "dataobj", None)
    if not getattr(proxy, "is_proxy", False) or str(getattr(proxy, "file_like", "")) != str(filename):
        return None
    if getattr(proxy, "order", "F") != "F" or (getattr(proxy, "slope", None), getattr(proxy, "inter", None)) != (1, 0):
        return None
    with open(str(filename), "rb") as f:
        if f.read(2) != b"\x1f\x8b":
            return None  # not gzip: nibabel memory-maps it
    dtype, shape = np.dtype(proxy.dtype), tuple(int(s) for s in proxy.shape)
    data = inflate(str(filename))
    count = int(np.prod(shape))
    if len(data) < proxy.offset + count * dtype.itemsize:
        return None  # let nibabel say what is wrong with the file
    return np.frombuffer(data, dtype=dtype, count=count, offset=proxy.offset).reshape(shape, order="F")


class FastNiftiReader(NibabelReader):
    """MONAI's ``NibabelReader`` that returns the array C-ordered in ``dtype``, read faster.

    ``LoadImage`` casts the reader's array to its ``dtype`` (float32 by default) and makes it C-contiguous with numpy;
    this reader hands it over already so, built by :func:`c_ordered`, and inflates an unscaled ``.nii.gz`` in one
    call (:func:`inflate`) instead of nibabel's stream of small reads. The values and the metadata are those of
    ``NibabelReader`` with the same arguments. :class:`FastLoadImaged` puts it where ``LoadImaged`` has
    ``NibabelReader``.

    Args:
        dtype: dtype of the returned array (None: the file's, after nibabel's scaling).
        kwargs: ``NibabelReader``'s arguments.
    """

    def __init__(self, dtype: Any = np.float32, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.dtype = dtype

    def _get_array_data(self, img: Any, filename: Any) -> np.ndarray:
        if self.to_gpu:
            return super()._get_array_data(img, filename)
        array = _unscaled_gzip_array(img, filename)
        if array is None:
            array = np.asanyarray(img.dataobj)
        return c_ordered(array, self.dtype)


class FastLoadImaged(LoadImaged):
    """``LoadImaged`` (same arguments) whose ``NibabelReader`` is a :class:`FastNiftiReader` with its settings and
    ``LoadImaged``'s dtype: NIfTI files load faster with the same array and metadata; every other format, and the
    choice of reader by file suffix, are MONAI's."""

    def __init__(self, keys: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(keys, *args, **kwargs)
        loader = self._loader
        loader.readers = [_faster_reader(r, loader.dtype) for r in loader.readers]


def _faster_reader(reader: Any, dtype: Any) -> Any:
    if type(reader) is not NibabelReader:
        return reader
    return FastNiftiReader(
        dtype, channel_dim=reader.channel_dim, as_closest_canonical=reader.as_closest_canonical,
        squeeze_non_spatial_dims=reader.squeeze_non_spatial_dims, to_gpu=reader.to_gpu, **reader.kwargs,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------------------- resampling
def _value(option: Any) -> Any:
    return option.value if isinstance(option, Enum) else option


def _base_grid(n: int, align_corners: bool) -> torch.Tensor:
    """The normalised coordinates ``affine_grid`` gives the n voxels of an output axis (float64)."""
    if n <= 1:
        return torch.zeros(max(n, 1), dtype=torch.float64)
    base = torch.linspace(-1, 1, n, dtype=torch.float64)
    return base if align_corners else base * (n - 1) / n


def _source_index(coord: torch.Tensor, size: int, align_corners: bool, padding_mode: str) -> torch.Tensor:
    """``grid_sample``'s source coordinate of the normalised ``coord`` on an axis of ``size`` voxels."""
    index = (coord + 1) / 2 * (size - 1) if align_corners else ((coord + 1) * size - 1) / 2
    return index.clamp(0, size - 1) if padding_mode == "border" else index


def _linear_stencil(index: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(low, high, w_low, w_high)`` of linear interpolation at ``index``; a neighbour outside ``[0, size)`` gets
    weight 0 (``zeros`` padding; with ``border`` the index is clipped first, so it has weight 0 anyway)."""
    low = index.floor()
    w_high, w_low = index - low, (low + 1) - index
    low, high = low.long(), low.long() + 1
    w_low = torch.where((low >= 0) & (low < size), w_low, 0.0)
    w_high = torch.where((high >= 0) & (high < size), w_high, 0.0)
    return low.clamp(0, size - 1), high.clamp(0, size - 1), w_low, w_high


def resample_axis_aligned(
    img: torch.Tensor, xform: torch.Tensor, size: Sequence[int], padding_mode: str = "border", align_corners=False
) -> torch.Tensor:
    """Bilinear resampling in float64 of ``img`` (C, X, Y, Z) onto ``size`` by a voxel-to-voxel ``xform`` (4, 4)
    whose 3x3 part is diagonal, as MONAI's ``SpatialResample`` does it with ``affine_grid`` and ``grid_sample``.

    Returns (C, *size) float32. The coordinates are those ``affine_grid`` and ``grid_sample`` compute; X is
    interpolated row by row and (Y, Z) by the 2D ``grid_sample`` of each row.
    """
    src = [int(s) for s in img.shape[1:]]
    size = [int(s) for s in size]
    theta = to_norm_affine(xform.to(torch.float64)[None], src, size, bool(align_corners))[0]
    coords = [_base_grid(n, align_corners) * theta[d, d] + theta[d, 3] for d, n in enumerate(size)]
    low, high, w_low, w_high = _linear_stencil(_source_index(coords[0], src[0], align_corners, padding_mode), src[0])
    grid = torch.stack(torch.broadcast_tensors(coords[2][None, :], coords[1][:, None]), dim=-1)[None]  # (1, Y, Z, 2)
    grid = grid.to(img.device)
    low, high, w_low, w_high = (t.to(img.device) for t in (low, high, w_low, w_high))
    out = torch.empty((img.shape[0], *size), dtype=torch.float32, device=img.device)
    with one_thread():
        _resample_rows(img, out, (low, high, w_low, w_high), grid, padding_mode, align_corners)
    return out


def _resample_rows(img, out, stencil, grid, padding_mode, align_corners) -> None:
    """:func:`resample_axis_aligned`'s loop: X interpolated for a slice of rows, then (Y, Z) by ``grid_sample``."""
    low, high, w_low, w_high = stencil
    size, src = out.shape[1:], img.shape[1:]
    rows = max(1, CHUNK_ELEMENTS // max(1, src[1] * src[2]))
    for c in range(img.shape[0]):
        for a in range(0, size[0], rows):
            b = min(a + rows, size[0])
            w0, w1 = w_low[a:b, None, None], w_high[a:b, None, None]
            planes = img[c].index_select(0, low[a:b]).to(torch.float64).mul_(w0)
            planes.addcmul_(img[c].index_select(0, high[a:b]).to(torch.float64), w1)
            sampled = F.grid_sample(planes[:, None], grid.expand(b - a, -1, -1, -1), "bilinear", padding_mode,
                                    bool(align_corners))  # fmt: skip
            out[c, a:b] = sampled[:, 0]


#: largest off-diagonal entry of a voxel-to-voxel transform still taken as axis-aligned: the rounding left by
#: ``Spacing`` on oblique scans (about 1e-16); it moves a source coordinate by under 1e-10 voxels on a 512 grid
AXIS_TOL = 1e-13


def _axis_aligned(xform: torch.Tensor) -> bool:
    """The 3x3 part of a (4, 4) transform is diagonal up to rounding (:data:`AXIS_TOL`): each output axis reads one
    input axis."""
    m = xform[:3, :3]
    return bool(((m - torch.diag(torch.diagonal(m))).abs() <= AXIS_TOL).all())


def _unchanged(planned: MetaTensor, op: dict, xform: torch.Tensor, size: tuple, img: MetaTensor) -> bool:
    """MONAI's test for "no resampling" (``spatial_resample``'s ``affine_unchanged``): the same spatial size and the
    source and destination affines, or the transform and the identity, equal within ``AFFINE_TOL``."""
    if size != tuple(img.shape[1:]):
        return False
    src = torch.as_tensor(op[TraceKeys.EXTRA_INFO]["src_affine"], dtype=torch.float64)
    dst = torch.as_tensor(planned.peek_pending_affine(), dtype=torch.float64)
    eye = torch.eye(4, dtype=torch.float64)
    return torch.allclose(src, dst, atol=AFFINE_TOL) or torch.allclose(xform, eye, atol=AFFINE_TOL)


class SeparableResample(SpatialResample):
    """MONAI's ``SpatialResample`` that resamples axis-aligned bilinear float64 grids with
    :func:`resample_axis_aligned`, recording the operation as ``SpatialResample`` records it.

    The fast path is taken for a 3D ``MetaTensor`` without pending operations, ``mode`` bilinear, ``padding_mode``
    border or zeros, ``dtype`` float64 (MONAI's default), not lazy, with a transform between the grids that maps each
    axis onto itself and changes the grid; otherwise, and always in :meth:`inverse`, MONAI's own resampling runs.
    """

    fast = True

    def __call__(  # type: ignore[override]
        self, img: torch.Tensor, dst_affine=None, spatial_size=None, mode=None, padding_mode=None,
        align_corners=None, dtype=None, lazy=None,
    ) -> torch.Tensor:  # fmt: skip
        args = (img, dst_affine, spatial_size, mode, padding_mode, align_corners, dtype)
        mode, padding_mode = _value(mode or self.mode), _value(padding_mode or self.padding_mode)
        align = self.align_corners if align_corners is None else align_corners
        dt = dtype or self.dtype or img.dtype
        usable = (
            self.fast and not USE_COMPILED and not (self.lazy if lazy is None else lazy) and get_track_meta()
            and isinstance(img, MetaTensor) and img.ndim == 4 and not img.pending_operations
            and mode == "bilinear" and padding_mode in ("border", "zeros") and align in (True, False)
            and dt in (np.float64, torch.float64, "float64")
        )  # fmt: skip
        if not usable:
            return super().__call__(*args, lazy=lazy)
        planned = super().__call__(*args, lazy=True)  # MONAI's geometry and record, without resampling
        op = planned.pending_operations[-1]
        xform, size = torch.as_tensor(op[LazyAttr.AFFINE], dtype=torch.float64), tuple(op[LazyAttr.SHAPE])
        if len(size) != 3 or _unchanged(planned, op, xform, size, img) or not _axis_aligned(xform):
            return super().__call__(*args, lazy=False)
        data = resample_axis_aligned(img.as_tensor(), xform, size, padding_mode, align)
        meta = TraceableTransform.track_transform_meta(
            img, sp_size=torch.tensor(size), affine=xform, extra_info=op[TraceKeys.EXTRA_INFO],
            orig_size=op[TraceKeys.ORIG_SIZE], transform_info=self.get_transform_info(), lazy=False,
        )  # fmt: skip
        return MetaTensor(data).copy_meta_from(meta)

    def inverse(self, data: torch.Tensor) -> torch.Tensor:
        """MONAI's inverse, with MONAI's resampling."""
        with self._exact():
            return super().inverse(data)

    @contextlib.contextmanager
    def _exact(self) -> Iterator[None]:
        self.fast = False
        try:
            yield
        finally:
            self.fast = True


class FastSpacingd(Spacingd):
    """``Spacingd`` whose resampling is :class:`SeparableResample`: the same arguments, the same record and inverse;
    faster on axis-aligned grids (see the module docstring for how its values compare)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        old = self.spacing_transform.sp_resample
        self.spacing_transform.sp_resample = SeparableResample(
            mode=old.mode, padding_mode=old.padding_mode, align_corners=old.align_corners, dtype=old.dtype,
            lazy=old.lazy,
        )  # fmt: skip


# ---------------------------------------------------------------------------------------------- intensity and crop
def _slices(n: int, step: int) -> Iterator[slice]:
    for a in range(0, n, step):
        yield slice(a, min(a + step, n))


class FastScaleIntensityRange(ScaleIntensityRange):
    """``ScaleIntensityRange`` computed into one new volume, slice by slice: the same operations in the same order
    and dtype, so the same values; float tensors only (anything else takes MONAI's path)."""

    def __call__(self, img: Any) -> Any:  # type: ignore[override]
        if not isinstance(img, torch.Tensor) or not img.is_floating_point() or self.a_max - self.a_min == 0.0:
            return super().__call__(img)
        if self.dtype is not None and get_equivalent_dtype(self.dtype, torch.Tensor) != img.dtype:
            return super().__call__(img)
        src = img.as_tensor() if isinstance(img, MetaTensor) else img
        out = torch.empty_like(src, memory_format=torch.contiguous_format)
        flat_in, flat_out = src.reshape(-1), out.view(-1)
        scale = self.b_min is not None and self.b_max is not None
        with one_thread():
            self._window(flat_in, flat_out, scale)
        if not isinstance(img, MetaTensor):
            return out
        return MetaTensor(out).copy_meta_from(img)

    def _window(self, flat_in: torch.Tensor, flat_out: torch.Tensor, scale: bool) -> None:
        for s in _slices(flat_in.numel(), CHUNK_ELEMENTS):
            part = torch.sub(flat_in[s], self.a_min, out=flat_out[s])
            part.div_(self.a_max - self.a_min)
            if scale:
                part.mul_(self.b_max - self.b_min).add_(self.b_min)
            if self.clip:
                part.clamp_(self.b_min, self.b_max)


class FastScaleIntensityRanged(ScaleIntensityRanged):
    """``ScaleIntensityRanged`` with :class:`FastScaleIntensityRange` (same arguments, same values)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        old = self.scaler
        self.scaler = FastScaleIntensityRange(old.a_min, old.a_max, old.b_min, old.b_max, old.clip, old.dtype)


def foreground_box(img: torch.Tensor, margin: Sequence[int], allow_smaller: bool) -> tuple[list[int], list[int]]:
    """MONAI's ``generate_spatial_bounding_box(img, is_positive, None, margin, allow_smaller)``: the box of the voxels
    where some channel is ``> 0``, grown by ``margin``; ``([0]*d, [0]*d)`` when there are none.

    The maximum over the channels and every other axis is positive exactly where ``> 0`` holds somewhere; a NaN
    maximum (NaN voxels) is answered by the exact boolean test for that axis.
    """
    ndim = img.ndim - 1
    start, end = [0] * ndim, [0] * ndim
    for axis in range(ndim):
        others = [d for d in range(img.ndim) if d != axis + 1]
        peak = img.amax(dim=others)
        hit = peak > 0
        if bool(peak.isnan().any()):
            hit = (img > 0).any(dim=others[0]).any(dim=[d - 1 for d in others[1:]])
        where = torch.nonzero(hit)
        if where.numel() == 0:
            return [0] * ndim, [0] * ndim
        first, last = int(where[0]) - margin[axis], int(where[-1]) + margin[axis] + 1
        size = img.shape[axis + 1]
        start[axis], end[axis] = (max(first, 0), min(last, size)) if allow_smaller else (first, last)
    return start, end


class FastCropForeground(CropForeground):
    """``CropForeground`` whose bounding box comes from :func:`foreground_box` when the crop uses the default
    foreground test (``> 0`` in any channel), no size rounding (``k_divisible`` 1) and a float tensor; the crop and
    its record are MONAI's."""

    def compute_bounding_box(self, img: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        usable = (
            self.select_fn is is_positive and self.channel_indices is None and isinstance(img, torch.Tensor)
            and img.is_floating_point() and all(int(k) == 1 for k in np.atleast_1d(self.k_divisible))
        )  # fmt: skip
        if not usable:
            return super().compute_bounding_box(img)
        margin = [int(m) for m in ensure_tuple_rep(self.margin, img.ndim - 1)]
        if min(margin) < 0:
            return super().compute_bounding_box(img)  # MONAI names the error
        start, end = foreground_box(img.as_tensor() if isinstance(img, MetaTensor) else img, margin,
                                    self.allow_smaller)  # fmt: skip
        return np.asarray(start, dtype=np.int16), np.asarray(end, dtype=np.int16)


class FastCropForegroundd(CropForegroundd):
    """``CropForegroundd`` with :class:`FastCropForeground` (same arguments, same crop and record)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        old = self.cropper
        new = FastCropForeground(
            select_fn=old.select_fn, channel_indices=old.channel_indices, margin=old.margin,
            allow_smaller=old.allow_smaller, return_coords=old.return_coords, k_divisible=old.k_divisible,
            lazy=old.lazy,
        )  # fmt: skip
        new.padder = old.padder  # the padding settings given to CropForegroundd
        self.cropper = new
