"""Triton python-backend models of a native model repository (torch-free).

* :mod:`~dunet_deploy.serving.network_model` -- ``dunet`` with ``backend: "python"``:
  slabs -> probabilities through our runtime (OpenVINO / ONNX Runtime), for CPU servers;
* :mod:`~dunet_deploy.serving.volume_model` -- ``dunet_volume``: a NIfTI file's bytes ->
  the lesion mask as ``.nii.gz`` bytes and a JSON summary, the whole pipeline, calling the
  network model through Triton's BLS;
* :mod:`~dunet_deploy.serving.spec_model` -- ``<name>_spec``: the network's description
  (what ``dunet-serve --engine`` serves beside it).

Each class is what the ``model.py`` written by ``dunet-export --format triton`` imports.
``triton_python_backend_utils`` only exists inside Triton's python stub, so it is imported
when a model is initialized, never at module import.
"""
