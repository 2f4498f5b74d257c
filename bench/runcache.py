"""Run cache of the fairness benchmarks: one folder per run, rerun only when its configuration changes.

A run is (variant, seed, cohort, config overrides). Its **key** is a hash of

- ``BENCH_VERSION`` (bump it when a code change alters results: a new loss, another network);
- the run's resolved configuration: ``train.json`` + the variant overlay + ``evaluate.json`` merged by MONAI's
  ``ConfigParser``, with the overrides applied and the run-local paths and help texts left out;
- the cohort's arguments (``synthetic.generate_cohort``) and the seed.

A cohort with ``"spatial_dims": 2`` is the 2D cohort (``synthetic_2d.generate_cohort``, with the other arguments):
its runs stack ``profiles/2d.json`` after the variant (and ``profiles/2d_evaluate.json`` after ``evaluate.json``
when evaluating). A cohort without that key is the 3D cohort, and its runs' files and keys are those of before the
2D path. Overrides may name nested keys (``optimizer#weight_decay``); an override of a key that training lacks is
applied to the evaluation only.

A cohort with a ``"datalist"`` key is a user's cohort (``bench/benchmark_datalist.py``): ``datalist`` names the user's
datalist file and ``data_dir`` the folder holding the ``datalist.json`` the run trains and is evaluated on (one fold of
a cross-validation, written there before the run). Its key leaves those two paths out and holds instead
:func:`datalist_fingerprint`: the sha256 of the user's datalist and the size and modification time of every file it
lists, so a changed cohort reruns and an unchanged one does not. Its runs are named ``<variant>_<fold>_s<seed>`` and
stack the cohort's ``profiles`` (e.g. ``profiles/fairseg.json``, ``profiles/gpu.json``) last. A cohort without
``"datalist"`` is keyed as before.

So a change that leaves results equal (a faster kernel, a moved file, a reworded help text) keeps every finished
run, and a change to one variant's overlay reruns only that variant's runs. A run also records the key of its
training alone (train + variant + the overrides of training keys): when only the evaluation changed (``evaluate.json``)
and the run's weights are still in the scratch folder, the run is evaluated again without training (``run.json``
then keeps ``train_commit``, the commit it was trained on). DRO settings that a run without DRO
weights never reads (ERM, the oracle: the ESS floor, the refresh, the warm-up) are left out of its key.

Each run folder holds only small files, all committed: ``run.json`` (key, spec, git commit, times, and the
``OMP_NUM_THREADS`` of the invocation that wrote it: the thread count changes the summation order, so a retrain with
another count is not bit-identical),
``per_case.csv`` and ``metrics.json`` (the evaluation on the testing split) and ``train_log.json`` (the
validation curve and the DRO summary of the last epoch, parsed from the training log). Weights, checkpoints and
logs stay in a scratch folder (``--work``), never in the repository.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundle"
CONFIGS = BUNDLE / "configs"

#: bump when a code change alters the results of finished runs (their keys change, so they rerun)
BENCH_VERSION = 3
#: configuration keys that never change a result (paths of this run, documentation)
_NEUTRAL_KEYS = ("settings_help", "dataset_dir", "datalist", "output_dir", "ckpt_dir", "bundle_root", "run_name")
_SMALL_FILES = ("per_case.csv", "metrics.json")
#: the spatial dimensions a cohort may name (``cohort["spatial_dims"]``; 3 when it names none)
SPATIAL_DIMS = (2, 3)
PROFILE_2D = ("profiles/2d.json", "profiles/2d_evaluate.json")
#: the cohort key naming a user's datalist (a cohort without it is a synthetic one)
DATALIST_KEY = "datalist"
#: the cohort keys of a user's cohort that are paths on this machine, left out of its key
_DATALIST_PATH_KEYS = (DATALIST_KEY, "dataset_dir", "data_dir")


def spatial_dims(cohort: dict[str, Any]) -> int:
    """The cohort's spatial dimensions: ``cohort["spatial_dims"]`` (2 or 3), 3 when absent."""
    dims = cohort.get("spatial_dims", 3)
    if isinstance(dims, bool) or dims not in SPATIAL_DIMS:
        raise ValueError(f"cohort spatial_dims must be one of {list(SPATIAL_DIMS)}, got {dims!r}.")
    return int(dims)


