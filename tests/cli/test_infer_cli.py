"""``dunet-infer`` end to end: masks equal PyTorch's, geometry kept, bad input reported."""

from __future__ import annotations

import dataclasses
import gzip
import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtime"))
import runtime_testutils as rt

from dunet_deploy.cli.infer import main
from dunet_deploy.runtime import tensorrt_runner as trt_runner
from dunet_deploy.runtime.pipeline import output_stem


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("infer")
    model = rt.export_tiny_onnx(root / "model.onnx")
    vols = [rt.write_volume(root / "case_a.nii.gz", seed=0),
            # Anisotropic voxels: zooms and lesion mm³ must follow them.
            rt.write_volume(root / "case_b.nii", seed=1, zooms=(1.5, 0.9, 2.0))]
    return model, root / "model.onnx", vols


def invoke(args: list[str]):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.mark.parametrize(("backend", "precision"), [("onnxruntime", "auto"),
                                                    ("openvino", "fp32")])
def test_masks_match_pytorch(tiny, tmp_path, backend, precision):
    model, onnx_path, vols = tiny
    out = tmp_path / "out"
    res = invoke(["--engine", onnx_path, *vols, "-o", out, "--backend", backend,
                  "--precision", precision, "--batch-size", "5", "--save-prob", "--threads", "1"])
    assert res.exit_code == 0, res.output + res.stderr
    assert "2/2 volume(s) segmented" in res.stdout and res.stderr == ""
    summary = json.loads((out / "summary.json").read_text())
    assert summary["backend"] == backend and summary["precision"] == "fp32"
    assert summary["batch_size"] == 5 and summary["ok"] == 2 and summary["failed"] == 0
    assert summary["machine"]["cpu_model"] and summary["model"]["model_name"] == "dunet"
    spec = rt.tiny_spec()
    for vol, case in zip(vols, summary["cases"]):
        name = output_stem(vol)
        mask_path, prob_path = out / f"{name}_mask.nii.gz", out / f"{name}_prob.nii.gz"
        assert case["status"] == "ok" and case["mask"] == str(mask_path)
        assert case["prob"] == str(prob_path)
        ref_prob, ref_mask = rt.torch_reference(model, vol, spec)
        mask_img = nib.load(str(mask_path))
        assert mask_img.get_data_dtype() == np.uint8
        mask = np.asarray(mask_img.dataobj)
        rt.assert_masks_match(mask, ref_mask, ref_prob)
        rt.assert_same_geometry(mask_path, vol)
        rt.assert_same_geometry(prob_path, vol)
        prob_img = nib.load(str(prob_path))
        assert prob_img.get_data_dtype() == np.float32
        np.testing.assert_allclose(np.asarray(prob_img.dataobj), ref_prob, atol=1e-4)
        assert case["lesion_voxels"] == int(mask.sum()) > 0
        zooms = nib.load(str(vol)).header.get_zooms()[:3]
        assert case["lesion_volume_mm3"] == pytest.approx(mask.sum() * np.prod(zooms))
        assert case["slabs_run"] + case["slabs_skipped"] == rt.SHAPE[2]
        assert case["slabs_skipped"] > 0  # the synthetic head leaves empty end slices
        assert set(case["times"]) == {"read", "preprocess", "infer", "postprocess", "write"}
        assert case["times"]["infer"] > 0
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["summary.json", "case_a_mask.nii.gz", "case_a_prob.nii.gz", "case_b_mask.nii.gz",
         "case_b_prob.nii.gz"])


