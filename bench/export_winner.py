"""The model to deploy: the benchmark's winner retrained on the whole cross-validation pool, written as a bundle.

:func:`export` (``bench/benchmark_datalist.py --export DIR``):

1. **Retrain** the winning variant (best pooled worst-group Dice, ``bench/datalist_report.py``) once, seed 0, on the
   pool (the datalist's ``training`` and ``validation`` lists) with 10 % held out (stratified, patients together)
   for checkpoint selection (:func:`retrain`: training only, cached under its training key in
   ``OUT/export/<variant>_pool_s0/run.json``, weights in ``OUT/work/<variant>_pool_s0/models``). Its validation Dice on
   that 10 % is reported as a sanity check, not an estimate (it also chose the checkpoint): the cross-validation is
   the estimate.
2. **Write DIR** as a bundle, every config stack of the run merged into one file per role, so that the plain bundle
   commands use the user's settings:

   - ``configs/train.json``: ``train.json`` + the variant + the profile overlays + the run's overrides (its
     ``subgroup_key``, ``subgroups`` ...), merged by MONAI's ``ConfigParser``; ``configs/evaluate.json``:
     ``evaluate.json`` (+ ``profiles/2d_evaluate.json``) with the report's groupings; ``configs/inference.json``:
     ``inference.json`` (+ ``profiles/2d_inference.json`` + the data-set or GPU overlay) with the overrides and the
     variant's settings that inference reads (``use_dmoe``), so inference routes by the user's groups;
     ``inference_dicom.json`` (CT series, 3D only; kept in a 2D bundle because ``make verify`` checks that stack),
     the multi-GPU overlays and ``logging.conf`` as they are;
   - ``configs/metadata.json``: the bundle's (or the 2D one's) with the network's input and output shapes and
     channels, the class names, the data source and the cross-validated numbers of the winner;
   - ``models/model.pt`` (the retrained weights), ``models/model.ts`` (``monai.bundle ckpt_export``),
     ``large_files.yml`` (their sha256), ``scripts/`` and ``LICENSE`` copied from the bundle, ``docs/README.md``
     (a short model card) and ``docs/data_license.txt``.

   DIR must not exist or be empty (checked before any training); it passes ``make verify``
   (``tools/verify_bundle.py --bundle-dir DIR``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import runcache  # noqa: E402

sys.path.insert(0, str(runcache.REPO / "tools"))
from write_large_files import write_large_files  # noqa: E402

#: copied as they are: overlays on the merged configs (``inference_dicom.json`` reads CT series: 3D bundles only, kept
#: in a 2D one because ``make verify`` checks every standard stack)
COPIED_CONFIGS = ("logging.conf", "inference_dicom.json", "multi_gpu_train.json", "multi_gpu_evaluate.json")
#: keys of the variant overlays that only name the run's outputs
_RUN_PATH_KEYS = ("run_name", "ckpt_dir")


# ------------------------------------------------------------------------------------------------ configs


def merged_config(files: list[str], overrides: dict[str, Any]) -> dict[str, Any]:
    """``files`` stacked by MONAI's ``ConfigParser`` into one config, then each override whose key it has."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(files)
    for key, value in overrides.items():
        if key in parser:
            parser[key] = value
    return parser.get()


def merged_overlay(files: list[str], overrides: dict[str, Any]) -> dict[str, Any]:
    """Overlay files (keys such as ``validate#postprocessing``) merged into one, applied in the same order when
    stacked: a key set again moves to the end; then ``overrides``."""
    out: dict[str, Any] = {}
    for content in [*(json.loads(Path(f).read_text()) for f in files), overrides]:
        for key, value in content.items():
            out.pop(key, None)
            out[key] = value
    return out


def inference_files(spec: runcache.RunSpec) -> list[str]:
    files = ["inference.json"] + (["profiles/2d_inference.json"] if runcache.spatial_dims(spec.cohort) == 2 else [])
    return [str(runcache.CONFIGS / f) for f in [*files, *spec.cohort.get("profiles", ())]]


def variant_settings(spec: runcache.RunSpec) -> dict[str, Any]:
    """The variant overlay's keys besides its output paths (``use_dmoe``, ``dro#...``)."""
    content = json.loads((runcache.CONFIGS / "variants" / f"{spec.variant}.json").read_text())
    return {k: v for k, v in content.items() if k not in _RUN_PATH_KEYS}


