"""Does FairDRO help on my data? The fairness benchmark on a user's own datalist, with cross-validation.

Usage (``make benchmark-fairness DATALIST=/data/rt/datalist.json SUBGROUP_KEY=stage [FOLDS=5 ...]``)::

    python bench/benchmark_datalist.py --datalist D --subgroup-key KEY [--variants erm,dmoe,fairdro] [--seeds 3]
        [--folds K] [--patient-key KEY] [--profile none|2d|fairseg|ham10000|gpu] [--epochs N] [--out DIR]
        [--threshold 0.5] [--min-group-cases 10] [--set KEY=VALUE ...] [--export DIR] [--dry-run] [--report-only]

What it does, in order (nothing is written before step 4):

1. **Checks** (``bench/datalist_cohort.py``): the datalist is read (relative or absolute paths, any attributes, no
   ``subtype`` needed); a subgroup key (or patient key) that no item has, a variant that does not exist, an
   ``--export`` folder that is not empty, ``--folds`` larger than the smallest group (``bench/cv_folds.py``) and
   every error ``scripts/check_data.py`` finds in the files (a missing image, labels outside the classes, an image
   and label on different grids ...) each stop it with **one line** on stderr (exit status 2).
2. **Splits**: with ``--folds K`` the union of ``training`` and ``validation`` is split into K folds, stratified by
   the subgroup, patients (``--patient-key``) kept together, 10 % of each fold's training part held out for
   validation (checkpoint selection, the DRO recipe); every case is tested exactly once. Without ``--folds`` the
   datalist's own ``testing`` list is used (and its ``validation``, or 10 % of ``training`` without one).
3. **Runs**: every variant x seed x fold is a run cached by ``bench/runcache.py`` in ``OUT/runs/<variant>_<fold>_s
   <seed>``: its key holds the configuration and the datalist's sha256 and the size and modification time of every
   file it lists, so a rerun skips what is finished (a killed benchmark resumes where it stopped) and a changed cohort
   reruns. The routing and DRO groups are the subgroup key's values; the report's groupings add the extra attributes.
4. **Plan** (``bench/datalist_probe.py``): one short probe (``fairdro``, two epochs on a few cases, cached in
   ``OUT/probe.json``) is timed, then the plan is printed (and kept in ``OUT/plan.txt``): runs, cached, estimated CPU
   or GPU hours, disk.
5. **Progress** (``bench/run_progress.py``): one line per training epoch and an overall bar with the time left.
6. **Report** (``bench/datalist_report.py``): ``OUT/report.md`` and ``OUT/report.json``, rewritten after every run,
   on the user's groups, with the paired comparisons and the verdict; printed at the end.
7. ``--export DIR`` (``bench/export_winner.py``): the winner (best pooled worst-group Dice) retrained once on the
   whole pool with a 10 % validation split, and written to DIR as a bundle that passes ``make verify``.

Profiles: ``2d`` stacks ``configs/profiles/2d.json`` (and ``2d_evaluate.json``), ``fairseg``/``ham10000`` add the data
set's overlay last, ``gpu`` stacks ``configs/profiles/gpu.json``; without ``--profile`` the 2D profile is chosen for
PNG, JPEG and NPZ images, none (3D) otherwise. ``--set KEY=VALUE`` overrides a config key of every run (VALUE read as
JSON when it parses, e.g. ``--set features=16`` or ``--set 'image_size=[128,128]'``). ``--dry-run`` prints the plan
without probing or writing; ``--report-only`` rebuilds the report from finished runs. Exit status: 0 all runs
finished, 1 a run failed, 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cv_folds  # noqa: E402
import datalist_cohort as dc  # noqa: E402
import datalist_probe as probe_mod  # noqa: E402
import datalist_report as dr  # noqa: E402
import export_winner  # noqa: E402
import run_progress  # noqa: E402
import runcache  # noqa: E402

InputError = dc.InputError
PROFILES = {
    "none": {},
    "2d": {"spatial_dims": 2},
    "fairseg": {"spatial_dims": 2, "profiles": ["profiles/fairseg.json"]},
    "ham10000": {"spatial_dims": 2, "profiles": ["profiles/ham10000.json"]},
    "gpu": {"profiles": ["profiles/gpu.json"]},
}
DEFAULT_VARIANTS = ("erm", "dmoe", "fairdro")
#: variants that read the items' hidden ``subtype`` (the oracles): refused on a datalist without it
NEEDS_SUBTYPE = ("oracle", "oracle_dmoe")
_2D_SUFFIXES = (".png", ".jpg", ".jpeg", ".npz")


@dataclass
class Bench:
    """Everything a benchmark needs once its input passed the checks."""

    args: argparse.Namespace
    cohort: dc.Cohort
    profile: str
    overrides: dict[str, Any]
    epochs: int
    splits: list[dc.Split]
    specs: list[runcache.RunSpec]
    out: Path
    warnings: int

    @property
    def runs_dir(self) -> Path:
        return self.out / "runs"

    @property
    def work(self) -> Path:
        return self.out / "work"

    def split_dir(self, name: str) -> Path:
        return self.out / "splits" / name


# ------------------------------------------------------------------------------------------------ arguments


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datalist", required=True, help="the datalist JSON (training/validation/testing lists)")
    p.add_argument("--subgroup-key", required=True, help="item attribute that routes the network and groups the DRO")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help="comma-separated (configs/variants)")
    p.add_argument("--seeds", type=int, default=3, help="seeds per variant and fold (0..N-1; default 3)")
    p.add_argument("--folds", type=int, default=None, help="K-fold cross-validation of training + validation")
    p.add_argument("--patient-key", default=None, help="item attribute naming the patient (kept in one fold)")
    p.add_argument("--profile", choices=sorted(PROFILES), default=None, help="config profile (default: by image type)")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default: the profile's)")
    p.add_argument("--out", type=Path, default=None, help="runs, cache and report (default runs/benchmark-<name>)")
    p.add_argument("--dataset-dir", default=None, help="folder relative paths start from (default: the datalist's)")
    p.add_argument("--threshold", type=float, default=0.5, help="a case with Dice below it is a failure")
    p.add_argument("--alpha", type=float, default=0.2, help="CVaR share of the worst cases (default 0.2)")
    p.add_argument("--min-group-cases", type=int, default=10, help="fewer testing cases: too small to compare")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override of every run")
    p.add_argument("--export", type=Path, default=None, help="write the winner, retrained on the pool, as a bundle")
    p.add_argument("--dry-run", action="store_true", help="print the plan without probing or writing anything")
    p.add_argument("--report-only", action="store_true", help="rebuild the report from finished runs")
    return p


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_sets(pairs: list[str]) -> dict[str, Any]:
    """``--set KEY=VALUE`` pairs as overrides (VALUE as JSON when it parses)."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise InputError(f"--set {pair!r}: write KEY=VALUE, e.g. --set features=16")
        out[key.strip()] = _value(value)
    return out


