"""Run every official model-zoo check on a bundle folder and stop at the first failure.

Checks, in order (one ``PASS``/``FAIL`` line each; exit status 0 when all pass, 1 on the first failure, 2 for
usage errors):

1. ``files``: the required files (``LICENSE``, ``configs/metadata.json``, ``models/model.pt``) and the preferred
   ones (``configs/inference.json``, ``docs/README.md``, ``docs/data_license.txt``) exist.
2. ``verify_metadata``: ``python -m monai.bundle verify_metadata`` against ``--schema``, else the file named by
   ``$BUNDLE_META_SCHEMA``, else the schema shipped in ``tools/schemas/`` (``tools/bundle_schema.py``); nothing is
   downloaded, so ``make verify`` needs no network.
3. ``changelog``: the metadata ``version`` is a key of its ``changelog``.
4. ``hashes``: ``models/model.pt`` and ``models/model.ts`` (when present) have entries in ``large_files.yml``,
   and every entry's file exists with the recorded hash (the message names the file and both hashes).
5. ``verify_net_in_out``: ``python -m monai.bundle verify_net_in_out network_def`` with ``inference.json``.
6. ``ckpt_export``: ``python -m monai.bundle ckpt_export`` of ``models/model.pt`` into a temporary file,
   ``torch.jit.load`` of it, and the scripted network equal to the eager one (1e-4) on a random input, with and
   without a subgroup.
7. ``workflow <stack>``: every config stack through ``ConfigWorkflow`` on a tiny synthetic cohort
   (``initialize()`` and ``check_properties() == []``): train, train+evaluate, each variant, inference,
   inference+inference_dicom, each hardware profile on train and on inference, and the 2D stacks (train+2d,
   train+evaluate+2d+2d_evaluate, inference+2d_inference, each where its profile exists; a data-set overlay such as
   ``profiles/fairseg.json`` last on each of them); the multi-GPU stacks are parsed only (they need ``torchrun``),
   with their required property ids present.

Where the bundle ships the 2D configuration (``configs/profiles/2d_inference.json``), checks 2, 3, 5 and 6 run a
second time for it, after check 6, as ``verify_metadata 2d`` (``configs/metadata_2d.json``), ``changelog 2d`` (also:
the same version as ``metadata.json``), ``verify_net_in_out 2d`` (``inference.json`` + ``profiles/2d_inference.json``
with ``metadata_2d.json``) and ``ckpt_export 2d``: no 2D weights are shipped, so it exports the state dict of the 2D
network initialised after ``torch.manual_seed(0)`` (experts made non-zero, so the dMoE layers act), written to a
temporary file.

A repository tool (``make verify``), as model-zoo keeps its checks in ``ci/``; it imports the checked bundle's own
``scripts`` package from ``--bundle-dir``. Command line::

    python tools/verify_bundle.py --bundle-dir bundle [--schema PATH_TO/meta_schema.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

from bundle_schema import meta_schema_path

REPO = Path(__file__).resolve().parents[1]
REQUIRED_FILES = ("LICENSE", "configs/metadata.json", "models/model.pt")
PREFERRED_FILES = ("configs/inference.json", "docs/README.md", "docs/data_license.txt")
WEIGHT_FILES = ("models/model.pt", "models/model.ts")
#: the 2D configuration: its inference overlay (its presence turns the 2D checks on), metadata and config stack
PROFILE_2D_INFERENCE = "configs/profiles/2d_inference.json"
META_2D = "metadata_2d.json"
INFERENCE_2D = ["inference.json", "profiles/2d_inference.json"]
#: the 2D overlays, stacked only as the 2D stacks of check 7 (not as hardware profiles on both configs)
PROFILES_2D = ("2d.json", "2d_evaluate.json", "2d_inference.json")
#: settings that keep the workflow checks to seconds (the properties do not depend on them)
TINY_TRAIN = {"epochs": 1, "val_interval": 1, "cache_rate": 0.0, "num_workers": 0}


class CheckFailed(Exception):
    """A check found a problem; the message says what."""


def _monai_cmd(bundle_dir: Path, *args: str) -> str:
    """Run ``python -m monai.bundle ARGS`` with the bundle's ``scripts`` importable; raise on a non-zero exit."""
    env = dict(os.environ)
    # verify_net_in_out and ckpt_export do not put the bundle on sys.path (only `run` does)
    env["PYTHONPATH"] = str(bundle_dir) + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run(
        [sys.executable, "-m", "monai.bundle", *args], cwd=bundle_dir, env=env, capture_output=True, text=True
    )
    out = res.stdout + res.stderr
    if res.returncode != 0:
        tail = "\n".join(out.strip().splitlines()[-15:])
        raise CheckFailed(f"`python -m monai.bundle {args[0]}` exited with {res.returncode}:\n{tail}")
    return out


