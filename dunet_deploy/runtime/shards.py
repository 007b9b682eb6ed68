"""Sharded runs: one cohort split over many processes or machines, and their summaries merged.

A Slurm job array (or any N processes) runs the same command with ``I/N``::

    inputs --expand--> [case 0, case 1, ..., case T-1]        (every shard expands all of them)
    case --key--> path relative to its input root --sha256--> shard 1..N
    shard I segments its own cases and writes summary-I-of-N.json
    merge_summaries(OUT): every summary-*-of-N.json -> one summary.json (cases in input order)

A case's shard depends on its own relative path only (not on its position), so
adding files to a cohort moves no case to another shard, and every machine
agrees whatever folder the data is mounted at. An input that yields nothing
(a pattern that matches no file) is keyed by its text, so exactly one shard
reports it.

Nothing here imports torch or a backend.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any

from dunet_deploy.artifacts import write_json
from dunet_deploy.errors import DunetError
from dunet_deploy.runtime.dicom_io import ScanReader
from dunet_deploy.runtime.pipeline import (
    NIFTI_READER,
    SUMMARY_NAME,
    InputItem,
    Reader,
    expand_inputs,
    output_stem,
)

__all__ = [
    "Shard",
    "ShardPlan",
    "input_root",
    "merge_summaries",
    "parse_shard",
    "plan_shard",
    "shard_key",
    "shard_of",
    "shard_summaries",
]

#: ``summary-I-of-N.json``, the summary a shard writes (never ``summary.json``).
SHARD_SUMMARY = re.compile(r"^summary-(\d+)-of-(\d+)\.json$")
_SHARD_TEXT = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count`` (1-based, as Slurm's ``--array=1-N`` numbers tasks).

    Raises:
        DunetError: unless ``1 <= index <= count``.
    """

    index: int
    count: int

    def __post_init__(self) -> None:
        if self.count < 1:
            raise DunetError(f"shard {self}: the count N must be >= 1", option="shard")
        if not 1 <= self.index <= self.count:
            raise DunetError(f"shard {self}: I must be between 1 and {self.count}",
                             option="shard")

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    @property
    def summary_name(self) -> str:
        """``summary-I-of-N.json``."""
        return f"summary-{self.index}-of-{self.count}.json"

    def owns(self, key: str) -> bool:
        """Whether the case with this :func:`shard_key` belongs to this shard."""
        return shard_of(key, self.count) == self.index


def parse_shard(text: str) -> Shard:
    """``"2/8"`` -> ``Shard(2, 8)``.

    Raises:
        DunetError: a one-line reason for anything but ``I/N`` with ``1 <= I <= N``.
    """
    match = _SHARD_TEXT.match(text)
    if match is None:
        raise DunetError(f"shard {text!r}: expected I/N, like 1/4 (the first of four)",
                         option="shard")
    return Shard(int(match.group(1)), int(match.group(2)))


def shard_of(key: str, count: int) -> int:
    """The shard (1..``count``) of a case key: the first 8 bytes of its SHA-256, modulo ``count``.

    Python's ``hash`` is salted per process; SHA-256 gives every machine the same answer.
    """
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return 1 + int.from_bytes(digest[:8], "big") % count


def input_root(text: str | os.PathLike[str]) -> Path:
    """The folder that an input's cases are named relative to.

    A directory is its own root; a glob pattern's root is the part before its
    first wildcard (``data/sub-*/anat/*.nii.gz`` -> ``data``); a file's root is
    its folder.
    """
    path = Path(text)
    if path.is_dir():
        return path
    parts = path.parts
    for i, part in enumerate(parts):
        if any(ch in part for ch in "*?["):
            return Path(*parts[:i]) if i else Path(".")
    return path.parent


def shard_key(path: str | os.PathLike[str], root: str | os.PathLike[str]) -> str:
    """The case's path relative to its input root, with ``/`` separators (the hashing key)."""
    p, r = PurePath(path), PurePath(root)
    try:
        rel = p.relative_to(r)
    except ValueError:  # e.g. a root "." with an absolute match
        rel = PurePath(os.path.relpath(p, r))
    return rel.as_posix()


