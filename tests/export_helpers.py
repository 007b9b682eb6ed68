"""Helpers shared by the export and export-CLI tests (conftest.py loads it by path as
``dunet_export_test_helpers``; tests/cli does the same).

* tiny D-UNets (base_filters=8) at 32×32 slabs, random or briefly trained;
* :func:`make_fake_tensorrt`, a stand-in for the ``tensorrt`` module that records
  what the engine builder asks of it.
"""

from __future__ import annotations

import copy
import enum
import functools
import json
import types
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dunet_deploy.data.preprocess import mask_to_labels, nonempty_slab_indices, volume_to_slabs
from dunet_deploy.data.synth import synthesize_case
from dunet_deploy.models import create_model
from dunet_deploy.spec import PreprocessSpec

#: Volume geometry of the tiny tests: oriented slices 40×32 -> 32×32 slabs.
TINY_SHAPE = (32, 40, 24)
#: Seed of a synthetic case with a lesion large enough to matter at 32×32.
LESION_SEED = 3
#: Cases of the int8 tests' dataset (``dunet-synth --seed 1``: case i is seed i + 1).
INT8_CASES = 13
#: Its held-out cases (the checkpoint's validation split): seeds 12 and 13 have the largest
#: lesions of the first 13 at the tiny geometry (198 and 114 voxels). The int8 gate judges a
#: case's int8 mask against fp32's from 100 fp32 voxels on, so on these the comparison means
#: something (the smaller lesions are nearly all edge at 32x32).
INT8_VAL = (11, 12)


def tiny_spec() -> PreprocessSpec:
    spec = PreprocessSpec.for_geometry(TINY_SHAPE)
    assert spec.image_size == 32
    return spec