def check_options(args: argparse.Namespace) -> list[str]:
    """The variants; :class:`InputError` for an option the benchmark cannot use."""
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    known = sorted(p.stem for p in (runcache.CONFIGS / "variants").glob("*.json"))
    unknown = [v for v in variants if v not in known]
    if not variants or unknown or len(set(variants)) != len(variants):
        raise InputError(f"VARIANTS={args.variants!r}: name each once, from {', '.join(known)}")
    for name, value, low in (("SEEDS", args.seeds, 1), ("EPOCHS", args.epochs, 1), ("--min-group-cases",
                             args.min_group_cases, 1)):  # fmt: skip
        if value is not None and value < low:
            raise InputError(f"{name}={value}: must be at least {low}")
    if not 0 < args.threshold < 1:
        raise InputError(f"--threshold {args.threshold}: the failure threshold must be in (0, 1)")
    if not 0 < args.alpha <= 1:
        raise InputError(f"--alpha {args.alpha}: the CVaR share must be in (0, 1]")
    if args.export is not None and args.export.exists() and (not args.export.is_dir() or any(args.export.iterdir())):
        raise InputError(f"--export {args.export}: the folder exists and is not empty; name a new folder")
    return variants


# ------------------------------------------------------------------------------------------------ preparing


def choose_profile(args: argparse.Namespace, cohort: dc.Cohort) -> str:
    if args.profile is not None:
        return args.profile
    image = str(cohort.lists["training"][0].get("image", ""))
    return "2d" if image.lower().endswith(_2D_SUFFIXES) else "none"


