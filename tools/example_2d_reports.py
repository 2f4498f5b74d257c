"""Build the example 2D reports of ``bundle/docs/2d.md`` from the test fixtures, with the commands run on real data.

Harvard-FairSeg and HAM10000 cannot be shipped (CC BY-NC-ND 4.0 and CC BY-NC 4.0, both behind a download), so the
example in ``bundle/docs/examples/`` is made from the small stand-ins of ``tests/fixtures_2d.py``, written in each
data set's own format (random pixels, geometric masks): the numbers show what the report contains, not how well the
method does. Each data set goes through prepare -> check-data -> training -> evaluation -> summary -> inference,
the same commands as ``bundle/docs/2d.md`` (*2D benchmarks*), with a short schedule (``--epochs``)::

    python tools/example_2d_reports.py [--out bundle/docs/examples] [--work .bench_work/example_2d] [--epochs 3]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
import fixtures_2d  # noqa: E402

PROFILE = "bundle/configs/profiles/2d.json"
DATASETS = {
    "fairseg": {"prepare": "prepare_fairseg.py", "subgroups": "Asian,Black,White", "key": "race", "classes": 3},
    "ham10000": {"prepare": "prepare_ham10000.py", "subgroups": "0-30,30-60,60+", "key": "age_group", "classes": 2},
}


def commands(name: str, raw: Path, data: Path, run: Path, epochs: int) -> list[list[str]]:
    """The documented command lines for one data set, from its download folder ``raw`` to the report in ``run``."""
    ds, py, overlay = DATASETS[name], sys.executable, f"bundle/configs/profiles/{name}.json"
    train = ["bundle/configs/train.json", PROFILE, overlay]
    evaluate = ["bundle/configs/train.json", "bundle/configs/evaluate.json", PROFILE,
                "bundle/configs/profiles/2d_evaluate.json", overlay]  # fmt: skip
    infer = ["bundle/configs/inference.json", "bundle/configs/profiles/2d_inference.json", overlay]
    where = ["--dataset_dir", str(data), "--output_dir", str(run), "--ckpt_dir", str(run / "models")]
    return [
        [py, f"bundle/scripts/{ds['prepare']}", "--data-dir", str(raw), "--out", str(data / "datalist.json")],
        [
            py,
            "bundle/scripts/check_data.py",
            "--datalist",
            str(data / "datalist.json"),
            "--subgroup-key",
            ds["key"],
            "--subgroups",
            ds["subgroups"],
            "--num-classes",
            str(ds["classes"]),
            "-q",
        ],  # fmt: skip
        [
            py,
            "-m",
            "monai.bundle",
            "run",
            "training",
            "--config_file",
            json.dumps(train),
            *where,
            "--epochs",
            str(epochs),
        ],  # fmt: skip
        [py, "-m", "monai.bundle", "run", "evaluating", "--config_file", json.dumps(evaluate), *where],
        [py, "bundle/scripts/fairness_stats.py", "summary", str(run)],
        [
            py,
            "-m",
            "monai.bundle",
            "run",
            "inference",
            "--config_file",
            json.dumps(infer),
            "--dataset_dir",
            str(data),
            "--output_dir",
            str(run / "inference"),
            "--ckpt_path",
            str(run / "models" / "model.pt"),
        ],  # fmt: skip
    ]


def build(name: str, work: Path, out: Path, epochs: int) -> None:
    raw, data, run = work / name / "download", work / name / "prepared", work / name / "run"
    shutil.rmtree(work / name, ignore_errors=True)
    if name == "fairseg":
        fixtures_2d.write_fairseg(raw, layout="readme", n=60, shape=(64, 80))
    else:
        fixtures_2d.write_ham10000(raw, n_lesions=48, shape=(48, 64))
    printed = []
    for cmd in commands(name, raw, data, run, epochs):
        res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        if res.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{res.stdout[-2000:]}{res.stderr[-2000:]}")
        if "fairness_stats.py" in cmd[1] or "prepare_" in cmd[1]:
            printed.append(res.stdout.strip())
    dest = out / f"{name}_fixture"
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(run / "fairness", dest)  # report.html with its plots and thumbnails, metrics.json, per_case.csv
    note = (f"Built by `python tools/example_2d_reports.py` from the **test fixtures** (`tests/fixtures_2d.py`: random "
            f"pixels and geometric masks in {name}'s own file format), trained for {epochs} epochs. Not real data: "
            "the numbers show what the report holds, not how well the method does.")  # fmt: skip
    (dest / "README.md").write_text(f"# Example report: {name} (fixtures)\n\n{note}\n\n```\n" + "\n\n".join(printed)
                                    + "\n```\n")  # fmt: skip
    print(f"{name}: {dest}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "bundle" / "docs" / "examples")
    parser.add_argument("--work", type=Path, default=REPO / ".bench_work" / "example_2d")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--datasets", nargs="+", choices=sorted(DATASETS), default=sorted(DATASETS))
    args = parser.parse_args(argv)
    for name in args.datasets:
        build(name, args.work, args.out, args.epochs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