@dataclass(frozen=True)
class RunSpec:
    """One benchmark run: a variant with a seed on a synthetic cohort, with config overrides."""

    variant: str
    seed: int
    cohort: dict[str, Any]
    overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        c = self.cohort
        if DATALIST_KEY in c:
            return f"{self.variant}_{c['fold']}_s{self.seed}"
        return f"{self.variant}_{c.get('minority', 'none')}_l{c.get('difficulty', 'd')}_s{self.seed}"

    def config_files(self, evaluation: bool = False) -> list[str]:
        """The config files of the run's training (``evaluation``: of its evaluation), in stacking order."""
        files = ["train.json", f"variants/{self.variant}.json"] + (["evaluate.json"] if evaluation else [])
        if spatial_dims(self.cohort) == 2:
            files += PROFILE_2D[: 2 if evaluation else 1]
        files += list(self.cohort.get("profiles", ()))
        return [str(CONFIGS / f) for f in files]


def cohort_name(cohort: dict[str, Any]) -> str:
    """Folder name of a cohort: readable, plus a short hash of all its arguments."""
    digest = hashlib.sha256(json.dumps(cohort, sort_keys=True).encode()).hexdigest()[:8]
    return f"{cohort.get('minority', 'none')}_l{cohort.get('difficulty', 'd')}_{digest}"


def resolved_config(spec: RunSpec, evaluation: bool = True) -> dict[str, Any]:
    """The merged configuration of a run (train + variant + evaluate + overrides), without neutral keys.

    ``evaluation=False``: the training's configuration only (train + variant, and the overrides that name one of
    its keys or a new key of one of its sections, such as ``dro#diagnose``)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(spec.config_files(evaluation))
    for key, value in spec.overrides.items():
        if evaluation or key in parser or _new_key_of_a_section(parser, key):
            parser[key] = value
    config = parser.get()
    return {k: v for k, v in config.items() if k not in _NEUTRAL_KEYS}


def _new_key_of_a_section(parser, key: str) -> bool:
    """Whether ``key`` (``a#b``) adds a key to a section (a dict) that the configuration has."""
    parent = key.rpartition("#")[0]
    return bool(parent) and parent in parser and isinstance(parser[parent], dict)


#: the FairDRO settings that a run with plain weights (intra none or oracle, inter not groupdro) still reads
_PLAIN_DRO_KEYS = ("_target_", "intra", "inter", "apply", "unknown", "subtype_key", "cohort", "group_key",
                   "group_names", "num_groups", "diagnose")  # fmt: skip


def _drop_unread_dro_settings(config: dict[str, Any]) -> dict[str, Any]:
    """Without DRO weights (ERM, the oracle) the bank, the ESS floor, the warm-up and the refresh never change a
    weight, a draw or an update (the refresh pass is eval-mode, without augmentation, and draws no random number), so
    a change to those settings keeps such runs."""
    dro = config.get("dro")
    if not isinstance(dro, dict) or dro.get("intra") not in ("none", "oracle") or dro.get("inter") == "groupdro":
        return config
    return {**config, "dro": {k: v for k, v in dro.items() if k in _PLAIN_DRO_KEYS}}


def _listed_files(item: Any) -> list[str]:
    """The file paths of a datalist item (``image`` and ``label``, each a path or a list of paths)."""
    if not isinstance(item, dict):
        return []
    values = [item.get("image"), item.get("label")]
    flat = [v for value in values for v in (value if isinstance(value, list) else [value])]
    return [v for v in flat if isinstance(v, str)]


def datalist_fingerprint(datalist: str | Path, dataset_dir: str | Path | None = None) -> dict[str, Any]:
    """The sha256 of a datalist file and a sha256 over the path, size and modification time (ns) of every file it
    lists (relative paths resolve against ``dataset_dir``, default the datalist's folder; a missing file counts as
    size -1). Any changed byte of the datalist, or any rewritten image or label, changes it."""
    path = Path(datalist)
    raw = path.read_bytes()
    base = Path(dataset_dir) if dataset_dir is not None else path.parent
    data = json.loads(raw)
    lines = set()
    for items in (v for v in (data.values() if isinstance(data, dict) else []) if isinstance(v, list)):
        for file in (f for item in items for f in _listed_files(item)):
            resolved = Path(file) if os.path.isabs(file) else base / file
            try:
                st = resolved.stat()
                lines.add(f"{resolved}\t{st.st_size}\t{st.st_mtime_ns}")
            except OSError:
                lines.add(f"{resolved}\t-1\t-1")
    files = hashlib.sha256("\n".join(sorted(lines)).encode()).hexdigest()
    return {"sha256": hashlib.sha256(raw).hexdigest(), "files": files, "n_files": len(lines)}


def _key_cohort(cohort: dict[str, Any]) -> dict[str, Any]:
    """The cohort as its runs' keys hold it: a user's cohort without its paths, with its datalist's fingerprint."""
    if DATALIST_KEY not in cohort:
        return cohort
    kept = {k: v for k, v in cohort.items() if k not in _DATALIST_PATH_KEYS}
    return {**kept, "data": datalist_fingerprint(cohort[DATALIST_KEY], cohort.get("dataset_dir"))}


def run_key(spec: RunSpec, evaluation: bool = True) -> str:
    """Cache key of a run (see the module notes); ``evaluation=False``: the key of its training alone (the weights
    stay valid while it holds, so a change to the evaluation only re-evaluates)."""
    config = _drop_unread_dro_settings(resolved_config(spec, evaluation))
    blob = {"bench_version": BENCH_VERSION, "config": config, "cohort": _key_cohort(spec.cohort), "seed": spec.seed}
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:16]


