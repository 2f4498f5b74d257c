"""End-to-end check of the MONAI Deploy app (deploy/app.py) against the bundle's own DICOM inference.

Run with the main venv's python; the app runs in the Deploy venv (``--deploy-python``, default
``.venv-deploy/bin/python``), as a clinic would run it::

    FAIRDRO_SUBGROUP=<stage> python deploy/app.py -i <series folder> -o <out> -m bundle/models/model.ts

For synthetic CT series stored in several ways (identity, flipped, reversed slice order, transposed, oblique;
each folder also holds the case's reference RTSTRUCT, which the app's series selector must skip) it checks:

* the app writes exactly one DICOM SEG and one RTSTRUCT, both in the CT's study and referencing its series;
* the SEG decoded onto the CT grid equals the mask of ``monai.bundle run inference`` with
  ``inference_dicom.json`` on the same series, same subgroup and the same weights (``model.pt``; the app uses
  the TorchScript export ``model.ts``): Dice >= 0.99;
* the RTSTRUCT rasterised back onto the CT grid agrees with that mask (Dice >= 0.95, polygon discretisation);
* the subgroup reaches the network: the app's mask for the case's own stage matches the bundle run for that
  stage better than the bundle run for another stage whenever those two differ;
* bad input gets a clear error: an unknown ``FAIRDRO_SUBGROUP`` and an output folder inside the input.

Exit status 0 = every check passed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundle"
sys.path.insert(0, str(BUNDLE))
sys.path.insert(0, str(REPO / "tools"))

from checklib import Checks, bundle_dicom_inference, dice, log  # noqa: E402
from scripts import synthetic  # noqa: E402
from scripts.dicom_seg import read_seg  # noqa: E402
from scripts.dicom_series import read_series_info  # noqa: E402
from scripts.rtstruct import rasterise_roi  # noqa: E402

check = Checks()


def deploy_env(deploy_python: Path) -> dict[str, str]:
    env = dict(os.environ)
    site = next((deploy_python.parent.parent / "lib").glob("python3*/site-packages"))
    cuda = site / "nvidia" / "cu13" / "lib"
    if cuda.is_dir():  # holoscan links libcudart.so.13 (deploy/requirements.txt installs it)
        env["LD_LIBRARY_PATH"] = f"{cuda}:{env.get('LD_LIBRARY_PATH', '')}".rstrip(":")
    env.pop("PYTHONPATH", None)
    return env


def run_app(
    deploy_python: Path, series: Path, out: Path, subgroup: str | None, model: Path
) -> subprocess.CompletedProcess:
    env = deploy_env(deploy_python)
    if subgroup is None:
        env.pop("FAIRDRO_SUBGROUP", None)
    else:
        env["FAIRDRO_SUBGROUP"] = subgroup
    cmd = f'ulimit -s 32768; exec "{deploy_python}" deploy/app.py -i "{series}" -o "{out}" -m "{model}"'
    t0 = time.time()
    res = subprocess.run(["bash", "-c", cmd], cwd=REPO, env=env, capture_output=True, text=True)
    log(f"  app on {series.name} (subgroup {subgroup}): rc={res.returncode} in {time.time() - t0:.1f} s")
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--deploy-python", type=Path, default=REPO / ".venv-deploy" / "bin" / "python")
    ap.add_argument("--model", type=Path, default=BUNDLE / "models" / "model.ts")
    ap.add_argument("--work", type=Path, default=None, help="work folder (default: a temporary one)")
    ap.add_argument("--n-cases", type=int, default=5)
    args = ap.parse_args()
    if not args.deploy_python.exists():
        print(f"Deploy venv python {args.deploy_python} not found; run `make deploy-env`.", file=sys.stderr)
        return 1
    work = args.work or Path(tempfile.mkdtemp(prefix="fairdro_deploy_"))
    work.mkdir(parents=True, exist_ok=True)
    datalist = synthetic.generate_cohort(work / "cohort", n_cases=args.n_cases, seed=5, shape=(64, 64, 32), dicom=True)
    items = [it for part in ("training", "validation", "testing") for it in datalist[part]]
    stages = ["T1", "T2", "T3", "T4"]
    timings = []
    for item in items:
        series = work / "cohort" / item["dicom_dir"]
        info = read_series_info(series)
        stage, other = item["stage"], next(s for s in stages if s != item["stage"])
        log(f"{item['id']}: stored as {item['dicom_variant']}, stage {stage}")
        out = work / "app" / item["id"]
        t0 = time.time()
        res = run_app(args.deploy_python, series, out, stage, args.model)
        timings.append(time.time() - t0)
        if res.returncode != 0:
            check(False, f"{item['id']}: app exited {res.returncode}\n{res.stderr[-3000:]}")
            continue
        rs_files = sorted(out.glob("RS_*.dcm"))
        seg_files = [p for p in out.glob("*.dcm") if pydicom.dcmread(p, stop_before_pixels=True).Modality == "SEG"]
        check(len(rs_files) == 1 and len(seg_files) == 1, f"{item['id']}: one SEG and one RTSTRUCT written")
        if len(rs_files) != 1 or len(seg_files) != 1:
            continue
        for path in (seg_files[0], rs_files[0]):
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            check(ds.StudyInstanceUID == info.study_instance_uid, f"{item['id']}: {ds.Modality} in the CT's study")
        rs = pydicom.dcmread(rs_files[0])
        ref = rs.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
        check(ref.SeriesInstanceUID == info.series_instance_uid, f"{item['id']}: RTSTRUCT references the CT series")
        app_mask = read_seg(seg_files[0], info) > 0
        own = bundle_dicom_inference(series, work / "bundle" / item["id"] / stage, stage)
        d_own = dice(app_mask, own)
        check(d_own >= 0.99, f"{item['id']}: app SEG vs bundle inference ({stage}) Dice {d_own:.4f} >= 0.99")
        d_rs = dice(rasterise_roi(rs_files[0], info, names=["CTV"]), own)
        check(d_rs >= 0.95, f"{item['id']}: app RTSTRUCT vs bundle inference Dice {d_rs:.4f} >= 0.95")
        alt = bundle_dicom_inference(series, work / "bundle" / item["id"] / other, other)
        if dice(own, alt) < 0.999:
            d_alt = dice(app_mask, alt)
            what = f"{item['id']}: subgroup reaches the network (Dice {d_own:.4f} own vs {d_alt:.4f} {other})"
            check(d_own > d_alt, what)
        else:
            log(f"  {item['id']}: stages {stage} and {other} give the same mask here; routing not distinguishable")

    first = work / "cohort" / items[0]["dicom_dir"]
    info = read_series_info(first)
    res = run_app(args.deploy_python, first, work / "no_subgroup", None, args.model)
    seg_files = [p for p in (work / "no_subgroup").glob("*.dcm") if not p.name.startswith("RS_")]
    if res.returncode == 0 and len(seg_files) == 1:
        d = dice(read_seg(seg_files[0], info), bundle_dicom_inference(first, work / "bundle" / "no_subgroup", None))
        check(d >= 0.99, f"no FAIRDRO_SUBGROUP: app vs bundle fallback routing (subgroup None) Dice {d:.4f} >= 0.99")
    else:
        check(False, f"app without FAIRDRO_SUBGROUP: rc={res.returncode}, SEG files {seg_files}\n{res.stderr[-2000:]}")
    res = run_app(args.deploy_python, first, work / "bad_subgroup", "T9", args.model)
    check(res.returncode != 0 and "'T9'" in res.stderr and "not one of the bundle's subgroups" in res.stderr,
          "unknown FAIRDRO_SUBGROUP refused with a message naming it")  # fmt: skip
    res = run_app(args.deploy_python, first, first / "out", items[0]["stage"], args.model)
    check(res.returncode != 0 and "inside the input series folder" in res.stderr and not (first / "out").exists(),
          "output folder inside the input refused, nothing written there")  # fmt: skip
    if timings:
        med, worst = np.median(timings), max(timings)
        log(f"app wall time per series (process start to exit): median {med:.1f} s, max {worst:.1f} s")
    if check.failures:
        log(f"{len(check.failures)} check(s) failed")
        return 1
    log("all Deploy checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
