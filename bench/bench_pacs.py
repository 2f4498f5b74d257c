"""Load and fault benchmark of the DICOM node against a real PACS (Orthanc), printed as tables.

1. **Load, cold and warm**: N synthetic CT series (default 10) are uploaded to Orthanc, then Orthanc sends all of
   them to the node at once (N store jobs, ``ConcurrentJobs`` = N); done twice on the same machine with N other
   series, first with the node started with ``--cold`` (inference workflow built for every series), then warm
   (the default: built once per process). Per series: time from the last instance acknowledged (the store job
   done) to the RTSTRUCT stored in Orthanc (first seen by polling every 0.2 s), and the node's own inference time
   (``timings.inference_seconds`` of its ``result.json``: workflow build or reuse, inference, writing); every
   RTSTRUCT must arrive and reference its own series and only its slices (none mixed).
2. **Kill while queued**: 3 series sent (every instance acknowledged), the node killed with SIGKILL during the
   quiet time (nothing processed yet), restarted: all 3 RTSTRUCTs must arrive.
3. **Kill while processing**: the same, killed one second after the first series' inference started.

The latency includes the node's ``quiet_seconds`` (the series-complete timer) and the wait behind the series
queued before it, which is printed with the table. Run: ``make bench-pacs`` (or ``python bench/bench_pacs.py
--series 10 --quiet 2``). JSON: ``load`` is the warm run (the node's default), ``load_cold`` the cold one. Exit
status 1 if any result is missing or mixed, or the workflow was not built N times cold and once warm.

The node's ``limits.max_associations`` and ``max_associations_per_host`` are raised to N where lower (``node_limits``
in the JSON): the N store jobs are N associations from one host, and over a limit the node refuses an association
(A-ASSOCIATE-RJ), which Orthanc does not retry.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bundle"))
sys.path.insert(0, str(REPO / "tools"))

from checklib import free_port, log  # noqa: E402
from pacs import ORTHANC_AET, NodeProcess, Orthanc, ct_files, node_settings, references_only_series  # noqa: E402
from scripts import synthetic  # noqa: E402
from scripts.dicom_series import read_series_info  # noqa: E402


def rtstruct_ok(pacs: Orthanc, study_id: str, info) -> bool | None:
    """None while no RTSTRUCT is in the study; else whether it is one and references exactly this series' slices."""
    found = pacs.series_in_study(study_id, "RTSTRUCT")
    if not found:
        return None
    instances = [i for s in found for i in s["Instances"]]
    rs = pydicom.dcmread(io.BytesIO(pacs.instance_file(instances[0])))
    return len(instances) == 1 and references_only_series(rs, info)


def wait_for_rtstructs(pacs: Orthanc, uploaded: list, rows: list[dict], deadline: float) -> None:
    """Poll every 0.2 s until every series' RTSTRUCT is in Orthanc, noting when each was first seen and whether it
    is ok, and (rows with a store ``job``) when Orthanc's store job finished, i.e. every instance was acknowledged."""
    while time.time() < deadline and any(r["stored"] is None for r in rows):
        now = time.time()
        for row, (_, _, study_id, info) in zip(rows, uploaded, strict=True):
            if row.get("job") and row["acked"] is None and pacs.job(row["job"])["State"] == "Success":
                row["acked"] = now
            if row["stored"] is None and (ok := rtstruct_ok(pacs, study_id, info)) is not None:
                row["stored"], row["ok"] = now, ok
        time.sleep(0.2)


def run_load(pacs: Orthanc, uploaded: list, timeout: float) -> list[dict]:
    rows = [{"case": item["id"], "job": pacs.send_to_node(series_id), "acked": None, "stored": None, "ok": None}
            for item, series_id, _, _ in uploaded]  # fmt: skip
    wait_for_rtstructs(pacs, uploaded, rows, time.time() + timeout)
    return rows


def seconds_stats(values: list[float]) -> dict[str, float] | None:
    """Median, 90th percentile and maximum of per-series seconds (None when there are none)."""
    if not values:
        return None
    return {"median": float(np.median(values)), "p90": float(np.percentile(values, 90)), "max": float(max(values))}