def read_meta(run_dir: Path) -> dict[str, Any]:
    """A finished run's ``run.json`` (``{}`` when the run is not finished or the file is unreadable)."""
    meta = run_dir / "run.json"
    if not meta.is_file() or not all((run_dir / f).is_file() for f in _SMALL_FILES):
        return {}
    try:
        return json.loads(meta.read_text())
    except json.JSONDecodeError:
        return {}


def is_done(run_dir: Path, key: str) -> bool:
    """Whether ``run_dir`` holds a finished run with this key."""
    return read_meta(run_dir).get("key") == key


def record_train_key(run_dir: Path, spec: RunSpec) -> None:
    """Add the training key to a finished run that predates it (its full key holds, so its training's does)."""
    meta = read_meta(run_dir)
    if meta and "train_key" not in meta:
        meta["train_key"] = run_key(spec, evaluation=False)
        (run_dir / "run.json").write_text(json.dumps(meta, indent=2) + "\n")


def git_commit() -> str:
    """Commit of the working tree (``+dirty`` when it has uncommitted changes to tracked files)."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, check=True)  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def ensure_cohort(cohort: dict[str, Any], data_root: Path) -> Path:
    """Generate the cohort once (deterministic by its arguments) under ``data_root``; returns its folder.

    ``spatial_dims`` 2: ``synthetic_2d.generate_cohort`` with the other arguments; else ``synthetic``'s. A user's
    cohort (``"datalist"``) is not generated: its folder is ``cohort["data_dir"]``, where its caller wrote the run's
    ``datalist.json``."""
    if DATALIST_KEY in cohort:
        folder = Path(cohort["data_dir"])
        if not (folder / "datalist.json").is_file():
            raise FileNotFoundError(f"{folder / 'datalist.json'} does not exist: write the run's datalist first.")
        return folder
    sys.path.insert(0, str(BUNDLE))
    from scripts import synthetic, synthetic_2d

    generator = synthetic_2d if spatial_dims(cohort) == 2 else synthetic
    folder = data_root / cohort_name(cohort)
    if not (folder / "datalist.json").is_file():
        tmp = folder.with_name(folder.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        generator.generate_cohort(tmp, **{k: v for k, v in cohort.items() if k != "spatial_dims"})
        tmp.replace(folder)
    return folder


_EPOCH_METRIC = re.compile(r"Epoch\[(\d+)\] Metrics -- (.*)$")
_PAIR = re.compile(r"(\w+): ([-+0-9.eE]+|nan)")


#: per-epoch curves kept in ``train_log.json`` besides ``val_mean_dice`` (the ESS log of the recipe)
_CURVES = ("val_worst_group_dice", "val_worst_group_cvar", "dro_ess_frac", "dro_lam")
#: ... and every curve of the intra-group CVaR diagnostic (``dro#diagnose``: cvar_precision_<g>, cvar_recall_<g>, ...)
_DIAGNOSTIC_PREFIX = "cvar_"


def parse_train_log(text: str) -> dict[str, Any]:
    """The validation curves, the ESS per epoch and the last DRO summary from a training log (MONAI StatsHandler
    lines)."""
    curve: dict[int, dict[str, float]] = {}
    for line in text.splitlines():
        m = _EPOCH_METRIC.search(line)
        if m:
            values = {k: float(v) for k, v in _PAIR.findall(m.group(2))}
            curve.setdefault(int(m.group(1)), {}).update(values)
    val = {e: v["val_mean_dice"] for e, v in sorted(curve.items()) if "val_mean_dice" in v}
    dro = {}
    for e in sorted(curve, reverse=True):
        dro = {k: v for k, v in curve[e].items() if k.startswith("dro_")}
        if dro:
            break
    names = [*_CURVES, *sorted({k for v in curve.values() for k in v if k.startswith(_DIAGNOSTIC_PREFIX)})]
    curves = {name: {e: v[name] for e, v in sorted(curve.items()) if name in v} for name in names}
    return {"val_mean_dice": val, "last_dro": dro, "curves": {k: c for k, c in curves.items() if c}}


def _bundle(cmd: list[str], log: Path) -> None:
    # this checkout's bundle first on the path (before a bundle registered in the venv by `make setup`)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(BUNDLE), os.environ.get("PYTHONPATH")]))}
    with log.open("a") as fh:
        fh.write("$ " + " ".join(cmd) + "\n")
        fh.flush()
        res = subprocess.run(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"command failed ({res.returncode}), see {log}: {' '.join(cmd)}")


def bundle_command(
    spec: RunSpec, workflow: str, data: Path, work: Path, output_dir: Path | None = None, extra: tuple[str, ...] = ()
) -> list[str]:
    """The ``monai.bundle run`` command line of a run's ``training`` or ``evaluating`` (weights in
    ``work/models``; output in ``output_dir``, default ``work``), with the run's overrides and ``extra`` arguments."""
    files = spec.config_files(workflow == "evaluating")
    cmd = [sys.executable, "-m", "monai.bundle", "run", workflow, "--config_file", json.dumps(files),
           "--dataset_dir", str(data), "--output_dir", str(output_dir or work), "--ckpt_dir", str(work / "models"),
           "--seed", str(spec.seed), *extra]  # fmt: skip
    for key, value in spec.overrides.items():
        cmd += [f"--{key}", _cli_value(value)]
    return cmd


