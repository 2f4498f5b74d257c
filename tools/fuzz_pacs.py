"""Fuzz the DICOM node with malformed associations and data sets, on loopback (``make fuzz-pacs``).

The node runs as its own process (``python -m dicom_node``, tools/pacs.py ``NodeProcess``) and sends its results
(RTSTRUCT and SEG) to a stand-in PACS in this process. Then:

1. a first valid series (warm-up: the inference workflow is built) is sent and delivered; the node's open file
   descriptors, resident memory and threads are read from ``/proc``;
2. ``--count`` malformed sessions (default 2000) are sent one after another from 127.0.0.2 by a raw client
   (tools/fuzz_pdus.py), each a valid C-STORE or C-ECHO session changed by one mutator (tools/fuzz_mutators.py,
   drawn in turn, seeded by ``--seed`` and the case number); meanwhile a second sender (pynetdicom, 127.0.0.1)
   sends ``--valid`` - 1 more valid series, spread over the run. Sending stops after ``--count`` cases or
   ``--max-seconds``, whichever comes first;
3. the run waits until every valid series is delivered and the node is idle, reads ``/proc`` again, and checks
   what is left in the node's work folder.

Written as JSON (``--out``; ``--quick``: the seeded CI subset, 300 cases and 2 valid series, into the work
folder), then checked by tools/fuzz_pacs_check.py: exit status 1 and one line per violation. Every delivered SEG
and RTSTRUCT must match the bundle's own result for that series (``monai.bundle run inference`` with
``inference_dicom.json``, run once per distinct series here): Dice 1.000. ``cases.jsonl`` in the work folder
lists every case (``tools/fuzz_mutators.make_case(seed, index, ...)`` rebuilds one).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import pydicom
from pynetdicom import AE, AllStoragePresentationContexts, evt

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bundle"))
sys.path.insert(0, str(REPO / "tools"))

from checklib import bundle_dicom_inference, dice, free_port, log  # noqa: E402
from fuzz_mutators import MUTATIONS, make_case  # noqa: E402
from fuzz_pacs_check import check  # noqa: E402
from fuzz_pdus import play  # noqa: E402
from pacs import NODE_AET, NodeProcess, ct_files, node_settings, references_only_series, restamp  # noqa: E402
from scripts import synthetic  # noqa: E402
from scripts.dicom_seg import read_seg  # noqa: E402
from scripts.dicom_series import read_series_info  # noqa: E402
from scripts.rtstruct import rasterise_roi  # noqa: E402

VALID_AET, FUZZ_AET, FUZZ_SOURCE = "VALIDSCU", "FUZZSCU", "127.0.0.2"
SHAPE = (48, 48, 24)
QUIET_SECONDS, HOUSEKEEPING_SECONDS = 1.0, 5.0
FAILED_CAP = {"max_failed_series": 25, "max_failed_bytes": 32 << 20}  # small, so that the cap is exercised
DEFAULT_OUT = REPO / "bench" / "results" / "pacs" / "fuzz_pacs.json"
NOTE = ("shared machine: 2 CPU cores used at the same time by other jobs, so per-case times are noisy; the node "
        "runs its inference on CPU")  # fmt: skip


class StandInPacs:
    """The node's destination: a storage SCP on loopback keeping every RTSTRUCT and SEG, by referenced series."""

    def __init__(self, folder: Path):
        self.folder, self._lock = folder, threading.Lock()
        self.received: dict[str, dict[str, Path]] = defaultdict(dict)  # series -> {"RTSTRUCT"|"SEG": file}
        ae = AE("PACS")
        ae.supported_contexts = AllStoragePresentationContexts
        self.server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)])
        self.port = self.server.server_address[1]

    def _store(self, event: evt.Event) -> int:
        ds = event.dataset
        if ds.Modality == "RTSTRUCT":
            frame = ds.ReferencedFrameOfReferenceSequence[0]
            series = frame.RTReferencedStudySequence[0].RTReferencedSeriesSequence[0].SeriesInstanceUID
        else:
            series = ds.ReferencedSeriesSequence[0].SeriesInstanceUID
        path = self.folder / str(series) / f"{ds.Modality}.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(event.encoded_dataset(include_meta=True))
        with self._lock:
            self.received[str(series)][str(ds.Modality)] = path
        return 0x0000

    def delivered(self, series: str) -> dict[str, Path]:
        with self._lock:
            return dict(self.received.get(series, {}))

    def stop(self) -> None:
        self.server.shutdown()