def burst_limits(n: int) -> dict[str, int]:
    """The node's association limits (total and per host) from ``deploy/dicom_node.json``, raised to ``n`` where
    lower, so that ``n`` associations from one host at once are all accepted."""
    defaults = json.loads((REPO / "deploy" / "dicom_node.json").read_text())["limits"]
    return {key: max(n, int(defaults[key])) for key in ("max_associations", "max_associations_per_host")}


def node_timings(node: NodeProcess, uploaded: list) -> list[dict]:
    """The node's ``timings`` of each series it finished (its result.json), in the order it finished them."""
    results = Path(node.overrides["work_dir"]) / "results"
    paths = [results / info.series_instance_uid / "result.json" for *_, info in uploaded]
    timings = [json.loads(p.read_text())["timings"] for p in paths if p.is_file()]
    return sorted(timings, key=lambda t: t["finished_at"])


def inference_stats(timings: list[dict]) -> dict | None:
    """Per-series inference seconds: all series, the first (process warm-up, and the warm build), the others; and
    how many series built the inference workflow."""
    seconds = [t["inference_seconds"] for t in timings]
    if not seconds:
        return None
    return {
        **seconds_stats(seconds),
        "first": seconds[0],
        "after_first": seconds_stats(seconds[1:]),
        "workflow_builds": sum(bool(t.get("workflow_built")) for t in timings),
    }


def load_mode(pacs: Orthanc, node: NodeProcess, uploaded: list, cold: bool, timeout: float) -> dict:
    """One load run with a freshly started node, ``--cold`` or warm; the node is stopped afterwards."""
    node.args = ["--cold"] if cold else []
    node.start()
    try:
        rows = run_load(pacs, uploaded, timeout)
    finally:
        node.stop()
    lat = [r["stored"] - r["acked"] for r in rows if r["stored"] and r["acked"]]
    return {
        "mode": "cold" if cold else "warm",
        "series": len(uploaded),
        "arrived": sum(r["stored"] is not None for r in rows),
        "mixed": sum(r["ok"] is False for r in rows),
        "latency_s": seconds_stats(lat),
        "inference_s": inference_stats(node_timings(node, uploaded)),
    }


def _cell(stats: dict | None, key: str) -> str:
    return f"{stats[key]:.3f} s" if stats and key in stats else "n/a"


def print_load(cold: dict, warm: dict, quiet: float) -> None:
    print(f"\n| load: {warm['series']} series sent at once | cold (--cold) | warm (default) |\n|---|---|---|")
    print(f"| RTSTRUCTs arrived | {cold['arrived']} / {cold['series']} | {warm['arrived']} / {warm['series']} |")
    print(f"| mixed (wrong series or slices) | {cold['mixed']} | {warm['mixed']} |")
    for key in ("median", "p90", "max"):
        print(f"| last instance acked -> RTSTRUCT stored, {key} | {_cell(cold['latency_s'], key)} "
              f"| {_cell(warm['latency_s'], key)} |")  # fmt: skip
    c_inf, w_inf = cold["inference_s"] or {}, warm["inference_s"] or {}
    for key in ("median", "p90", "max", "first"):
        print(f"| node inference per series, {key} | {_cell(c_inf, key)} | {_cell(w_inf, key)} |")
    for key in ("median", "p90"):
        print(f"| node inference per series after the first, {key} | {_cell(c_inf.get('after_first'), key)} "
              f"| {_cell(w_inf.get('after_first'), key)} |")  # fmt: skip
    print(f"| series that built the inference workflow | {c_inf.get('workflow_builds')} "
          f"| {w_inf.get('workflow_builds')} |")  # fmt: skip
    print(f"| quiet_seconds (in the latency) | {quiet:.0f} s | {quiet:.0f} s |\n")


