"""The clinical loop against a real PACS: Orthanc -> our DICOM node -> RTSTRUCT back in Orthanc (``make test-pacs``).

Run with the main venv's python. Steps:

1. a synthetic cohort with DICOM CT series (several storage orders and an oblique one);
2. a throw-away Orthanc on loopback (tools/pacs.py) with our node registered as modality ``fairdro``;
3. the node started with the documented command (``python -m dicom_node``), calling AE ``ORTHANC``
   allowed, Orthanc as destination, subgroup from a lookup table keyed by PatientID, SEG also sent;
4. the CT series uploaded to Orthanc (REST ``POST /instances``; the case's reference RTSTRUCT is not), then
   sent by Orthanc to the node (REST ``POST /modalities/fairdro/store``);
5. Orthanc queried until an RTSTRUCT (and SEG) appear in each study; each RTSTRUCT downloaded and checked:
   same study, references the CT series and only its slices, frame of reference; rasterised onto the CT it
   agrees with the bundle's own NIfTI output (``monai.bundle run inference`` with ``inference_dicom.json``, same
   series and subgroup, run here independently of the node): Dice >= 0.95;
6. the same study over DICOMweb (``/dicom-web/studies/<uid>/series``) lists the RTSTRUCT series;
7. the same series sent again: processed once (the node logs a duplicate; still one RTSTRUCT in Orthanc);
8. another series encoded JPEG Lossless SV1 (.70, ``dcmcjpeg +e1``), uploaded (Orthanc keeps it .70: no ingest
   transcoding is configured) and sent by Orthanc as stored: the node's spool/processing files of that series
   are .70 with the uploaded pixel data byte for byte (stored as received, not transcoded), and its RTSTRUCT
   arrives in the same study, referencing that series, with Dice >= 0.95 against the bundle's own NIfTI;
9. DICOM TLS (a throw-away CA, tools/testcerts.py): Orthanc restarted with DICOM TLS (its certificate required
   by the node and the node's by Orthanc), the node restarted with TLS and client certificates required: a
   plain-TCP client and a client with a certificate from another CA are refused, Orthanc's C-ECHO succeeds, and
   a new series goes CT in and RTSTRUCT back over TLS (checked as in step 5);
10. silent peers (issue 31), plain and over TLS: 50 silent TCP connections from 127.0.0.2 (tools/pacs.py
    SilentClients, reopened as soon as the node closes them at its pending timeout) while Orthanc sends series to
    the node: the median latency (Orthanc's store request -> RTSTRUCT in Orthanc) of 3 series stays within 1.5x the
    median of 3 series on the quiet node;
11. refusals (issue 31), on a second short-lived node with small ``limits``: a connection over
    ``max_pending_connections`` and silent ones past ``pending_timeout_seconds`` are closed, an association over
    ``max_associations`` gets A-ASSOCIATE-RJ (local limit exceeded); each is logged as ``Refused ... (cause=...)``
    and counted in ``/metrics`` as ``fairdro_node_refusals_total{cause="..."}``.

Exit status 0 = every check passed. ``--keep`` keeps the work folder (logs of Orthanc and the node).
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
from pathlib import Path

import pydicom

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bundle"))
sys.path.insert(0, str(REPO / "tools"))

from checklib import Checks, bundle_dicom_inference, dice, free_port, log  # noqa: E402
from pacs import (  # noqa: E402
    NODE_AET,
    NODE_MODALITY,
    ORTHANC_AET,
    NodeProcess,
    Orthanc,
    SilentClients,
    client_context,
    closed_by_peer,
    ct_files,
    node_settings,
    references_only_series,
    renamed_series,
)
from pynetdicom import AE  # noqa: E402
from pynetdicom.sop_class import Verification  # noqa: E402
from scripts import synthetic  # noqa: E402
from scripts.dicom_seg import read_seg  # noqa: E402
from scripts.dicom_series import read_series_info  # noqa: E402
from scripts.rtstruct import rasterise_roi  # noqa: E402
from testcerts import make_pki  # noqa: E402

check = Checks()
JPEG_LOSSLESS_SV1 = "1.2.840.10008.1.2.4.70"
SILENT_CLIENTS, SILENT_SOURCE = 50, "127.0.0.2"
LATENCY_SERIES = 3  # series per median (quiet, then with the silent clients)
PENDING_TIMEOUT = 2.0  # the main node's limits.pending_timeout_seconds: silent clients are closed and reopened


class SpoolWatcher(threading.Thread):
    """Records every instance of one series while the node holds it (``spool/<uid>/``, ``processing/<uid>/``).

    The node deletes a series' instances once its result is written, so they are read as they appear:
    ``seen`` maps SOPInstanceUID to ``(transfer syntax, pixel data bytes)`` of the file the node stored.
    """

    def __init__(self, state_dir: Path, series_uid: str):
        super().__init__(daemon=True)
        self.folders = [Path(state_dir) / "spool" / series_uid, Path(state_dir) / "processing" / series_uid]
        self.seen: dict[str, tuple[str, bytes]] = {}
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            for folder in self.folders:
                try:
                    paths = [p for p in folder.glob("*.dcm") if not p.name.startswith(".")]
                except OSError:
                    continue
                for path in paths:
                    if path.stem in self.seen:
                        continue
                    try:
                        ds = pydicom.dcmread(path)
                        self.seen[path.stem] = (str(ds.file_meta.TransferSyntaxUID), bytes(ds.PixelData))
                    except Exception:  # moved on (spool -> processing -> deleted) while being read: seen again later
                        pass
            self._done.wait(0.05)

    def stop(self) -> None:
        self._done.set()
        self.join()


def encode_jpeg_lossless(files: list[Path], out: Path) -> list[Path]:
    """Each file encoded JPEG Lossless SV1 (.70) by dcmtk's ``dcmcjpeg +e1`` (an encoder independent of ours)."""
    if shutil.which("dcmcjpeg") is None:
        raise RuntimeError("dcmcjpeg is not installed (Debian: apt-get install dcmtk)")
    out.mkdir(parents=True)
    for path in files:
        subprocess.run(["dcmcjpeg", "+e1", str(path), str(out / path.name)], check=True, capture_output=True)
    return [out / p.name for p in files]