class ValidSender(threading.Thread):
    """The second sender: new copies of a few CT series (fresh UIDs) sent with pynetdicom from 127.0.0.1, each in one
    association, retried up to 3 times (5 s apart) as a PACS would; ``sent`` holds those acknowledged in full."""

    def __init__(self, port: int, bases: list[dict], folder: Path):
        super().__init__(daemon=True, name="valid-sender")
        self.port, self.bases, self.folder = port, bases, folder
        self.todo: list[int] = []
        self.wake, self.stop_event, self._lock = threading.Event(), threading.Event(), threading.Lock()
        self._busy = False
        self.attempted, self.attempts = 0, 0
        self.sent: list[dict] = []  # {"series", "base", "dir", "acked_at"}

    def request(self, number: int) -> None:
        with self._lock:
            self.todo.append(number)
        self.wake.set()

    def idle(self) -> bool:
        """Nothing asked for is waiting or being sent."""
        with self._lock:
            return not self.todo and not self._busy

    def run(self) -> None:
        while not self.stop_event.is_set():
            if not self.wake.wait(0.2):
                continue
            with self._lock:
                numbers, self.todo, self._busy = self.todo, [], True
                self.wake.clear()
            for number in numbers:
                self._send_series(number)
            with self._lock:
                self._busy = False

    def _send_series(self, number: int) -> None:
        base = self.bases[number % len(self.bases)]
        folder = self.folder / f"valid_{number:03d}"
        datasets = renamed_copy(base["files"], folder)
        self.attempted += 1
        for attempt in range(3):
            self.attempts += 1
            if self._store(datasets):
                self.sent.append({"series": str(datasets[0].SeriesInstanceUID), "base": base["id"], "dir": folder,
                                  "acked_at": time.monotonic()})  # fmt: skip
                return
            log(f"valid series {number}: attempt {attempt + 1} not acknowledged in full; retried in 5 s")
            time.sleep(5)

    def _store(self, datasets: list[pydicom.Dataset]) -> bool:
        ae = AE(VALID_AET)
        ae.add_requested_context(str(datasets[0].SOPClassUID))
        assoc = ae.associate("127.0.0.1", self.port, ae_title=NODE_AET)
        if not assoc.is_established:
            return False
        try:
            statuses = [getattr(assoc.send_c_store(ds), "Status", None) for ds in datasets]
        finally:
            assoc.release()
        return statuses == [0] * len(datasets)


def renamed_copy(files: list[Path], folder: Path) -> list[pydicom.Dataset]:
    """The series with new study, series, frame of reference and SOP instance UIDs, also written to ``folder``."""
    folder.mkdir(parents=True)
    out = restamp([pydicom.dcmread(path) for path in files])
    for path, ds in zip(files, out):
        ds.save_as(folder / path.name)
    return out


# ------------------------------------------------------------------------------------------------ the node


def proc_usage(pid: int) -> dict[str, float]:
    """Open file descriptors, resident memory (MiB) and threads of a process, from /proc."""
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
        "rss_mib": int(status["VmRSS"].split()[0]) / 1024,
        "threads": int(status["Threads"]),
    }