def _bad_inputs(root: Path) -> dict[str, tuple[Path, str]]:
    """Each bad input and a fragment of the reason reported for it."""
    root.mkdir()
    shape4d = (*rt.SHAPE, 2)
    bad: dict[str, tuple[Path, str]] = {
        "missing": (root / "missing.nii.gz", "no such file"),
        "not_nifti": (root / "notes.nii.gz", "not a NIfTI file"),
        "truncated": (root / "truncated.nii.gz", "truncated or corrupt"),
        "2d": (root / "flat.nii.gz", "expected a 3D volume"),
        "4d": (root / "series.nii.gz", "expected a 3D volume"),
        "nan": (root / "nan.nii.gz", "NaN or Inf"),
        "shape": (root / "wrong_shape.nii.gz", "in-plane shape"),
    }
    with gzip.open(bad["not_nifti"][0], "wb") as f:
        f.write(b"this is not an image\n" * 50)
    good = rt.write_volume(root / "full.nii.gz", seed=3)
    blob = good.read_bytes()
    bad["truncated"][0].write_bytes(blob[: len(blob) // 2])
    nib.save(nib.Nifti1Image(np.ones((40, 48), np.float32), np.eye(4)), str(bad["2d"][0]))
    nib.save(nib.Nifti1Image(np.ones(shape4d, np.float32), np.eye(4)), str(bad["4d"][0]))
    data = np.ones(rt.SHAPE, np.float32)
    data[3, 4, 5] = np.nan
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(bad["nan"][0]))
    rt.write_volume(bad["shape"][0], shape=(40, 40, 24))
    good.unlink()
    return bad


def test_bad_inputs_fail_alone(tiny, tmp_path):
    _, onnx_path, vols = tiny
    bad = _bad_inputs(tmp_path / "bad")
    out = tmp_path / "out"
    inputs = [vols[0], *(p for p, _ in bad.values())]
    res = invoke(["--engine", onnx_path, *inputs, "-o", out, "--backend", "onnxruntime",
                  "--quiet"])
    assert res.exit_code == 1  # some inputs failed
    lines = res.stderr.splitlines()
    assert len(lines) == len(bad), res.stderr
    for (path, reason), line in zip(bad.values(), lines):
        assert line.startswith(f"error: {path}: ") and reason in line, line
    assert res.stdout == ""  # --quiet
    # The good volume completed; nothing (not even a temporary) for the bad ones.
    assert sorted(p.name for p in out.iterdir()) == ["case_a_mask.nii.gz", "summary.json"]
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["ok"], summary["failed"]) == (1, len(bad))
    for case, (path, reason) in zip(summary["cases"][1:], bad.values()):
        assert case["status"] == "error" and case["input"] == str(path)
        assert reason in case["message"] and case["mask"] is None


def test_model_errors_exit_2(tiny, tmp_path):
    import onnx

    _, onnx_path, vols = tiny
    plain = onnx.load(str(onnx_path))
    del plain.metadata_props[:]
    foreign = tmp_path / "foreign.onnx"
    onnx.save(plain, str(foreign))
    cases = [
        (foreign, "not a dunet-deploy model"),
        (tmp_path / "nope.onnx", "model file not found"),
        (rt.write_fake_engine(tmp_path / "model.plan", rt.tiny_spec()),
         "TensorRT is not installed"),
    ]
    for model, reason in cases:
        out = tmp_path / f"out_{model.stem}"
        res = invoke(["--engine", model, vols[0], "-o", out])
        assert res.exit_code == 2, res.stderr
        assert res.stderr.count("\n") == 1 and res.stderr.startswith("error: ")
        assert reason in res.stderr
        assert not out.exists() or not any(out.iterdir())


def test_engine_with_foreign_sidecar_exit_2(tiny, tmp_path, monkeypatch):
    _, _, vols = tiny
    memory = rt.FakeMemory()
    monkeypatch.setitem(sys.modules, "tensorrt",
                        rt.make_fake_tensorrt(memory, rt.tiny_spec(), version="10.14.1.48"))
    monkeypatch.setattr(trt_runner, "default_memory", lambda device=0: memory)
    plan = rt.write_fake_engine(tmp_path / "model.plan", rt.tiny_spec())
    res = invoke(["--engine", plan, vols[0], "-o", tmp_path / "out"])
    assert res.exit_code == 2
    assert res.stderr == (f"error: {plan}: engine was built with TensorRT {rt.TRT_VERSION}, this "
                          "is TensorRT 10.14.1.48; rebuild the engine here (dunet-export) or "
                          f"install TensorRT {rt.TRT_VERSION}\n")
    assert not (tmp_path / "out").exists()  # the failed run removes the folder it created