def write_configs(spec: runcache.RunSpec, configs: Path) -> dict[str, Any]:
    """The exported configs (module notes); returns the merged inference config."""
    configs.mkdir(parents=True, exist_ok=True)
    train = merged_config(spec.config_files(False), spec.overrides)
    train["run_name"] = spec.variant
    eval_files = [str(runcache.CONFIGS / "evaluate.json")]
    if runcache.spatial_dims(spec.cohort) == 2:
        eval_files.append(str(runcache.CONFIGS / runcache.PROFILE_2D[1]))
    evaluate = merged_overlay(eval_files, {k: v for k, v in spec.overrides.items() if k not in train})
    inference = merged_config(inference_files(spec), {**variant_settings(spec), **spec.overrides})
    for name, content in (("train.json", train), ("evaluate.json", evaluate), ("inference.json", inference)):
        (configs / name).write_text(json.dumps(content, indent=4) + "\n")
    for name in COPIED_CONFIGS:
        shutil.copyfile(runcache.CONFIGS / name, configs / name)
    return inference


def network_values(configs: Path) -> dict[str, Any]:
    """Input channels, output channels, the input shape and the class names of the exported inference config."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(configs / "inference.json"))
    get = parser.get_parsed_content
    classes = get("class_names") if "class_names" in parser else ["background", "target"]
    return {"in": int(get("network_def#in_channels")), "out": int(get("network_def#out_channels")),
            "shape": list(get("patch_size")), "classes": list(classes)}  # fmt: skip


def write_metadata(spec: runcache.RunSpec, configs: Path, report: dict[str, Any]) -> None:
    """``configs/metadata.json``: the bundle's (3D) or 2D metadata with this network and these numbers."""
    dims = runcache.spatial_dims(spec.cohort)
    meta = json.loads((runcache.CONFIGS / ("metadata_2d.json" if dims == 2 else "metadata.json")).read_text())
    net = network_values(configs)
    fmt = meta["network_data_format"]
    fmt["inputs"]["image"].update(num_channels=net["in"], spatial_shape=net["shape"],
                                  channel_def={str(i): f"image channel {i}" for i in range(net["in"])})  # fmt: skip
    fmt["outputs"]["pred"].update(num_channels=net["out"], spatial_shape=net["shape"],
                                  channel_def={str(i): c for i, c in enumerate(net["classes"])})  # fmt: skip
    classes = ", ".join(f"{i} is {c}" for i, c in enumerate(net["classes"]))
    key = report["settings"]["subgroup_key"]
    summary = report["groupings"][key]["summary"][spec.variant]
    info = report["info"]
    meta.update(
        name=f"FairDRO benchmark winner ({spec.variant}) on {info['datalist_name']}",
        description=(f"The {spec.variant} variant of the FairDRO bundle, chosen by the fairness benchmark on "
                     f"{info['datalist']} (best pooled worst-group Dice over {key}) and retrained on the whole "
                     f"cross-validation pool; routed by {key} ({', '.join(spec.overrides['subgroups'])})."),
        data_source=f"the user's datalist {info['datalist']} (sha256 {info['datalist_sha256']})",
        label_classes=classes, pred_classes=classes,
        eval_metrics={"note": "mean_dice, worst_group_dice, es_dice: the benchmark's pooled cross-validated testing "
                      "cases (the variant, not these weights); held_out_dice: these weights on the pool's held-out "
                      "10 % (also their checkpoint selection: optimistic)",
                      "mean_dice": summary["dice_all"], "worst_group_dice": summary["worst_group_dice"],
                      "es_dice": summary["es_dice"], "held_out_dice": report.get("held_out_dice")},
    )  # fmt: skip
    (configs / "metadata.json").write_text(json.dumps(meta, indent=4) + "\n")


# ------------------------------------------------------------------------------------------------ bundle


def retrain(spec: runcache.RunSpec, out: Path, work: Path) -> tuple[dict[str, Any], bool]:
    """Train ``spec`` (its split written) into ``work/<name>`` unless ``out/export/<name>/run.json`` holds its
    training key and the weights are still there; returns (that record, whether it trained)."""
    record, folder = out / "export" / spec.name / "run.json", work / spec.name
    key = runcache.run_key(spec, evaluation=False)
    meta = json.loads(record.read_text()) if record.is_file() else {}
    if meta.get("train_key") == key and (folder / "models" / "model.pt").is_file():
        return meta, False
    data = runcache.ensure_cohort(spec.cohort, out)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    t0 = time.time()
    if spec.variant == runcache.JTT:  # its first stage: the identification model and its error set
        runcache.identify_error_set(spec, data, folder)
    runcache._bundle(runcache.bundle_command(spec, "training", data, folder), folder / "run.log")
    selection = json.loads((folder / "models" / "model_selection.json").read_text())
    meta = {"train_key": key, "variant": spec.variant, "seed": spec.seed, "cohort": spec.cohort,
            "overrides": spec.overrides, "train_s": round(time.time() - t0, 1), "commit": runcache.git_commit(),
            "weights": str(folder / "models" / "model.pt"), "selection": selection,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}  # fmt: skip
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(meta, indent=2) + "\n")
    shutil.rmtree(folder / "checkpoints", ignore_errors=True)
    return meta, True


