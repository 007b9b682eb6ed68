"""Registration to the model's template: accuracy, cost, and the cost of ``auto``'s check.

On MNI152 2009a anatomy (``dunet_deploy.data.anatomy``: the template from
the nilearn wheel, each head warped by a random smooth non-linear field, bias
field, noise, lesions):

* a template is built from ``--train`` registered 2 mm cases (as
  ``dunet-train`` would: mean after the spec's normalisation, leave-one-out
  similarity range);
* ``--scans`` new heads at 1 mm (the random warp has no affine part, so a
  head on the MNI box IS registered) are moved by KNOWN random motions
  (rotation <= 20 deg per axis, shift <= 30 mm per axis, per-axis scale
  0.9-1.1) onto sagittal (PIR) and coronal 1 mm int16 grids, and registered
  with ``plan_registration(mode="auto")`` on ``--threads`` threads. Error =
  mean distance over the template's head (every ~4 mm) between the estimated
  and the true position;
* masks: both the native scan (through the registration stage,
  ``register_to_network``) and the registered head (no registration) are
  segmented through the inference core by a position-dependent numpy model
  (tissue inside one in-plane quadrant of the model's slices; no trained
  model is needed to test geometry); the head's mask carried onto the native
  grid by the true motion is compared with the native scan's mask (DSC);
* the registered heads go through ``auto``: none may be registered (false
  alarms), and the check's time is compared with the preprocessing of the
  same volume (intensity normalisation + slicing, a lower bound of a
  ``dunet-infer`` run, so the ratio is an upper bound);
* N4 (``bias_correct``) on the first 4 scans with a strong bias field:
  registration with and without it.

Usage::

    python benchmarks/registration.py --out benchmarks/results/DIR [--scans 20] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from dunet_deploy.data import anatomy as A
from dunet_deploy.data import registration as R
from dunet_deploy.data.nifti import NiftiVolume
from dunet_deploy.data.preprocess import normalize_intensity, volume_to_slices
from dunet_deploy.machine import cpu_features
from dunet_deploy.runtime.core import finish_prediction, predict_grid, to_network
from dunet_deploy.runtime.register_stage import RegisterStage, register_to_network
from dunet_deploy.spec import PreprocessSpec


def _quadrant_model(spec: PreprocessSpec):  # type: ignore[no-untyped-def]
    """``predict(slabs [N, C, S, S]) -> [N, 1, S, S]``: smoothed tissue in one in-plane quadrant."""
    from scipy import ndimage

    s = spec.image_size
    window = np.zeros((s, s), np.float32)
    window[: s // 2, : s // 2] = 1.0

    def predict(slabs: np.ndarray) -> np.ndarray:
        mean = ndimage.uniform_filter(slabs.mean(axis=1), size=(1, 7, 7), mode="nearest")
        return (1.0 / (1.0 + np.exp(-8.0 * (mean + 1.5))) * window)[:, None].astype(np.float32)

    return predict


def _mask(net, shape, affine, spec, predict) -> np.ndarray:  # type: ignore[no-untyped-def]
    grid = predict_grid(net, spec, predict, batch_size=32)
    geometry = NiftiVolume(data=np.broadcast_to(np.zeros((), np.float32), shape),
                           affine=affine, header=None)
    return finish_prediction(grid, net, geometry, spec).mask


def _dsc(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    return float(2 * (a & b).sum() / max(int(a.sum() + b.sum()), 1))


def _error_mm(template: R.Template, reg: R.Registration, motion: A.Motion) -> float:
    pts = template._points[0]
    est = reg.world_to_template @ (motion.matrix() @ pts)
    return float(np.linalg.norm((est - pts)[:3], axis=0).mean())


def _timed(fn, *args, **kw):  # type: ignore[no-untyped-def]
    w, c = time.perf_counter(), time.process_time()
    out = fn(*args, **kw)
    return out, time.perf_counter() - w, time.process_time() - c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--scans", type=int, default=20)
    ap.add_argument("--train", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n4", type=int, default=4, help="scans also measured with a bias field")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    spec = PreprocessSpec()
    train = [A.synthesize_anatomy_case(1000 + i, shape=(99, 117, 95)) for i in range(args.train)]
    template = R.build_template([(img, aff) for img, _m, aff in train], spec,
                                grid=(A.MNI152_SHAPE, A.mni152_grid()))
    rng = np.random.default_rng(args.seed)
    grid = A.mni152_grid()
    model_spec = PreprocessSpec.for_geometry(A.MNI152_SHAPE, orientation=("R", "A", "S"),
                                             voxel_size=(1.0, 1.0, 1.0), grid_affine=grid)
    predict = _quadrant_model(model_spec)
    stage = RegisterStage(mode="auto", threads=args.threads)
    rows = []
    for i in range(args.scans):
        layout = ("sagittal", "coronal")[i % 2]
        motion = A.random_motion(rng)
        row: dict = {"scan": i, "layout": layout, **{k: v for k, v in motion.to_dict().items()
                                                     if k in ("rotation_deg", "shift_mm", "scale")}}
        img, _lesions, aff = A.synthesize_anatomy_case(args.seed + i, warp_mm=4.0)
        carried = np.zeros(1)
        scan = A.native_scan(img, aff, motion, layout=layout, voxel_mm=1.0)
        try:
            reg, wall, cpu = _timed(R.plan_registration, scan.data, scan.affine, template,
                                    mode="auto", threads=args.threads)
            row["warped"] = {"registered": reg.done, "error_mm": round(_error_mm(
                template, reg, motion), 3), "wall_s": round(wall, 3), "core_s": round(cpu, 3),
                "similarity_before": round(reg.similarity_before, 4),
                "similarity_after": round(reg.similarity_after, 4)}
            # Masks: the native scan through the stage vs the head's mask carried by the motion.
            net, record, _ = register_to_network(scan.data, scan.affine, model_spec, stage,
                                                 template=template)
            native_mask = _mask(net, scan.data.shape, scan.affine, model_spec, predict)
            head_net = to_network(img, model_spec, affine=aff)
            head_mask = _mask(head_net, img.shape, aff, model_spec, predict)
            carried = A.native_scan(img, aff, motion, mask=head_mask, layout=layout,
                                    voxel_mm=1.0).mask
            row["warped"]["mask_dsc"] = round(_dsc(native_mask, carried), 4)
            row["warped"]["stage_registered"] = record["done"]
        except Exception as exc:  # a non-convergence is a result here
            row["warped"] = {"registered": False, "error": str(exc)}
        # The registered head through auto: a false alarm?
        plan, wall, cpu = _timed(R.plan_registration, img, aff, template, mode="auto",
                                 threads=args.threads)
        _, pre_wall, _ = _timed(lambda v: volume_to_slices(normalize_intensity(v, spec), spec),
                                img)
        row["registered_head"] = {"false_alarm": plan.done,
                                  "similarity": round(plan.similarity_before, 4),
                                  "check_s": round(wall, 4), "preprocess_s": round(pre_wall, 4)}
        if i < args.n4 and carried.ndim == 3:  # N4 on a strong bias field
            x = np.linspace(-1, 1, scan.data.shape[0], dtype=np.float32)[:, None, None]
            biased = scan.data * np.exp(np.float32(0.7) * x)
            fixed, n4_wall, _ = _timed(R.bias_correct, biased, scan.affine, threads=args.threads)
            for name, vol in (("biased", biased), ("n4", fixed)):
                try:
                    r = R.register(vol, scan.affine, template, threads=args.threads)
                    row[f"bias_{name}"] = {"error_mm": round(_error_mm(template, r, motion), 3),
                                           "similarity_after": round(r.similarity_after, 4)}
                except Exception as exc:
                    row[f"bias_{name}"] = {"error": str(exc)}
            row["n4_s"] = round(n4_wall, 3)
            # Masks of the biased scan through the stage with --bias-correct (without it the
            # registration above fails: a per-case error, no mask).
            try:
                n4_stage = RegisterStage(mode="auto", bias_correct=True, threads=args.threads)
                net, _, _ = register_to_network(biased, scan.affine, model_spec, n4_stage,
                                                template=template)
                row["bias_n4"]["mask_dsc"] = round(_dsc(_mask(
                    net, scan.data.shape, scan.affine, model_spec, predict), carried), 4)
            except Exception as exc:
                row["bias_n4"]["mask_error"] = str(exc)
        rows.append(row)
        print(json.dumps(row), flush=True)

    def stat(key: str, field: str) -> float:
        vals = [r[key][field] for r in rows if field in r[key]]
        return round(float(np.mean(vals)), 3) if vals else float("nan")

    summary = {
        "cpu": cpu_features()["model"], "flags": cpu_features()["flags"],
        "threads": args.threads, "cpus_visible": len(os.sched_getaffinity(0)),
        "template": {"shape": list(template.data.shape),
                     "similarity_range": template.similarity_range, "floor": template.floor},
        "scans": args.scans,
        "registered_by_auto": sum(r["warped"]["registered"] for r in rows),
        "mean_error_mm": stat("warped", "error_mm"),
        "max_error_mm": round(max(r["warped"].get("error_mm", np.inf) for r in rows), 3),
        "mask_dsc_min": round(min(r["warped"].get("mask_dsc", 0.0) for r in rows), 4),
        "mask_dsc_mean": stat("warped", "mask_dsc"),
        "wall_s_per_volume": stat("warped", "wall_s"),
        "core_s_per_volume": stat("warped", "core_s"),
        "false_alarms": sum(r["registered_head"]["false_alarm"] for r in rows),
        "check_s": stat("registered_head", "check_s"),
        "preprocess_s": stat("registered_head", "preprocess_s"),
        "rows": rows,
    }
    (args.out / "registration.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "rows"}, indent=2))


if __name__ == "__main__":
    main()
