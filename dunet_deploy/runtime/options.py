"""``InferenceOptions``: every setting of a run, validated once, built once by the CLI.

The same frozen object travels from ``dunet-infer`` / ``dunet-eval`` to the
:class:`~dunet_deploy.Segmenter`, the executors (in-process, worker
processes), the Triton client and summaries; it is picklable and JSON
round-trippable (:meth:`InferenceOptions.to_dict` /
:meth:`InferenceOptions.from_dict`), so it can also go into request
parameters, actor constructors and shard records::

    opts = InferenceOptions(backend="openvino", batch_size=8, save_prob=True)
    with Segmenter("export/model.onnx", opts) as seg:
        seg.predict_files(["scans/"], "masks/")
    InferenceOptions.from_dict(json.loads(json.dumps(opts.to_dict()))) == opts  # True

Adding a setting is one field here: its default lives only in the field, its
check in :meth:`InferenceOptions.__post_init__`, and ``metadata={"output":
True}`` marks a field that changes what is written (it then enters
:meth:`InferenceOptions.fingerprint`). Messages name the parameter
(``batch_size 0: must be >= 1``); ``DunetError.option`` lets a command print
its flag instead. Imports neither numpy nor torch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from dunet_deploy import choices
from dunet_deploy.choices import check_choice
from dunet_deploy.errors import DunetError

__all__ = ["InferenceOptions", "Sources"]

#: Where each model-defaulted setting came from: ``"model"`` or ``"argument"``.
Sources = dict[str, str]

#: A DICOM UID: dot-separated numbers, at most 64 characters.
_UID = re.compile(r"(?=.{1,64}$)[0-9]+(\.[0-9]+)*")
_OUT = {"output": True}  # the field changes what a run writes (see fingerprint())


@dataclass(frozen=True)
class InferenceOptions:
    """How a model runs and what a run over files writes.

    Attributes:
        backend: ``auto`` or one of :data:`~dunet_deploy.choices.BACKENDS`.
        precision: One of :data:`~dunet_deploy.choices.PRECISIONS` (``auto``:
            the backend's best for this model and machine).
        device: One of :data:`~dunet_deploy.choices.DEVICES` (ONNX Runtime providers).
        threads: Backend CPU threads, >= 1 (``None``: the backend's choice).
        batch_size: Slabs per model call, >= 1 (capped at an engine's maximum).
        cuda_graph: TensorRT / ONNX Runtime CUDA: replay a CUDA graph per batch size.
        tta: ``none`` or ``flip``; ``None`` takes the model's own default.
        min_lesion_mm3: Remove connected lesions smaller than this (mm³), >= 0;
            ``None`` takes the model's own default.
        resample: ``auto`` (inputs off the training grid are resampled) or
            ``never`` (refused).
        save_prob: Also write ``<name>_prob.nii.gz`` per input.
        prob_dtype: ``float32`` or ``uint16`` probability maps.
        workers: Worker processes that read and write (0: all in this process).
        prefetch: Prepared volumes queued ahead of the model, >= 1.
        recursive: Input folders are searched in their sub-folders too.
        series: Read only this Series Instance UID from DICOM inputs (``None``:
            every 3D series of a folder, each its own case).
        dicom_seg: Also write ``<name>_seg.dcm``, a DICOM SEG of the source
            series (every input must then be a DICOM series).
        register: Registration to the model's template, one of
            :data:`~dunet_deploy.choices.REGISTER_MODES`; ``None`` takes the
            model's own default (``auto`` unless exported otherwise).
        bias_correct: N4 bias-field correction of each scan before normalisation.
        skip_existing: Inputs whose outputs are already complete in the output
            folder, made by the same model and output-affecting options, are
            not done again (see :func:`~dunet_deploy.runtime.resume.plan_run`).

    Raises:
        DunetError: on construction, for any invalid value (``option`` names the field).
    """

    backend: str = field(default="auto", metadata=_OUT)
    precision: str = field(default="auto", metadata=_OUT)
    device: str = field(default="auto", metadata=_OUT)
    threads: int | None = None
    batch_size: int = 16
    cuda_graph: bool = False
    tta: str | None = field(default=None, metadata=_OUT)
    min_lesion_mm3: float | None = field(default=None, metadata=_OUT)
    resample: str = field(default="auto", metadata=_OUT)
    save_prob: bool = field(default=False, metadata=_OUT)
    prob_dtype: str = field(default="float32", metadata=_OUT)
    workers: int = 0
    prefetch: int = 1
    recursive: bool = False
    # DICOM inputs and outputs (runtime/dicom_io.py)
    series: str | None = field(default=None, metadata=_OUT)
    dicom_seg: bool = field(default=False, metadata=_OUT)
    # registration (runtime/register_stage.py)
    register: str | None = field(default=None, metadata=_OUT)
    bias_correct: bool = field(default=False, metadata=_OUT)
    skip_existing: bool = False

    def __post_init__(self) -> None:
        check_choice("backend", self.backend, ("auto", *choices.BACKENDS))
        check_choice("precision", self.precision, choices.PRECISIONS)
        check_choice("device", self.device, choices.DEVICES)
        if self.tta is not None:
            check_choice("tta", self.tta, choices.TTA_MODES)
        check_choice("resample", self.resample, choices.RESAMPLE_MODES)
        check_choice("prob_dtype", self.prob_dtype, choices.PROB_DTYPES)
        if self.threads is not None:
            _check_int("threads", self.threads, 1)
        _check_int("batch_size", self.batch_size, 1)
        _check_int("workers", self.workers, 0)
        _check_int("prefetch", self.prefetch, 1)
        if self.register is not None:
            check_choice("register", self.register, choices.REGISTER_MODES)
        if self.series is not None and (not isinstance(self.series, str)
                                        or not _UID.fullmatch(self.series)):
            raise DunetError(f"series {self.series!r}: not a DICOM UID (digits and dots, "
                             "at most 64 characters)", option="series")
        for name in ("cuda_graph", "save_prob", "recursive", "dicom_seg", "bias_correct",
                     "skip_existing"):
            if not isinstance(getattr(self, name), bool):
                raise DunetError(f"{name} {getattr(self, name)!r}: must be True or False",
                                 option=name)
        if self.min_lesion_mm3 is not None:
            value = self.min_lesion_mm3
            if (isinstance(value, bool) or not isinstance(value, (int, float))
                    or not math.isfinite(value) or value < 0):
                raise DunetError(f"min_lesion_mm3 {value!r}: must be a finite number >= 0",
                                 option="min_lesion_mm3")
            object.__setattr__(self, "min_lesion_mm3", float(value))

    # ------------------------------------------------------------- changes
    def replace(self, **changes: Any) -> InferenceOptions:
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)

    def with_model_defaults(self, defaults: Any) -> tuple[InferenceOptions, Sources]:
        """Fill ``tta`` / ``min_lesion_mm3`` / ``register`` left ``None`` from a model's defaults.

        Args:
            defaults: The model's :class:`~dunet_deploy.spec.InferenceDefaults`.

        Returns:
            ``(options with the three set, sources)``: ``sources`` maps each of
            them to ``"model"`` or ``"argument"``.
        """
        sources = {"tta": "model" if self.tta is None else "argument",
                   "min_lesion_mm3": "model" if self.min_lesion_mm3 is None else "argument",
                   "register": "model" if self.register is None else "argument"}
        resolved = self.replace(
            tta=defaults.tta if self.tta is None else self.tta,
            min_lesion_mm3=(defaults.min_lesion_mm3 if self.min_lesion_mm3 is None
                            else self.min_lesion_mm3),
            register=(getattr(defaults, "register", "auto") if self.register is None
                      else self.register))
        return resolved, sources

    # ------------------------------------------------------------- records
    def to_dict(self) -> dict[str, Any]:
        """JSON-compatible dict of every field."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> InferenceOptions:
        """Decode :meth:`to_dict` output; a missing key takes its default.

        Raises:
            DunetError: on a non-object, an unknown key or an invalid value.
        """
        if not isinstance(doc, Mapping):
            raise DunetError(f"inference options: expected a JSON object, got "
                             f"{type(doc).__name__}")
        unknown = sorted(set(doc) - set(cls.field_names()))
        if unknown:
            raise DunetError(f"inference options: unknown key(s) {', '.join(unknown)}")
        return cls(**dict(doc))

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """Every field, in declaration order."""
        return tuple(f.name for f in dataclasses.fields(cls))

    def fingerprint(self) -> str:
        """16 hex digits identifying the fields that change what a run writes.

        Two runs whose options have the same fingerprint (on the same model)
        write the same files; speed settings (threads, batch size, workers,
        prefetch) do not enter it.
        """
        keyed = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                 if f.metadata.get("output")}
        blob = json.dumps(keyed, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise DunetError(f"{name} {value!r}: must be an integer >= {minimum}", option=name)
    if value < minimum:
        raise DunetError(f"{name} {value}: must be >= {minimum}", option=name)