def check_files(bundle_dir: Path, **_) -> str:
    missing = [f for f in REQUIRED_FILES if not (bundle_dir / f).is_file()]
    missing_pref = [f for f in PREFERRED_FILES if not (bundle_dir / f).is_file()]
    if missing or missing_pref:
        raise CheckFailed(f"missing required files {missing} and preferred files {missing_pref} in {bundle_dir}")
    return f"{len(REQUIRED_FILES)} required and {len(PREFERRED_FILES)} preferred files present"


def _config_list(files: list[str]) -> str:
    """``--config_file`` of ``python -m monai.bundle`` for files under ``configs/``: a name or a list literal."""
    paths = [f"configs/{f}" for f in files]
    return paths[0] if len(paths) == 1 else "[" + ",".join(repr(f) for f in paths) + "]"


def check_metadata(bundle_dir: Path, schema: str | None = None, meta_name: str = "metadata.json", **_) -> str:
    """``verify_metadata`` against ``schema``, else ``meta_schema_path()``; an existing file, so MONAI never
    downloads one."""
    try:
        path = Path(schema) if schema else meta_schema_path()
    except (OSError, ValueError) as e:
        raise CheckFailed(str(e)) from e
    if not path.is_file():
        raise CheckFailed(f"the schema {path} does not exist (MONAI would try to download it there)")
    meta = str(bundle_dir / "configs" / meta_name)
    _monai_cmd(bundle_dir, "verify_metadata", "--meta_file", meta, "--filepath", str(path.resolve()))
    return f"valid against {path}"


def check_changelog(bundle_dir: Path, meta_name: str = "metadata.json", **_) -> str:
    path = bundle_dir / "configs" / meta_name
    meta = json.loads(path.read_text(encoding="utf-8"))
    version, changelog = meta.get("version"), meta.get("changelog") or {}
    if version not in changelog:
        raise CheckFailed(f"{path}: version {version!r} is not a key of its changelog {sorted(changelog)}")
    if meta_name != "metadata.json":
        main = json.loads((bundle_dir / "configs" / "metadata.json").read_text(encoding="utf-8")).get("version")
        if version != main:
            raise CheckFailed(f"{path}: version {version!r} differs from metadata.json's {main!r}")
    return f"version {version} is in the changelog"


def check_hashes(bundle_dir: Path, **_) -> str:
    from scripts.safe_io import file_hash, read_large_files

    yml = bundle_dir / "large_files.yml"
    if not yml.is_file():
        raise CheckFailed(f"{yml} does not exist (write it with `make demo-weights`)")
    entries = read_large_files(yml)
    listed = {os.path.normpath(e["path"]) for e in entries}
    unlisted = [f for f in WEIGHT_FILES if (bundle_dir / f).is_file() and os.path.normpath(f) not in listed]
    if unlisted:
        raise CheckFailed(f"{yml} has no entry for {unlisted}")
    for entry in entries:
        path = bundle_dir / entry["path"]
        hash_type = str(entry.get("hash_type") or "md5")  # MONAI's download_url default
        expected = str(entry.get("hash_val") or "").lower()
        if not expected:
            raise CheckFailed(f"{yml}: the entry for {entry['path']} has no hash_val")
        if not path.is_file():
            raise CheckFailed(f"{path} is listed in {yml} but does not exist")
        actual = file_hash(path, hash_type)
        if actual != expected:
            raise CheckFailed(
                f"{path}: {hash_type} is {actual} but {yml} records {expected} "
                "(the file was modified or the yml is stale; rerun `make demo-weights` if the weights are new)"
            )
    return f"{len(entries)} file(s) match {yml.name}: " + ", ".join(e["path"] for e in entries)


