"""What kind of file is this? Recognise our inputs by content, never by suffix alone.

Users hand a command the wrong file (``dunet-infer --engine run/best.pt``,
``dunet-export scan.nii.gz``); the reader for the expected kind then fails
with a message about its own format ("no sidecar", "truncated checkpoint")
that does not say what went wrong. :func:`sniff` reads a few hundred bytes
and tells which of our kinds the file is; :func:`check_kind` turns a
mismatch into one line saying what the file is and which command or option
takes it.

Kinds (``FileKind.name``):

==============  ==========================================================
``checkpoint``  a ``torch.save`` file: a zip holding ``*/data.pkl``, or a
                legacy pickle (protocol 2+)
``onnx``        an ONNX ``ModelProto`` (protobuf: ``ir_version`` first,
                then a ModelProto field)
``engine``      a TensorRT engine: ``ftrt`` magic, or one with a
                dunet-deploy sidecar ``<name>.json`` that names TensorRT
``sidecar``     a dunet-deploy JSON description (engine sidecar, ``model.json``)
``nifti``       a NIfTI-1/2 header (``sizeof_hdr`` 348/540 and its magic),
                gzip-compressed or not
``triton``      a Triton model configuration (``config.pbtxt``: text with a
                ``backend:`` or ``platform:`` line)
==============  ==========================================================

numpy-free and torch-free: the runtime imports it.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CHECKPOINT", "KINDS", "MODEL", "VOLUME", "FileKind", "check_kind", "sniff"]

KINDS = ("checkpoint", "onnx", "engine", "sidecar", "nifti", "triton")
#: What each reader expects (the ``expected`` argument of :func:`check_kind`).
CHECKPOINT = ("checkpoint",)
MODEL = ("onnx", "engine")
VOLUME = ("nifti",)
_HEAD = 4096
#: Tags of ModelProto fields that may follow ``ir_version`` (field number << 3 | wire type).
_MODEL_TAGS = frozenset({0x12, 0x1A, 0x22, 0x28, 0x32, 0x3A, 0x42, 0x72, 0x7A, 0x82})
_NIFTI_MAGICS = {348: (344, (b"n+1\0", b"ni1\0")), 540: (4, (b"n+2\0", b"ni2\0"))}
_TRITON_KEY = re.compile(rb'^[ \t]*(backend|platform)[ \t]*:[ \t]*"', re.MULTILINE)


@dataclass(frozen=True)
class FileKind:
    """A recognised file.

    Attributes:
        name: One of :data:`KINDS`.
        what: How to call it in a sentence ("a PyTorch checkpoint").
    """

    name: str
    what: str


_WHAT = {
    "checkpoint": "a PyTorch checkpoint",
    "onnx": "an ONNX model",
    "engine": "a TensorRT engine",
    "sidecar": "a dunet-deploy model description (JSON sidecar)",
    "nifti": "a NIfTI volume",
    "triton": "a Triton model configuration",
}


def _read_head(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(_HEAD)


def _varint(data: bytes, pos: int) -> tuple[int, int] | None:
    value, shift = 0, 0
    while pos < len(data) and shift < 64:
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        pos += 1
        if not byte & 0x80:
            return value, pos
        shift += 7
    return None


def _is_onnx(head: bytes) -> bool:
    if len(head) < 3 or head[0] != 0x08:  # field 1 (ir_version), varint
        return False
    parsed = _varint(head, 1)
    if parsed is None:
        return False
    version, pos = parsed
    return 1 <= version <= 100 and pos < len(head) and head[pos] in _MODEL_TAGS


def _nifti_header(head: bytes) -> bool:
    for order in ("<", ">"):
        if len(head) < 4:
            return False
        size = struct.unpack(f"{order}i", head[:4])[0]
        if size in _NIFTI_MAGICS:
            offset, magics = _NIFTI_MAGICS[size]
            return head[offset:offset + 4] in magics
    return False


def _is_nifti(path: Path, head: bytes) -> bool:
    if head[:2] == b"\x1f\x8b":
        try:
            with gzip.open(path, "rb") as f:
                head = f.read(548)
        except (OSError, EOFError, zlib.error):
            return False
    return _nifti_header(head)


def _is_checkpoint(path: Path, head: bytes) -> bool:
    if head[:3] == b"\x80\x02\x8a":
        return True  # legacy torch.save: a protocol-2 pickle that starts with its magic number
    if head[:4] != b"PK\x03\x04":
        return False
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("/data.pkl") or n == "data.pkl" for n in z.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def _sidecar_doc(path: Path) -> dict[str, object] | None:
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return doc if isinstance(doc, dict) and doc.get("format") == "dunet-deploy" else None


def _is_engine(path: Path, head: bytes) -> bool:
    if head[:4] == b"ftrt":  # TensorRT's plan magic tag
        return True
    side = _sidecar_doc(path.with_name(path.name + ".json"))
    return side is not None and ("tensorrt" in side or "tensorrt_version" in side)


def sniff(path: str | os.PathLike[str]) -> FileKind | None:
    """The kind of ``path`` by content, or ``None`` (unknown, missing, unreadable)."""
    p = Path(path)
    try:
        if not p.is_file():
            return None
        head = _read_head(p)
    except OSError:
        return None
    if _is_onnx(head):
        name = "onnx"
    elif _is_nifti(p, head):
        name = "nifti"
    elif _is_checkpoint(p, head):
        name = "checkpoint"
    elif head[:1] == b"{" and _sidecar_doc(p) is not None:
        name = "sidecar"
    elif _is_engine(p, head):
        name = "engine"
    elif b"\0" not in head and _TRITON_KEY.search(head):
        name = "triton"
    else:
        return None
    return FileKind(name, _WHAT[name])


def _hint(kind: str, path: Path) -> str:
    """Which command takes a file of ``kind``, spelled for ``path``."""
    if kind == "checkpoint":
        return f"export it first: dunet-export {path} -o export"
    if kind in ("onnx", "engine"):
        return f"run it with dunet-infer --engine {path} or dunet-eval --engine {path}"
    if kind == "nifti":
        return f"segment it with dunet-infer --engine MODEL {path} -o masks"
    if kind == "triton":  # ROOT/NAME/config.pbtxt
        return f"serve its repository: dunet-serve --repository {path.parent.parent}"
    return f"give the model it describes instead: --engine {_described_model(path)}"


def _described_model(sidecar: Path) -> Path:
    """The model a sidecar describes: ``model.plan.json`` -> ``model.plan``;
    ``model.json`` -> the ``model.onnx`` (or engine) beside it."""
    stem = sidecar.name[: -len(".json")] if sidecar.name.endswith(".json") else sidecar.stem
    candidates = [sidecar.with_name(stem)] if Path(stem).suffix else []
    candidates += [sidecar.with_name(stem + s) for s in (".onnx", ".plan", ".engine")]
    return next((c for c in candidates if c.is_file()), candidates[0])


def check_kind(path: str | os.PathLike[str], expected: tuple[str, ...],
               takes: str | None = None) -> FileKind | None:
    """Refuse a file that is recognisably another kind than ``expected``.

    Unknown or unreadable files pass: the reader of the expected kind reports
    them in its own words.

    Args:
        path: The file as the user named it.
        expected: Acceptable kinds (from :data:`KINDS`).
        takes: The option or command that was given the file (``"--engine"``),
            for "``<takes>`` takes ..."; without it the message says "not ...".

    Returns:
        The kind found (one of ``expected``), or ``None`` when not recognised.

    Raises:
        DunetError: ``"run/best.pt: is a PyTorch checkpoint; --engine takes an
            exported model (...): export it first: dunet-export run/best.pt -o export"``.
    """
    from dunet_deploy.errors import DunetError

    kind = sniff(path)
    if kind is None or kind.name in expected:
        return kind
    wanted = _PHRASES.get(tuple(expected)) or " or ".join(_WHAT[k] for k in expected)
    p = Path(path)
    said = f"; {takes} takes {wanted}" if takes else f", not {wanted}"
    raise DunetError(f"{p}: is {kind.what}{said}: {_hint(kind.name, p)}")


_PHRASES = {
    ("checkpoint",): "a dunet-train checkpoint (run/best.pt)",
    ("onnx", "engine"): "an exported model (.onnx, or a TensorRT engine with its sidecar)",
    ("nifti",): "a NIfTI volume (.nii / .nii.gz)",
}
