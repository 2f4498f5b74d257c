"""Load and fault benchmark of the DICOM node against a real PACS (Orthanc), printed as tables.

1. **Load**: N synthetic CT series (default 10) are uploaded to Orthanc, then Orthanc sends all of them to the
   node at once (N store jobs, ``ConcurrentJobs`` = N). Per series: time from the last instance acknowledged
   (the store job done) to the RTSTRUCT stored in Orthanc (first seen by polling every 0.2 s); every RTSTRUCT
   must arrive and reference its own series and only its slices (none mixed).
2. **Kill while queued**: 3 series sent (every instance acknowledged), the node killed with SIGKILL during the
   quiet time (nothing processed yet), restarted: all 3 RTSTRUCTs must arrive.
3. **Kill while processing**: the same, killed one second after the first series' inference started.

The latency includes the node's ``quiet_seconds`` (the series-complete timer), which is printed with the table.
Run: ``make bench-pacs`` (or ``python bench/bench_pacs.py --series 10 --quiet 2``). Exit status 1 if any
result is missing or mixed.
"""

from __future__ import annotations

import argparse
import io
import json
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
    ap.add_argument("--series", type=int, default=10, help="series sent at once in the load test")
    ap.add_argument("--quiet", type=float, default=2.0, help="the node's quiet_seconds")
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fairdro_bench_pacs_"))
    n_total = args.series + 6
    datalist = synthetic.generate_cohort(work / "cohort", n_cases=n_total, seed=9, shape=(64, 64, 32), dicom=True)
    items = [it for part in ("training", "validation", "testing") for it in datalist[part]]
    table = work / "subgroups.json"
    table.write_text(json.dumps({it["id"]: it["stage"] for it in items}))
    node_port = free_port()
    node = NodeProcess(work / "node", node_settings(work / "node", node_port, table, args.quiet))
    results: dict = {"machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads", "quiet_s": args.quiet}
    failed = False
    with Orthanc(work / "orthanc", node_port, concurrent_jobs=args.series) as pacs:
        node.overrides["destinations"] = [{"ae_title": ORTHANC_AET, "host": "127.0.0.1", "port": pacs.dicom_port}]
        node.start()
        uploaded = []
        for item in items:
            series_dir = work / "cohort" / item["dicom_dir"]
            series_id = pacs.upload(ct_files(series_dir))
            uploaded.append((item, series_id, pacs.study_of(series_id), read_series_info(series_dir)))
        log(f"{len(uploaded)} series in Orthanc; load test with {args.series} at once")
        rows = run_load(pacs, uploaded[: args.series], args.timeout)
        lat = [r["stored"] - r["acked"] for r in rows if r["stored"] and r["acked"]]
        arrived = sum(r["stored"] is not None for r in rows)
        mixed = sum(r["ok"] is False for r in rows)
        stats = {"median": float(np.median(lat)), "max": float(max(lat))} if lat else None
        results["load"] = {"series": args.series, "arrived": arrived, "mixed": mixed, "latency_s": stats}
        failed |= arrived != args.series or mixed > 0
        print(f"\n| load: {args.series} series sent at once | value |\n|---|---|")
        print(f"| RTSTRUCTs arrived | {arrived} / {args.series} |\n| mixed (wrong series or slices) | {mixed} |")
        if lat:
            print(f"| last instance acked -> RTSTRUCT stored, median | {np.median(lat):.1f} s |")
            print(f"| last instance acked -> RTSTRUCT stored, max | {max(lat):.1f} s |")
        print(f"| quiet_seconds (included above) | {args.quiet:.0f} s |\n")

        print("| SIGKILL test | sent | arrived | correct | restart (s) | all delivered after restart (s) |")
        print("|---|---|---|---|---|---|")
        for name, while_processing, batch in (
            ("while 3 series queued", False, uploaded[args.series : args.series + 3]),
            ("1 s into processing", True, uploaded[args.series + 3 : args.series + 6]),
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
    print(f"\nmachine: {results['machine']}")
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
