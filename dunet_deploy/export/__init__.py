"""Export: checkpoint -> ONNX (FP32, mixed FP16, INT8 QDQ) -> TensorRT engine / Triton repository.

Modules (import them directly; ``onnx_export`` needs torch, the others do not):

* :mod:`~dunet_deploy.export.onnx_export` — PyTorch -> ONNX with metadata;
* :mod:`~dunet_deploy.export.fp16` — the mixed-precision graph rewrite and its policy;
* :mod:`~dunet_deploy.export.int8` — calibration, QDQ quantization and the accuracy gate;
* :mod:`~dunet_deploy.export.pipeline` — ``run_export``: one step per artefact, staged;
* :mod:`~dunet_deploy.export.verify` — comparisons on ONNX Runtime / OpenVINO / PyTorch;
* :mod:`~dunet_deploy.export.tensorrt_build` — TensorRT engine builder (lazy imports);
* :mod:`~dunet_deploy.export.triton_repo` — Triton model repository writer.

The command line is :mod:`dunet_deploy.cli.export` (``dunet-export``).
"""