def wait_for(pacs: Orthanc, study_id: str, modality: str, timeout: float, count: int = 1) -> list[dict]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = pacs.series_in_study(study_id, modality)
        if len(found) >= count:
            return found
        time.sleep(0.5)
    return pacs.series_in_study(study_id, modality)


def check_rtstruct(
    pacs: Orthanc, work: Path, item: dict, series_dir: Path, series_id: str, t0: float, timeout: float, seg: bool = True
) -> None:
    """The RTSTRUCT (and SEG) of one series arrived in its study, reference only its slices, and match the bundle's
    own NIfTI of that series (Dice); DICOMweb lists them."""
    info = read_series_info(series_dir)
    study_id = pacs.study_of(series_id)
    rs_series = wait_for(pacs, study_id, "RTSTRUCT", timeout)
    check(len(rs_series) == 1, f"{item['id']}: one RTSTRUCT series in the study ({time.time() - t0:.1f} s)")
    if len(rs_series) != 1:
        return
    (rs_instance,) = rs_series[0]["Instances"]
    rs = pydicom.dcmread(io.BytesIO(pacs.instance_file(rs_instance)))
    check(rs.StudyInstanceUID == info.study_instance_uid, f"{item['id']}: RTSTRUCT in the CT's study")
    check(references_only_series(rs, info), f"{item['id']}: RTSTRUCT references this CT series and only its slices")
    frame_uid = rs.ReferencedFrameOfReferenceSequence[0].FrameOfReferenceUID
    check(frame_uid == info.frame_of_reference_uid, f"{item['id']}: frame of reference")
    own = bundle_dicom_inference(series_dir, work / "bundle" / item["id"], item["stage"])
    d = dice(rasterise_roi(rs, info, names=["CTV"]), own)
    check(d >= 0.95, f"{item['id']}: RTSTRUCT from Orthanc vs the bundle's own NIfTI: Dice {d:.4f} >= 0.95")
    if seg:
        seg_series = wait_for(pacs, study_id, "SEG", 30)
        check(len(seg_series) == 1, f"{item['id']}: one SEG series in the study (send_seg)")
        if seg_series:
            seg_file = work / f"{item['id']}_seg.dcm"
            seg_file.write_bytes(pacs.instance_file(seg_series[0]["Instances"][0]))
            ds = dice(read_seg(seg_file, info), own)
            check(ds >= 0.999, f"{item['id']}: SEG from Orthanc vs the bundle's own NIfTI: Dice {ds:.4f}")
    web = pacs.get(f"/dicom-web/studies/{info.study_instance_uid}/series")
    modalities = sorted(s.get("00080060", {}).get("Value", ["?"])[0] for s in web)
    check("RTSTRUCT" in modalities and "CT" in modalities, f"{item['id']}: DICOMweb lists {modalities}")


