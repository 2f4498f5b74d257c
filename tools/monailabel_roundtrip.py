"""Round trip of the FairDRO bundle through MONAI Label (0.8.5), compared with the bundle's own inference.

Run with the main venv's python (it needs nibabel/numpy/monai for the comparison); the MONAI Label
server runs in its own venv (``--ml-python``, default ``.venv-monailabel/bin/python``).

Steps: synthetic cohort (6 cases, 64x64x32) -> 2-epoch training (or ``--model``) -> copy of the
bundle as ``apps/monaibundle/model/fairdro_ctv_segmentation`` -> ``start_server`` on 127.0.0.1 and a
free port -> ``POST /infer`` of one image with params ``{"stage": "T2"}`` and with no params ->
``monai.bundle run inference`` on the same image (subgroup T2, and unknown) -> mask comparison.
The server is stopped in all cases.

With ``--expect-mismatch`` the served ``model.pt`` has every key prefixed with ``module.`` (what a
DDP checkpoint looks like); MONAI Label loads it with ``strict=False``, i.e. serves random weights
with HTTP 200. The run then passes only if the check detects it (key-mismatch warning in the server
log and masks that differ from the bundle's). Exit status 0 = pass, 1 = fail.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from checklib import free_port, log  # tools/ is on sys.path when this file runs as a script

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundle"
MODEL_NAME = "fairdro_ctv_segmentation"  # contains "segmentation": MONAI Label infers the task type from it
KEY_WARNING = "Checkpoint keys don't match"


def run(cmd: list[str], **kw) -> float:
    log("$ " + " ".join(str(c) for c in cmd))
    t0 = time.time()
    subprocess.run([str(c) for c in cmd], check=True, **kw)
    dt = time.time() - t0
    log(f"  done in {dt:.1f} s")
    return dt


def make_data_and_model(work: Path, py: str, model: Path | None, epochs: int) -> Path:
    data = work / "data"
    if not (data / "datalist.json").exists():
        run(
            [
                "nice",
                "-n",
                "10",
                py,
                BUNDLE / "scripts/synthetic.py",
                "--out",
                data,
                "--n-cases",
                "6",
                "--seed",
                "0",
                "--shape",
                "64",
                "64",
                "32",
            ],
            cwd=REPO,
        )
    if model is not None:
        return model
    out = work / "run/models/model.pt"
    if out.exists():
        log(f"reusing weights {out}")
        return out
    run(
        [
            "nice",
            "-n",
            "10",
            py,
            "-m",
            "monai.bundle",
            "run",
            "training",
            "--config_file",
            BUNDLE / "configs/train.json",
            "--dataset_dir",
            data,
            "--output_dir",
            work / "run",
            "--ckpt_dir",
            work / "run/models",
            "--epochs",
            str(epochs),
            "--val_interval",
            "1",
        ],
        cwd=REPO,
    )
    if not out.exists():
        # a 6-case cohort has an empty validation split, so the key-metric saver never writes model.pt:
        # take the network weights of the final training checkpoint (a plain state dict, like model.pt)
        final = work / "run/checkpoints/checkpoint_final.pt"
        state = torch.load(final, map_location="cpu", weights_only=True)["model"]
        out.parent.mkdir(parents=True, exist_ok=True)
        torch.save(state, out)
        log(f"no validation split: wrote {out} from {final}['model'] ({len(state)} tensors)")
    return out


def prepare_app(work: Path, ml_py: str, weights: Path, prefix: str) -> Path:
    apps = work / "apps"
    if apps.exists():
        shutil.rmtree(apps)
    run([ml_py, REPO / "tools/monailabel_server.py", "apps", "--download", "--name", "monaibundle", "--output", apps])
    dst = apps / "monaibundle/model" / MODEL_NAME
    shutil.copytree(BUNDLE, dst, ignore=shutil.ignore_patterns("runs", "eval", "data", "__pycache__", "model.*"))
    (dst / "models").mkdir(exist_ok=True)
    state = torch.load(weights, map_location="cpu", weights_only=True)
    if prefix:
        state = {prefix + k: v for k, v in state.items()}
        log(f"negative test: every key of the served model.pt prefixed with {prefix!r}")
    torch.save(state, dst / "models/model.pt")
    return apps / "monaibundle"


def http(url: str, data: bytes | None = None, headers: dict | None = None, timeout: float = 300) -> bytes:
    req = urllib.request.Request(url, data=data, headers=headers or {}, method="POST" if data is not None else "GET")
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.read()


class Server:
    def __init__(self, ml_py: str, app: Path, studies: Path, logfile: Path):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.logfile = logfile
        env = dict(os.environ)
        env["PATH"] = str(Path(ml_py).parent) + os.pathsep + env.get("PATH", "")
        env.pop("PYTHONPATH", None)
        cmd = [
            "nice",
            "-n",
            "10",
            ml_py,
            str(REPO / "tools/monailabel_server.py"),
            "start_server",
            "--app",
            str(app),
            "--studies",
            str(studies),
            "--conf",
            "models",
            MODEL_NAME,
            "--conf",
            "zoo_source",
            "local",
            "--conf",
            "sam2",
            "false",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
        ]
        log("$ " + " ".join(cmd) + f"  > {logfile}")
        self.fh = open(logfile, "w")
        self.proc = subprocess.Popen(
            cmd, stdout=self.fh, stderr=subprocess.STDOUT, env=env, cwd=str(app.parent), start_new_session=True
        )

    def wait_ready(self, timeout: float = 240) -> dict:
        t0 = time.time()
        while time.time() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"server exited with {self.proc.returncode}; see {self.logfile}:\n" + self.log_text()[-3000:]
                )
            try:
                info = json.loads(http(self.base + "/info/", timeout=5))
                log(f"server ready after {time.time() - t0:.1f} s on {self.base}")
                return info
            except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
                time.sleep(1)
        raise RuntimeError(f"server not ready after {timeout} s; see {self.logfile}")

    def infer(self, image_id: str, params: dict | None, out: Path) -> float:
        boundary = uuid.uuid4().hex
        body = b""
        if params is not None:
            body = (
                f'--{boundary}\r\nContent-Disposition: form-data; name="params"\r\n\r\n{json.dumps(params)}\r\n'
            ).encode()
        body += f"--{boundary}--\r\n".encode()
        url = f"{self.base}/infer/{MODEL_NAME}?image={image_id}&output=image"
        t0 = time.time()
        content = http(url, data=body, headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        dt = time.time() - t0
        out.write_bytes(content)
        log(
            f"POST /infer/{MODEL_NAME}?image={image_id}&output=image params={params} -> {out.name} "
            f"({len(content)} bytes, {dt:.2f} s)"
        )
        return dt

    def log_text(self) -> str:
        self.fh.flush()
        return self.logfile.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.fh.close()
        log(f"server stopped (exit {self.proc.returncode})")


def bundle_inference(py: str, work: Path, item: dict, weights: Path, subgroup: str | None, out_dir: Path) -> Path:
    item = {k: item[k] for k in ("id", "image")}  # no `stage`: the subgroup comes from --subgroup, like a request
    dl = out_dir / "datalist.json"
    out_dir.mkdir(parents=True, exist_ok=True)
    dl.write_text(json.dumps({"testing": [item]}))
    env = dict(os.environ, PYTHONPATH=str(BUNDLE))  # this bundle's `scripts` before any registered one
    run(
        [
            "nice",
            "-n",
            "10",
            py,
            "-m",
            "monai.bundle",
            "run",
            "inference",
            "--config_file",
            BUNDLE / "configs/inference.json",
            "--dataset_dir",
            work / "data",
            "--datalist",
            dl,
            "--output_dir",
            out_dir,
            "--ckpt_path",
            weights,
            "--subgroup",
            "None" if subgroup is None else subgroup,
        ],
        cwd=BUNDLE,
        stdout=subprocess.DEVNULL,
        env=env,
    )
    return out_dir / f"{item['id']}_seg.nii.gz"


def load_mask(path: Path) -> tuple[np.ndarray, np.ndarray]:
    img = nib.load(str(path))
    return np.asarray(img.dataobj).squeeze(), img.affine


def compare(name: str, a_path: Path, b_path: Path) -> dict:
    a, aff_a = load_mask(a_path)
    b, aff_b = load_mask(b_path)
    res = {"pair": name, "shape_a": list(a.shape), "shape_b": list(b.shape)}
    if a.shape != b.shape:
        res.update(same_shape=False, dice=float("nan"), identical=False)
    else:
        fa, fb = a > 0, b > 0
        inter, tot = int((fa & fb).sum()), int(fa.sum() + fb.sum())
        res.update(
            same_shape=True,
            identical=bool(np.array_equal(a, b)),
            fg_a=int(fa.sum()),
            fg_b=int(fb.sum()),
            voxels_differing=int((a != b).sum()),
            dice=1.0 if tot == 0 else 2 * inter / tot,
            affine_max_abs_diff=float(np.abs(aff_a - aff_b).max()),
        )
    log(f"compare {name}: {json.dumps(res)}")
    return res


def main() -> int:
    global BUNDLE
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=None, help="work folder (default: a new temporary one, removed)")
    p.add_argument("--keep", action="store_true", help="keep the work folder")
    p.add_argument("--model", type=Path, default=None, help="weights to serve (default: train --epochs on the cohort)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--python", default=str(REPO / ".venv/bin/python"), help="main venv python (bundle commands)")
    p.add_argument("--ml-python", default=str(REPO / ".venv-monailabel/bin/python"), help="MONAI Label venv python")
    p.add_argument("--bundle", type=Path, default=REPO / "bundle", help="bundle folder to serve and to compare with")
    p.add_argument("--stage", default="T2", help="subgroup sent as params {'stage': ...}")
    p.add_argument("--min-dice", type=float, default=0.999)
    p.add_argument(
        "--expect-mismatch",
        action="store_true",
        help="serve a 'module.'-prefixed model.pt; pass only if the weight check catches it",
    )
    args = p.parse_args()
    BUNDLE = args.bundle.resolve()

    t_start = time.time()
    work = args.work or Path(tempfile.mkdtemp(prefix="monailabel_rt_"))
    work.mkdir(parents=True, exist_ok=True)
    work = work.resolve()
    log(f"work folder {work}; mode: {'NEGATIVE (--expect-mismatch)' if args.expect_mismatch else 'positive'}")
    server = None
    failures: list[str] = []
    try:
        weights = make_data_and_model(work, args.python, args.model, args.epochs).resolve()
        dl = json.loads((work / "data/datalist.json").read_text())
        item = dl["testing"][0]
        image_id = Path(item["image"]).name.removesuffix(".nii.gz")
        app = prepare_app(work, args.ml_python, weights, "module." if args.expect_mismatch else "")
        out = work / ("out_mismatch" if args.expect_mismatch else "out")
        if out.exists():
            shutil.rmtree(out)
        out.mkdir()

        server = Server(args.ml_python, app, work / "data/images", out / "server.log")
        info = server.wait_ready()
        models = info.get("models", {})
        if MODEL_NAME not in models:
            raise RuntimeError(f"{MODEL_NAME} not among the served models {list(models)}")
        m = models[MODEL_NAME]
        log(f"/info: model {MODEL_NAME}: type={m.get('type')} labels={m.get('labels')}")
        ml_stage = out / f"ml_{image_id}_{args.stage}.nii.gz"
        ml_none = out / f"ml_{image_id}_noparams.nii.gz"
        t1 = server.infer(image_id, {"stage": args.stage}, ml_stage)
        t2 = server.infer(image_id, None, ml_none)
        t3 = server.infer(image_id, {"stage": args.stage}, out / "ml_repeat.nii.gz")
        server_log = server.log_text()
        server.stop()
        key_warning = KEY_WARNING in server_log
        log(
            f"server log: key-mismatch warning present: {key_warning}; first infer {t1:.2f} s, then {t2:.2f} s, "
            f"{t3:.2f} s"
        )
        if "Traceback" in server_log:
            failures.append("server log holds a Traceback")

        ref_stage = bundle_inference(args.python, work, item, weights, args.stage, out / "bundle_stage")
        ref_none = bundle_inference(args.python, work, item, weights, None, out / "bundle_unknown")

        results = [
            compare(f"MONAI Label {{stage:{args.stage}}} vs bundle --subgroup {args.stage}", ml_stage, ref_stage),
            compare("MONAI Label (no params) vs bundle --subgroup None (unknown routing)", ml_none, ref_none),
            compare(f"MONAI Label {{stage:{args.stage}}} vs MONAI Label (no params)", ml_stage, ml_none),
            compare(f"bundle --subgroup {args.stage} vs bundle unknown", ref_stage, ref_none),
        ]
        (out / "results.json").write_text(json.dumps({"results": results, "key_warning": key_warning}, indent=2))
        match = [r["same_shape"] and (r["identical"] or r["dice"] >= args.min_dice) for r in results[:2]]
        if args.expect_mismatch:
            detected = key_warning or not all(match)
            log(f"NEGATIVE TEST: key warning={key_warning}, masks match bundle={match} -> detected={detected}")
            if not detected:
                failures.append("served random weights (module.-prefixed checkpoint) were NOT detected")
        else:
            if key_warning:
                failures.append("server log warns that checkpoint keys don't match: weights not (fully) loaded")
            if not match[0]:
                failures.append(
                    f"MONAI Label with params {{'stage': '{args.stage}'}} differs from the bundle's "
                    f"inference with --subgroup {args.stage} (Dice {results[0]['dice']:.6f})"
                )
            if not match[1]:
                failures.append(
                    f"MONAI Label without params differs from the bundle's unknown-subgroup inference "
                    f"(Dice {results[1]['dice']:.6f})"
                )
    except Exception as e:  # noqa: BLE001 - any error is a failure, reported below
        failures.append(f"{type(e).__name__}: {e}")
    finally:
        if server is not None and server.proc.poll() is None:
            server.stop()
        if args.work is None and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    log(f"total {time.time() - t_start:.1f} s")
    if failures:
        for f in failures:
            log(f"FAIL: {f}")
        return 1
    log("PASS")
    return 0


if __name__ == "__main__":
    sys.exit(main())