def metrics(node: NodeProcess) -> dict[str, float]:
    """Every sample of the node's ``/metrics`` (``name{labels}`` -> value)."""
    health = node.overrides["health"]
    with urllib.request.urlopen(f"http://127.0.0.1:{health['port']}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line[:1] != "#"}


def live(node: NodeProcess) -> bool:
    """The process runs and ``/livez`` says every node thread is alive."""
    if node.proc is None or node.proc.poll() is not None:
        return False
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{node.overrides['health']['port']}/livez", timeout=10) as r:
            return r.status == 200
    except OSError:
        return False


def settled_usage(node: NodeProcess, timeout: float = 60.0) -> dict[str, float]:
    """``proc_usage`` once no connection is pending or open at the node (median of 3 reads, 0.5 s apart)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = metrics(node)
        if m.get("fairdro_node_pending_connections", 1) == 0 and m.get("fairdro_node_active_associations", 1) == 0:
            break
        time.sleep(0.2)
    reads = []
    for _ in range(3):
        reads.append(proc_usage(node.proc.pid))
        time.sleep(0.5)
    return {key: sorted(r[key] for r in reads)[1] for key in reads[0]}


def node_overrides(work: Path, port: int, table: Path, pacs_port: int) -> dict[str, Any]:
    """The node's settings: both senders allowed, the stand-in PACS as destination, SEG sent, small failed/ cap,
    housekeeping (the failed/ cap) every few seconds."""
    base = json.loads((REPO / "deploy" / "dicom_node.json").read_text())
    limits = {**base["limits"], **FAILED_CAP}
    return node_settings(
        work, port, table, QUIET_SECONDS, allowed_calling_aets=[VALID_AET, FUZZ_AET], send_seg=True,
        destinations=[{"ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port}], min_free_bytes=256 << 20,
        health={"enabled": True, "bind_address": "127.0.0.1", "port": free_port()}, limits=limits,
        node={**base["node"], "housekeeping_seconds": HOUSEKEEPING_SECONDS},
    )  # fmt: skip


def unhandled_in_log(text: str) -> int:
    """Lines of the node's log that report an exception reaching ``threading.excepthook`` or ``sys.excepthook``:
    the node's own hook line, or Python's default output should the hook be missing."""
    markers = ("Unhandled exception", "Exception in thread ", "Exception ignored in thread")
    return sum(1 for line in text.splitlines() if any(m in line for m in markers))


# ------------------------------------------------------------------------------------------------ the run


class Fuzz:
    """One run: cohort, stand-in PACS, node, warm-up, the cases with valid series interleaved, the final state."""

    def __init__(self, args: argparse.Namespace, work: Path):
        self.args, self.work = args, work
        self.by_mutation: Counter = Counter()
        self.outcomes: dict[str, Counter] = defaultdict(Counter)
        self.stored_malformed: list[int] = []
        self.kept_open = 0
        self.crash: dict[str, Any] | None = None
        self.malformed_series: set[str] = set()

    def prepare(self) -> None:
        datalist = synthetic.generate_cohort(self.work / "cohort", n_cases=4, seed=self.args.seed, shape=SHAPE,
                                             dicom=True)  # fmt: skip
        items = [it for part in ("testing", "validation", "training") for it in datalist[part]]
        firsts = [next(it for it in items if it["stage"] == s) for s in dict.fromkeys(it["stage"] for it in items)]
        chosen = firsts[: 1 if self.args.quick else 2]
        self.bases = [{"id": it["id"], "stage": it["stage"], "dir": self.work / "cohort" / it["dicom_dir"],
                       "files": ct_files(self.work / "cohort" / it["dicom_dir"])} for it in chosen]  # fmt: skip
        self.template = pydicom.dcmread(self.bases[0]["files"][len(self.bases[0]["files"]) // 2])
        table = self.work / "subgroups.json"
        table.write_text(json.dumps({it["id"]: it["stage"] for it in items}))  # PatientID = case id
        self.pacs = StandInPacs(self.work / "delivered")
        self.port = free_port()
        self.node = NodeProcess(
            self.work / "node", node_overrides(self.work / "node", self.port, table, self.pacs.port)
        )
        self.sender = ValidSender(self.port, self.bases, self.work / "valid")
        self.own: dict[str, dict[str, Any]] = {}
        self.own_thread = threading.Thread(target=self._bundle_results, daemon=True, name="bundle-own")

    def _bundle_results(self) -> None:
        """The bundle's own result for each distinct base series (independent of the node); a failure is logged and
        leaves that base without a result (its series then have no Dice, a violation)."""
        for base in self.bases:
            out = self.work / "bundle" / base["id"]
            try:
                mask = bundle_dicom_inference(base["dir"], out, base["stage"])
                (rs,) = out.glob("RS_*.dcm")
                self.own[base["id"]] = {"mask": mask, "rtstruct": pydicom.dcmread(rs)}
            except Exception as err:  # noqa: BLE001 (reported; the checker fails the missing Dice)
                log(f"the bundle's own inference of {base['id']} failed: {type(err).__name__}: {err}")

    def warm_up(self) -> dict[str, float]:
        """The first valid series, delivered; returns the node's usage afterwards (the 'before' figures)."""
        self.sender.start()
        self.sender.request(0)
        if not self.wait_delivered(1, 300):
            raise RuntimeError(f"the warm-up series was not delivered; node log: {self.node.log_path}")
        self.wait_idle(120)
        return settled_usage(self.node)

    def wait_delivered(self, count: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.node.proc.poll() is None:
            if len(self.sender.sent) >= count and all(self._delivered(s) for s in self.sender.sent[:count]):
                return True
            time.sleep(0.5)
        return False

    def _delivered(self, sent: dict) -> bool:
        return set(self.pacs.delivered(sent["series"])) >= {"RTSTRUCT", "SEG"}

    def wait_idle(self, timeout: float) -> bool:
        """No series in spool/ or processing/ and nothing waiting for delivery (``/metrics``)."""
        keys = ("receiving_series", "queue_length", "pending_deliveries")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.node.proc.poll() is None:
            m = metrics(self.node)
            busy = any(m.get(f"fairdro_node_{k}", 1) for k in keys) or self._folder_entries("processing")
            if not busy and self.sender.idle():
                return True
            time.sleep(0.5)
        return False

    def _folder_entries(self, name: str) -> list[str]:
        folder = Path(self.node.overrides["work_dir"]) / name
        return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []

    def run_cases(self) -> float:
        """Send the malformed cases, asking for a valid series at evenly spaced cases; returns the seconds taken."""
        args, started = self.args, time.monotonic()
        interleave = {round((k + 1) * args.count / args.valid): k + 1 for k in range(args.valid - 1)}
        with open(self.work / "cases.jsonl", "w") as cases:
            for index in range(args.count):
                if time.monotonic() - started > args.max_seconds or not self._alive(index):
                    break
                if index in interleave:
                    self.sender.request(interleave[index])
                record = self.one_case(index)
                cases.write(json.dumps(record) + "\n")
                if index % 250 == 0:
                    log(f"case {index}: {record['mutation']}: {record['variant']} -> {record['end']}")
        return time.monotonic() - started

    def _alive(self, index: int) -> bool:
        """The node process runs (checked before every case) and its threads too (every 50 cases)."""
        if self.node.proc.poll() is not None:
            self.crash = {"case": index - 1, "what": f"node exited with {self.node.proc.returncode}"}
        elif index % 50 == 0 and not live(self.node):
            self.crash = {"case": index - 1, "what": "/livez: a node thread is dead"}
        return self.crash is None

    def one_case(self, index: int) -> dict[str, Any]:
        name, variant, series, steps = make_case(self.args.seed, index, self.template, NODE_AET, FUZZ_AET)
        outcome, closed = play(("127.0.0.1", self.port), steps, FUZZ_SOURCE, timeout=3.0, close_wait=10.0)
        self.by_mutation[name] += 1
        self.malformed_series.add(series)
        stored = 0x0000 in outcome.statuses
        self.outcomes[name][outcome.end] += 1
        self.outcomes[name]["stored (0x0000)"] += stored
        self.kept_open += not closed
        if stored:
            self.stored_malformed.append(index)
        return {"case": index, "mutation": name, "variant": variant, "series": series, "client_port": outcome.port,
                "end": outcome.end, "statuses": outcome.statuses, "closed_by_node": closed}  # fmt: skip

    def observe_end(self, before: dict[str, float]) -> dict[str, Any]:
        """After the cases: wait for the valid series and an idle node, one more housekeeping pass (the failed/ cap),
        then read the node's usage, liveness, metrics, log and work folder."""
        deadline = time.monotonic() + 300
        while not self.sender.idle() and time.monotonic() < deadline:  # a valid series still being sent
            time.sleep(0.2)
        settled = self.crash is None and self.wait_delivered(len(self.sender.sent), self.args.deliver_timeout)
        settled = settled and self.wait_idle(120)
        time.sleep(HOUSEKEEPING_SECONDS + 1)
        running = self.node.proc.poll() is None
        alive = live(self.node)
        return {
            "settled": settled,
            "before": before,
            "after": settled_usage(self.node) if running else None,
            "alive": alive,
            "metrics": metrics(self.node) if alive else {},
            "log": self.node.log_text(),
            **self.final_state(),
        }

    def final_state(self) -> dict[str, Any]:
        """What the node's work folder holds once idle: spool/processing, results/ and failed/ against the cap."""
        root = Path(self.node.overrides["work_dir"])
        valid = {s["series"] for s in self.sender.sent}
        failed = [p for p in (root / "failed").iterdir() if p.is_dir() and not p.name.startswith(".")]
        failed_bytes = sum(f.stat().st_size for p in failed for f in p.rglob("*") if f.is_file())
        return {
            "spool_left": self._folder_entries("spool") + self._folder_entries("processing"),
            "results_not_valid": sorted(p.name for p in (root / "results").iterdir() if p.name not in valid),
            "malformed_in_results": sorted(self.malformed_series & {p.name for p in (root / "results").iterdir()}),
            "failed": {
                "series": len(failed),
                "bytes": failed_bytes,
                "max_series": FAILED_CAP["max_failed_series"],
                "max_bytes": FAILED_CAP["max_failed_bytes"],
            },  # fmt: skip
        }

    def dice_of_deliveries(self) -> list[dict[str, Any]]:
        """Per delivered valid series: Dice of the delivered SEG and RTSTRUCT against the bundle's own result."""
        self.own_thread.join()
        rows = []
        for sent in self.sender.sent:
            files = self.pacs.delivered(sent["series"])
            delivered = {"RTSTRUCT", "SEG"} <= set(files)
            row = {
                "series": sent["series"],
                "base": sent["base"],
                "delivered": delivered,
                "seg": None,
                "rtstruct": None,
            }
            if delivered and sent["base"] in self.own:
                info, own = read_series_info(sent["dir"]), self.own[sent["base"]]
                base_info = read_series_info(next(b["dir"] for b in self.bases if b["id"] == sent["base"]))
                rs = pydicom.dcmread(files["RTSTRUCT"])
                row["references_only_its_slices"] = references_only_series(rs, info)
                row["seg"] = round(dice(read_seg(files["SEG"], info), own["mask"]), 4)
                own_rs = rasterise_roi(own["rtstruct"], base_info, names=["CTV"])
                row["rtstruct"] = round(dice(rasterise_roi(rs, info, names=["CTV"]), own_rs), 4)
                row["mask_voxels"] = int(own["mask"].sum())
            rows.append(row)
        return rows


def machine() -> dict[str, str]:
    cpu = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs ({cpu}), Python {platform.python_version()}",
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}  # fmt: skip


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """The whole run (see the module docstring); returns the result JSON."""
    fuzz, t0 = Fuzz(args, work), time.monotonic()
    fuzz.prepare()
    try:
        fuzz.node.start()
        log(f"node on 127.0.0.1:{fuzz.port} (log {fuzz.node.log_path}); stand-in PACS on {fuzz.pacs.port}")
        before = fuzz.warm_up()
        fuzz.own_thread.start()  # after the warm-up: it would take the CPU from the node's first inference
        log(f"warm-up series delivered; node before: {before}")
        fuzz_seconds = fuzz.run_cases()
        log(f"{sum(fuzz.by_mutation.values())} cases sent in {fuzz_seconds:.0f} s; waiting for the valid series")
        observed = fuzz.observe_end(before)
    finally:
        fuzz.sender.stop_event.set()
        fuzz.node.stop()
        fuzz.pacs.stop()
    observed["seconds"] = {"fuzz": round(fuzz_seconds, 1), "total": round(time.monotonic() - t0, 1)}
    return report(args, fuzz, observed)


def report(args: argparse.Namespace, fuzz: Fuzz, observed: dict[str, Any]) -> dict[str, Any]:
    """The result JSON from the run's counts and what ``Fuzz.observe_end`` saw."""
    dice_rows = fuzz.dice_of_deliveries()
    node_metrics, before, after = observed["metrics"], observed["before"], observed["after"]
    crashes = int(fuzz.crash is not None) + int(fuzz.crash is None and not observed["alive"])
    unhandled = max(unhandled_in_log(observed["log"]), int(node_metrics.get("fairdro_node_unhandled_exceptions", 0)))
    refusals = {
        k.split('"')[1]: int(v) for k, v in node_metrics.items() if k.startswith("fairdro_node_refusals_total{")
    }
    growth = lambda key: None if after is None else round(after[key] - before[key], 1)  # noqa: E731
    return {
        **machine(),
        "seed": args.seed,
        "command": "python tools/fuzz_pacs.py " + shlex.join(sys.argv[1:]),
        "notes": NOTE,
        "quick": args.quick,
        "requested": {"count": args.count, "valid": args.valid, "max_seconds": args.max_seconds},
        "malformed": sum(fuzz.by_mutation.values()),
        "by_mutation": dict(sorted(fuzz.by_mutation.items())),
        "mutations_known": sorted(MUTATIONS),
        "outcomes_by_mutation": {k: dict(sorted(v.items())) for k, v in sorted(fuzz.outcomes.items())},
        "cases_with_an_instance_stored": fuzz.stored_malformed,
        "connections_kept_open_by_node": fuzz.kept_open,
        "crashes": crashes,
        "crash": fuzz.crash,
        "unhandled_exceptions": unhandled,
        "valid_series_attempted": fuzz.sender.attempted,
        "valid_series_sent": len(fuzz.sender.sent),
        "valid_series_delivered": sum(r["delivered"] for r in dice_rows),
        "valid_send_attempts": fuzz.sender.attempts,
        "valid_dice": dice_rows,
        "settled": observed["settled"],
        "node_before": before,
        "node_after": after,
        "fd_growth": growth("fds"),
        "rss_growth_mib": growth("rss_mib"),
        "threads_growth": growth("threads"),
        **{k: observed[k] for k in ("spool_left", "results_not_valid", "malformed_in_results", "failed")},
        "refusals": refusals,
        "node_log_error_lines": sum(" ERROR " in line for line in observed["log"].splitlines()),
        "node_log_bytes": len(observed["log"].encode()),
        "seconds": observed["seconds"],
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=2000, help="malformed cases to send (default 2000)")
    ap.add_argument("--valid", type=int, default=8, help="valid series, the warm-up included (default 8, >= 2)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the cases and the synthetic cohort")
    ap.add_argument("--max-seconds", type=float, default=900.0, help="stop sending cases after this long")
    ap.add_argument("--deliver-timeout", type=float, default=600.0, help="seconds to wait for the valid results")
    ap.add_argument("--quick", action="store_true", help="the CI subset: 300 cases, 2 valid series, <= 120 s sending")
    ap.add_argument("--out", type=Path, default=None, help=f"result JSON (default {DEFAULT_OUT}; --quick: work folder)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    args = ap.parse_args(argv)
    if args.quick:
        args.count, args.valid, args.max_seconds = 300, 2, min(args.max_seconds, 120.0)
    if args.valid < 2 or args.count < 1:
        ap.error("--valid must be >= 2 (a warm-up and one sent during the fuzz) and --count >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="fairdro_fuzz_"))
    out = args.out or (work / "fuzz_pacs.json" if args.quick else DEFAULT_OUT)
    log(f"work folder {work}; {args.count} cases, {args.valid} valid series, seed {args.seed}")
    result = run(args, work)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    problems = check(result)
    for line in problems:
        print(f"FAIL {line}", flush=True)
    log(f"{result['malformed']} malformed cases, {result['valid_series_delivered']}/{result['valid_series_sent']} "
        f"valid series delivered, fd growth {result['fd_growth']}, RSS growth {result['rss_growth_mib']} MiB; "
        f"{out}")  # fmt: skip
    if not problems and not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