def run_overrides(cohort: dc.Cohort, args: argparse.Namespace) -> dict[str, Any]:
    """The overrides of every run: the user's groups, the report's groupings, validation every epoch, ``--set``."""
    out = {"subgroup_key": cohort.subgroup_key, "subgroups": cohort.subgroups,
           "fairness_groupings": [cohort.subgroup_key, *cohort.extras], "val_interval": 1}  # fmt: skip
    if args.epochs is not None:
        out["epochs"] = args.epochs
    return {**out, **parse_sets(args.set)}


def spec_for(bench_out: Path, cohort: dc.Cohort, split: dc.Split, profile: str, variant: str, seed: int,
             overrides: dict[str, Any]) -> runcache.RunSpec:  # fmt: skip
    """The run of ``variant`` with ``seed`` on ``split`` (its datalist in ``OUT/splits/<split>``)."""
    c = {runcache.DATALIST_KEY: str(cohort.path), "dataset_dir": str(cohort.dataset_dir),
         "data_dir": str(bench_out / "splits" / split.name), "fold": split.name,
         "split_sha256": split.sha256(cohort), **PROFILES[profile]}  # fmt: skip
    return runcache.RunSpec(variant, seed, c, dict(overrides))


def config_values(spec: runcache.RunSpec) -> dict[str, Any]:
    """``patch_size``, ``out_channels`` and ``epochs`` of a run's resolved training configuration."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(spec.config_files(False))
    for key, value in spec.overrides.items():
        if key in parser:
            parser[key] = value
    channels = parser.get_parsed_content("out_channels") if "out_channels" in parser else 2
    return {"patch_size": list(parser.get_parsed_content("patch_size")), "out_channels": int(channels),
            "epochs": int(parser.get_parsed_content("epochs"))}  # fmt: skip


def _check_variants(variants: list[str], cohort: dc.Cohort) -> None:
    needs = [v for v in variants if v in NEEDS_SUBTYPE]
    if needs and not any("subtype" in item for items in cohort.lists.values() for item in items):
        raise InputError(f"VARIANTS: {', '.join(needs)} read each item's 'subtype', which no item of {cohort.path} "
                         "has; leave them out")  # fmt: skip


def prepare(args: argparse.Namespace) -> Bench:
    """Every check (module notes, step 1) and the plan; writes nothing."""
    variants = check_options(args)
    cohort = dc.load_cohort(args.datalist, args.subgroup_key, args.patient_key, args.folds, args.dataset_dir)
    _check_variants(variants, cohort)
    profile, overrides = choose_profile(args, cohort), run_overrides(cohort, args)
    out = (args.out or Path.cwd() / "runs" / f"benchmark-{cohort.path.stem}").resolve()
    if out.exists() and not out.is_dir():
        raise InputError(f"OUT={out}: it is a file; name a folder")
    first = spec_for(out, cohort, dc.Split("probe", [], [], []), profile, variants[0], 0, overrides)
    values = config_values(first)
    warnings = dc.check_files(cohort, values["patch_size"], values["out_channels"])
    if args.folds is not None:
        dc.check_fold_count(cohort, args.folds)
    splits = dc.make_splits(cohort, args.folds)
    specs = [spec_for(out, cohort, split, profile, v, seed, overrides) for seed in range(args.seeds) for split in
             splits for v in variants]  # fmt: skip
    return Bench(args, cohort, profile, overrides, values["epochs"], splits, specs, out, len(warnings))


# ------------------------------------------------------------------------------------------------ plan


def label(spec: runcache.RunSpec) -> str:
    return f"{spec.cohort['fold']} {spec.variant} s{spec.seed}"


def split_sizes(bench: Bench) -> dict[str, dict[str, int]]:
    return {s.name: {"training": len(s.training), "validation": len(s.validation), "testing": len(s.testing)}
            for s in bench.splits}  # fmt: skip


def cohort_lines(bench: Bench) -> list[str]:
    c, args = bench.cohort, bench.args
    pool = c.pool if args.folds else c.lists["training"] + c.lists.get("validation", []) + c.lists["testing"]
    counts = Counter(cv_folds.value_of(item, c.subgroup_key) or cv_folds.UNKNOWN for item in pool)
    patients = {cv_folds.value_of(item, c.patient_key) or item["id"] for item in pool} if c.patient_key else None
    groups = ", ".join(f"{g} {n}" for g, n in sorted(counts.items()))
    skipped = "; ".join(f"{k} ({why})" for k, why in c.skipped_extras.items())
    lines = [
        f"Fairness benchmark on {c.path} (sha256 {c.sha256[:12]})",
        f"  cohort: {len(pool)} cases" + (f" ({len(patients)} patients)" if patients else "")
        + f"; {c.subgroup_key}: {groups}",
        f"  extra attributes broken down: {', '.join(c.extras) or 'none'}" + (f"; not: {skipped}" if skipped else ""),
        f"  check_data: no errors, {bench.warnings} warning(s)",
    ]  # fmt: skip
    sizes = "; ".join(f"{n}: {s['training']} training, {s['validation']} validation, {s['testing']} testing"
                      for n, s in split_sizes(bench).items())  # fmt: skip
    how = f"{args.folds} folds stratified by {c.subgroup_key}" + (", patients together" if c.patient_key else "") \
        if args.folds else "the datalist's own lists"  # fmt: skip
    return [*lines, f"  splits ({how}): {sizes}"]


def decide_all(bench: Bench) -> dict[str, str]:
    return {s.name: runcache.decide(s, bench.runs_dir, bench.work)[0] for s in bench.specs}


def plan_lines(bench: Bench, actions: dict[str, str], probe: probe_mod.Probe | None) -> list[str]:
    args = bench.args
    todo = [s for s in bench.specs if actions[s.name] != "cached"]
    variants = list(dict.fromkeys(s.variant for s in bench.specs))
    lines = [
        *cohort_lines(bench),
        f"  configuration: profile {bench.profile}, {bench.epochs} epochs, variants {', '.join(variants)}, seeds "
        f"0-{args.seeds - 1}",
        f"  runs: {len(bench.specs)} ({len(bench.splits)} fold(s) x {len(variants)} variant(s) x {args.seeds} "
        f"seed(s)): {len(bench.specs) - len(todo)} cached, {len(todo)} to run",
    ]  # fmt: skip
    if probe is None:
        return lines + (["  estimate: not probed (nothing to run)" if not todo else "  estimate: not probed yet"])
    total = sum(estimates(bench, probe, todo).values())
    keep, peak = probe_mod.disk_estimate(probe, len(todo))
    return lines + [
        f"  probe: {probe.variant}, {probe_mod.PROBE_EPOCHS} epochs on {probe.n_train} training + {probe.n_val} "
        "validation cases: "
        f"{probe.wall_s:.1f} s ({probe.startup_s:.1f} s start-up)",
        f"  estimate: {total / 3600:.2f} {probe.device} hours ({run_progress.duration(total)}); disk about "
        f"{keep / 1e6:.0f} MB in {bench.out} (+{peak / 1e6:.0f} MB of checkpoints while a run trains)",
    ]


def estimates(bench: Bench, probe: probe_mod.Probe, specs: list[runcache.RunSpec]) -> dict[str, float]:
    sizes = split_sizes(bench)
    out = {}
    for s in specs:
        n = sizes[s.cohort["fold"]]
        out[s.name] = sum(probe_mod.estimate_run(probe, bench.epochs, n["training"], n["validation"], n["testing"]))
    return out


def probe_spec(bench: Bench) -> tuple[runcache.RunSpec, dc.Split]:
    """The probe: ``fairdro`` (the dearest variant, whatever the plan) for two epochs on a few cases of the first
    split, with the plan's overrides (so a plan of other variants on the same cohort reuses it)."""
    split = bench.splits[0]
    small = dc.Split("probe", split.training[: probe_mod.PROBE_TRAIN], split.validation[: probe_mod.PROBE_VAL], [])
    overrides = {**bench.overrides, "epochs": probe_mod.PROBE_EPOCHS}
    return spec_for(bench.out, bench.cohort, small, bench.profile, probe_mod.PROBE_VARIANT, 0, overrides), small


