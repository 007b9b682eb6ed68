"""Reading a python-backend model's ``args`` (what Triton passes to ``initialize``)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dunet_deploy.artifacts import ArtifactInfo
from dunet_deploy.errors import DunetError


def model_parameters(args: Mapping[str, Any]) -> tuple[str, dict[str, str], Path]:
    """(model name, string parameters, model folder) from ``initialize``'s ``args``."""
    config = json.loads(args["model_config"])
    params = {str(k): str(v.get("string_value", "")) for k, v in
              config.get("parameters", {}).items()}
    # args["model_repository"] is the model's own folder (<repository>/<name>).
    return str(config["name"]), params, Path(args["model_repository"])


def int_parameter(params: Mapping[str, str], key: str, source: str, minimum: int = 1) -> int:
    """An integer parameter ``>= minimum``; a one-line error naming the model otherwise."""
    try:
        value = int(params[key])
    except KeyError:
        raise DunetError(f"{source}: config.pbtxt has no parameter {key!r}") from None
    except ValueError:
        raise DunetError(
            f"{source}: parameter {key!r} = {params[key]!r} is not an integer"
        ) from None
    if value < minimum:
        raise DunetError(f"{source}: parameter {key!r} must be >= {minimum}, got {value}")
    return value


def artifact_parameters(params: Mapping[str, str], source: str) -> ArtifactInfo:
    """The ``dunet.*`` parameters as an :class:`ArtifactInfo` (spec, model, precision)."""
    return ArtifactInfo.from_metadata(params, f"{source} config.pbtxt")