def check_net_in_out(bundle_dir: Path, meta_name: str = "metadata.json", configs: list[str] | None = None, **_) -> str:
    out = _monai_cmd(bundle_dir, "verify_net_in_out", "network_def", "--meta_file", f"configs/{meta_name}",
                     "--config_file", _config_list(configs or ["inference.json"]))  # fmt: skip
    if "verified with no error" not in out:
        raise CheckFailed("verify_net_in_out did not report 'verified with no error'")
    return "network_def input/output match network_data_format"


def check_metadata_2d(bundle_dir: Path, schema: str | None = None, **_) -> str:
    return check_metadata(bundle_dir, schema, meta_name=META_2D)


def check_changelog_2d(bundle_dir: Path, **_) -> str:
    return check_changelog(bundle_dir, meta_name=META_2D)


def check_net_in_out_2d(bundle_dir: Path, **_) -> str:
    return check_net_in_out(bundle_dir, meta_name=META_2D, configs=INFERENCE_2D)


def _parser(bundle_dir: Path, configs: list[str], meta_name: str):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(bundle_dir / "configs" / f) for f in configs])
    parser.read_meta(str(bundle_dir / "configs" / meta_name))
    return parser


def write_2d_checkpoint(bundle_dir: Path, path: Path) -> Path:
    """Write the state dict of the 2D inference network (``INFERENCE_2D``) built after ``torch.manual_seed(0)``,
    with non-zero experts (as after training, so that the dMoE layers act), to ``path``; return ``path``."""
    import torch

    torch.manual_seed(0)
    net = _parser(bundle_dir, INFERENCE_2D, META_2D).get_parsed_content("network_def")
    for layer in net.moe_layers().values():
        layer.experts.reset_parameters(zero_output=False)
    torch.save(net.state_dict(), path)
    return path


def check_export(bundle_dir: Path, **_) -> str:
    return _export_equal(bundle_dir, bundle_dir / "models" / "model.pt", ["inference.json"], "metadata.json")


def check_export_2d(bundle_dir: Path, **_) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = write_2d_checkpoint(bundle_dir, Path(tmp) / "model_2d.pt")
        return "seed-0 2D network " + _export_equal(bundle_dir, ckpt, INFERENCE_2D, META_2D)


def _export_equal(bundle_dir: Path, ckpt: Path, configs: list[str], meta_name: str) -> str:
    """``ckpt_export`` of ``ckpt`` with ``configs``, ``torch.jit.load``, and scripted equal to eager (1e-4)."""
    import torch
    from scripts.safe_io import load_weights

    with tempfile.TemporaryDirectory() as tmp:
        ts = Path(tmp) / "model.ts"
        _monai_cmd(bundle_dir, "ckpt_export", "network_def", "--filepath", str(ts), "--ckpt_file", str(ckpt),
                   "--meta_file", f"configs/{meta_name}", "--config_file", _config_list(configs))  # fmt: skip
        extra = {"metadata.json": "", "inference.json": ""}
        try:
            scripted = torch.jit.load(str(ts), map_location="cpu", _extra_files=extra)
        except Exception as e:
            raise CheckFailed(f"torch.jit.load of the exported {ts.name} failed: {e}") from e
    if not extra["metadata.json"] or not extra["inference.json"]:
        raise CheckFailed("the exported TorchScript lacks extra/metadata.json or extra/inference.json")
    parser = _parser(bundle_dir, configs, meta_name)
    net = load_weights(ckpt, parser.get_parsed_content("network_def")).eval()
    image = parser.get("_meta_#network_data_format#inputs#image")
    n_sub = len(parser.get_parsed_content("subgroups"))
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(1, image["num_channels"], *image["spatial_shape"], generator=gen)
    worst = 0.0
    with torch.no_grad():
        for subgroup in (None, *(torch.tensor([i]) for i in range(n_sub))):
            diff = (scripted(x, subgroup) - net(x, subgroup)).abs().max().item()
            worst = max(worst, diff)
            if not diff <= 1e-4:
                where = "without a subgroup" if subgroup is None else f"with subgroup {int(subgroup)}"
                raise CheckFailed(f"TorchScript differs from the eager network {where}: max |diff| {diff:.3g} > 1e-4")
    return f"exported, torch.jit.load-ed, equal to eager (max |diff| {worst:.1e}) with and without a subgroup"