def test_tensorrt_path_end_to_end_with_fakes(tiny, tmp_path, monkeypatch):
    """The whole dunet-infer path through the TensorRT runner (fake engine, fake GPU)."""
    _, _, vols = tiny
    memory = rt.FakeMemory()
    monkeypatch.setitem(sys.modules, "tensorrt",
                        rt.make_fake_tensorrt(memory, rt.tiny_spec(), max_batch=8))
    monkeypatch.setattr(trt_runner, "default_memory", lambda device=0: memory)
    plan = rt.write_fake_engine(tmp_path / "model.plan", rt.tiny_spec())
    out = tmp_path / "out"
    res = invoke(["--engine", plan, *vols, "-o", out, "--batch-size", "16"])
    assert res.exit_code == 0, res.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["backend"] == "tensorrt" and summary["batch_size"] == 8  # capped
    assert "NVIDIA H100" in summary["device"]
    for vol in vols:
        name = vol.name.split(".")[0]
        mask = np.asarray(nib.load(str(out / f"{name}_mask.nii.gz")).dataobj)
        np.testing.assert_array_equal(mask, rt.fake_reference(vol, rt.tiny_spec()))
    assert memory.closed


def test_usage_errors(tiny, tmp_path):
    _, onnx_path, vols = tiny
    res = invoke(["--engine", onnx_path, "-o", tmp_path / "o"])  # no INPUT
    assert res.exit_code == 2 and res.stderr.startswith("error: ")
    res = invoke(["--engine", onnx_path, vols[0], "-o", tmp_path / "o", "--batch-size", "0"])
    assert res.exit_code == 2 and res.stderr.count("\n") == 1
    res = invoke(["--engine", onnx_path, vols[0], "-o", tmp_path / "o", "--precision", "int8"])
    assert res.exit_code == 2
    res = invoke(["--engine", onnx_path, vols[0], "-o", tmp_path / "o", "--backend",
                  "onnxruntime", "--precision", "bf16"])
    assert res.exit_code == 2 and "exported precision fp32" in res.stderr
    assert res.stderr.startswith("error: --precision 'bf16': not possible")  # the flag, printed
    res = invoke(["--engine", onnx_path, vols[0], "-o", tmp_path / "o", "--backend",
                  "openvino", "--cuda-graph"])
    assert res.exit_code == 2 and "CUDA graphs need a CUDA backend" in res.stderr
    assert res.stderr.startswith("error: --cuda-graph: ")


def test_ray_flags_that_do_not_combine(tiny, tmp_path):
    """--ray-* without --ray, a bad --ray-layout, --ray with --workers: one line, exit 2."""
    _, onnx_path, vols = tiny
    base = ["--engine", onnx_path, vols[0], "-o", tmp_path / "o"]
    for extra, says in [
            (["--ray-layout", "fused"], "--ray-layout needs --ray"),
            (["--ray-actors", "2"], "--ray-actors needs --ray"),
            (["--ray-cpus-per-actor", "2"], "--ray-cpus-per-actor needs --ray"),
            (["--ray=127.0.0.1:1", "--ray-layout", "spread"], "'spread' is not one of"),
            (["--ray=127.0.0.1:1", "--workers", "2"], "it takes no --workers")]:
        res = invoke(base + extra)
        assert res.exit_code == 2 and res.stderr.count("\n") == 1, (extra, res.stderr)
        assert res.stderr.startswith("error: ") and says in res.stderr, (extra, res.stderr)
    assert not (tmp_path / "o").exists()