def check_loop(pacs: Orthanc, node: NodeProcess, work: Path, items: list[dict], timeout: float) -> None:
    """Steps 4-7: every series through Orthanc -> node -> Orthanc, then the first one sent again."""
    sent = []
    for item in items:
        series_dir = work / "cohort" / item["dicom_dir"]
        series_id = pacs.upload(ct_files(series_dir))
        t0 = time.time()
        pacs.send_to_node(series_id, synchronous=True)
        sent.append((item, series_dir, series_id, t0))
        log(f"{item['id']} ({item['dicom_variant']}, stage {item['stage']}) sent by Orthanc to the node")
    for item, series_dir, series_id, t0 in sent:
        check_rtstruct(pacs, work, item, series_dir, series_id, t0, timeout)
    # the same series sent again: processed once
    item, series_dir, series_id, _ = sent[0]
    pacs.send_to_node(series_id, synchronous=True)
    deadline = time.time() + 60
    while time.time() < deadline and "duplicate" not in node.log_text().lower():
        time.sleep(0.5)
    time.sleep(3)
    study_id = pacs.study_of(series_id)
    n_rs = sum(len(s["Instances"]) for s in pacs.series_in_study(study_id, "RTSTRUCT"))
    check("duplicate" in node.log_text().lower() and n_rs == 1,
          f"{item['id']}: sent twice, processed once (duplicate logged; {n_rs} RTSTRUCT in Orthanc)")  # fmt: skip


def check_jpeg(pacs: Orthanc, node: NodeProcess, work: Path, item: dict, timeout: float) -> None:
    """Step 8: a JPEG-lossless series, sent by Orthanc as stored: the node must receive and keep .70."""
    series_dir = work / "cohort" / item["dicom_dir"]
    info = read_series_info(series_dir)
    files = encode_jpeg_lossless(ct_files(series_dir), work / "jpeg70" / item["id"])
    uploaded = {str(ds.SOPInstanceUID): bytes(ds.PixelData) for ds in map(pydicom.dcmread, files)}
    series_id = pacs.upload(files)
    instances = pacs.get(f"/series/{series_id}")["Instances"]
    in_orthanc = {pacs.get(f"/instances/{i}/metadata/TransferSyntax").decode() for i in instances}
    check(in_orthanc == {JPEG_LOSSLESS_SV1}, f"{item['id']}: Orthanc stores the uploaded series as {in_orthanc}")
    watcher = SpoolWatcher(Path(node.overrides["work_dir"]), info.series_instance_uid)
    watcher.start()
    t0 = time.time()
    try:
        pacs.send_to_node(series_id, synchronous=True)
        log(f"{item['id']} (JPEG Lossless SV1, stage {item['stage']}) sent by Orthanc to the node")
        study_id = pacs.study_of(series_id)
        rs_series = wait_for(pacs, study_id, "RTSTRUCT", timeout)
    finally:
        watcher.stop()
    syntaxes = sorted({ts for ts, _ in watcher.seen.values()})
    check(len(watcher.seen) == len(uploaded) and syntaxes == [JPEG_LOSSLESS_SV1],
          f"{item['id']}: the node stored {len(watcher.seen)}/{len(uploaded)} instances, transfer syntax "
          f"{syntaxes}")  # fmt: skip
    same = sum(watcher.seen.get(sop, ("", b""))[1] == data for sop, data in uploaded.items())
    check(same == len(uploaded), f"{item['id']}: {same}/{len(uploaded)} stored with the uploaded pixel data "
          "byte for byte (not transcoded)")  # fmt: skip
    check(len(rs_series) == 1, f"{item['id']}: one RTSTRUCT series in the study ({time.time() - t0:.1f} s)")
    if len(rs_series) == 1:
        (rs_instance,) = rs_series[0]["Instances"]
        rs = pydicom.dcmread(io.BytesIO(pacs.instance_file(rs_instance)))
        check(rs.StudyInstanceUID == info.study_instance_uid and references_only_series(rs, info),
              f"{item['id']}: RTSTRUCT in the CT's study, referencing this series and only its slices")  # fmt: skip
        own = bundle_dicom_inference(series_dir, work / "bundle" / item["id"], item["stage"])
        d = dice(rasterise_roi(rs, info, names=["CTV"]), own)
        check(d >= 0.95, f"{item['id']}: RTSTRUCT of the .70 series vs the bundle's NIfTI of the uncompressed "
              f"series: Dice {d:.4f} >= 0.95")  # fmt: skip