def _cli_value(value: Any) -> str:
    """An override as ``monai.bundle run`` reads it back (Python literals: ``True``, not JSON's ``true``)."""
    if isinstance(value, str):
        return value
    return repr(value) if isinstance(value, bool) else json.dumps(value)


def execute(spec: RunSpec, data: Path, work: Path) -> dict[str, float]:
    """Train and evaluate one run in ``work``; returns the wall time of each phase (s)."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    t0 = time.time()
    if spec.variant == JTT:
        identify_error_set(spec, data, work)
    _bundle(bundle_command(spec, "training", data, work), work / "run.log")
    return {"train_s": round(time.time() - t0, 1), "evaluate_s": reevaluate(spec, data, work)}


#: the variant whose training needs a first stage: an identification model and its error set (``variants/jtt.json``)
JTT = "jtt"
#: what ``variants/jtt.json`` trains the identification model for when the run does not set ``jtt#epochs``
JTT_DEFAULT_EPOCHS = 10


def identification_spec(spec: RunSpec) -> RunSpec:
    """JTT's first stage as a run of its own: the ``dmoe`` variant (ERM on the same network) with the same seed,
    cohort and recipe, trained for ``jtt#epochs`` epochs (the ``jtt#`` settings themselves left out)."""
    overrides = {k: v for k, v in spec.overrides.items() if not k.startswith("jtt#")}
    overrides["epochs"] = spec.overrides.get("jtt#epochs", JTT_DEFAULT_EPOCHS)
    return RunSpec("dmoe", spec.seed, spec.cohort, overrides)