def test_eval_engine_agrees_with_checkpoint(tiny, tmp_path):
    """The runtime as dunet-eval's predict callable scores like the PyTorch checkpoint."""
    evaluate = pytest.importorskip(
        "dunet_deploy.training.evaluate",
        reason="dunet_deploy.training.evaluate (torch-free evaluation) does not exist yet",
    )
    from dunet_deploy.data.synth import write_dataset
    from dunet_deploy.runtime import open_runner
    from dunet_deploy.training.checkpoint import save_checkpoint

    model, onnx_path, _ = tiny
    data = tmp_path / "data"
    write_dataset(data, cases=2, layout="pairs", shape=rt.SHAPE, seed=5)
    ckpt = tmp_path / "model.pt"
    save_checkpoint(ckpt, model=model, spec=rt.tiny_spec())
    reference = evaluate.evaluate_checkpoint(ckpt, data, device="cpu", batch_size=8)
    for backend in ("onnxruntime", "openvino"):
        with open_runner(onnx_path, backend, precision="fp32") as runner:
            cases = evaluate.select_cases(data)
            got = evaluate.evaluate_cases(cases, runner.spec, runner.infer, batch_size=8)
        assert [m.case_id for m in got] == [m.case_id for m in reference]
        for a, b in zip(got, reference):
            assert a.tp + a.fp > 0  # the tiny model does predict lesion
            assert abs(a.tp - b.tp) <= 5 and abs(a.fp - b.fp) <= 5 and abs(a.fn - b.fn) <= 5
            assert a.dsc == pytest.approx(b.dsc, abs=1e-4)


def test_triton_url_routes_to_the_triton_runner(tiny, tmp_path, monkeypatch):
    """--triton-url runs the same pipeline with dunet-serve's client runner (faked here)."""
    triton_client = pytest.importorskip("dunet_deploy.runtime.triton_client")
    from dunet_deploy.runtime.ort import OnnxRuntimeRunner

    _, onnx_path, vols = tiny
    seen = {}

    def fake_triton_runner(url, expected=None):
        seen["url"], seen["expected"] = url, expected
        return OnnxRuntimeRunner(onnx_path, expected)  # stands in for the remote model

    monkeypatch.setattr(triton_client, "TritonRunner", fake_triton_runner)
    out = tmp_path / "out"
    res = invoke(["--engine", onnx_path, vols[0], "-o", out, "--triton-url",
                  "grpc://127.0.0.1:8001", "--quiet"])
    assert res.exit_code == 0, res.stderr
    assert seen["url"] == "grpc://127.0.0.1:8001"
    assert seen["expected"].spec == rt.tiny_spec()
    assert (out / "case_a_mask.nii.gz").is_file()


def test_every_parameter_is_an_option_or_cli_only():
    from dunet_deploy.cli import infer
    from dunet_deploy.runtime.options import InferenceOptions

    fields = {f.name: f for f in dataclasses.fields(InferenceOptions)}
    params = {p.name: p for p in main.params if p.name not in ("version",)}
    unmapped = set(params) - set(fields) - infer.CLI_ONLY
    assert not unmapped, f"dunet-infer parameters that reach nothing: {sorted(unmapped)}"
    assert not infer.CLI_ONLY & set(fields)
    assert not infer.CLI_ONLY - set(params), "CLI_ONLY names a parameter that is gone"
    parsed = main.make_context("dunet-infer", ["--engine", "m.onnx", "x.nii", "-o", "o"]).params
    for name in set(params) & set(fields):  # one default, held by the options object
        if parsed[name] is not None:
            assert parsed[name] == fields[name].default, name
    assert infer.build_options(parsed | {"workers": 0}) == InferenceOptions(workers=0)


def test_option_errors_name_the_flag(tiny, tmp_path):
    result = invoke(["--engine", str(tiny[1]), str(tiny[2][0]), "-o", str(tmp_path / "o"),
                     "--min-lesion-mm3", "nan"])
    assert result.exit_code == 2
    assert "error: --min-lesion-mm3 nan: must be a finite number >= 0" in result.output