def _echo(port: int, tls_args: tuple | None) -> bool:
    """C-ECHO to the node as Orthanc's AE title (allow-listed), over TLS when ``tls_args`` is given."""
    ae = AE(ORTHANC_AET)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AET, tls_args=tls_args)
    if not assoc.is_established:
        return False
    ok = int(assoc.send_c_echo().Status) == 0
    assoc.release()
    return ok


def check_tls(work: Path, node: NodeProcess, item: dict, timeout: float) -> float:
    """Step 9: the node with TLS (client certificates required) and a TLS Orthanc: CT in and RTSTRUCT back over
    TLS in both directions; a plain-TCP client and a client with a certificate from another CA are refused. Then
    step 10 over TLS; returns the seconds step 10 took."""
    pki = make_pki(work / "pki")
    tls = {"certificate": pki["peer"]["certificate"], "private_key": pki["peer"]["private_key"],
           "ca_bundle": pki["ca"]["certificate"]}  # fmt: skip
    node_tls = {"enabled": True, "certificate": str(pki["node"]["certificate"]),
                "private_key": str(pki["node"]["private_key"]), "ca_bundle": str(pki["ca"]["certificate"]),
                "require_client_cert": True, "min_version": "1.2"}  # fmt: skip
    port = int(node.overrides["port"])
    node.stop()
    with Orthanc(work / "orthanc_tls", port, tls=tls) as pacs:
        dest = {"ae_title": ORTHANC_AET, "host": "127.0.0.1", "port": pacs.dicom_port, "tls_hostname": "localhost"}
        node.echo_tls_args = (client_context(pki, "peer"), "localhost")
        node.start(tls=node_tls, destinations=[dest], send_seg=False)
        log(f"TLS: Orthanc (DICOM TLS on {pacs.dicom_port}) and the node (TLS on {port})")
        check(not _echo(port, None), "TLS: a plain-TCP client is refused")
        check(not _echo(port, (client_context(pki, "rogue"), "localhost")),
              "TLS: a client whose certificate is signed by another CA is refused")  # fmt: skip
        check(_echo(port, node.echo_tls_args), "TLS: a client with a certificate from the CA is accepted")
        try:
            echoed = pacs.post_json(f"/modalities/{NODE_MODALITY}/echo", {}) in ({}, None)
        except urllib.error.HTTPError:  # Orthanc answers 500 when the echo fails
            echoed = False
        check(echoed, "TLS: Orthanc's C-ECHO to the node over DICOM TLS succeeds")
        series_dir = work / "cohort" / item["dicom_dir"]
        series_id = pacs.upload(ct_files(series_dir))
        t0 = time.time()
        pacs.send_to_node(series_id, synchronous=True)
        log(f"{item['id']} (stage {item['stage']}) sent by Orthanc to the node over DICOM TLS")
        check_rtstruct(pacs, work, item, series_dir, series_id, t0, timeout, seg=False)
        text = node.log_text()
        check("Refused TLS connection" in text, "TLS: the node logged the refused handshakes")
        t_silent = time.monotonic()
        check_silent(pacs, node, work, item, "TLS")
        return time.monotonic() - t_silent


def _latency(pacs: Orthanc, files: list[Path], timeout: float = 120.0) -> float:
    """Upload a series to Orthanc, then seconds from Orthanc's store request to the node until its RTSTRUCT is in
    Orthanc (the association to the node, the transfer, the node's quiet time, inference and the send back)."""
    series_id = pacs.upload(files)
    study_id = pacs.study_of(series_id)
    t0 = time.monotonic()
    pacs.send_to_node(series_id, synchronous=True)
    while time.monotonic() - t0 < timeout:
        if pacs.series_in_study(study_id, "RTSTRUCT"):
            return time.monotonic() - t0
        time.sleep(0.05)
    return float("inf")


