"""``dunet_volume``: a NIfTI file's bytes in, its lesion mask (``.nii.gz`` bytes) out.

Per request (input ``nifti``, ``BYTES [1]``: a ``.nii`` or ``.nii.gz`` file)::

    load_nifti_bytes (limits checked before inflating)
      -> core.to_network (reoriented / resampled onto the model's grid)
      -> core.segment(predict=<BLS call of the network model>, with the model's
         TTA and small-lesion defaults)    -> nifti_bytes_like -> ``mask`` and ``summary``

The same inference core as ``dunet-infer`` and the Segmenter, so a file
segmented here gives the mask a local run gives.

A request may carry the client's :class:`~dunet_deploy.runtime.options.InferenceOptions`
as the JSON request parameter ``dunet_options`` (what ``dunet-infer --server-side``
sends): its ``tta``, ``min_lesion_mm3``, ``resample``, ``register``, ``bias_correct`` and
``batch_size`` (capped at the network's ``max_batch_size``) are applied (registration
with the template the network model's file carries beside it), ``tta`` /
``min_lesion_mm3`` left ``None`` take the model's defaults, and an option the server
cannot apply (another backend, probability maps, ...) or a bad value is refused as
``"<name>: <option> ...: <reason>"``. Without it the model's defaults and
``volume.batch_size`` apply.

The slab predictor is a BLS request to the network model (``volume.network_model``,
in batches of the request's batch size), so the dynamic batcher in front of the network
merges slabs of concurrent volumes. A bad file gets a one-line Triton error naming it
(the request id, which our client sets to the file name); other requests go on.
Parameters are checked at load against the network model's ``config.pbtxt``.
"""

from __future__ import annotations

import json
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dunet_deploy.artifacts import INPUT_NAME, OUTPUT_NAME, ArtifactInfo
from dunet_deploy.data.nifti import (
    NiftiLimits,
    load_nifti_bytes,
    nifti_bytes_like,
    output_descrip,
)
from dunet_deploy.errors import DunetError, one_line
from dunet_deploy.postprocess import with_tta
from dunet_deploy.runtime.options import InferenceOptions
from dunet_deploy.runtime.pipeline import (
    CaseResult,
    InputItem,
    finish_case,
    infer_case,
    prepare_source,
)
from dunet_deploy.runtime.register_stage import RegisterStage
from dunet_deploy.runtime.triton_client import OPTIONS_PARAMETER, check_server_side
from dunet_deploy.serving._config import artifact_parameters, int_parameter, model_parameters

NIFTI_INPUT = "nifti"
MASK_OUTPUT = "mask"
SUMMARY_OUTPUT = "summary"
Predictor = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class VolumeSettings:
    """``dunet_volume``'s config parameters.

    Attributes:
        info: the network's description (its spec preprocesses every request).
        network: the network model's name.
        batch_size: slabs per BLS call.
        limits: what one request may cost.
    """

    info: ArtifactInfo
    network: str
    batch_size: int
    limits: NiftiLimits

    @classmethod
    def from_parameters(cls, params: Mapping[str, str], source: str) -> VolumeSettings:
        """Parse and validate the parameters (``DunetError`` naming ``source``)."""
        network = params.get("volume.network_model", "")
        if not network:
            raise DunetError(f"{source}: config.pbtxt has no parameter 'volume.network_model'")
        return cls(
            info=artifact_parameters(params, source),
            network=network,
            batch_size=int_parameter(params, "volume.batch_size", source),
            limits=NiftiLimits(
                max_voxels=int_parameter(params, "volume.max_voxels", source),
                max_voxel_bytes=int_parameter(params, "volume.max_voxel_bytes", source),
                max_file_bytes=int_parameter(params, "volume.max_request_bytes", source),
            ),
        )

    def check_network(self, params: Mapping[str, str], max_batch_size: int,
                      source: str) -> ArtifactInfo:
        """Refuse a network model whose metadata disagrees with ours.

        Args:
            params: the network's config parameters.
            max_batch_size: the network's ``max_batch_size``.
            source: our model name, for messages.

        Returns:
            The network's description.
        """
        net = artifact_parameters(params, f"{source}: network model {self.network!r}")
        if net.spec.digest() != self.info.spec.digest():
            raise DunetError(
                f"{source}: network model {self.network!r} has spec digest "
                f"{net.spec.digest()}, this model's parameters say {self.info.spec.digest()}"
            )
        if max_batch_size < self.batch_size:
            raise DunetError(
                f"{source}: volume.batch_size {self.batch_size} exceeds the max_batch_size "
                f"{max_batch_size} of network model {self.network!r}"
            )
        return net