def _stacks(bundle_dir: Path) -> list[tuple[str, list[str], str | None, dict]]:
    """(name, config files, workflow type or None for parse-only, overrides) of every config stack."""
    cfg = bundle_dir / "configs"
    stacks = [
        ("train", ["train.json"], "train", {}),
        ("train+evaluate", ["train.json", "evaluate.json"], "train", {}),
    ]
    for variant in sorted((cfg / "variants").glob("*.json")):
        stacks.append((f"train+variants/{variant.name}", ["train.json", f"variants/{variant.name}"], "train", {}))
    stacks += [
        ("inference", ["inference.json"], "infer", {}),
        ("inference+inference_dicom", ["inference.json", "inference_dicom.json"], "infer", {"dicom": True}),
    ]
    for profile in _hardware_profiles(cfg):  # overlays for other hardware, on both configs
        stacks.append((f"train+profiles/{profile.name}", ["train.json", f"profiles/{profile.name}"], "train", {}))
        stacks.append(
            (f"inference+profiles/{profile.name}", ["inference.json", f"profiles/{profile.name}"], "infer", {})
        )
    stacks += _stacks_2d(cfg)
    if (cfg / "multi_gpu_train.json").is_file():
        stacks.append(("train+multi_gpu_train (parse only)", ["train.json", "multi_gpu_train.json"], None, {}))
    if (cfg / "multi_gpu_evaluate.json").is_file():
        files = ["train.json", "evaluate.json", "multi_gpu_evaluate.json"]
        stacks.append(("train+evaluate+multi_gpu_evaluate (parse only)", files, None, {}))
    return stacks


def _is_dataset_overlay(profile: Path) -> bool:
    """A data-set overlay (``settings_help#dataset_*`` key, e.g. profiles/fairseg.json) goes last on a 2D stack."""
    content = json.loads(profile.read_text(encoding="utf-8"))
    return any(str(k).startswith("settings_help#dataset_") for k in content)


def _hardware_profiles(cfg: Path) -> list[Path]:
    """The profiles stacked on train.json and on inference.json alone (e.g. gpu.json): not 2D, not a data set."""
    profiles = sorted((cfg / "profiles").glob("*.json"))
    return [p for p in profiles if p.name not in PROFILES_2D and not _is_dataset_overlay(p)]


def _stacks_2d(cfg: Path) -> list[tuple[str, list[str], str | None, dict]]:
    """The 2D stacks whose profiles exist, then each of them with each data-set overlay last."""
    prof = cfg / "profiles"
    candidates = [
        ("train+2d", ["train.json", "profiles/2d.json"], "train"),
        ("train+evaluate+2d+2d_evaluate",
         ["train.json", "evaluate.json", "profiles/2d.json", "profiles/2d_evaluate.json"], "train"),
        ("inference+2d_inference", ["inference.json", "profiles/2d_inference.json"], "infer"),
    ]  # fmt: skip
    base = [(n, files, t) for n, files, t in candidates if all((cfg / f).is_file() for f in files)]
    stacks = [(n, files, t, {"dims": 2}) for n, files, t in base]
    for overlay in sorted(p for p in prof.glob("*.json") if p.name not in PROFILES_2D and _is_dataset_overlay(p)):
        for n, files, t in base:
            stacks.append((f"{n}+profiles/{overlay.name}", [*files, f"profiles/{overlay.name}"], t, {"dims": 2}))
    return stacks