def identify_error_set(spec: RunSpec, data: Path, work: Path) -> Path:
    """Train JTT's identification model into ``work/identify`` and write its error set there (``jtt_identify``);
    the run's training then reads it (``jtt#identify_dir`` defaults to ``<output_dir>/identify``)."""
    ident = work / "identify"
    _bundle(bundle_command(identification_spec(spec), "training", data, ident), work / "run.log")
    _bundle(bundle_command(spec, "jtt_identify", data, work), work / "run.log")
    return ident / "error_set.json"


def reevaluate(spec: RunSpec, data: Path, work: Path) -> float:
    """Evaluate the weights in ``work/models`` on the testing split again; returns the wall time (s)."""
    shutil.rmtree(work / "fairness", ignore_errors=True)
    t0 = time.time()
    _bundle(bundle_command(spec, "evaluating", data, work), work / "run.log")
    return round(time.time() - t0, 1)


def copy_run(src: Path, dst: Path) -> None:
    """Copy a finished run's small files (another benchmark's identical run is thus never trained twice)."""
    dst.mkdir(parents=True, exist_ok=True)
    names = (*_SMALL_FILES, "train_log.json", "jtt_error_set.json", "run.json")  # run.json last: marks it finished
    for name in names:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)


def prior_training(spec: RunSpec, train_key: str, folders: list[Path], work: Path) -> tuple[Path, Path] | None:
    """A finished run of ``spec`` with the same training (in ``folders``, in order) whose weights are still on
    disk: (its folder, its weights folder), or ``None``. The weights are where its ``run.json`` says, else in
    ``work/models``."""
    for folder in folders:
        meta = read_meta(folder)
        if meta.get("train_key") != train_key:
            continue
        for weights in ([Path(meta["weights"])] if meta.get("weights") else []) + [work / "models"]:
            if (weights / "model.pt").is_file():
                return folder, weights
    return None


def _reuse_training(spec: RunSpec, prior: tuple[Path, Path], run_dir: Path, data: Path, work: Path) -> dict:
    """Evaluate a prior training's weights again into ``run_dir``; returns the times for ``run.json``."""
    folder, weights = prior
    if weights.resolve() != (work / "models").resolve():
        shutil.copytree(weights, work / "models", dirs_exist_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    if folder.resolve() != run_dir.resolve():
        shutil.copyfile(folder / "train_log.json", run_dir / "train_log.json")
    meta = read_meta(folder)
    evaluate_s = reevaluate(spec, data, work)
    return {"train_s": meta.get("train_s"), "evaluate_s": evaluate_s,
            "train_commit": meta.get("train_commit", meta.get("commit"))}  # fmt: skip


def decide(spec: RunSpec, out_root: Path, work_root: Path, sources: list[Path] = ()) -> tuple[str, Any]:
    """What :func:`run` would do, without doing it: ``("cached", None)``, ``("copy", source)`` (an identical run in a
    source, :func:`copy_run`), ``("re-evaluate", prior)`` (same training, weights on disk: :func:`prior_training`),
    ``("rerun", None)`` (finished with another configuration) or ``("run", None)``."""
    key = run_key(spec)
    run_dir = out_root / spec.name
    if is_done(run_dir, key):
        return "cached", None
    for source in sources:
        if source.resolve() != out_root.resolve() and is_done(source / spec.name, key):
            return "copy", source
    folders = [run_dir, *(s / spec.name for s in sources)]
    prior = prior_training(spec, run_key(spec, evaluation=False), folders, work_root / spec.name)
    if prior:
        return "re-evaluate", prior
    return ("rerun" if read_meta(run_dir) else "run"), None


def copy_per_case(src: Path, dst: Path, columns: tuple[str, ...] | None = None) -> None:
    """Copy ``per_case.csv``, keeping only ``columns`` (in their order) when given; every one must be in ``src``."""
    if columns is None:
        shutil.copyfile(src, dst)
        return
    with src.open(newline="") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in columns if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{src} lacks the column(s) {missing}; it has {reader.fieldnames}.")
        rows = [{c: row[c] for c in columns} for row in reader]
    with dst.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(columns))
        writer.writeheader()
        writer.writerows(rows)