def held_out_dice(meta: dict[str, Any]) -> float:
    """The retrained weights' validation mean Dice on the pool's held-out 10 % (at the selected epoch)."""
    selection = meta["selection"]
    epoch = selection["selected_epoch"]
    return float(next(h["val_mean_dice"] for h in selection["history"] if h["epoch"] == epoch))


def _monai(bundle: Path, *args: str) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(bundle), os.environ.get("PYTHONPATH")]))}
    res = subprocess.run([sys.executable, "-m", "monai.bundle", *args], cwd=bundle, env=env, capture_output=True,
                         text=True)  # fmt: skip
    if res.returncode != 0:
        tail = "\n".join((res.stdout + res.stderr).strip().splitlines()[-10:])
        raise RuntimeError(f"python -m monai.bundle {args[0]} failed ({res.returncode}):\n{tail}")


def model_card(spec: runcache.RunSpec, report: dict[str, Any]) -> str:
    info, key = report["info"], report["settings"]["subgroup_key"]
    s = report["groupings"][key]["summary"][spec.variant]
    dims = runcache.spatial_dims(spec.cohort)
    return "\n".join([
        f"# {spec.variant} on {info['datalist_name']} (exported by the FairDRO fairness benchmark)",
        "", "## Model overview", "",
        f"The `{spec.variant}` variant of the FairDRO bundle ({dims}D), routed by `{key}` "
        f"({', '.join(spec.overrides['subgroups'])}). It won the fairness benchmark on this cohort (best worst-group "
        "Dice pooled over the cross-validation folds) and was retrained once on the whole pool, 10 % held out for "
        "checkpoint selection.", "", "## Data", "",
        f"`{info['datalist']}` (sha256 `{info['datalist_sha256']}`), {info['n_cases']} cases.", "",
        "## Performance", "",
        f"Cross-validated (benchmark report, {info['folds'] or 'no'} folds, seed-averaged): mean Dice "
        f"{s['dice_all']:.3f}, worst-group Dice {s['worst_group_dice']:.3f} ({s['worst_group']}), ES-Dice "
        f"{s['es_dice']:.3f}. These weights on the pool's held-out 10 % (also their checkpoint selection, so "
        f"optimistic): mean Dice {report.get('held_out_dice', float('nan')):.3f}.", "",
        f"Verdict: {report['verdict']}", "", "## Bundle commands", "",
        "```bash", "cd <this folder>", "PYTHONPATH=. python -m monai.bundle run inference --config_file "
        "configs/inference.json --dataset_dir DIR --datalist DIR/datalist.json --output_dir OUT", "```", "",
        "## Intended use", "", "Research. Validate on local data under the institution's processes before any "
        "clinical use.", "", "## License", "", "Apache-2.0 (`LICENSE`) for the code; the data's licence is its "
        "owner's (`docs/data_license.txt`).", "",
    ])  # fmt: skip


def write_bundle(spec: runcache.RunSpec, weights: Path, report: dict[str, Any], folder: Path) -> None:
    """Write the bundle (module notes, step 2) into ``folder``."""
    shutil.copytree(runcache.BUNDLE / "scripts", folder / "scripts",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.so"))  # fmt: skip
    shutil.copyfile(runcache.BUNDLE / "LICENSE", folder / "LICENSE")
    write_configs(spec, folder / "configs")
    write_metadata(spec, folder / "configs", report)
    (folder / "models").mkdir()
    shutil.copyfile(weights, folder / "models" / "model.pt")
    _monai(folder, "ckpt_export", "network_def", "--filepath", "models/model.ts", "--ckpt_file", "models/model.pt",
           "--meta_file", "configs/metadata.json", "--config_file", "configs/inference.json")  # fmt: skip
    write_large_files(folder, url_base=(folder / "models").resolve().as_uri())
    (folder / "docs").mkdir()
    (folder / "docs" / "README.md").write_text(model_card(spec, report))
    (folder / "docs" / "data_license.txt").write_text(
        f"The weights were trained on {report['info']['datalist']}; the data's licence and terms of use are those "
        "of its owner.\n"
    )


def export(spec: runcache.RunSpec, report: dict[str, Any], out: Path, work: Path, folder: Path) -> int:
    """Retrain ``spec`` (the winner on the pool split, its datalist written) and write the bundle into ``folder``;
    returns the exit status."""
    meta, ran = retrain(spec, out, work)
    held_out = held_out_dice(meta)
    print(f"export: {spec.name} {'trained' if ran else 'cached'} ({meta['weights']}); validation mean Dice "
          f"{held_out:.3f} on its held-out 10 %", flush=True)  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    write_bundle(spec, work / spec.name / "models" / "model.pt", {**report, "held_out_dice": held_out}, folder)
    print(f"export: bundle written to {folder}; check it with python tools/verify_bundle.py --bundle-dir {folder}")
    return 0