def check_workflows(bundle_dir: Path, report, **_) -> None:
    from monai.bundle import ConfigWorkflow
    from monai.bundle.properties import TrainProperties
    from monai.utils import BundleProperty, BundlePropertyConfig
    from scripts.synthetic import generate_cohort

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cohort = tmp / "cohort"
        generate_cohort(cohort, n_cases=10, seed=7, shape=(48, 48, 24))
        dicom_dir = tmp / "dicom_case"  # only named: initialize does not read it
        ckpt_2d = tmp / "model_2d.pt"
        for name, files, wf_type, extra in _stacks(bundle_dir):
            label = f"workflow {name}"
            out = tmp / "out" / name.replace("/", "_").replace(" ", "_")
            paths = [str(bundle_dir / "configs" / f) for f in files]
            try:
                if wf_type is None:
                    wf = ConfigWorkflow(config_file=paths, workflow_type="train", meta_file=None)
                    wf.parser.parse(reset=True)
                    props = {**TrainProperties}
                    missing = [
                        n for n, p in props.items()
                        if p.get(BundleProperty.REQUIRED) and p[BundlePropertyConfig.ID] not in wf.parser
                    ]  # fmt: skip
                else:
                    overrides = {"dataset_dir": str(cohort), "output_dir": str(out)}
                    if wf_type == "train":
                        overrides.update(ckpt_dir=str(out / "models"), **TINY_TRAIN)
                    elif extra.get("dims") == 2:  # no 2D weights are shipped: a seed-0 2D checkpoint
                        if not ckpt_2d.is_file():
                            write_2d_checkpoint(bundle_dir, ckpt_2d)
                        overrides["ckpt_path"] = str(ckpt_2d)
                    else:
                        overrides["ckpt_path"] = str(bundle_dir / "models" / "model.pt")
                    if extra.get("dicom"):
                        overrides["input_dir"] = str(dicom_dir)
                    wf = ConfigWorkflow(config_file=paths, workflow_type=wf_type, meta_file=None, **overrides)
                    wf.initialize()
                    missing = wf.check_properties()
                    wf.finalize()
            except Exception as e:
                detail = "".join(traceback.format_exception_only(type(e), e)).strip()
                raise CheckFailed(f"{label}: {detail}") from e
            if missing:
                raise CheckFailed(f"{label}: check_properties() reports missing or misnamed properties {missing}")
            report(label, "PASS", "parsed, required ids present" if wf_type is None else "check_properties() == []")


CHECKS = [
    ("files", check_files),
    ("verify_metadata", check_metadata),
    ("changelog", check_changelog),
    ("hashes", check_hashes),
    ("verify_net_in_out", check_net_in_out),
    ("ckpt_export", check_export),
]
#: the 2D configuration's checks, run after CHECKS where the bundle has PROFILE_2D_INFERENCE
CHECKS_2D = [
    ("verify_metadata 2d", check_metadata_2d),
    ("changelog 2d", check_changelog_2d),
    ("verify_net_in_out 2d", check_net_in_out_2d),
    ("ckpt_export 2d", check_export_2d),
]


def _checks(bundle_dir: Path) -> list:
    """CHECKS, then CHECKS_2D where the bundle ships the 2D configuration."""
    return CHECKS + (CHECKS_2D if (bundle_dir / PROFILE_2D_INFERENCE).is_file() else [])


def verify_bundle(bundle_dir: str | Path, schema: str | None = None, out=None) -> bool:
    """Run the checks in order, printing a ``PASS``/``FAIL`` line each; ``False`` at the first failure."""
    out = out or sys.stdout
    bundle_dir = Path(bundle_dir).resolve()
    if str(bundle_dir) not in sys.path:
        sys.path.insert(0, str(bundle_dir))

    def report(name: str, status: str, detail: str) -> None:
        print(f"{status} {name}: {detail}", file=out, flush=True)

    current = "setup"
    try:
        for current, check in _checks(bundle_dir):
            report(current, "PASS", check(bundle_dir, schema=schema))
        current = "workflow"
        check_workflows(bundle_dir, report)
    except CheckFailed as e:
        report(current, "FAIL", str(e))
        return False
    print(f"ALL CHECKS PASSED for {bundle_dir}", file=out, flush=True)
    return True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle-dir", default=str(REPO / "bundle"), help="the bundle folder")
    parser.add_argument(
        "--schema", default=None, help="a meta_schema_*.json (default: $BUNDLE_META_SCHEMA, else tools/schemas/)"
    )
    args = parser.parse_args(argv)
    if not Path(args.bundle_dir).is_dir():
        parser.error(f"--bundle-dir {args.bundle_dir} is not a folder")
    if args.schema and not Path(args.schema).is_file():
        parser.error(f"--schema {args.schema} does not exist")
    logging.basicConfig(level=logging.WARNING)
    return 0 if verify_bundle(args.bundle_dir, args.schema) else 1


if __name__ == "__main__":
    sys.exit(main())