def run(
    spec: RunSpec,
    out_root: Path,
    data_root: Path,
    work_root: Path,
    sources: list[Path] = (),
    per_case_columns: tuple[str, ...] | None = None,
) -> tuple[Path, bool]:
    """Run ``spec`` unless ``out_root/<name>`` already holds it with the same key, or one of ``sources`` does
    (copied); returns (folder, ran). When only the evaluation changed (the same training key, here or in a source)
    and that run's weights are still on disk, they are evaluated again without training (:func:`decide`).
    ``per_case_columns``: the columns of ``per_case.csv`` kept in the run folder (default: all)."""
    run_dir = out_root / spec.name
    action, found = decide(spec, out_root, work_root, list(sources))
    if action == "cached":
        record_train_key(run_dir, spec)
        return run_dir, False
    if action == "copy":
        copy_run(found / spec.name, run_dir)
        return run_dir, False
    data = ensure_cohort(spec.cohort, data_root)
    work = work_root / spec.name
    if action == "re-evaluate":
        times = _reuse_training(spec, found, run_dir, data, work)
    else:
        times = execute(spec, data, work)
        run_dir.mkdir(parents=True, exist_ok=True)
        summary = parse_train_log((work / "run.log").read_text())
        (run_dir / "train_log.json").write_text(json.dumps(summary, indent=2) + "\n")
    copy_per_case(work / "fairness" / "per_case.csv", run_dir / "per_case.csv", per_case_columns)
    shutil.copyfile(work / "fairness" / "metrics.json", run_dir / "metrics.json")
    if (work / "identify" / "error_set.json").is_file():  # JTT: which training cases its first stage flagged
        shutil.copyfile(work / "identify" / "error_set.json", run_dir / "jtt_error_set.json")
    meta = {"key": run_key(spec), "train_key": run_key(spec, evaluation=False), "bench_version": BENCH_VERSION,
            "commit": git_commit(), "variant": spec.variant, "seed": spec.seed, "cohort": spec.cohort,
            "overrides": spec.overrides, **times, "weights": str((work / "models").resolve()),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}  # fmt: skip
    (run_dir / "run.json").write_text(json.dumps(meta, indent=2) + "\n")  # written last: marks the run finished
    for folder in (work / "checkpoints", work / "identify" / "checkpoints", work / "identify" / "models"):
        shutil.rmtree(folder, ignore_errors=True)
    return run_dir, True


def record_train_keys(out_root: Path) -> int:
    """:func:`record_train_key` for every finished run under ``out_root`` whose key holds; returns how many."""
    count = 0
    for meta_file in sorted(out_root.glob("*/run.json")):
        meta = read_meta(meta_file.parent)
        if not meta or "train_key" in meta:
            continue
        spec = RunSpec(meta["variant"], meta["seed"], meta["cohort"], meta.get("overrides", {}))
        if spec.name == meta_file.parent.name and is_done(meta_file.parent, run_key(spec)):
            record_train_key(meta_file.parent, spec)
            count += 1
    return count


if __name__ == "__main__":
    # python bench/runcache.py --record-train-keys DIR [DIR ...]: give finished runs from before training keys one
    if len(sys.argv) > 2 and sys.argv[1] == "--record-train-keys":
        for folder in sys.argv[2:]:
            print(f"{folder}: {record_train_keys(Path(folder))} run(s) given a training key")
    else:
        sys.exit("usage: python bench/runcache.py --record-train-keys DIR [DIR ...]")
