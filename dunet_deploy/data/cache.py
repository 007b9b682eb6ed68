"""A preprocessed, memory-mapped slice cache for training.

Preprocessing (bring the case onto the model's grid as inference does, i.e.
reorient it exactly to the spec's orientation or resample it to the training
spacing — see :mod:`dunet_deploy.data.geometry` — then normalise, orient,
crop, resize) runs once per case and the result is kept on disk, so training
never holds a dataset of float32 volumes in memory and data loading is a
memory-mapped read plus a slab gather.

Layout of ``cache_dir``::

    manifest.json              spec, spec digest, cases, per-slice statistics
    case_00000_images.npy      float16 [Z, S, S]   preprocessed slices
    case_00000_labels.npy      uint8   [Z, S, S]   labels in {0, 1}
    ...

``manifest.json`` is written last (atomically), so an interrupted build has no
manifest and is rebuilt on the next call. A cache is reused when its spec
digest and its case list (ids, files, file sizes and modification times)
match; otherwise it is rebuilt from scratch.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dunet_deploy.data.geometry import plan_model_space
from dunet_deploy.data.layouts import Case, load_case
from dunet_deploy.data.preprocess import (
    mask_to_labels,
    nonempty_slice_flags,
    slab_flags_from_slice_flags,
    volume_to_slices,
)
from dunet_deploy.errors import DunetError
from dunet_deploy.spec import PreprocessSpec

__all__ = ["CACHE_FORMAT", "MANIFEST", "SliceCache", "build_cache"]

CACHE_FORMAT = 1
MANIFEST = "manifest.json"


def _file_stamp(path: Path) -> list[Any]:
    try:
        st = path.stat()
    except OSError:
        raise DunetError(f"{path}: no such file") from None
    return [str(path), st.st_size, st.st_mtime_ns]


def _case_key(case: Case) -> dict[str, Any]:
    """What identifies a case's source data (for cache reuse)."""
    return {
        "case_id": case.case_id,
        "image": _file_stamp(case.image),
        "masks": [_file_stamp(m) for m in case.masks],
    }