def request_options(parameters: str | Mapping[str, Any] | None,
                    name: str) -> InferenceOptions | None:
    """The client's options from a request's parameters (``None``: it sent none).

    Args:
        parameters: the request's parameters, as the python backend gives them
            (a JSON object text) or already decoded.
        name: the request's name (the file), for messages.

    Raises:
        DunetError: ``"<name>: <option> <value>: <reason>"`` for a bad value or one
            the server cannot apply, ``"<name>: request parameter 'dunet_options': ..."``
            for text that is not a JSON object.
    """
    try:
        params = json.loads(parameters) if isinstance(parameters, str) else dict(parameters or {})
        raw = params.get(OPTIONS_PARAMETER)
        if raw is None:
            return None
        doc = json.loads(raw) if isinstance(raw, str) else raw
    except (ValueError, TypeError):
        raise DunetError(f"{name}: request parameter {OPTIONS_PARAMETER!r}: not a JSON "
                         "object") from None
    try:
        options = InferenceOptions.from_dict(doc)
        check_server_side(options)
    except DunetError as exc:
        raise DunetError(f"{name}: {exc}") from None
    return options


def segment_nifti_bytes(data: bytes, name: str, settings: VolumeSettings,
                        predict: Predictor, options: InferenceOptions | None = None,
                        max_batch: int | None = None,
                        model_file: str | Path | None = None) -> tuple[bytes, dict[str, Any]]:
    """The whole pipeline on one file's bytes.

    Args:
        data: a ``.nii`` / ``.nii.gz`` file.
        name: its name, for messages.
        settings: spec, batch size and limits.
        predict: the network, ``float32 [N, C, S, S] -> float32 [N, 1, S, S]``.
        options: the client's options (``None``: the model's defaults and
            ``settings.batch_size``); see :func:`request_options`.
        max_batch: the network's ``max_batch_size``, which caps ``options.batch_size``.
        model_file: the network's model file, whose registration template lies
            beside it (``None``: no template; ``register`` auto then only says so).

    Returns:
        (the uint8 mask as ``.nii.gz`` bytes on the input's grid, the summary
        document: shape, zooms, lesion voxels and mm³, the settings applied and
        where each came from, times, bytes).

    Raises:
        DunetError: ``"<name>: <reason>"`` for a file we refuse or cannot use.
    """
    spec = settings.info.spec
    asked = InferenceOptions(batch_size=settings.batch_size) if options is None else options
    run, sources = asked.with_model_defaults(settings.info.inference)
    assert run.tta is not None and run.min_lesion_mm3 is not None
    batch = run.batch_size if max_batch is None else min(run.batch_size, max_batch)
    item = InputItem(Path(name))
    result = CaseResult(input=name)
    times = result.times
    t0 = time.perf_counter()
    register = _register_stage(model_file, settings.info, run)
    vol = load_nifti_bytes(data, name, settings.limits)
    times["read"] = time.perf_counter() - t0
    # The stages every other path runs (pipeline.prepare_source / infer_case / finish_case).
    prep = prepare_source(item, vol, spec, resample=run.resample, result=result,
                          register=register)
    grid = infer_case(with_tta(predict, run.tta, spec), spec, prep, batch)
    pred = None if grid is None else finish_case(grid, prep, spec,
                                                 min_lesion_mm3=run.min_lesion_mm3,
                                                 keep_prob=False)
    if pred is None:
        raise DunetError(str(result.message))
    t1 = time.perf_counter()
    blob = nifti_bytes_like(pred.mask, vol, np.uint8, name=name, descrip=output_descrip("mask"))
    times["write"] = time.perf_counter() - t1
    summary = {
        "input": name,
        "shape": [int(n) for n in vol.shape],
        "zooms": [float(z) for z in vol.zooms],
        "lesion_voxels": pred.lesion_voxels,
        "lesion_volume_mm3": pred.lesion_volume_mm3,
        "lesions_removed": pred.lesions_removed,
        "slabs_run": pred.slabs_run,
        "geometry": pred.geometry,
        "warnings": list(dict.fromkeys([*result.warnings, *pred.warnings])),
        "inference": {"tta": run.tta, "min_lesion_mm3": run.min_lesion_mm3,
                      "resample": run.resample, "register": run.register or "auto",
                      "bias_correct": run.bias_correct, "source": sources},
        "registration": result.registration,
        "batch_size": batch,
        "bytes_received": len(data),
        "mask_bytes": len(blob),
        "times": {k: round(v, 6) for k, v in times.items()},
    }
    return blob, summary


