"""Reading and writing NIfTI volumes with one-line, file-naming errors.

Only numpy and nibabel are used. Every failure a user can cause (missing
file, not NIfTI, truncated gzip, wrong dimensionality, NaN voxels, unwritable
output) is raised as :class:`~dunet_deploy.errors.DunetError` whose message
starts with the file name.

Files and request bytes are untrusted: the header is checked against
:class:`NiftiLimits` (3D, supported data type, voxel count and bytes, finite
affine and voxel sizes, compressed size) before any voxel data is inflated or
allocated, and gzip streams are inflated only up to the bytes the header
declares, so neither a header claiming 10^12 voxels nor a small ``.nii.gz``
that inflates to tens of GB (a gzip bomb) costs more than the limits allow.
"""

from __future__ import annotations

import gzip
import io
import os
import secrets
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import numpy.typing as npt

from dunet_deploy.errors import DunetError
from dunet_deploy.filetypes import VOLUME, check_kind

__all__ = [
    "DEFAULT_LIMITS",
    "NiftiLimits",
    "NiftiVolume",
    "check_header",
    "load_mask",
    "load_nifti",
    "load_nifti_bytes",
    "nifti_bytes_like",
    "nifti_suffix",
    "output_descrip",
    "output_kind",
    "save_nifti_like",
]

PathLike = str | os.PathLike[str]
_GIB = 1 << 30
#: On-disk voxel types we read (NIfTI codes 2, 4, 8, 16, 64, 256, 512, 768, 1024, 1280).
SUPPORTED_DTYPES = frozenset(
    np.dtype(t).name
    for t in (np.uint8, np.int8, np.int16, np.uint16, np.int32, np.uint32, np.int64, np.uint64,
              np.float32, np.float64)
)
_GZIP_MAGIC = b"\x1f\x8b"
_HEAD_BYTES = 540  # a NIfTI-2 header; NIfTI-1's is 348
_MAX_VOX_OFFSET = 16 << 20  # header + extensions; real files have a few KB at most
#: First word of the header ``descrip`` of every output this package writes
#: (``"dunet-deploy mask"``): a later run recognises its own files by it, whatever their name.
OUTPUT_MARKER = "dunet-deploy"
#: What an output can be (the second word of the marker).
OUTPUT_KINDS = ("mask", "prob")


@dataclass(frozen=True)
class NiftiLimits:
    """What an untrusted NIfTI file or request may cost before it is refused.

    Attributes:
        max_voxels: Most voxels (the float32 volume we build is 4 bytes each).
        max_voxel_bytes: Most bytes of voxel data as stored (dims × dtype size).
        max_file_bytes: Most bytes of the file or request as sent (compressed
            size for ``.nii.gz``).
    """

    max_voxels: int = _GIB // 4
    max_voxel_bytes: int = _GIB
    max_file_bytes: int = _GIB

    def __post_init__(self) -> None:
        for name in ("max_voxels", "max_voxel_bytes", "max_file_bytes"):
            if int(getattr(self, name)) < 1:
                raise DunetError(f"NIfTI limit {name} must be >= 1, got {getattr(self, name)}")


DEFAULT_LIMITS = NiftiLimits()