class SliceCache:
    """Read access to a built cache; see the module docstring for the layout.

    Global slab index ``i`` runs over all slices of all cases in manifest
    order; slab ``i`` is centred on slice ``z`` of case ``k``.

    Safe to pickle into DataLoader workers: memory maps are reopened lazily in
    each process.
    """

    def __init__(self, cache_dir: str | os.PathLike[str]) -> None:
        """Open an existing cache.

        Raises:
            DunetError: when there is no valid manifest.
        """
        self.cache_dir = Path(cache_dir)
        manifest_path = self.cache_dir / MANIFEST
        try:
            self.manifest: dict[str, Any] = json.loads(manifest_path.read_text())
        except FileNotFoundError:
            raise DunetError(f"{self.cache_dir}: not a slice cache (no {MANIFEST})") from None
        except (OSError, json.JSONDecodeError) as exc:
            raise DunetError(f"{manifest_path}: unreadable cache manifest ({exc})") from None
        if self.manifest.get("format") != CACHE_FORMAT:
            raise DunetError(f"{manifest_path}: unsupported cache format")
        self.spec = PreprocessSpec.from_dict(self.manifest["spec"])
        cases = self.manifest["cases"]
        self.case_ids: list[str] = [c["case_id"] for c in cases]
        self._z = np.array([c["z"] for c in cases], dtype=np.int64)
        # _starts[k] = global index of slice 0 of case k; _starts[-1] = total.
        self._starts = np.concatenate([[0], np.cumsum(self._z)]).astype(np.int64)
        self._label_pixels = np.concatenate(
            [np.asarray(c["label_pixels"], dtype=np.int64) for c in cases] or [np.zeros(0, int)]
        )
        slab_flags = [
            slab_flags_from_slice_flags(np.asarray(c["nonempty"], dtype=bool), self.spec)
            for c in cases
        ]
        self._slab_nonempty = np.concatenate(slab_flags or [np.zeros(0, bool)])
        self._offsets = np.asarray(self.spec.slab_offsets, dtype=np.int64)
        self._maps: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    # ------------------------------------------------------------ pickling
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_maps"] = {}
        return state

    # -------------------------------------------------------------- access
    def __len__(self) -> int:
        """Number of slabs (= total number of slices over all cases)."""
        return int(self._starts[-1])

    @property
    def digest(self) -> str:
        """Digest of the spec the cache was built with."""
        return str(self.manifest["spec_digest"])

    def _arrays(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        arrays = self._maps.get(k)
        if arrays is None:
            entry = self.manifest["cases"][k]
            images = np.load(self.cache_dir / entry["images"], mmap_mode="r")
            labels = np.load(self.cache_dir / entry["labels"], mmap_mode="r")
            arrays = self._maps[k] = (images, labels)
        return arrays

    def _locate(self, i: int) -> tuple[int, int]:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"slab index {i} out of range for cache of {n} slabs")
        i %= n
        k = int(np.searchsorted(self._starts, i, side="right") - 1)
        return k, i - int(self._starts[k])

    def slab(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Slab ``i`` and its label.

        Returns:
            ``(image float32 [C, S, S], label uint8 [1, S, S])``; channels
            outside the case's volume are zeros (``slices_to_slabs`` semantics).
        """
        k, z = self._locate(int(i))
        images, labels = self._arrays(k)
        s = self.spec.image_size
        out = np.zeros((self._offsets.size, s, s), dtype=np.float32)
        src = z + self._offsets
        valid = (src >= 0) & (src < images.shape[0])
        out[valid] = images[src[valid]]
        return out, np.array(labels[z][None], dtype=np.uint8)

    def case_of(self, i: int) -> str:
        """Case id that slab ``i`` belongs to."""
        return self.case_ids[self._locate(int(i))[0]]

    def _case_number(self, case_id: str) -> int:
        try:
            return self.case_ids.index(case_id)
        except ValueError:
            raise KeyError(f"case {case_id!r} is not in the cache") from None

    def case_indices(self, case_id: str) -> np.ndarray:
        """Global slab indices of a case, int64 ``[Z]`` in slice order.

        Raises:
            KeyError: for an unknown case id.
        """
        k = self._case_number(case_id)
        return np.arange(self._starts[k], self._starts[k + 1], dtype=np.int64)

    def case_slabs(self, case_id: str) -> tuple[np.ndarray, np.ndarray]:
        """All slabs of one case, e.g. for per-case validation.

        Returns:
            ``(images float32 [Z, C, S, S], labels uint8 [Z, 1, S, S])``.

        Raises:
            KeyError: for an unknown case id.
        """
        images, labels = self._arrays(self._case_number(case_id))
        z = images.shape[0]
        src = np.arange(z)[:, None] + self._offsets[None, :]
        valid = (src >= 0) & (src < z)
        out = np.zeros((z, self._offsets.size, *images.shape[1:]), dtype=np.float32)
        out[valid] = images[src[valid]]
        return out, np.array(labels[:, None], dtype=np.uint8)

    def case_z(self, case_id: str) -> int:
        """Number of slices of a case."""
        return int(self.case_indices(case_id).size)

    def lesion_slab_indices(self) -> np.ndarray:
        """Global indices of slabs whose label has any lesion pixel (int64)."""
        return np.flatnonzero(self._label_pixels > 0).astype(np.int64)

    def nonempty_indices(self) -> np.ndarray:
        """Global indices of slabs with any nonzero raw voxel in the crop box (int64).

        Matches :func:`~dunet_deploy.data.preprocess.nonempty_slab_indices`,
        i.e. the slabs the runtime actually runs the network on.
        """
        return np.flatnonzero(self._slab_nonempty).astype(np.int64)


def _valid_existing(cache_dir: Path, digest: str, keys: list[dict[str, Any]]) -> bool:
    manifest_path = cache_dir / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if manifest.get("format") != CACHE_FORMAT or manifest.get("spec_digest") != digest:
        return False
    entries = manifest.get("cases", [])
    if [e.get("source") for e in entries] != keys:
        return False
    return all(
        (cache_dir / e["images"]).is_file() and (cache_dir / e["labels"]).is_file()
        for e in entries
    )


def build_cache(
    cases: Sequence[Case],
    spec: PreprocessSpec,
    cache_dir: str | os.PathLike[str],
    *,
    progress: Callable[[int, int, str], None] | None = None,
) -> SliceCache:
    """Build (or reuse) the slice cache for ``cases`` under ``spec``.

    Cases are processed one at a time; peak memory is about one raw volume
    plus its preprocessed slices.

    Args:
        cases: Cases to include, in the order slab indices should follow.
        spec: Preprocessing spec (its digest keys the cache).
        cache_dir: Folder for the cache (created if missing).
        progress: Optional ``callback(done, total, case_id)`` after each case.

    Returns:
        The opened cache.

    Raises:
        DunetError: when a case cannot be read, its image and mask shapes
            differ, the spec cannot take its geometry, or case ids repeat.
    """
    out = Path(cache_dir)
    ids = [c.case_id for c in cases]
    if len(set(ids)) != len(ids):
        raise DunetError("build_cache: duplicate case ids")
    if not cases:
        raise DunetError("build_cache: no cases given")
    digest = spec.digest()
    keys = [_case_key(c) for c in cases]
    if _valid_existing(out, digest, keys):
        return SliceCache(out)

    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / MANIFEST
    manifest_path.unlink(missing_ok=True)  # invalidate before touching any array
    for stale in out.glob("case_*_*.npy"):
        stale.unlink()
    s = spec.image_size
    entries = []
    for k, (case, key) in enumerate(zip(cases, keys, strict=True)):
        image, mask = load_case(case)
        try:
            space = plan_model_space(image.shape, image.affine, spec)
        except DunetError as exc:
            raise DunetError(f"case {case.case_id}: {exc}") from None
        # Exactly what inference does: the image and its mask on the model's grid.
        volume, mask = space.to_model(image.data), space.mask_to_model(mask)
        slices = volume_to_slices(volume, spec)
        labels = mask_to_labels(mask, spec)[:, 0]
        flags = nonempty_slice_flags(volume, spec)
        z = slices.shape[0]
        img_name, lab_name = f"case_{k:05d}_images.npy", f"case_{k:05d}_labels.npy"
        img_map = np.lib.format.open_memmap(out / img_name, mode="w+", dtype=np.float16,
                                            shape=(z, s, s))
        img_map[:] = slices
        img_map.flush()
        lab_map = np.lib.format.open_memmap(out / lab_name, mode="w+", dtype=np.uint8,
                                            shape=(z, s, s))
        lab_map[:] = labels
        lab_map.flush()
        del img_map, lab_map
        entries.append({
            "case_id": case.case_id,
            "source": key,
            "volume_shape": list(volume.shape),
            "geometry": space.describe(),
            "z": int(z),
            "images": img_name,
            "labels": lab_name,
            # Raw mask voxels per axial slice (whole slice) and label pixels in
            # the resized crop (what training sees; drives oversampling).
            "lesion_voxels": _per_slice_counts(mask, spec).tolist(),
            "label_pixels": labels.reshape(z, -1).sum(axis=1, dtype=np.int64).tolist(),
            "nonempty": flags.astype(bool).tolist(),
        })
        if progress is not None:
            progress(k + 1, len(cases), case.case_id)
    manifest = {
        "format": CACHE_FORMAT,
        "spec_digest": digest,
        "spec": spec.to_dict(),
        "cases": entries,
    }
    tmp = out / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest) + "\n")
    os.replace(tmp, manifest_path)
    return SliceCache(out)


def _per_slice_counts(mask: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    per = np.moveaxis(mask, spec.axial_axis, 0)
    return per.reshape(per.shape[0], -1).sum(axis=1, dtype=np.int64)