def cached_probe(bench: Bench) -> probe_mod.Probe | None:
    return probe_mod.read_probe(bench.out / "probe.json", probe_mod.probe_key(probe_spec(bench)[0]))


def get_probe(bench: Bench, todo: list[runcache.RunSpec]) -> probe_mod.Probe | None:
    """The cached probe or a new one (``None`` when nothing is to run)."""
    if not todo:
        return None
    spec, small = probe_spec(bench)
    cached = probe_mod.read_probe(bench.out / "probe.json", probe_mod.probe_key(spec))
    if cached is not None:
        return cached
    small.write(bench.cohort, bench.split_dir("probe"))
    import torch

    device = "GPU" if torch.cuda.is_available() else "CPU"
    probe = probe_mod.run_probe(spec, len(small.training), len(small.validation), bench.work / "probe", device)
    probe_mod.write_probe(probe, bench.out / "probe.json")
    return probe


# ------------------------------------------------------------------------------------------------ running


def run_one(bench: Bench, spec: runcache.RunSpec, progress: run_progress.Progress, train_est: float) -> bool:
    """Run one spec with its progress lines; False when it failed (one failure does not stop the benchmark)."""
    t0 = time.time()
    progress.start_run(spec.name, label(spec), bench.epochs, train_est)
    follower = run_progress.LogFollower(bench.work / spec.name / "run.log", progress)
    follower.start()
    try:
        runcache.run(spec, bench.runs_dir, bench.out, bench.work)
        ok = True
    except (RuntimeError, OSError, ValueError) as exc:
        print(f"{label(spec)}: FAILED ({exc})", flush=True)
        ok = False
    finally:
        follower.stop()
        progress.end_run()
    if ok:
        print(f"{label(spec)}: finished in {time.time() - t0:.0f} s  {progress.status()}", flush=True)
    return ok


