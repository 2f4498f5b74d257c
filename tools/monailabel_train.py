"""Training the bundle through MONAI Label's own bundle trainer (``monailabel.tasks.train.bundle.BundleTrainTask``).

Run with the MONAI Label venv's python (``make test-monailabel`` does). Steps: a synthetic cohort (6 cases) laid
out as a MONAI Label local datastore (``studies/<case>.nii.gz`` + ``studies/labels/final/<case>.nii.gz``) -> a
copy of the bundle -> ``BundleTrainTask(bundle)(request, datastore)`` with the request MONAI Label's ``POST
/train`` sends (``max_epochs`` 5 = one validation at the bundle's ``val_interval`` 5, ``val_split`` 0.34, CPU)
-> checks: the trainer (starting from the shipped weights, which MONAI Label loads first) rewrote
``models/model.pt``, and the new file is a plain state dict (no ``module.`` prefix) that loads
with ``strict=True`` into the network of ``inference.json``, which MONAI Label's inference task serves.

MONAI Label's trainer gives the bundle only ``image``/``label`` per item (no subgroup attribute): every case
trains with the unknown-subgroup policy, and the cohort check warns about it. Exit status 0 = pass.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=None, help="work folder (default: a temporary one, removed)")
    ap.add_argument("--epochs", type=int, default=5)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    work = (args.work or Path(tempfile.mkdtemp(prefix="monailabel_train_"))).resolve()
    bundle = work / "bundle"
    shutil.copytree(
        REPO / "bundle", bundle, ignore=shutil.ignore_patterns("runs", "eval", "data", "node", "__pycache__")
    )
    sys.path.insert(0, str(bundle))
    import torch
    from monai.bundle import ConfigParser
    from monailabel.datastore.local import LocalDatastore
    from monailabel.tasks.train.bundle import BundleTrainTask
    from scripts import synthetic

    failures = []
    try:
        synthetic.generate_cohort(work / "data", n_cases=6, seed=0, shape=(64, 64, 32))
        studies = work / "studies"
        (studies / "labels" / "final").mkdir(parents=True)
        for image in sorted((work / "data" / "images").glob("*.nii.gz")):
            shutil.copy(image, studies / image.name)
            shutil.copy(work / "data" / "labels" / image.name, studies / "labels" / "final" / image.name)
        datastore = LocalDatastore(str(studies), extensions=["*.nii.gz"], auto_reload=False)
        model = bundle / "models" / "model.pt"
        before = sha256(model)
        task = BundleTrainTask(str(bundle), {})
        if not task.is_valid():
            raise RuntimeError("MONAI Label does not accept the bundle as trainable (BundleTrainTask.is_valid)")
        request = {"model": "fairdro_ctv_segmentation", "max_epochs": args.epochs, "device": "cpu",
                   "multi_gpu": False, "val_split": 0.34, "pretrained": True}  # fmt: skip
        t0 = time.time()
        task(request, datastore)
        print(f"MONAI Label bundle training of {args.epochs} epochs: {time.time() - t0:.1f} s", flush=True)
        if sha256(model) == before:
            failures.append("models/model.pt was not rewritten by the training MONAI Label started")
        state = torch.load(model, map_location="cpu", weights_only=True)
        if any(str(k).startswith("module.") for k in state):
            failures.append("the trained model.pt has 'module.'-prefixed keys (MONAI Label would serve random weights)")
        parser = ConfigParser()
        parser.read_config(str(bundle / "configs" / "inference.json"))
        network = parser.get_parsed_content("network_def")
        network.load_state_dict(state, strict=True)  # raises on any missing or unexpected key
        print(f"trained model.pt loads with strict=True ({len(state)} tensors)", flush=True)
    except Exception as err:  # noqa: BLE001 - every error is a failure, reported below
        failures.append(f"{type(err).__name__}: {err}")
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    for failure in failures:
        print(f"FAIL: {failure}", flush=True)
    print("PASS" if not failures else f"{len(failures)} failure(s)", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