def check_silent(pacs: Orthanc, node: NodeProcess, work: Path, item: dict, mode: str) -> None:
    """Step 10: median latency of LATENCY_SERIES series (renamed copies of ``item``'s CT) on the quiet node, then
    while SILENT_CLIENTS silent connections from 127.0.0.2 are held (and reopened); within 1.5x."""
    files = ct_files(work / "cohort" / item["dicom_dir"])
    folder = work / "silent" / mode

    def latencies(tag: str) -> list[float]:
        return [_latency(pacs, renamed_series(files, folder / f"{tag}{i}")) for i in range(LATENCY_SERIES)]

    pending = "fairdro_node_pending_connections"
    quiet = latencies("quiet")
    with SilentClients(int(node.overrides["port"]), count=SILENT_CLIENTS, source=SILENT_SOURCE, seconds=90) as silent:
        deadline = time.monotonic() + 20
        while (node.metric(pending) or 0) < 0.9 * SILENT_CLIENTS and time.monotonic() < deadline:
            time.sleep(0.1)
        held = node.metric(pending) or 0
        loaded = latencies("loaded")
        report = silent.stop()
    check(held >= 0.9 * SILENT_CLIENTS, f"{mode}: {held:.0f} silent connections from {SILENT_SOURCE} pending at the "
          "node (/metrics)")  # fmt: skip
    q, m = statistics.median(quiet), statistics.median(loaded)
    check(m <= 1.5 * q,
          f"{mode}: series latency (Orthanc store -> RTSTRUCT in Orthanc) with {SILENT_CLIENTS} silent clients: "
          f"median {m:.2f} s {[round(x, 2) for x in loaded]} vs quiet {q:.2f} s {[round(x, 2) for x in quiet]}: "
          f"{m / q:.2f}x <= 1.5x (silent connections reopened {report.get('reopened', '?')} times)")  # fmt: skip


def _refusal_seen(node: NodeProcess, cause: str, count: int, within: float = 5.0) -> tuple[int, float]:
    """(log lines ``Refused ... (cause=<cause>)``, ``fairdro_node_refusals_total{cause}``), polled until both reach
    ``count`` or ``within`` seconds pass."""
    deadline = time.monotonic() + within
    while True:
        lines = sum(1 for ln in node.log_text().splitlines() if "Refused " in ln and f"(cause={cause}):" in ln)
        value = node.metric(f'fairdro_node_refusals_total{{cause="{cause}"}}') or 0.0
        if (lines >= count and value >= count) or time.monotonic() > deadline:
            return lines, value
        time.sleep(0.1)