@dataclass
class NiftiVolume:
    """A loaded 3D NIfTI image.

    Attributes:
        data: float32 ``[X, Y, Z]`` voxel values with ``scl_slope``/``scl_inter``
            applied.
        affine: float64 ``[4, 4]`` voxel-to-world matrix (sform if set, else
            qform).
        header: The nibabel header, kept so outputs can copy geometry
            (``None`` for an in-memory volume; the affine is then used).
        path: Where it was read from (``None`` for in-memory volumes).
    """

    data: np.ndarray
    affine: np.ndarray
    header: Any = None
    path: Path | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of ``data``."""
        return tuple(self.data.shape)

    @property
    def zooms(self) -> tuple[float, ...]:
        """Voxel sizes (mm) of the three spatial axes."""
        if self.header is None:
            return tuple(float(z) for z in np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0)))
        return tuple(float(z) for z in self.header.get_zooms()[:3])


def nifti_suffix(path: PathLike) -> str:
    """Return ``".nii.gz"`` or ``".nii"`` for a NIfTI file name, else ``""``."""
    name = os.fspath(path).lower()
    if name.endswith(".nii.gz"):
        return ".nii.gz"
    if name.endswith(".nii"):
        return ".nii"
    return ""


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def _check_path(path: Path) -> None:
    if not path.exists():
        raise DunetError(f"{path}: no such file")
    if path.is_dir():
        raise DunetError(f"{path}: is a directory, not a NIfTI file")
    check_kind(path, VOLUME)  # a checkpoint or model given as a scan: say what it is


def _open_image(path: Path) -> Any:
    """nib.load with file checks; returns a NIfTI-1/2 image (data not read)."""
    _check_path(path)
    try:
        # nibabel logs (to stderr) each header field it "fixes"; ours are checked already.
        with nib.imageglobals.LoggingOutputSuppressor():
            img = nib.load(str(path))
    except nib.filebasedimages.ImageFileError:
        raise DunetError(f"{path}: not a NIfTI file") from None
    except Exception as exc:  # nibabel raises many types on corrupt input
        raise DunetError(f"{path}: cannot read NIfTI header ({_reason(exc)})") from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise DunetError(f"{path}: not a NIfTI file (nibabel reads it as {type(img).__name__})")
    return img


def _spatial_shape(path: PathLike, shape: Sequence[int]) -> tuple[int, ...]:
    """Squeeze trailing singleton dims beyond 3; reject anything not 3D."""
    dims = tuple(int(n) for n in shape)
    while len(dims) > 3 and dims[-1] == 1:
        dims = dims[:-1]
    if len(dims) != 3:
        raise DunetError(f"{path}: expected a 3D volume, got shape {tuple(shape)}")
    if min(dims) < 1:
        raise DunetError(f"{path}: empty volume of shape {dims}")
    return dims


def _bytes_text(n: int) -> str:
    return f"{n / _GIB:.2f} GiB" if n >= _GIB else f"{n / (1 << 20):.1f} MiB"


def check_header(header: Any, name: PathLike, limits: NiftiLimits = DEFAULT_LIMITS) -> int:
    """Refuse a NIfTI header whose data we must not read, before reading any.

    Args:
        header: A ``nib.Nifti1Header`` or ``nib.Nifti2Header``.
        name: The file (or request) name for the message.
        limits: The limits to enforce.

    Returns:
        The number of bytes of voxel data the header declares.

    Raises:
        DunetError: ``"<name>: <reason>"`` for a non-3D shape, an unsupported
            data type, too many voxels or bytes, a non-finite or singular
            affine, non-positive or non-finite voxel sizes, or a bad
            ``vox_offset``; also for anything else nibabel cannot make of it.
    """
    try:
        return _check_header(header, name, limits)
    except DunetError:
        raise
    except Exception as exc:  # numpy / nibabel on values no header should hold
        raise DunetError(f"{name}: corrupt NIfTI header ({_reason(exc)})") from None


def _check_header(header: Any, name: PathLike, limits: NiftiLimits) -> int:
    ndim = int(header["dim"][0])
    raw_dims = [int(d) for d in header["dim"][1 : 1 + ndim]] if 1 <= ndim <= 7 else []
    if not raw_dims or min(raw_dims) < 0:
        raise DunetError(f"{name}: corrupt NIfTI header (dim = {list(header['dim'])})")
    dims = _spatial_shape(name, raw_dims)
    try:
        dtype = header.get_data_dtype()
    except Exception:  # nibabel raises HeaderDataError/KeyError for unknown codes
        raise DunetError(f"{name}: unknown NIfTI datatype code {int(header['datatype'])}") from None
    if dtype.name not in SUPPORTED_DTYPES:
        raise DunetError(f"{name}: unsupported voxel type {dtype} (use an integer or float type)")
    if int(header["bitpix"]) != 8 * dtype.itemsize:
        raise DunetError(f"{name}: corrupt NIfTI header (bitpix {int(header['bitpix'])} for "
                         f"datatype {dtype}, which has {8 * dtype.itemsize})")
    # A slope of 0 or NaN means "unscaled" (nibabel writes NaN), and then the intercept
    # is ignored; an infinite slope, or a non-finite intercept beside a slope, is corrupt.
    slope, inter = float(header["scl_slope"]), float(header["scl_inter"])
    if np.isinf(slope) or (np.isfinite(slope) and slope != 0 and not np.isfinite(inter)):
        raise DunetError(f"{name}: corrupt NIfTI header (scl_slope = {slope}, "
                         f"scl_inter = {inter})")
    voxels = int(np.prod(np.array(raw_dims, dtype=object)))
    nbytes = voxels * dtype.itemsize
    if voxels > limits.max_voxels or nbytes > limits.max_voxel_bytes:
        raise DunetError(
            f"{name}: header declares {'x'.join(map(str, dims))} {dtype} voxels "
            f"({_bytes_text(nbytes)}), over the limit of {limits.max_voxels} voxels / "
            f"{_bytes_text(limits.max_voxel_bytes)}"
        )
    zooms = np.asarray(header["pixdim"][1:4], dtype=np.float64)
    if not (np.isfinite(zooms).all() and (np.abs(zooms) > 0).all()):
        raise DunetError(f"{name}: voxel sizes {zooms.tolist()} must be finite and non-zero")
    # Checked whenever a qform is declared, not only when it is the best affine: the
    # outputs copy the input's qform, and nibabel cannot rebuild an impossible one.
    if int(header["qform_code"]) > 0:
        bcd = [float(header[k]) for k in ("quatern_b", "quatern_c", "quatern_d")]
        if not np.isfinite(bcd).all() or sum(v * v for v in bcd) > 1 + 1e-6:
            raise DunetError(f"{name}: corrupt NIfTI header (impossible qform quaternion "
                             f"b, c, d = {bcd}: not finite or b² + c² + d² > 1)")
    affine = np.asarray(header.get_best_affine(), dtype=np.float64)
    if not np.isfinite(affine).all() or abs(float(np.linalg.det(affine[:3, :3]))) < 1e-12:
        raise DunetError(f"{name}: the voxel-to-world affine is not finite or is singular")
    offset = float(header["vox_offset"])
    if not (np.isfinite(offset) and 0 <= offset <= _MAX_VOX_OFFSET):
        raise DunetError(f"{name}: corrupt NIfTI header (vox_offset = {offset})")
    return nbytes


def _volume_from_image(img: Any, name: PathLike, path: Path | None) -> NiftiVolume:
    """Read the voxels of a checked image as float32 (scaling applied) and validate them."""
    shape = _spatial_shape(name, img.shape)
    try:
        data = np.asarray(img.get_fdata(dtype=np.float32))
    except MemoryError:
        raise
    except Exception as exc:  # EOFError, zlib.error, OSError, ValueError on truncation
        raise DunetError(f"{name}: cannot read voxel data, file truncated or corrupt "
                         f"({_reason(exc)})") from None
    data = data.reshape(shape)
    finite = np.isfinite(data)
    if not finite.all():
        bad = int(data.size - np.count_nonzero(finite))
        raise DunetError(f"{name}: {bad} voxel(s) are NaN or Inf")
    return NiftiVolume(data=data, affine=np.asarray(img.affine, dtype=np.float64),
                       header=img.header, path=path)


def load_nifti(path: PathLike, limits: NiftiLimits = DEFAULT_LIMITS) -> NiftiVolume:
    """Load a 3D NIfTI volume (.nii or .nii.gz, any numeric on-disk type).

    A 4D (or 5D) image whose extra dimensions are all 1 is squeezed to 3D.
    The header is checked with :func:`check_header` before the voxel data is
    read, and only the bytes the header declares are ever inflated.

    Args:
        path: File to read.
        limits: What the file may cost (file size, voxels, bytes).

    Returns:
        The volume with float32 data (scaling applied).

    Raises:
        DunetError: ``"<path>: <reason>"`` for a missing file, non-NIfTI or
            corrupt/truncated file, non-3D image, a header over ``limits``,
            or NaN/Inf voxels.
    """
    p = Path(path)
    _check_path(p)
    size = p.stat().st_size
    if size > limits.max_file_bytes:
        raise DunetError(f"{p}: file of {_bytes_text(size)} is over the limit of "
                         f"{_bytes_text(limits.max_file_bytes)}")
    raw = _file_header(p)
    if raw is not None:  # as written: nibabel's copy has some fields "fixed"
        check_header(raw[1], p, limits)
    img = _open_image(p)
    check_header(img.header, p, limits)
    return _volume_from_image(img, p, p)


def _file_header(path: Path) -> tuple[Any, Any] | None:
    """The header of a NIfTI file exactly as written; ``None`` when it is not one."""
    try:
        with open(path, "rb") as f:
            gz = f.read(2) == _GZIP_MAGIC
        with (gzip.open(path, "rb") if gz else open(path, "rb")) as f:
            head = f.read(_HEAD_BYTES)
    except (OSError, EOFError, zlib.error):
        return None  # nib.load says what is wrong with the file
    return _parse_header(head, path)


def _parse_header(head: bytes, name: PathLike) -> tuple[Any, Any] | None:
    """(image class, header) of a NIfTI-1/2 header's bytes, unchecked; ``None`` if not one.

    Raises:
        DunetError: a header nibabel cannot parse at all.
    """
    image_class: Any = None
    for cls in (nib.Nifti1Image, nib.Nifti2Image):
        size = cls.header_class.sizeof_hdr
        first = bytes(head[:4])
        if len(head) >= size and size in (int.from_bytes(first, "little"),
                                          int.from_bytes(first, "big")):
            image_class = cls
    if image_class is None:
        return None
    try:  # check=False: nibabel would "fix" (and hide) broken fields
        header = image_class.header_class.from_fileobj(io.BytesIO(head), check=False)
    except Exception as exc:  # nibabel's HeaderDataError / ValueError on bad magic etc.
        raise DunetError(f"{name}: cannot read NIfTI header ({_reason(exc)})") from None
    return image_class, header


def output_descrip(kind: str) -> str:
    """The header ``descrip`` written in an output of this package: ``"dunet-deploy mask"``.

    Args:
        kind: One of :data:`OUTPUT_KINDS`.
    """
    if kind not in OUTPUT_KINDS:
        raise ValueError(f"output kind {kind!r}: one of {', '.join(OUTPUT_KINDS)}")
    return f"{OUTPUT_MARKER} {kind}"


def output_kind(path: PathLike) -> str | None:
    """``"mask"`` or ``"prob"`` when ``path`` is a NIfTI file this package wrote, else ``None``.

    Reads only the header (the first 540 bytes, inflated from a ``.nii.gz``);
    a file that is missing, not NIfTI or unreadable is not ours (``None``).
    """
    p = Path(path)
    if not p.is_file():
        return None
    try:
        parsed = _file_header(p)
    except DunetError:
        return None
    if parsed is None:
        return None
    raw = np.asarray(parsed[1]["descrip"]).item()
    words = bytes(raw).split(b"\0", 1)[0].decode("latin-1").split()
    if len(words) == 2 and words[0] == OUTPUT_MARKER and words[1] in OUTPUT_KINDS:
        return words[1]
    return None


def _inflate(data: bytes, name: str, need: int) -> bytes:
    """The first ``need`` bytes of a gzip stream (multi-member), never inflating more."""
    out = bytearray()
    rest: bytes | memoryview = memoryview(data)
    try:
        while len(out) < need and len(rest):
            d = zlib.decompressobj(wbits=31)  # one gzip member
            chunk: bytes | memoryview = rest
            while len(out) < need and chunk and not d.eof:
                out += d.decompress(chunk, need - len(out))  # max_length caps the inflation
                chunk = d.unconsumed_tail
            if not d.eof:
                break
            rest = d.unused_data
    except zlib.error as exc:
        raise DunetError(f"{name}: corrupt gzip data ({_reason(exc)})") from None
    return bytes(out)


def load_nifti_bytes(data: bytes, name: str,
                     limits: NiftiLimits = DEFAULT_LIMITS) -> NiftiVolume:
    """Load a 3D NIfTI volume from a file's bytes (``.nii`` or ``.nii.gz``, told apart by content).

    For untrusted input (a server request): the size of ``data``, then the
    header (:func:`check_header`) are checked before any voxel data is
    inflated; a gzip stream is inflated only up to the header's
    ``vox_offset`` + voxel bytes, so trailing data (a gzip bomb) is never
    decompressed.

    Args:
        data: The file's bytes.
        name: Name used in messages (e.g. the client's file name).
        limits: What the request may cost.

    Returns:
        The volume (``path`` is ``None``; ``header`` set).

    Raises:
        DunetError: ``"<name>: <reason>"`` for anything but a valid 3D NIfTI
            within ``limits``.
    """
    if len(data) > limits.max_file_bytes:
        raise DunetError(f"{name}: {_bytes_text(len(data))} sent, over the limit of "
                         f"{_bytes_text(limits.max_file_bytes)}")
    gz = bytes(data[:2]) == _GZIP_MAGIC
    head = _inflate(data, name, _HEAD_BYTES) if gz else bytes(data[:_HEAD_BYTES])
    parsed = _parse_header(head, name)
    if parsed is None:
        raise DunetError(f"{name}: not a NIfTI file")
    image_class, header = parsed
    nbytes = check_header(header, name, limits)  # before vox_offset is used: it may be NaN
    need = int(header["vox_offset"]) + nbytes
    raw = _inflate(data, name, need) if gz else bytes(data[:need])
    if len(raw) < need:
        raise DunetError(f"{name}: cannot read voxel data, file truncated or corrupt "
                         f"({len(raw)} of {need} bytes)")
    try:
        with nib.imageglobals.LoggingOutputSuppressor():
            img = image_class.from_bytes(raw)
    except Exception as exc:  # nibabel raises many types on corrupt input
        raise DunetError(f"{name}: cannot read NIfTI ({_reason(exc)})") from None
    return _volume_from_image(img, name, None)


def load_mask(paths: PathLike | Sequence[PathLike]) -> np.ndarray:
    """Load one or several lesion masks and merge them (logical OR).

    A voxel is lesion when its value is ``> 0`` in any mask (ATLAS R1.1 splits
    some lesions over several ``LesionSmooth`` files).

    Args:
        paths: One path or a non-empty list of paths.

    Returns:
        uint8 ``[X, Y, Z]`` with values in {0, 1}.

    Raises:
        DunetError: when a file cannot be loaded, the list is empty, or the
            masks' shapes differ.
    """
    path_list = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if not path_list:
        raise DunetError("no mask files given")
    merged: np.ndarray | None = None
    first: Path | None = None
    for path in path_list:
        vol = load_nifti(path)
        if merged is None:
            merged, first = vol.data > 0, vol.path
        elif vol.data.shape != merged.shape:
            raise DunetError(
                f"{vol.path}: mask shape {vol.data.shape} differs from {merged.shape} of {first}"
            )
        else:
            merged |= vol.data > 0
    assert merged is not None
    return merged.astype(np.uint8)


def _check_representable(path: Path, data: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if not np.isfinite(data).all():
        raise DunetError(f"{path}: refusing to write NaN or Inf voxels")
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        if data.size and (data.min() < info.min or data.max() > info.max):
            raise DunetError(
                f"{path}: values {data.min()}..{data.max()} do not fit {dtype.name}"
            )
        if np.issubdtype(data.dtype, np.floating) and not np.array_equal(data, np.round(data)):
            raise DunetError(f"{path}: non-integer values cannot be stored as {dtype.name}")
    return data.astype(dtype)


def _header_for(affine: np.ndarray, shape: tuple[int, ...]) -> Any:
    """A fresh header for an in-memory reference volume (``header=None``)."""
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_sform(affine, code=2)
    hdr.set_qform(affine, code=2)
    hdr.set_zooms(tuple(float(z) for z in np.sqrt((affine[:3, :3] ** 2).sum(axis=0))))
    return hdr


def _image_like(name: PathLike, data: npt.ArrayLike, ref: NiftiVolume,
                dtype: npt.DTypeLike, scale: float = 1.0, descrip: str | None = None) -> Any:
    """A NIfTI image of ``data`` with the geometry of ``ref`` (see :func:`save_nifti_like`)."""
    arr = np.asarray(data)
    if arr.shape != ref.data.shape:
        raise DunetError(f"{name}: data shape {arr.shape} differs from reference {ref.data.shape}")
    np_dtype = np.dtype(dtype)
    arr = _check_representable(Path(name), arr, np_dtype)
    ref_hdr = ref.header if ref.header is not None else _header_for(ref.affine, ref.data.shape)
    hdr = ref_hdr.copy()
    hdr.set_data_dtype(np_dtype)
    image_class = nib.Nifti2Image if isinstance(hdr, nib.Nifti2Header) else nib.Nifti1Image
    img = image_class(arr, ref.affine, header=hdr)
    img.set_sform(ref_hdr.get_sform(), code=int(ref_hdr["sform_code"]))
    img.set_qform(ref_hdr.get_qform(), code=int(ref_hdr["qform_code"]))
    img.header.set_zooms(tuple(float(z) for z in ref_hdr.get_zooms()[:3]))
    # Store the values (times `scale`); the reference's scaling/display range mean nothing here.
    img.header.set_slope_inter(scale, 0.0)
    img.header["cal_min"] = 0.0
    img.header["cal_max"] = 0.0
    if descrip is not None:
        img.header["descrip"] = descrip.encode("ascii")[:79]
    return img


def nifti_bytes_like(data: npt.ArrayLike, ref: NiftiVolume, dtype: npt.DTypeLike = np.uint8,
                     *, name: str = "output", compresslevel: int = 1,
                     descrip: str | None = None) -> bytes:
    """The ``.nii.gz`` bytes of ``data`` with the geometry of ``ref`` (what a server returns).

    Args:
        data: Array of ``ref.data.shape``.
        ref: The volume whose geometry to copy.
        dtype: Stored dtype (integer dtypes require integral, in-range data).
        name: Name used in messages.
        compresslevel: gzip level (1: fast; masks compress well anyway).
        descrip: Header description (:func:`output_descrip`); ``None``: the reference's.

    Returns:
        A gzip-compressed NIfTI file, readable by :func:`load_nifti_bytes`.
    """
    img = _image_like(name, data, ref, dtype, descrip=descrip)
    return gzip.compress(img.to_bytes(), compresslevel=compresslevel, mtime=0)


def save_nifti_like(
    path: PathLike,
    data: npt.ArrayLike,
    ref: NiftiVolume,
    dtype: npt.DTypeLike = np.float32,
    scale: float = 1.0,
    *,
    descrip: str | None = None,
) -> Path:
    """Write ``data`` with the geometry of ``ref``, atomically.

    The output has the reference's shape, affine, qform/sform (and codes) and
    voxel sizes; ``scl_slope``/``scl_inter`` are reset so the values are stored
    as-is in ``dtype`` (e.g. uint8 masks, float32 probabilities). The file is
    first written to a temporary file in the same directory and then renamed
    over ``path``, so readers never see a partial file and on any error no
    file (temporary or final) is left behind.

    Args:
        path: Output file, ``.nii`` or ``.nii.gz``. Its directory must exist.
        data: Array of ``ref.data.shape``.
        ref: The volume whose geometry to copy.
        dtype: On-disk dtype. Integer dtypes require integral, in-range data.
        scale: ``scl_slope`` stored with the values (readers get ``value * scale``).
        descrip: Header description, at most 79 ASCII characters; this
            package's outputs carry :func:`output_descrip` so that a later run
            never takes them for scans (``None``: the reference's).

    Returns:
        The written path.

    Raises:
        DunetError: on a bad suffix, shape mismatch, unrepresentable values,
            missing directory or any write failure.
    """
    out = Path(path)
    suffix = nifti_suffix(out)
    if not suffix:
        raise DunetError(f"{out}: output file name must end in .nii or .nii.gz")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise DunetError(f"{out}: directory {parent} does not exist")
    img = _image_like(out, data, ref, dtype, scale, descrip)

    # Same directory so os.replace is an atomic rename; the suffix tells
    # nibabel whether to gzip. (Not mkstemp: its 0600 mode would stick.)
    tmp = parent / f".{out.name}.{secrets.token_hex(6)}.tmp{suffix}"
    try:
        nib.save(img, str(tmp))
        os.replace(tmp, out)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, Exception):
            # An OSError names our temporary file; the user's path and the reason are enough.
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else _reason(exc)
            raise DunetError(f"{out}: cannot write ({why})") from None
        raise
    return out
