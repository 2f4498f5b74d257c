"""Hidden-failures benchmark, part 2: the comparison on the chosen setting (issue 29, items 2-4).

Run by ``python bench/hidden_failures.py --part compare`` after the positive-control search (part 1).

**The chosen setting** is fixed by a rule written before any result: the *first* setting of the search's plan order
(``hidden_failures.SETTINGS``, most informative first) whose two oracle gaps both pass; ``--setting NAME`` names one
by hand (the report says so). If none passes, the closest one (the verdict's) is used and the comparison is labelled
*underpowered*; if only the backbone pair passes, the dMoE comparison is.

**Its placebo**: the same recipe at level 0 (``placebo_<setting>``), the four reference variants, 2 seeds; both gaps'
intervals must contain 0. (The search's own placebo is at the base recipe.)

**JTT's settings** (T, tau, lambda_up; :data:`JTT_GRID`, 6 points) are chosen on *validation* worst-group (stage)
Dice, the best epoch's (the checkpoint rule), seed 0: never on the testing split, never on ``subtype``.

Run order: JTT's grid, the comparison, the placebo. **The comparison**: on the backbone ``erm``, ``erm_cvar``,
``groupdro``, ``oracle``; on the dMoE network ``dmoe``,
``fairdro``, ``jtt`` (the chosen point), ``oracle_dmoe``; 5 seeds each. ``dmoe`` and ``fairdro`` run with
``dro#diagnose: true`` (the intra-group CVaR diagnostic at every bank refresh; it trains bit-identically), so their
runs are not the search's (other keys); the other reference variants' seeds 0 and 1 are copied from the search.

Everything lands in ``bench/results/hidden_failures/compare_<setting>/`` (``placebo/``, ``jtt_grid/<point>/``,
``runs/``), each run cached by ``bench/runcache.py``; the report (``report.md``, ``report.json``,
``diagnostic.png``) is rewritten by ``bench/hidden_failures_tables.py`` after every run.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ablation_stats as stats
import fairness_ablation as fa
import hidden_failures as hf
import hidden_failures_tables as hft
import runcache

logger = logging.getLogger("hidden_failures")

BACKBONE = ("erm", "erm_cvar", "groupdro", "oracle")
DMOE = ("dmoe", "fairdro", "jtt", "oracle_dmoe")
DIAGNOSED = ("dmoe", "fairdro")
SEEDS = (0, 1, 2, 3, 4)
JTT_SEED = 0
#: JTT's grid: T (epochs of the identification model, within the chosen schedule), tau (Dice threshold of the error
#: set) and lambda_up (weight of an error case); Liu et al. use a short T and lambda_up from 5 to 100
JTT_GRID = (
    {"jtt#epochs": 2, "jtt#tau": 0.5, "jtt#lambda_up": 5.0},
    {"jtt#epochs": 2, "jtt#tau": 0.5, "jtt#lambda_up": 20.0},
    {"jtt#epochs": 2, "jtt#tau": 0.8, "jtt#lambda_up": 5.0},
    {"jtt#epochs": 5, "jtt#tau": 0.5, "jtt#lambda_up": 5.0},
    {"jtt#epochs": 5, "jtt#tau": 0.5, "jtt#lambda_up": 20.0},
    {"jtt#epochs": 5, "jtt#tau": 0.8, "jtt#lambda_up": 5.0},
)


@dataclass(frozen=True)
class ComparePlan:
    """Who runs in part 2: the variants on each network, the seeds, JTT's grid and the placebo's variants/seeds."""

    backbone: tuple[str, ...] = BACKBONE
    dmoe: tuple[str, ...] = DMOE
    seeds: tuple[int, ...] = SEEDS
    jtt_grid: tuple[dict[str, Any], ...] = JTT_GRID
    placebo_variants: tuple[str, ...] = hf.VARIANTS
    placebo_seeds: tuple[int, ...] = hf.SEEDS


FULL = ComparePlan()
#: the smoke bench: the dMoE network's four variants, one seed, one JTT point, on the search's smoke setting
SMOKE = ComparePlan((), DMOE, (0,), ({"jtt#epochs": 1, "jtt#tau": 0.5, "jtt#lambda_up": 5.0},), hf.SMOKE_VARIANTS,
                    (0,))  # fmt: skip


@dataclass(frozen=True)
class Choice:
    """The chosen setting and how it was chosen (``status``: the search's status; ``underpowered``: the gaps whose
    positive control failed, which label their comparison)."""

    setting: hf.Setting
    how: str
    status: str
    underpowered: tuple[str, ...]


def point_name(point: dict[str, Any]) -> str:
    """Folder name of a JTT grid point: ``T2_tau0.5_up5``."""
    return f"T{point['jtt#epochs']}_tau{point['jtt#tau']:g}_up{point['jtt#lambda_up']:g}"


def choose(table: dict[str, Any], settings: list[hf.Setting], name: str | None = None) -> Choice:
    """The chosen setting from the calibration ``table`` (``hidden_failures.calibration``): ``name`` when given,
    else the first passing one in plan order, else the closest (the smaller of its two gaps the largest)."""
    rows = {r["name"]: r for r in table["settings"] if not r.get("is_placebo")}
    by_name = {s.name: s for s in settings}
    if name is not None:
        if name not in rows or name not in by_name:
            raise ValueError(f"unknown setting {name!r}; searched: {sorted(rows)}.")
        return _choice(by_name[name], rows[name], "named with --setting")
    unfinished = [n for n, r in rows.items() if r["done"] < r["planned"]]
    for row in rows.values():
        if row["status"].startswith("passes") and row["done"] >= row["planned"]:
            return _choice(by_name[row["name"]], row, "the first setting in plan order that passes both gaps")
        if row["name"] in unfinished:
            raise ValueError(f"the search has not finished setting {row['name']!r} (an earlier one in plan order);"
                             " run part 1 first, or name a setting with --setting.")  # fmt: skip
    measured = [r for r in rows.values() if all(g["estimate"] is not None for g in r["gaps"].values())]
    if not measured:
        raise ValueError("no setting of the search is measured yet: run part 1 first.")
    best = max(measured, key=lambda r: min(g["estimate"] for g in r["gaps"].values()))
    return _choice(by_name[best["name"]], best, "no setting passes: the closest one")


def _choice(setting: hf.Setting, row: dict[str, Any], how: str) -> Choice:
    failed = tuple(g for g, gap in row["gaps"].items() if not gap["passes"])
    return Choice(setting, how, row["status"], failed)


def placebo_setting(setting: hf.Setting, plan: ComparePlan = FULL) -> hf.Setting:
    """The chosen recipe on the same cohort at level 0 (the tagged cases follow the majority's rule)."""
    knobs, cohort = {**setting.knobs, "difficulty": 0}, {**setting.cohort, "difficulty": 0}
    specs = hf._specs(cohort, dict(setting.recipe), plan.placebo_variants, plan.placebo_seeds)
    return hf.Setting(f"placebo_{setting.name}", "placebo", knobs, cohort, dict(setting.recipe), specs,
                      "level 0, chosen recipe")  # fmt: skip


def jtt_specs(setting: hf.Setting, plan: ComparePlan = FULL) -> dict[str, runcache.RunSpec]:
    """One JTT run per grid point (seed :data:`JTT_SEED`), by point name; T stays within the schedule."""
    epochs = setting.recipe["epochs"]
    return {point_name(p): runcache.RunSpec("jtt", JTT_SEED, setting.cohort, {**setting.recipe, **p})
            for p in plan.jtt_grid if p["jtt#epochs"] < epochs}  # fmt: skip


def comparison_specs(
    setting: hf.Setting, jtt_point: dict[str, Any] | None, plan: ComparePlan = FULL
) -> list[runcache.RunSpec]:
    """The comparison's runs seed by seed; ``jtt`` only once its point is chosen (``None``: left out)."""
    specs = []
    for seed in plan.seeds:
        for variant in plan.backbone + plan.dmoe:
            extra = {"dro#diagnose": True} if variant in DIAGNOSED else {}
            if variant == "jtt":
                if jtt_point is None:
                    continue
                extra = dict(jtt_point)
            specs.append(runcache.RunSpec(variant, seed, setting.cohort, {**setting.recipe, **extra}))
    return specs


def finished(specs, folder: Path) -> list[dict[str, Any]]:
    """The finished runs among ``specs`` under ``folder`` (``hidden_failures.load_setting``'s run records)."""
    runs = []
    for spec in specs:
        run_dir = folder / spec.name
        if fa.run_state(spec, folder) != "done":
            continue
        runs.append({"name": spec.name, "variant": spec.variant, "seed": spec.seed, "dir": run_dir,
                     "rows": fa.read_per_case(run_dir / "per_case.csv"),
                     "train_log": fa._read_json(run_dir / "train_log.json")})  # fmt: skip
    return runs


class Comparison:
    """Part 2's plan and runner for one chosen setting under ``out/compare_<setting>``."""

    def __init__(self, choice: Choice, out: Path, work: Path, plan: ComparePlan = FULL):
        self.choice, self.setting, self.plan = choice, choice.setting, plan
        self.folder = out / f"compare_{self.setting.name}"
        self.search_folder = out / self.setting.name
        self.work = work / f"compare_{self.setting.name}"
        self.data = work / "data"

    # -- the plan ------------------------------------------------------------------------------------------------
    def jtt_choice(self) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
        """The chosen JTT point (``None`` until every point ran) and each point's validation record."""
        points = []
        for name, spec in jtt_specs(self.setting, self.plan).items():
            run = finished([spec], self.folder / "jtt_grid" / name)
            point = next(p for p in self.plan.jtt_grid if point_name(p) == name)
            points.append({"name": name, **point, "run": run[0] if run else None})
        return hft.choose_jtt(points), points

    def stages(self) -> list[tuple[str, Path, list[runcache.RunSpec], list[Path]]]:
        """``(stage, folder, specs, copy sources)`` in run order: JTT's grid, the comparison (its answer first), then
        the placebo at the chosen recipe."""
        stages = []
        for name, spec in jtt_specs(self.setting, self.plan).items():
            stages.append((f"jtt_grid/{name}", self.folder / "jtt_grid" / name, [spec], []))
        point, _ = self.jtt_choice()
        specs = comparison_specs(self.setting, point, self.plan)
        sources = [self.search_folder] + ([self.folder / "jtt_grid" / point_name(point)] if point else [])
        stages.append(("runs", self.folder / "runs", specs, sources))  # jtt's seed 0 is its grid point's run
        placebo = placebo_setting(self.setting, self.plan)
        stages.append(("placebo", self.folder / "placebo", list(placebo.specs), []))
        return stages

    # -- running -------------------------------------------------------------------------------------------------
    def run(self, max_runs: int | None, commit_repo: Path | None, variants: tuple[str, ...] | None = None) -> list[str]:
        """Run every stage in order (JTT's point is chosen once its grid is done), rewriting the report after each
        new run; ``variants``: only these variants' runs (another process runs the rest); returns the failed runs."""
        failed, new = [], 0
        for stage, folder, specs, sources in self.stages():
            if stage == "runs":  # JTT's grid has just finished: re-plan with its chosen point
                specs = next(st[2] for st in self.stages() if st[0] == "runs")
            for spec in [s for s in specs if variants is None or s.variant in variants]:
                if max_runs is not None and new >= max_runs:
                    logger.info("stopping after %d new run(s) (--max-runs)", new)
                    return failed
                try:
                    run_dir, ran = runcache.run(spec, folder, self.data, self.work / stage, sources=sources,
                                                per_case_columns=hf.PER_CASE_COLUMNS)  # fmt: skip
                except (RuntimeError, ValueError) as exc:
                    logger.error("%s/%s: FAILED (%s)", stage, spec.name, exc)
                    failed.append(f"{stage}/{spec.name}")
                    continue
                logger.info("compare %s/%s: %s", stage, spec.name, "ran" if ran else "cached")
                new += int(ran)
                fa.record_run(run_dir, ran, self.write_report, f"hidden failures: compare {stage}/{spec.name}",
                              commit_repo)  # fmt: skip
        return failed

    def dry_run(self) -> int:
        total = cached = 0
        for stage, folder, specs, sources in self.stages():
            for spec in specs:
                action = runcache.decide(spec, folder, self.work / stage, sources)[0]
                total, cached = total + 1, cached + (action == "cached")
                print(f"    {stage:<24} {spec.name:<28} {action}")
        point, _ = self.jtt_choice()
        if point is None:
            print(f"    runs: + {len(self.plan.seeds)} jtt runs once JTT's grid is done")
        print(f"compare {self.setting.name} ({self.choice.how}): {cached} of {total} runs cached.")
        return 0

    # -- the report ----------------------------------------------------------------------------------------------
    def collect(self) -> dict[str, Any]:
        """Everything the report needs, from the finished runs."""
        point, points = self.jtt_choice()
        placebo = placebo_setting(self.setting, self.plan)
        return {
            "setting": self.setting.info(),
            "choice": {
                "how": self.choice.how,
                "status": self.choice.status,
                "underpowered": list(self.choice.underpowered),
            },  # fmt: skip
            "placebo": placebo.info(),
            "placebo_runs": finished(placebo.specs, self.folder / "placebo"),
            "jtt_points": points,
            "jtt_chosen": point,
            "train_minority_ids": self.train_minority_ids(),
            "runs": finished(comparison_specs(self.setting, point, self.plan), self.folder / "runs"),
            "planned": len(comparison_specs(self.setting, self.plan.jtt_grid[0], self.plan)),
        }

    def write_report(self) -> list[Path]:
        collected = self.collect()
        report = hft.build_report(collected)
        report["carry3d"] = hft.carry3d_summary(self.folder.parent)
        diagnosed = {v: [r for r in collected["runs"] if r["variant"] == v] for v in DIAGNOSED}
        return hft.write_report(report, self.folder.parent, {v: r for v, r in diagnosed.items() if r})

    def train_minority_ids(self) -> list[str]:
        """The training cases of the chosen cohort whose ``subtype`` is the minority (JTT's error-set precision)."""
        datalist = runcache.ensure_cohort(self.setting.cohort, self.data) / "datalist.json"
        items = json.loads(datalist.read_text())["training"]
        return sorted(str(it["id"]) for it in items if stats.is_minority(it.get("subtype")))


def main(args, out: Path, work: Path) -> int:
    """``--part compare`` of ``bench/hidden_failures.py``."""
    if args.bench == "smoke":
        choice, plan = Choice(hf.smoke_setting(), "the smoke bench's one setting", "smoke", ()), SMOKE
    else:
        settings, plan = hf.plan("full"), FULL
        try:
            choice = choose(hf.calibration(settings, out), settings, args.setting)
        except ValueError as exc:
            print(f"hidden_failures --part compare: {exc}")
            return 2
    comparison = Comparison(choice, out, work, plan)
    variants = tuple(args.variants) if args.variants else None
    unknown = sorted(set(variants or ()) - set(plan.backbone + plan.dmoe + plan.placebo_variants))
    if unknown:
        print(f"hidden_failures --part compare: unknown variant(s) {unknown}; the comparison's: "
              f"{list(plan.backbone + plan.dmoe)}")  # fmt: skip
        return 2
    if args.dry_run:
        return comparison.dry_run()
    repo = fa.git_toplevel(out) if args.commit else None
    failed = [] if args.report_only else comparison.run(args.max_runs, repo, variants)
    files = comparison.write_report()
    if repo is not None and args.report_only:
        fa.git_commit_paths(files, f"hidden failures: compare {choice.setting.name} report", repo, attempts=10)
    print(files[0].read_text())
    print(json.dumps({"failed": failed}) if failed else "")
    return 1 if failed else 0