@dataclass(frozen=True)
class ShardPlan:
    """The cases of one shard, out of the whole run's expanded inputs.

    Attributes:
        shard: Which shard.
        total: Inputs in the whole run (every shard counts the same).
        positions: Each of this shard's inputs' position in the whole run.
        items: This shard's inputs, in run order.
        keys: Their :func:`shard_key` values.
    """

    shard: Shard
    total: int
    positions: tuple[int, ...]
    items: tuple[InputItem, ...]
    keys: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        """The ``"shard"`` entry of ``summary-I-of-N.json`` (what :func:`merge_summaries` reads)."""
        return {"index": self.shard.index, "count": self.shard.count, "total": self.total,
                "positions": list(self.positions),
                "inputs": [str(item.path) for item in self.items],
                "keys": list(self.keys)}


def _keys(inputs: Sequence[str | os.PathLike[str]], recursive: bool, reader: Reader
          ) -> dict[Path, str]:
    """Resolved path -> key, each file keyed under the first input that reaches it."""
    keys: dict[Path, str] = {}
    for raw in inputs:
        root = input_root(raw)
        for item in expand_inputs([raw], recursive=recursive, reader=reader):
            if not item.matched_nothing:
                keys.setdefault(item.path.resolve(), shard_key(item.path, root))
    return keys


def plan_shard(
    inputs: Sequence[str | os.PathLike[str]],
    shard: Shard,
    *,
    recursive: bool = False,
    items: Sequence[InputItem] | None = None,
    reader: Reader = NIFTI_READER,
) -> ShardPlan:
    """This shard's part of the inputs.

    Args:
        inputs: Files, directories and patterns, as every shard is given them.
        shard: Which part.
        recursive: Directories are searched in their sub-folders too.
        items: ``expand_inputs(inputs, recursive=recursive, reader=reader)``
            when the caller already has it.
        reader: Says what an input is (as the run is given it).

    Returns:
        A :class:`ShardPlan`; the shards of one count partition the inputs.
    """
    everything = (list(items) if items is not None
                  else expand_inputs(inputs, recursive=recursive, reader=reader))
    keys = _keys(inputs, recursive, reader)
    positions, mine, mine_keys = [], [], []
    for pos, item in enumerate(everything):
        key = (item.path.as_posix() if item.matched_nothing
               else keys.get(item.path.resolve(), item.path.name))
        if shard.owns(key):
            positions.append(pos)
            mine.append(item)
            mine_keys.append(key)
    return ShardPlan(shard, len(everything), tuple(positions), tuple(mine), tuple(mine_keys))


# --------------------------------------------------------------------- merge
def shard_summaries(out_dir: str | os.PathLike[str]) -> dict[Shard, Path]:
    """The ``summary-I-of-N.json`` files in ``out_dir``, by shard."""
    found: dict[Shard, Path] = {}
    for path in sorted(Path(out_dir).glob("summary-*-of-*.json")):
        match = SHARD_SUMMARY.match(path.name)
        if match is not None:
            found[Shard(int(match.group(1)), int(match.group(2)))] = path
    return found


