"""Registration to the model's template: accuracy, cost, and the cost of ``auto``'s check.

On MNI152 2009a anatomy (``dunet_deploy.data.anatomy``: the template from
the nilearn wheel, each head warped by a random smooth non-linear field, bias
field, noise, lesions):

* a template is built from ``--train`` registered 2 mm cases (as
  ``dunet-train`` would: mean after the spec's normalisation, leave-one-out
  similarity range);
* ``--scans`` new heads at 1 mm are moved by KNOWN random motions (rotation
  <= 20 deg per axis, shift <= 30 mm per axis, per-axis scale 0.9-1.1) onto
  sagittal (PIR) and coronal 1 mm int16 grids, and registered with
  ``plan_registration(mode="auto")`` on ``--threads`` threads. Error = mean
  distance over the template's head (every ~4 mm) between the estimated and
  the true position; reported for heads with the non-linear warp (the truth
  then includes the warp, which no affine can undo) and without it;
* the same heads, registered (no motion), go through ``auto``: none may be
  registered (false alarms), and the check's time is compared with the
  preprocessing of the same volume (intensity normalisation + slicing, a
  lower bound of a ``dunet-infer`` run, so the ratio is an upper bound);
* N4 (``bias_correct``) on heads with a strong bias field: similarity and
  registration error with and without it.

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
from dunet_deploy.data.preprocess import normalize_intensity, volume_to_slices
from dunet_deploy.machine import cpu_features
from dunet_deploy.spec import PreprocessSpec


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
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    spec = PreprocessSpec()
    train = [A.synthesize_anatomy_case(1000 + i, shape=(99, 117, 95)) for i in range(args.train)]
    template = R.build_template([(img, aff) for img, _m, aff in train], spec,
                                grid=(A.MNI152_SHAPE, A.mni152_grid()))
    rng = np.random.default_rng(args.seed)
    rows = []
    for i in range(args.scans):
        layout = ("sagittal", "coronal")[i % 2]
        motion = A.random_motion(rng)
        row: dict = {"scan": i, "layout": layout, **{k: v for k, v in motion.to_dict().items()
                                                     if k in ("rotation_deg", "shift_mm", "scale")}}
        for warp in (4.0, 0.0):
            img, mask, aff = A.synthesize_anatomy_case(args.seed + i, warp_mm=warp)
            scan = A.native_scan(img, aff, motion, mask=mask, layout=layout, voxel_mm=1.0)
            key = "warped" if warp else "unwarped"
            try:
                reg, wall, cpu = _timed(R.plan_registration, scan.data, scan.affine, template,
                                        mode="auto", threads=args.threads)
                row[key] = {"registered": reg.done, "error_mm": round(_error_mm(
                    template, reg, motion), 3), "wall_s": round(wall, 3), "core_s": round(cpu, 3),
                    "similarity_before": round(reg.similarity_before, 4),
                    "similarity_after": round(reg.similarity_after, 4)}
            except Exception as exc:  # a non-convergence is a result here
                row[key] = {"registered": False, "error": str(exc)}
            if warp:  # the registered head through auto: a false alarm?
                plan, wall, cpu = _timed(R.plan_registration, img, aff, template, mode="auto",
                                         threads=args.threads)
                _, pre_wall, _ = _timed(lambda v: volume_to_slices(normalize_intensity(v, spec),
                                                                   spec), img)
                row["registered_head"] = {"false_alarm": plan.done,
                                          "similarity": round(plan.similarity_before, 4),
                                          "check_s": round(wall, 4),
                                          "preprocess_s": round(pre_wall, 4)}
                if i < 4:  # N4 on a strong bias field
                    x = np.linspace(-1, 1, scan.data.shape[0], dtype=np.float32)[:, None, None]
                    biased = scan.data * np.exp(np.float32(0.7) * x)
                    fixed, n4_wall, _ = _timed(R.bias_correct, biased, scan.affine,
                                               threads=args.threads)
                    for name, vol in (("biased", biased), ("n4", fixed)):
                        try:
                            r = R.register(vol, scan.affine, template, threads=args.threads)
                            row[f"bias_{name}"] = {"error_mm": round(_error_mm(template, r, motion),
                                                                    3),
                                                   "similarity_after": round(r.similarity_after, 4)}
                        except Exception as exc:
                            row[f"bias_{name}"] = {"error": str(exc)}
                    row["n4_s"] = round(n4_wall, 3)
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
        "registered_by_auto": {k: sum(r[k]["registered"] for r in rows)
                               for k in ("warped", "unwarped")},
        "mean_error_mm": {k: stat(k, "error_mm") for k in ("warped", "unwarped")},
        "max_error_mm": {k: round(max(r[k].get("error_mm", np.inf) for r in rows), 3)
                         for k in ("warped", "unwarped")},
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