def cpu_model() -> str:
    """The CPU's model name (Linux), else the platform's processor string."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def run_kill(pacs: Orthanc, node: NodeProcess, uploaded: list, while_processing: bool, timeout: float) -> dict:
    for _, series_id, _, _ in uploaded:
        pacs.send_to_node(series_id, synchronous=True)  # returns when every instance is acknowledged
    if while_processing:
        deadline = time.time() + 120
        state = Path(node.overrides["work_dir"]) / "processing"
        while time.time() < deadline and not (state.is_dir() and any(state.iterdir())):
            time.sleep(0.05)
        time.sleep(1.0)
    node.kill()
    killed = time.time()
    node.start()
    restarted = time.time()
    rows = [{"stored": None, "ok": None} for _ in uploaded]
    wait_for_rtstructs(pacs, uploaded, rows, killed + timeout)
    arrived = [r["stored"] for r in rows if r["stored"] is not None]
    return {
        "sent": len(uploaded),
        "arrived": len(arrived),
        "correct": sum(bool(r["ok"]) for r in rows),
        "restart_s": restarted - killed,
        "all_after_restart_s": (max(arrived) - restarted) if arrived else float("nan"),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--series", type=int, default=10, help="series sent at once in each load run (cold, warm)")
    ap.add_argument("--quiet", type=float, default=2.0, help="the node's quiet_seconds")
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = ap.parse_args()
    if args.series < 1:
        ap.error(f"--series must be at least 1, got {args.series}")
    work = Path(tempfile.mkdtemp(prefix="fairdro_bench_pacs_"))
    n = args.series
    datalist = synthetic.generate_cohort(work / "cohort", n_cases=2 * n + 6, seed=9, shape=(64, 64, 32), dicom=True)
    items = [it for part in ("training", "validation", "testing") for it in datalist[part]]
    table = work / "subgroups.json"
    table.write_text(json.dumps({it["id"]: it["stage"] for it in items}))
    node_port = free_port()
    limits = burst_limits(n)
    node = NodeProcess(work / "node", node_settings(work / "node", node_port, table, args.quiet, limits=limits))
    results: dict = {
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
        "cpu": f"{cpu_model()}, {os.cpu_count()} cores",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": f"python bench/bench_pacs.py --series {n} --quiet {args.quiet:g}",
        "quiet_s": args.quiet,
        "node_limits": limits,
    }
    failed = False
    with Orthanc(work / "orthanc", node_port, concurrent_jobs=n) as pacs:
        node.overrides["destinations"] = [{"ae_title": ORTHANC_AET, "host": "127.0.0.1", "port": pacs.dicom_port}]
        uploaded = []
        for item in items:
            series_dir = work / "cohort" / item["dicom_dir"]
            series_id = pacs.upload(ct_files(series_dir))
            uploaded.append((item, series_id, pacs.study_of(series_id), read_series_info(series_dir)))
        log(f"{len(uploaded)} series in Orthanc; load test with {n} at once, cold then warm")
        cold = load_mode(pacs, node, uploaded[:n], True, args.timeout)
        warm = load_mode(pacs, node, uploaded[n : 2 * n], False, args.timeout)
        results["load"], results["load_cold"] = warm, cold
        failed |= any(r["arrived"] != n or r["mixed"] > 0 for r in (cold, warm))
        builds = [(r["inference_s"] or {}).get("workflow_builds") for r in (cold, warm)]
        if builds != [n, 1]:
            print(f"FAILED: expected {n} workflow builds cold and 1 warm, got {builds}")
            failed = True
        print_load(cold, warm, args.quiet)

        print("| SIGKILL test (warm) | sent | arrived | correct | restart (s) | all delivered after restart (s) |")
        print("|---|---|---|---|---|---|")
        for name, while_processing, batch in (
            ("while 3 series queued", False, uploaded[2 * n : 2 * n + 3]),
            ("1 s into processing", True, uploaded[2 * n + 3 : 2 * n + 6]),
        ):
            node.overrides["quiet_seconds"] = max(args.quiet, 10.0) if not while_processing else args.quiet
            node.stop()
            node.start()
            res = run_kill(pacs, node, batch, while_processing, args.timeout)
            results[f"kill {name}"] = res
            failed |= res["arrived"] != res["sent"] or res["correct"] != res["sent"]
            print(f"| killed {name} | {res['sent']} | {res['arrived']} | {res['correct']} | {res['restart_s']:.1f} "
                  f"| {res['all_after_restart_s']:.1f} |")  # fmt: skip
        node.stop()
    print(f"\nmachine: {results['machine']}; {results['cpu']}; {results['date']}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))
    if failed:
        print(f"FAILED: a result is missing or mixed; logs in {work}")
        return 1
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