def _read(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DunetError(f"{path}: unreadable shard summary ({exc})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("shard"), dict) \
            or not isinstance(doc.get("cases"), list):
        raise DunetError(f"{path}: not a shard summary (no \"shard\" or \"cases\")")
    return doc


def _same_run(docs: dict[Shard, tuple[Path, dict[str, Any]]]) -> None:
    """Refuse shards made by different models or options, or from different inputs."""
    (_, (first, ref)), *rest = sorted(docs.items(), key=lambda kv: kv[0].index)
    for shard, (path, doc) in rest:
        if doc.get("fingerprint") != ref.get("fingerprint") or not ref.get("fingerprint"):
            raise DunetError(f"{path.name} and {first.name} were made by different models or "
                             f"options (fingerprint {doc.get('fingerprint')} against "
                             f"{ref.get('fingerprint')}); rerun the stale shard")
        if doc["shard"].get("total") != ref["shard"].get("total"):
            raise DunetError(f"{path.name} saw {doc['shard'].get('total')} inputs and "
                             f"{first.name} {ref['shard'].get('total')}: the shards were given "
                             f"different inputs")
        if shard.count != doc["shard"].get("count") or shard.index != doc["shard"].get("index"):
            raise DunetError(f"{path.name}: its content is for shard "
                             f"{doc['shard'].get('index')}/{doc['shard'].get('count')}")


def merge_summaries(
    out_dir: str | os.PathLike[str],
    inputs: Sequence[str | os.PathLike[str]] | None = None,
    *,
    recursive: bool = False,
) -> dict[str, Any]:
    """Combine the shards' ``summary-I-of-N.json`` in ``out_dir`` into one ``summary.json``.

    The merged document has the shape of one run's summary (its ``cases`` in
    input order, ``total``/``done``/``ok``/``failed``/``skipped_existing``
    summed over all shards) plus
    ``"shards"`` (count, found, missing, each shard's machine and wall time),
    ``"missing_cases"`` (inputs no summary reports: cut off by an interrupt, or
    in a shard that wrote nothing) and ``"failed_cases"`` (inputs that failed).

    Args:
        out_dir: The folder the shards wrote into.
        inputs: The run's inputs, to name the cases of shards that wrote no
            summary (without them, only their count is known).
        recursive: As the shards were run.

    Returns:
        The merged document (also written to ``out_dir/summary.json``).

    Raises:
        DunetError: no shard summary; summaries of different shard counts,
            models, options or inputs; the same case in two summaries.
    """
    out = Path(out_dir)
    if not out.is_dir():
        raise DunetError(f"{out}: not a folder")
    found = shard_summaries(out)
    if not found:
        raise DunetError(f"{out}: no shard summaries (summary-I-of-N.json) to merge")
    counts = sorted({s.count for s in found})
    if len(counts) > 1:
        names = ", ".join(p.name for p in found.values())
        raise DunetError(f"{out}: summaries of different shard counts ({names}); "
                         f"remove the stale ones")
    count = counts[0]
    docs = {shard: (path, _read(path)) for shard, path in found.items()}
    _same_run(docs)

    rows: list[tuple[int, dict[str, Any]]] = []
    owner: dict[str, str] = {}
    missing: list[tuple[int, str]] = []
    for path, doc in sorted(docs.values(), key=lambda pd: pd[1]["shard"]["index"]):
        plan = doc["shard"]
        position = dict(zip(plan["inputs"], plan["positions"]))
        reported = set()
        for case in doc["cases"]:
            stem = output_stem(case["input"])
            if stem in owner:
                raise DunetError(f"overlapping shards: case {stem!r} is in {owner[stem]} and "
                                 f"{path.name}")
            owner[stem] = path.name
            reported.add(case["input"])
            rows.append((position.get(case["input"], plan["total"]), case))
        missing.extend((pos, name) for name, pos in position.items() if name not in reported)

    absent = [i for i in range(1, count + 1) if Shard(i, count) not in docs]
    first_doc = min(docs.values(), key=lambda pd: pd[1]["shard"]["index"])[1]
    total = int(next(iter(docs.values()))[1]["shard"]["total"])
    if absent and inputs is not None:
        # the inputs as the shards expanded them: DICOM series, the output folder left out
        series = (first_doc.get("options") or {}).get("series")
        reader = ScanReader(series if isinstance(series, str) else None)
        items = expand_inputs(inputs, recursive=recursive, reader=reader, out_dir=out)
        for i in absent:
            plan = plan_shard(inputs, Shard(i, count), recursive=recursive, items=items,
                              reader=reader)
            missing.extend(zip(plan.positions, (str(it.path) for it in plan.items)))
    rows.sort(key=lambda pc: pc[0])
    missing.sort()
    cases = [case for _, case in rows]
    shard_docs = [doc for _, doc in sorted(docs.values(), key=lambda pd: pd[1]["shard"]["index"])]
    first = shard_docs[0]
    interrupted = [f"{d['shard']['index']}/{count}: {d['interrupted']}"
                   for d in shard_docs if d.get("interrupted")]
    merged = {
        **{k: v for k, v in first.items() if k != "shard"},
        "wall_s": max(float(d.get("wall_s", 0.0)) for d in shard_docs),
        "model_load_s": max(float(d.get("model_load_s", 0.0)) for d in shard_docs),
        "interrupted": "; ".join(interrupted) or None,
        "total": total,
        "done": len(cases),
        "ok": sum(c.get("status") == "ok" for c in cases),
        "failed": sum(c.get("status") != "ok" for c in cases),
        "skipped_existing": sum(int(d.get("skipped_existing") or 0) for d in shard_docs),
        "cases": cases,
        "shards": {
            "count": count,
            "found": [d["shard"]["index"] for d in shard_docs],
            "missing": absent,
            "runs": [{"index": d["shard"]["index"], "wall_s": d.get("wall_s"),
                      "machine": d.get("machine"), "interrupted": d.get("interrupted")}
                     for d in shard_docs],
        },
        "missing_cases": [name for _, name in missing],
        "unlisted_cases": total - len(cases) - len(missing),
        "failed_cases": [c["input"] for c in cases if c.get("status") != "ok"],
    }
    write_json(out / SUMMARY_NAME, merged)
    return merged