def run_all(bench: Bench, actions: dict[str, str], probe: probe_mod.Probe | None) -> tuple[list[str], dict]:
    """Every run not cached, the report rewritten after each; returns (failed runs, timing)."""
    todo = [s for s in bench.specs if actions[s.name] != "cached"]
    est = estimates(bench, probe, todo) if probe else {s.name: 1.0 for s in todo}
    progress = run_progress.Progress(est)
    timing = {"runs": len(todo), "estimated_s": sum(est.values()) if probe else None, "actual_s": 0.0}
    failed, t0 = [], time.time()
    for spec in bench.specs:
        if actions[spec.name] == "cached":
            print(f"{label(spec)}: cached", flush=True)
            continue
        n = split_sizes(bench)[spec.cohort["fold"]]
        train_est = probe_mod.estimate_run(probe, bench.epochs, n["training"], n["validation"], 0)[0] if probe else 1
        if not run_one(bench, spec, progress, train_est):
            failed.append(spec.name)
        timing["actual_s"] = round(time.time() - t0, 1)
        write_report(bench, timing)
    return failed, timing


# ------------------------------------------------------------------------------------------------ report


def report_settings(bench: Bench) -> dr.Settings:
    a = bench.args
    return dr.Settings(bench.cohort.subgroup_key, tuple(bench.cohort.extras), a.threshold, a.alpha, a.min_group_cases)


def collect_runs(bench: Bench) -> dict[str, dict[int, dict[str, Any]]]:
    """``runs[variant][seed][fold]``: the per-case rows of each finished run (``None`` while unfinished)."""
    runs: dict[str, dict[int, dict[str, Any]]] = {}
    for spec in bench.specs:
        run_dir = bench.runs_dir / spec.name
        done = runcache.is_done(run_dir, runcache.run_key(spec))
        runs.setdefault(spec.variant, {}).setdefault(spec.seed, {})[spec.cohort["fold"]] = \
            dr.read_rows(run_dir) if done else None  # fmt: skip
    return runs


def benchmark_argv(argv: list[str]) -> list[str]:
    """The options that define the benchmark (without ``--report-only``, ``--dry-run`` and ``--export DIR``)."""
    out, skip = [], False
    for arg in argv:
        if skip or arg in ("--report-only", "--dry-run"):
            skip = False
            continue
        if arg == "--export":
            skip = True
            continue
        if not arg.startswith("--export="):
            out.append(arg)
    return out


