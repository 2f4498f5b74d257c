"""Soak of the DICOM node under faults, on loopback, with DICOM TLS on (``make soak-pacs``).

For ``--seconds`` (default 960, at least 900 for a reported run) several senders (threads, each its own calling AE
title and client certificate) send new synthetic CT series to the node over TLS; the node (a separate process,
``python -m dicom_node``, client certificates required) sends each RTSTRUCT over TLS to a stand-in PACS in this
process that records every delivery. Meanwhile, on a schedule drawn from ``--seed``:

* the node is killed with SIGKILL at random moments and restarted at once;
* the destination goes down for a while and comes back on the same port;
* the disk floor is crossed once: ``min_free_bytes`` is set 2 GiB below the free space at start and a 4 GiB file
  is allocated beside the work folder for a while, then deleted.

A sender treats a series as acknowledged only when every instance was answered 0x0000 in one association; a
failed association or any other status (0xA700 below the floor) makes it send the whole series again a little
later, as a PACS does. After the sending time, faults stop and the soak waits until every acknowledged series has
its RTSTRUCT. Written as JSON (``--out``), then checked (``--check FILE`` checks a JSON written earlier): every
acknowledged series delivered and none mixed, at least 900 s, TLS on, at least one kill, one outage and one floor
crossing with 0xA700 answers.

Latency: the sender's clock when the last instance of a series was acknowledged -> this process receiving its
RTSTRUCT (one clock). Peak memory: the largest VmHWM (peak resident set) of any node process, read every second.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import random
import shutil
import ssl
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pydicom
from pynetdicom import AE, AllStoragePresentationContexts, evt

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bundle"))
sys.path.insert(0, str(REPO / "tools"))

from checklib import free_port, log  # noqa: E402
from pacs import NODE_AET, NodeProcess, client_context, node_settings, restamp  # noqa: E402
from scripts import synthetic  # noqa: E402
from scripts.dicom_series import read_series_info  # noqa: E402
from testcerts import make_pki  # noqa: E402

MIN_SECONDS = 900
GIB = 1 << 30


class SeriesFactory:
    """New CT series made from a few synthetic cases: fresh study, series, frame and SOP instance UIDs each time."""

    def __init__(self, root: Path, n_cases: int, seed: int):
        datalist = synthetic.generate_cohort(root, n_cases=n_cases, seed=seed, shape=(48, 48, 24), dicom=True)
        items = [it for part in ("training", "validation", "testing") for it in datalist[part]]
        self.cases = [[pydicom.dcmread(f) for f in read_series_info(root / it["dicom_dir"]).files] for it in items]
        self.stages = {it["id"]: it["stage"] for it in items}
        self._lock, self._next = threading.Lock(), 0

    def new(self) -> list[pydicom.Dataset]:
        with self._lock:
            base, self._next = self.cases[self._next % len(self.cases)], self._next + 1
        return restamp([copy.deepcopy(ds) for ds in base])


class StandInPacs:
    """The destination: a TLS storage SCP (the node's client certificate required) recording every RTSTRUCT."""

    def __init__(self, pki: dict, port: int = 0):
        self.pki, self.port, self.server = pki, port, None
        self.deliveries: list[dict] = []  # {"series", "sop", "refs", "at"}
        self._lock = threading.Lock()

    def up(self) -> None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(self.pki["ca"]["certificate"]))
        context.load_cert_chain(str(self.pki["peer"]["certificate"]), str(self.pki["peer"]["private_key"]))
        context.verify_mode = ssl.CERT_REQUIRED
        ae = AE("PACS")
        ae.supported_contexts = AllStoragePresentationContexts
        handlers = [(evt.EVT_C_STORE, self._store)]
        self.server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=handlers, ssl_context=context)
        self.port = self.server.server_address[1]

    def down(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None

    def _store(self, event) -> int:
        ds = event.dataset
        if ds.get("Modality") == "RTSTRUCT":
            ref = ds.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
            refs = {c.ReferencedSOPInstanceUID for c in ref.get("ContourImageSequence", [])}
            with self._lock:
                self.deliveries.append({"series": ref.SeriesInstanceUID, "sop": str(ds.SOPInstanceUID), "refs": refs,
                                        "at": time.time()})  # fmt: skip
        return 0x0000

    def snapshot(self) -> list[dict]:
        with self._lock:
            return list(self.deliveries)


class Sender(threading.Thread):
    """Sends a new series, waits, sends the next; a series not fully acknowledged is sent again 2 s later."""

    def __init__(self, name: str, port: int, tls_args: tuple, factory: SeriesFactory, stop: threading.Event,
                 rng: random.Random, interval: tuple[float, float]):  # fmt: skip
        super().__init__(name=name, daemon=True)
        self.ae_title, self.port, self.tls_args, self.factory = name, port, tls_args, factory
        self.stop_event, self.rng, self.interval = stop, rng, interval
        self.series: dict[str, dict] = {}  # uid -> {"sops", "attempts", "acked_at"}
        self.counts = {"instances_sent": 0, "instances_acked": 0, "a700": 0, "other_status": 0, "assoc_failed": 0}

    def _send(self, datasets: list) -> bool:
        ae = AE(self.ae_title)
        ae.add_requested_context(str(datasets[0].SOPClassUID))
        assoc = ae.associate("127.0.0.1", self.port, ae_title=NODE_AET, tls_args=self.tls_args)
        if not assoc.is_established:
            self.counts["assoc_failed"] += 1
            return False
        statuses = []
        try:
            for ds in datasets:
                self.counts["instances_sent"] += 1
                status = assoc.send_c_store(ds)
                code = int(getattr(status, "Status", -1)) if status else -1
                statuses.append(code)
                if code != 0:
                    break
        finally:
            if assoc.is_established:
                assoc.release()
        self.counts["instances_acked"] += statuses.count(0)
        self.counts["a700"] += statuses.count(0xA700)
        self.counts["other_status"] += sum(c not in (0, 0xA700) for c in statuses)
        return len(statuses) == len(datasets) and all(c == 0 for c in statuses)

    def run(self) -> None:
        pending = None
        while not self.stop_event.is_set():
            if pending is None:
                pending = self.factory.new()
                uid = str(pending[0].SeriesInstanceUID)
                self.series[uid] = {"sops": {str(ds.SOPInstanceUID) for ds in pending}, "attempts": 0, "acked_at": None}
            entry = self.series[str(pending[0].SeriesInstanceUID)]
            entry["attempts"] += 1
            try:
                ok = self._send(pending)
            except Exception:  # the node died mid-association: the series is sent again
                self.counts["assoc_failed"] += 1
                ok = False
            if ok:
                entry["acked_at"], pending = time.time(), None
                self.stop_event.wait(self.rng.uniform(*self.interval))
            else:
                self.stop_event.wait(2.0)


class PeakMemory(threading.Thread):
    """Reads VmHWM (peak resident set) of the current node process every second; keeps the largest."""

    def __init__(self, node: NodeProcess):
        super().__init__(daemon=True)
        self.node, self.peak_kib, self.done = node, 0, threading.Event()

    def run(self) -> None:
        while not self.done.wait(1.0):
            proc = self.node.proc
            try:
                status = Path(f"/proc/{proc.pid}/status").read_text()
            except (OSError, AttributeError):
                continue
            for line in status.splitlines():
                if line.startswith("VmHWM:"):
                    self.peak_kib = max(self.peak_kib, int(line.split()[1]))


def schedule(seconds: float, rng: random.Random) -> list[tuple[float, str]]:
    """(time from start, event): SIGKILLs at random gaps, one destination outage, one disk floor crossing."""
    events = [(0.30 * seconds, "pacs_down"), (0.38 * seconds, "pacs_up")]
    events += [(0.60 * seconds, "floor_on"), (0.66 * seconds, "floor_off")]
    at = 0.08 * seconds
    while at < 0.9 * seconds:
        events.append((at, "kill"))
        at += rng.uniform(seconds / 8, seconds / 5)
    return sorted(events)


class Faults:
    """Carries out the scheduled events and records what happened."""

    def __init__(self, node: NodeProcess, pacs: StandInPacs, filler: Path, floor: int, health_port: int):
        self.node, self.pacs, self.filler, self.floor, self.health_port = node, pacs, filler, floor, health_port
        self.record: dict = {"kills": [], "destination_outages": [], "disk_floor": []}
        self.t0 = time.time()

    def _at(self) -> float:
        return round(time.time() - self.t0, 1)

    def __call__(self, event: str) -> None:
        if event == "kill":
            at = self._at()
            self.node.kill()
            start = time.time()
            self.node.start(timeout=180)
            self.record["kills"].append({"at_s": at, "restart_to_listening_s": round(time.time() - start, 1)})
        elif event == "pacs_down":
            self.pacs.down()
            self.record["destination_outages"].append({"from_s": self._at()})
        elif event == "pacs_up":
            self.pacs.up()
            self.record["destination_outages"][-1]["to_s"] = self._at()
        elif event == "floor_on":
            at = self._at()
            with open(self.filler, "wb") as f:
                os.posix_fallocate(f.fileno(), 0, 4 * GIB)
            free = shutil.disk_usage(self.filler.parent).free
            time.sleep(3)
            entry = {"from_s": at, "free_bytes": free, "min_free_bytes": self.floor, "readyz": _readyz(self)}
            self.record["disk_floor"].append(entry)
        elif event == "floor_off":
            self.filler.unlink(missing_ok=True)
            self.record["disk_floor"][-1].update(
                to_s=self._at(), free_bytes_after=shutil.disk_usage(self.filler.parent).free
            )


def _readyz(faults: Faults) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{faults.health_port}/readyz", timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as err:
        return err.code
    except OSError:
        return -1


def _percentiles(values: list[float]) -> dict | None:
    if not values:
        return None
    a = np.asarray(values)
    q = {f"p{p}": round(float(np.percentile(a, p)), 2) for p in (50, 90, 99)}
    return {"n": len(values), "min": round(float(a.min()), 2), **q, "max": round(float(a.max()), 2),
            "mean": round(float(a.mean()), 2)}  # fmt: skip


def summarise(senders: list[Sender], deliveries: list[dict], results_dir: Path) -> dict:
    """Series sent / acknowledged / delivered, extra deliveries, mixed ones, and the latency distribution."""
    series = {uid: entry for s in senders for uid, entry in s.series.items()}
    acked = {uid: e for uid, e in series.items() if e["acked_at"] is not None}
    by_series: dict[str, list[dict]] = {}
    for d in deliveries:
        by_series.setdefault(d["series"], []).append(d)
    mixed = sum(d["series"] not in series or not d["refs"] <= series[d["series"]]["sops"] for d in deliveries)
    latency, before_ack, incomplete = [], 0, []
    for uid, entry in acked.items():
        after = [d["at"] for d in by_series.get(uid, []) if d["at"] >= entry["acked_at"]]
        if after:
            latency.append(min(after) - entry["acked_at"])
        elif by_series.get(uid):
            before_ack += 1  # its RTSTRUCT came from instances acknowledged in an earlier, interrupted send
        result = results_dir / uid / "result.json"
        count = json.loads(result.read_text())["instance_count"] if result.is_file() else None
        if count != len(entry["sops"]):
            incomplete.append(uid)
    identical = sum(len(ds) - len({d["sop"] for d in ds}) for ds in by_series.values())
    return {
        "sent": len(series),
        "acknowledged": len(acked),
        "delivered": sum(uid in by_series for uid in acked),
        "undelivered": sorted(uid for uid in acked if uid not in by_series),
        "rtstructs_received": len(deliveries),
        "duplicates_delivered": len(deliveries) - len(by_series),
        "duplicates_same_sop_instance": identical,
        "mixed": mixed,
        "result_not_the_full_series": incomplete,
        "delivered_before_final_ack": before_ack,
        "send_attempts": sum(e["attempts"] for e in series.values()),
        "latency_s": _percentiles(latency),
    }


def check(result: dict) -> list[str]:
    """What is wrong with a soak result (empty: it passes)."""
    problems = []
    s, f = result.get("series", {}), result.get("faults", {})
    if result.get("sending_seconds", 0) < MIN_SECONDS:
        problems.append(f"sending time {result.get('sending_seconds')} s < {MIN_SECONDS} s")
    if not result.get("tls"):
        problems.append("TLS was not on")
    if not s.get("acknowledged") or s.get("delivered") != s.get("acknowledged") or s.get("undelivered"):
        problems.append(f"delivered {s.get('delivered')} of {s.get('acknowledged')} acknowledged series")
    if s.get("mixed") or s.get("result_not_the_full_series"):
        problems.append(f"mixed {s.get('mixed')}, incomplete results {s.get('result_not_the_full_series')}")
    if not f.get("kills"):
        problems.append("the node was never killed")
    if not any("to_s" in o for o in f.get("destination_outages", [])):
        problems.append("no destination outage (down and up again)")
    if not f.get("disk_floor") or not result.get("instances", {}).get("a700"):
        problems.append("the disk floor was not crossed with 0xA700 answers")
    if not (s.get("latency_s") or {}).get("n") or not result.get("node", {}).get("peak_rss_mib"):
        problems.append("no latency or peak memory measured")
    return problems


def _node_settings(work: Path, pki: dict, pacs: StandInPacs, n_senders: int, floor: int, health_port: int) -> dict:
    table = work / "subgroups.json"
    settings = node_settings(work / "node", free_port(), table, quiet_seconds=8)
    settings.update(
        allowed_calling_aets=[f"SENDER{i + 1}" for i in range(n_senders)],
        destinations=[{"ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port, "tls_hostname": "localhost"}],
        min_free_bytes=floor,
        health={"enabled": True, "port": health_port},
        tls={"enabled": True, "certificate": str(pki["node"]["certificate"]),
             "private_key": str(pki["node"]["private_key"]), "ca_bundle": str(pki["ca"]["certificate"]),
             "require_client_cert": True, "min_version": "1.2"},
    )  # fmt: skip
    return settings


def _wait_delivered(senders: list[Sender], pacs: StandInPacs, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        delivered = {d["series"] for d in pacs.snapshot()}
        if all(uid in delivered for s in senders for uid, e in s.series.items() if e["acked_at"] is not None):
            return
        time.sleep(1.0)


def _metrics(port: int) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples
            if s.name.startswith("fairdro_node_") and not s.labels and not s.name.endswith("_created")}  # fmt: skip


def run_soak(args: argparse.Namespace, work: Path) -> dict:
    events = schedule(args.seconds, random.Random(args.seed))
    pki = make_pki(work / "pki")
    factory = SeriesFactory(work / "cohort", n_cases=6, seed=args.seed)
    (work / "subgroups.json").write_text(json.dumps(factory.stages))  # PatientID = case id
    free = shutil.disk_usage(work).free
    if free < 6 * GIB:
        raise SystemExit(f"need at least 6 GiB free beside {work} for the disk-floor step; {free} bytes free")
    floor, health_port = free - 2 * GIB, free_port()
    pacs = StandInPacs(pki)
    pacs.up()
    node = NodeProcess(work / "node", _node_settings(work, pki, pacs, args.senders, floor, health_port))
    node.echo_tls_args = (client_context(pki, "peer"), "localhost")
    node.start(timeout=180)
    memory = PeakMemory(node)
    memory.start()
    stop = threading.Event()
    senders = [Sender(f"SENDER{i + 1}", int(node.overrides["port"]), (client_context(pki, "peer"), "localhost"),
                      factory, stop, random.Random(args.seed * 100 + i), (args.interval / 2, args.interval * 1.5))
               for i in range(args.senders)]  # fmt: skip
    faults = Faults(node, pacs, work / "filler.bin", floor, health_port)
    log(f"soak: {args.seconds:.0f} s, {args.senders} senders, TLS on; events {[(round(t), e) for t, e in events]}")
    try:
        for s in senders:
            s.start()
        for at, event in events:
            stop.wait(max(0.0, faults.t0 + at - time.time()))
            log(f"t={time.time() - faults.t0:.0f} s: {event}")
            faults(event)
        stop.wait(max(0.0, faults.t0 + args.seconds - time.time()))
        stop.set()
        for s in senders:
            s.join(60)
        sending = time.time() - faults.t0
        log(f"sending stopped after {sending:.0f} s; waiting for every acknowledged series to be delivered")
        _wait_delivered(senders, pacs, args.drain)
        metrics = _metrics(health_port)
    finally:
        stop.set()
        (work / "filler.bin").unlink(missing_ok=True)
        node.stop()
        memory.done.set()
        pacs.down()
    counts = {k: sum(s.counts[k] for s in senders) for k in senders[0].counts}
    return {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}",
        "command": " ".join(["python", *sys.argv]),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(faults.t0)),
        "sending_seconds": round(sending, 1),
        "total_seconds": round(time.time() - faults.t0, 1),
        "tls": True,
        "settings": {
            "senders": args.senders,
            "interval_s": args.interval,
            "quiet_seconds": 8,
            "seed": args.seed,
            "series_shape": [48, 48, 24],
            "weights": "shipped demo weights",
        },  # fmt: skip
        "series": summarise(senders, pacs.snapshot(), work / "node" / "state" / "results"),
        "instances": counts,
        "faults": faults.record,
        "node": {"peak_rss_mib": round(memory.peak_kib / 1024, 1), "processes": node.runs},
        "metrics_of_last_node_process": metrics,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=960.0, help=f"sending time (a reported run: >= {MIN_SECONDS})")
    ap.add_argument("--senders", type=int, default=3)
    ap.add_argument("--interval", type=float, default=30.0, help="mean seconds between a sender's series")
    ap.add_argument("--drain", type=float, default=600.0, help="seconds to wait for the last deliveries")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="write the result as JSON here")
    ap.add_argument("--check", type=Path, default=None, help="only check a result JSON written earlier")
    args = ap.parse_args()
    if args.check is not None:
        result = json.loads(args.check.read_text())
    else:
        work = Path(tempfile.mkdtemp(prefix="fairdro_soak_"))
        result = run_soak(args, work)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps({k: result[k] for k in ("series", "instances", "node")}, indent=2))
    problems = check(result)
    for problem in problems:
        print(f"CHECK FAILED: {problem}")
    if not problems:
        print(f"soak check passed ({result['sending_seconds']:.0f} s, {result['series']['acknowledged']} series)")
        if args.check is None:
            shutil.rmtree(work, ignore_errors=True)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