def _register_stage(model_file: str | Path | None, info: ArtifactInfo,
                    run: InferenceOptions) -> RegisterStage:
    """The registration stage of one request (the template is read once per process).

    Raises:
        DunetError: ``register`` always on a model without a template.
    """
    if model_file is not None:
        return RegisterStage.for_model(model_file, info, run, info.spec)
    if run.register == "always":
        raise DunetError("register 'always': the server's model has no registration template",
                         option="register")
    return RegisterStage(mode=run.register or "auto", bias_correct=run.bias_correct)


class TritonPythonModel:
    """Triton's python-backend entry points for ``dunet_volume``."""

    def initialize(self, args: dict[str, Any]) -> None:
        """Read and check the parameters against the network model's configuration."""
        from dunet_deploy.export.triton_repo import read_config
        from dunet_deploy.serving.network_model import network_model_file, network_runtime

        self.name, params, model_dir = model_parameters(args)
        self.settings = VolumeSettings.from_parameters(params, self.name)
        net_params, net_max_batch = read_config(
            Path(model_dir).parent / self.settings.network / "config.pbtxt")
        self.settings.check_network(net_params, net_max_batch, self.name)
        self.max_batch = net_max_batch or None
        # What the network really runs (not "auto"), for every response's summary.
        network_dir = Path(model_dir).parent / self.settings.network
        self.runtime = network_runtime(network_dir, self.name)
        # The registration template travels beside the network's model file.
        self.model_file = (network_model_file(network_dir, self.name)
                           if self.settings.info.template else None)

    def _predict(self, slabs: np.ndarray) -> np.ndarray:
        import triton_python_backend_utils as pb_utils

        request = pb_utils.InferenceRequest(
            model_name=self.settings.network, requested_output_names=[OUTPUT_NAME],
            inputs=[pb_utils.Tensor(INPUT_NAME, np.ascontiguousarray(slabs, np.float32))],
        )
        response = request.exec()
        if response.has_error():
            raise DunetError(f"network model {self.settings.network!r} failed: "
                             f"{one_line(response.error().message())}")
        return pb_utils.get_output_tensor_by_name(response, OUTPUT_NAME).as_numpy()

    def _one(self, request: Any) -> Any:
        import triton_python_backend_utils as pb_utils

        name = request.request_id() or "request"
        try:
            raw = pb_utils.get_input_tensor_by_name(request, NIFTI_INPUT).as_numpy()
            if raw.size != 1:
                raise DunetError(f"{name}: input {NIFTI_INPUT!r} must hold one file, "
                                 f"got {raw.size}")
            data = raw.reshape(-1)[0]
            options = request_options(request.parameters(), name)
            blob, summary = segment_nifti_bytes(bytes(data), name, self.settings, self._predict,
                                                options, self.max_batch, self.model_file)
        except (DunetError, MemoryError) as exc:
            text = "out of memory" if isinstance(exc, MemoryError) else one_line(exc)
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(text))
        except Exception as exc:  # a bug of ours: its traceback goes to the server's log,
            # and only this request fails (an exception out of execute fails the batch).
            traceback.print_exc()
            text = f"{name}: internal error in dunet_volume ({type(exc).__name__}: {exc})"
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(one_line(text)))
        summary["backend"] = self.runtime["backend"]
        summary["runtime"] = self.runtime
        summary["network_model"] = self.settings.network
        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor(MASK_OUTPUT, np.array([blob], dtype=np.object_)),
            pb_utils.Tensor(SUMMARY_OUTPUT, np.array([json.dumps(summary).encode()],
                                                     dtype=np.object_)),
        ])

    def execute(self, requests: list[Any]) -> list[Any]:
        """One response per request; a bad file fails only its own request."""
        return [self._one(r) for r in requests]