def report_info(bench: Bench, timing: dict | None) -> dict[str, Any]:
    c, a = bench.cohort, bench.args
    tested = [i for s in bench.splits for i in s.testing]
    patients = {i.get(c.patient_key) or i["id"] for i in tested} if c.patient_key else None
    argv = ["python", "bench/benchmark_datalist.py", *benchmark_argv(a.argv or [])]
    return {"datalist": str(c.path), "datalist_name": c.path.name, "datalist_sha256": c.sha256,
            "command": shlex.join(argv), "folds": a.folds, "seeds": a.seeds, "epochs": bench.epochs,
            "profile": bench.profile, "patient_key": c.patient_key, "n_cases": len(tested),
            "n_patients": len(patients) if patients else len(tested), "splits": split_sizes(bench),
            "skipped_attributes": c.skipped_extras, "timing": timing,
            "device": (timing or {}).get("device")}  # fmt: skip


def write_report(bench: Bench, timing: dict | None = None) -> dict[str, Any]:
    """Rebuild the report; ``timing`` (of this invocation's runs) is kept in ``OUT/timing.json``, and read back from
    it when this invocation trained nothing (the report then says what the last invocation that trained took)."""
    if timing is not None:
        (bench.out / "timing.json").write_text(json.dumps(timing) + "\n")
    elif (bench.out / "timing.json").is_file():
        timing = json.loads((bench.out / "timing.json").read_text())
    expected = [i["id"] for s in bench.splits for i in s.testing]
    folds = [s.name for s in bench.splits]
    report = dr.build_report(collect_runs(bench), folds, expected, report_settings(bench), report_info(bench, timing))
    dr.write_report(report, bench.out)
    return report


# ------------------------------------------------------------------------------------------------ main


def start(bench: Bench, actions: dict[str, str]) -> probe_mod.Probe | None:
    """Write the splits, probe, print the plan and keep it in ``OUT/plan.txt`` (when there is something to run:
    the plan of a benchmark that trained stays there)."""
    for split in bench.splits:
        split.write(bench.cohort, bench.split_dir(split.name))
    todo = [s for s in bench.specs if actions[s.name] != "cached"]
    probe = None if bench.args.report_only else get_probe(bench, todo)
    text = "\n".join(plan_lines(bench, actions, probe))
    print(text, flush=True)
    if todo and not bench.args.report_only:
        (bench.out / "plan.txt").write_text(text + "\n")
    return probe


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    args.argv = argv
    try:
        bench = prepare(args)
    except InputError as exc:
        print(f"ERROR benchmark-fairness: {exc}", file=sys.stderr, flush=True)
        return 2
    actions = decide_all(bench)
    if args.dry_run:
        print("\n".join(plan_lines(bench, actions, cached_probe(bench))))
        for spec in bench.specs:
            print(f"  {spec.name:<32} {actions[spec.name]}")
        return 0
    bench.out.mkdir(parents=True, exist_ok=True)
    try:
        probe = start(bench, actions)
    except RuntimeError as exc:  # the probe's training failed: the runs would too
        print(f"ERROR benchmark-fairness: the probe failed before any run: {exc}", file=sys.stderr, flush=True)
        return 1
    todo = [s for s in bench.specs if actions[s.name] != "cached"]
    failed, timing = ([], None) if args.report_only or not todo else run_all(bench, actions, probe)
    if timing is not None and probe is not None:
        timing["device"] = probe.device
    report = write_report(bench, timing)
    print(f"\nreport: {bench.out / 'report.md'}\n{report['verdict']}", flush=True)
    if failed:
        print(f"{len(failed)} run(s) failed: {', '.join(failed)}", file=sys.stderr, flush=True)
        return 1
    return export_pool(bench, report) if args.export is not None else 0


def export_pool(bench: Bench, report: dict[str, Any]) -> int:
    """``--export``: the winner retrained on the pool, written as a bundle (``bench/export_winner.py``)."""
    winner = report.get("winner")
    if not report["complete"] or winner is None:
        print(f"ERROR benchmark-fairness: --export needs every run finished ({report['runs']['done']} of "
              f"{report['runs']['planned']}); rerun the benchmark first", file=sys.stderr, flush=True)  # fmt: skip
        return 1
    split = dc.pool_split(bench.cohort)
    split.write(bench.cohort, bench.split_dir(split.name))
    spec = spec_for(bench.out, bench.cohort, split, bench.profile, winner, 0, bench.overrides)
    print(f"export: retraining {winner} on the pool ({len(split.training)} training, {len(split.validation)} "
          "validation cases)", flush=True)  # fmt: skip
    return export_winner.export(spec, report, bench.out, bench.work, bench.args.export)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