def check_refusals(work: Path, table: Path) -> None:
    """Step 11: a second node with small limits (3 pending connections, 2 s pending timeout, 1 association)."""
    limits = {"max_pending_connections": 3, "pending_timeout_seconds": 2, "max_associations": 1}
    port = free_port()
    health = {"enabled": True, "bind_address": "127.0.0.1", "port": free_port()}
    node = NodeProcess(work / "node_limits", node_settings(work / "node_limits", port, table, 2, limits=limits,
                                                           health=health), args=["--cold"])  # fmt: skip
    held: list[socket.socket] = []
    try:
        node.start()
        log(f"refusals: a second node on {port} with limits {json.dumps(limits)}")

        def silent() -> socket.socket:
            return socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(SILENT_SOURCE, 0))

        held = [silent() for _ in range(3)]
        deadline = time.monotonic() + 5
        while (node.metric("fairdro_node_pending_connections") or 0) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        extra = silent()
        held.append(extra)
        check(closed_by_peer(extra, 1.5), "refusals: a 4th silent connection (max_pending_connections 3) is closed at "
              "once")  # fmt: skip
        t0 = time.monotonic()
        closed = sum(closed_by_peer(s, 5) for s in held[:3])
        check(closed == 3, f"refusals: {closed}/3 silent connections closed at the pending timeout (2 s; last after "
              f"{time.monotonic() - t0:.1f} s)")  # fmt: skip
        for cause, count in (("pending_limit", 1), ("pending_timeout", 3)):
            lines, value = _refusal_seen(node, cause, count)
            check(lines == count and value == count, f"refusals: {cause}: {lines} log line(s) 'Refused connection "
                  f"... (cause={cause})', /metrics fairdro_node_refusals_total{{cause=\"{cause}\"}} {value:g} "
                  f"(expected {count})")  # fmt: skip
        ae = AE(ORTHANC_AET)
        ae.add_requested_context(Verification)
        first = ae.associate("127.0.0.1", port, ae_title=NODE_AET)
        second = ae.associate("127.0.0.1", port, ae_title=NODE_AET)
        rj = second.acceptor.primitive if second.is_rejected else None
        reason = (rj.result, rj.result_source, rj.diagnostic) if rj is not None else None
        check(first.is_established and reason == (2, 3, 2), f"refusals: a 2nd association (max_associations 1) gets "
              f"A-ASSOCIATE-RJ {reason} (rejected-transient, local limit exceeded); the 1st is open")  # fmt: skip
        if first.is_established:
            check(int(first.send_c_echo().Status) == 0, "refusals: the open association keeps working")
            first.release()
        lines, value = _refusal_seen(node, "association_limit", 1)
        check(lines == 1 and value == 1, f"refusals: association_limit: {lines} log line(s) 'Refused association ... "
              f'(cause=association_limit)\', /metrics fairdro_node_refusals_total{{cause="association_limit"}} '
              f"{value:g} (expected 1)")  # fmt: skip
    finally:
        for sock in held:
            sock.close()
        node.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-cases", type=int, default=5, help="synthetic cases in the cohort (more than --series + 1)")
    ap.add_argument("--series", type=int, default=3, help="series sent through the loop")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for each RTSTRUCT")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fairdro_pacs_"))
    log(f"work folder {work}")
    datalist = synthetic.generate_cohort(work / "cohort", n_cases=args.n_cases, seed=7, shape=(64, 64, 32), dicom=True)
    pool = [it for part in ("testing", "validation", "training") for it in datalist[part]]
    # one series per stage first (each is routed by its own subgroup), then the rest
    firsts = [next(it for it in pool if it["stage"] == s) for s in dict.fromkeys(it["stage"] for it in pool)]
    items = (firsts + [it for it in pool if it not in firsts])[: args.series]
    jpeg_item, tls_item = [it for it in pool if it not in items][:2]  # series the node has not seen
    table = work / "subgroups.json"
    every = [*items, jpeg_item, tls_item]
    table.write_text(json.dumps({it["id"]: it["stage"] for it in every}))  # PatientID = case id

    node_port = free_port()
    health = {"enabled": True, "bind_address": "127.0.0.1", "port": free_port()}
    limits = {"pending_timeout_seconds": PENDING_TIMEOUT}
    node = NodeProcess(work / "node", node_settings(work / "node", node_port, table, 2, send_seg=True, health=health,
                                                    limits=limits))  # fmt: skip
    pacs = Orthanc(work / "orthanc", node_port)
    try:
        pacs.start()
        node.overrides["destinations"] = [{"ae_title": ORTHANC_AET, "host": "127.0.0.1", "port": pacs.dicom_port}]
        node.start()
        log(f"Orthanc on 127.0.0.1 (HTTP {pacs.http_port}, DICOM {pacs.dicom_port}); node on {node_port}")
        check_loop(pacs, node, work, items, args.timeout)
        check_jpeg(pacs, node, work, jpeg_item, args.timeout)
        t_silent = time.monotonic()
        check_silent(pacs, node, work, items[0], "plain")
        added = time.monotonic() - t_silent
        pacs.stop()
        added += check_tls(work, node, tls_item, args.timeout)
        t_refusals = time.monotonic()
        check_refusals(work, table)
        added += time.monotonic() - t_refusals
        log(f"silent-client and refusal checks took {added:.0f} s")
        text = node.log_text()
        leaked = [it["id"] for it in every if f"SYNTHETIC^{it['id']}" in text or it["id"] in text]  # name / ID
        check(not leaked, "no patient name or ID in the node's log")
    finally:
        node.stop()
        pacs.stop()
    if check.failures:
        log(f"{len(check.failures)} check(s) failed; logs in {work}")
        return 1
    log("all PACS checks passed")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