def training_slabs(spec: PreprocessSpec, seeds: range) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-empty slabs ``[K, 4, 32, 32]`` and labels ``[K, 1, 32, 32]`` of synthetic cases."""
    xs, ys = [], []
    for seed in seeds:
        img, mask = synthesize_case(spec.volume_shape, seed=seed)
        idx = nonempty_slab_indices(img, spec)
        xs.append(volume_to_slabs(img, spec)[idx])
        ys.append(mask_to_labels(mask, spec)[idx])
    return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys)).float()


def train_tiny(spec: PreprocessSpec, steps: int = 40) -> torch.nn.Module:
    """A tiny D-UNet after a few Adam steps on synthetic data, BN stats calibrated.

    Random-init BatchNorm statistics make the output almost constant; a few
    steps plus a pass that recomputes the running statistics give outputs
    with real structure and pixels on both sides of the threshold. Trained
    once per process (cached); each call returns a fresh copy.
    """
    return copy.deepcopy(_train_tiny_cached(spec, steps))


@functools.lru_cache(maxsize=4)
def _train_tiny_cached(spec: PreprocessSpec, steps: int) -> torch.nn.Module:
    # One thread: on a busy 2-core machine two spinning OpenMP threads made
    # this 20x slower; the model is too small to gain from threads anyway.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(spec, steps)
    finally:
        torch.set_num_threads(threads)


def _train(spec: PreprocessSpec, steps: int) -> torch.nn.Module:
    torch.manual_seed(0)
    x, y = training_slabs(spec, range(1, 7))
    model = create_model("dunet", base_filters=8)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        i = torch.randint(len(x), (8,), generator=gen)
        p = model(x[i])
        dice = 1 - (2 * (p * y[i]).sum() + 1) / (p.sum() + y[i].sum() + 1)
        loss = torch.nn.functional.binary_cross_entropy(p, y[i]) + dice
        opt.zero_grad()
        loss.backward()
        opt.step()
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the calibration pass
    with torch.no_grad():
        model(x)
    for bn in bns:
        bn.momentum = 0.01
    return model.eval()


#: What the fake engine inspector reports: (name, type, output Format/Datatype).
FAKE_LAYERS = (
    ("conv1", "CaskConvolution", "Channel major FP16 format where channel % 8 == 0"),
    ("conv2", "CaskConvolution", "Row major linear FP16 format"),
    ("se_fc", "CaskGemm", "Row major linear FP32"),
    ("sigmoid", "PointWise", "Row major linear FP32"),
    ("reformat", "Reformat", "Row major linear FP16 format"),
)


def make_fake_tensorrt(
    version: str = "10.13.0.35",
    parse_ok: bool = True,
    build_ok: bool = True,
    *,
    input_names: tuple[str, ...] = ("slabs",),
    profile_ok: bool = True,
    cache_state: str = "ok",
) -> types.ModuleType:
    """A stand-in for the ``tensorrt`` module's builder API that records what it is asked.

    Fails the ways the real API fails, without raising: ``parse_from_file`` ->
    False, ``add_optimization_profile`` -> -1 (``profile_ok=False``),
    ``create_timing_cache`` -> None on a corrupt cache (``cache_state="corrupt"``)
    and ``set_timing_cache`` -> False for another GPU's cache (``"mismatch"``),
    ``build_serialized_network`` -> None.
    """
    calls: list[tuple[Any, ...]] = []
    trt = types.ModuleType("tensorrt")

    class _Severity(enum.IntEnum):
        ERROR = 1
        WARNING = 2

    class Logger:
        Severity = _Severity
        WARNING = _Severity.WARNING

        def __init__(self, min_severity: _Severity = _Severity.WARNING) -> None:
            self.min_severity = min_severity

    class NetworkDefinitionCreationFlag(enum.IntEnum):
        EXPLICIT_BATCH = 0
        STRONGLY_TYPED = 1

    class BuilderFlag(enum.IntEnum):
        FP16 = 0
        INT8 = 1
        TF32 = 6

    class MemoryPoolType(enum.IntEnum):
        WORKSPACE = 0

    class ProfilingVerbosity(enum.IntEnum):
        LAYER_NAMES_ONLY = 0
        NONE = 1
        DETAILED = 2

    class LayerInformationFormat(enum.IntEnum):
        ONELINE = 0
        JSON = 1

    class Dims(list):  # type: ignore[type-arg]
        pass

    class Tensor:
        def __init__(self, name: str) -> None:
            self.name = name

    class Network:
        def __init__(self, flags: int) -> None:
            self.flags = flags
            self.source: str | None = None
            self.num_inputs = 0

        def get_input(self, index: int) -> Tensor:
            return Tensor(input_names[index])

    class ParserError:
        def node(self) -> int:
            return 7

        def node_name(self) -> str:
            return "/decoder/Pad"

        def node_operator(self) -> str:
            return "Pad"

        def desc(self) -> str:
            return "unsupported\n  pads value"

    class OnnxParser:
        def __init__(self, network: Network, logger: Logger) -> None:
            self.network = network
            self.num_errors = 0

        def parse_from_file(self, path: str) -> bool:
            calls.append(("parse_from_file", Path(path).name))
            self.network.source = Path(path).name
            if not parse_ok:
                self.num_errors = 2
                return False
            self.network.num_inputs = len(input_names)
            return True

        def get_error(self, index: int) -> ParserError:
            return ParserError()

    class Profile:
        def set_shape(self, name: str, lo: Dims, opt: Dims, hi: Dims) -> None:
            calls.append(("set_shape", name, list(lo), list(opt), list(hi)))
            self.shapes = (name, list(lo), list(opt), list(hi))

    class TimingCache:
        def __init__(self, data: bytes) -> None:
            self.data = bytes(data)

        def serialize(self) -> bytes:
            return self.data + b"+tuned"

    class Config:
        def __init__(self) -> None:
            self.flags: list[BuilderFlag] = [BuilderFlag.TF32]  # TensorRT's default
            self.pool: dict[MemoryPoolType, int] = {}
            self.builder_optimization_level = 3
            self.profiling_verbosity = ProfilingVerbosity.LAYER_NAMES_ONLY
            self.profiles: list[Profile] = []
            self.cache: TimingCache | None = None

        def add_optimization_profile(self, profile: Profile) -> int:
            if not profile_ok:
                return -1
            self.profiles.append(profile)
            return len(self.profiles) - 1

        def set_flag(self, flag: BuilderFlag) -> None:
            calls.append(("set_flag", flag.name))
            self.flags.append(flag)

        def clear_flag(self, flag: BuilderFlag) -> None:
            calls.append(("clear_flag", flag.name))
            self.flags = [f for f in self.flags if f != flag]

        def set_memory_pool_limit(self, pool: MemoryPoolType, size: int) -> None:
            calls.append(("set_memory_pool_limit", pool.name, size))
            self.pool[pool] = size

        def create_timing_cache(self, data: bytes) -> TimingCache | None:
            calls.append(("create_timing_cache", bytes(data)))
            if data and cache_state == "corrupt":
                return None
            return TimingCache(data)

        def set_timing_cache(self, cache: TimingCache, ignore_mismatch: bool) -> bool:
            calls.append(("set_timing_cache", cache.data, ignore_mismatch))
            if cache.data and cache_state == "mismatch" and not ignore_mismatch:
                return False
            self.cache = cache
            return True

        def get_timing_cache(self) -> TimingCache:
            assert self.cache is not None
            return self.cache

    class Inspector:
        def get_engine_information(self, fmt: LayerInformationFormat) -> str:
            assert fmt == LayerInformationFormat.JSON
            layers = [{"Name": n, "LayerType": t, "Outputs": [{"Name": n + ":0",
                                                               "Format/Datatype": d}]}
                      for n, t, d in FAKE_LAYERS]
            return json.dumps({"Layers": layers, "Bindings": ["slabs", "prob"]})

    class Engine:
        def create_engine_inspector(self) -> Inspector:
            return Inspector()

    class Runtime:
        def __init__(self, logger: Logger) -> None:
            self.logger = logger

        def deserialize_cuda_engine(self, plan: bytes) -> Engine | None:
            return Engine() if json.loads(plan).get("verbosity") == "DETAILED" else None

    class Builder:
        def __init__(self, logger: Logger) -> None:
            self.logger = logger

        def create_network(self, flags: int = 0) -> Network:
            calls.append(("create_network", flags))
            return Network(flags)

        def create_optimization_profile(self) -> Profile:
            return Profile()

        def create_builder_config(self) -> Config:
            return Config()

        def build_serialized_network(self, network: Network, config: Config) -> bytes | None:
            if not build_ok:
                return None
            doc = {
                "source": network.source,
                "network_flags": network.flags,
                "flags": [f.name for f in config.flags],
                "workspace": config.pool.get(MemoryPoolType.WORKSPACE),
                "opt_level": config.builder_optimization_level,
                "verbosity": config.profiling_verbosity.name,
                "profiles": [p.shapes for p in config.profiles],
            }
            return json.dumps(doc).encode()

    for name, obj in {
        "__version__": version,
        "Logger": Logger,
        "NetworkDefinitionCreationFlag": NetworkDefinitionCreationFlag,
        "BuilderFlag": BuilderFlag,
        "MemoryPoolType": MemoryPoolType,
        "ProfilingVerbosity": ProfilingVerbosity,
        "LayerInformationFormat": LayerInformationFormat,
        "Dims": Dims,
        "OnnxParser": OnnxParser,
        "Builder": Builder,
        "Runtime": Runtime,
        "calls": calls,
    }.items():
        setattr(trt, name, obj)
    return trt


def write_typed_onnx(path: Path, precision: str) -> Path:
    """A minimal ONNX file carrying ``dunet.precision`` (what the builder reads)."""
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("slabs", TensorProto.FLOAT, ["N", 4, 32, 32])
    y = helper.make_tensor_value_info("prob", TensorProto.FLOAT, ["N", 4, 32, 32])
    graph = helper.make_graph([helper.make_node("Identity", ["slabs"], ["prob"])], "g", [x], [y])
    model = helper.make_model(graph)
    helper.set_model_props(model, {"dunet.precision": precision})
    onnx.save(model, str(path))
    return path


def run_export_cli(*args: object) -> tuple[int, str, str]:
    """``dunet-export ARGS`` through click's runner: ``(exit code, stdout, stderr)``."""
    from click.testing import CliRunner

    from dunet_deploy.cli import export as cli

    res = CliRunner().invoke(cli.main, [str(a) for a in args])
    if res.exception and not isinstance(res.exception, SystemExit):
        raise res.exception
    return res.exit_code, res.stdout, res.stderr


def one_line_error(code: int, err: str) -> str:
    """The ``error: ...`` line of a CLI that failed as a user error (exit 2, one line)."""
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]
