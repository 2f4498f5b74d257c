"""Helpers for the PACS round trip (tools/pacs_check.py) and the load/fault benchmark (bench/bench_pacs.py).

* :class:`Orthanc`: a throw-away Orthanc (Debian package ``orthanc`` + ``orthanc-dicomweb``) for loopback use:
  own storage folder, HTTP and DICOM on free ports (Orthanc 1.10 cannot bind them to 127.0.0.1 alone), HTTP
  answering this machine only, DICOM services allowed to the registered modality at 127.0.0.1 only (our node),
  the DICOMweb plugin enabled. No ``IngestTranscoding`` is set, so uploads are stored in their own transfer
  syntax, and the node's modality keeps Orthanc's default ``AllowTranscoding`` (true): Orthanc 1.10 offers the
  stored syntax first and falls back to uncompressed only when the node refuses it, as a real PACS would
  (``tools/pacs_check.py`` checks that a JPEG-lossless series reaches the node untranscoded). REST helpers for
  uploading, sending to a modality and finding what arrived in a study.
* :class:`NodeProcess`: the bundle's DICOM node as a separate process, started with the documented command
  (``python -m dicom_node --config deploy/dicom_node.json <overrides.json>``), so it can be
  killed with SIGKILL like a real crash.

Nothing here is bundle code; it drives real programs for tests and measurements.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pydicom
from checklib import free_port

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundle"
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
ORTHANC_AET = "ORTHANC"
NODE_AET = "FAIRDRO"
NODE_MODALITY = "fairdro"


def ct_files(series_dir: Path) -> list[Path]:
    """The CT slices of a synthetic case folder (its reference RTSTRUCT is left out)."""
    return [p for p in sorted(series_dir.glob("*.dcm")) if pydicom.dcmread(p, stop_before_pixels=True).Modality == "CT"]


def terminate(proc: subprocess.Popen | None, timeout: float) -> None:
    """SIGTERM a running process and wait; SIGKILL it if it has not exited after ``timeout`` seconds."""
    if proc is not None and proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def references_only_series(rtstruct: pydicom.Dataset, info: Any) -> bool:
    """Whether an RTSTRUCT references the CT series of ``info`` (a bundle ``SeriesInfo``) and only its slices."""
    frame = rtstruct.ReferencedFrameOfReferenceSequence[0]
    ref = frame.RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
    refs = {c.ReferencedSOPInstanceUID for c in ref.ContourImageSequence}
    return ref.SeriesInstanceUID == info.series_instance_uid and refs <= set(info.sop_instance_uids)


class Orthanc:
    """A throw-away Orthanc on 127.0.0.1 (``with Orthanc(work, node_port) as pacs: ...``).

    Args:
        work: folder for its configuration, storage, index and log (created).
        node_port: DICOM port of our node (registered as modality ``fairdro``, AE ``FAIRDRO``, 127.0.0.1).
        concurrent_jobs: Orthanc jobs run at once (a store to a modality is a job).
        tls: ``{"certificate", "private_key", "ca_bundle"}`` (PEM paths): DICOM over TLS in both directions, the
            peer's certificate required and checked against ``ca_bundle`` (Orthanc's DicomTls* settings); the node
            is registered with ``UseDicomTls``.
    """

    def __init__(self, work: Path, node_port: int, concurrent_jobs: int = 4, tls: dict[str, Any] | None = None):
        if shutil.which("Orthanc") is None:
            raise RuntimeError("Orthanc is not installed (Debian: apt-get install orthanc orthanc-dicomweb).")
        if not DICOMWEB_PLUGIN.is_file():
            raise RuntimeError(f"{DICOMWEB_PLUGIN} is missing (Debian: apt-get install orthanc-dicomweb).")
        self.work = Path(work)
        self.http_port, self.dicom_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.config = {
            "Name": "FAIRDRO_TEST_PACS",
            "StorageDirectory": str(self.work / "storage"),
            "IndexDirectory": str(self.work / "index"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": ORTHANC_AET,
            "RemoteAccessAllowed": False,  # HTTP from this machine only
            "AuthenticationEnabled": False,
            "DicomAlwaysAllowStore": False,  # only registered modalities may C-STORE into it ...
            "DicomAlwaysAllowEcho": False,
            "DicomAlwaysAllowFind": False,
            "DicomAlwaysAllowGet": False,
            "DicomAlwaysAllowMove": False,
            "DicomCheckModalityHost": True,  # ... from their registered address (127.0.0.1)
            "DicomModalities": {NODE_MODALITY: [NODE_AET, "127.0.0.1", int(node_port)]},
            "ConcurrentJobs": int(concurrent_jobs),
            "Plugins": [str(DICOMWEB_PLUGIN)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "StableAge": 2,
        }
        if tls:
            self.config.update({
                "DicomTlsEnabled": True,
                "DicomTlsCertificate": str(tls["certificate"]),
                "DicomTlsPrivateKey": str(tls["private_key"]),
                "DicomTlsTrustedCertificates": str(tls["ca_bundle"]),
                "DicomTlsRemoteCertificateRequired": True,
                "DicomModalities": {
                    NODE_MODALITY: {"AET": NODE_AET, "Host": "127.0.0.1", "Port": int(node_port), "UseDicomTls": True}
                },
            })  # fmt: skip
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> Orthanc:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def start(self, timeout: float = 60.0) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        cfg = self.work / "orthanc.json"
        cfg.write_text(json.dumps(self.config, indent=2))
        self.log_path = self.work / "orthanc.log"
        self._log = open(self.log_path, "w")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(["Orthanc", str(cfg)], stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self.proc.returncode}; log: {self.log_path}")
            try:
                self.get("/system")
                return
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.3)
        raise RuntimeError(f"Orthanc did not answer on {self.url} within {timeout} s; log: {self.log_path}")

    def stop(self) -> None:
        terminate(self.proc, 20)
        if getattr(self, "_log", None):
            self._log.close()

    # ------------------------------------------------------------------------------------------------ REST
    def _request(self, method: str, path: str, body: bytes | None = None, ctype: str = "application/json") -> Any:
        req = urllib.request.Request(self.url + path, data=body, method=method, headers={"Content-Type": ctype})
        with urllib.request.urlopen(req, timeout=60) as resp:
            data = resp.read()
            if resp.headers.get_content_type() in ("application/json", "application/dicom+json"):
                return json.loads(data) if data else None
            return data

    def get(self, path: str) -> Any:
        return self._request("GET", path)

    def post_json(self, path: str, obj: Any) -> Any:
        return self._request("POST", path, json.dumps(obj).encode())

    def upload(self, files: list[Path]) -> str:
        """POST every file to ``/instances``; returns the Orthanc id of their series."""
        series = set()
        for path in files:
            answer = self._request("POST", "/instances", path.read_bytes(), "application/dicom")
            series.add(answer["ParentSeries"])
        if len(series) != 1:
            raise ValueError(f"expected the files of one series, got {len(series)} series")
        return series.pop()

    def send_to_node(self, series_id: str, synchronous: bool = False) -> str | None:
        """``POST /modalities/fairdro/store``: Orthanc C-STOREs the series to the node; returns the job id."""
        answer = self.post_json(
            f"/modalities/{NODE_MODALITY}/store", {"Resources": [series_id], "Synchronous": synchronous}
        )
        return None if synchronous else answer["ID"]

    def job(self, job_id: str) -> dict:
        return self.get(f"/jobs/{job_id}")

    def study_of(self, series_id: str) -> str:
        return self.get(f"/series/{series_id}")["ParentStudy"]

    def series_in_study(self, study_id: str, modality: str) -> list[dict]:
        return [s for s in self.get(f"/studies/{study_id}/series") if s["MainDicomTags"].get("Modality") == modality]

    def instance_file(self, instance_id: str) -> bytes:
        return self._request("GET", f"/instances/{instance_id}/file")


def client_context(pki: dict[str, dict[str, Path]], who: str) -> ssl.SSLContext:
    """A TLS client context of the test PKI (tools/testcerts.py): trusts its CA, presents ``who``'s certificate."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki["ca"]["certificate"]))
    context.load_cert_chain(str(pki[who]["certificate"]), str(pki[who]["private_key"]))
    return context


def node_settings(work: Path, port: int, subgroup_table: Path, quiet_seconds: float, **extra: Any) -> dict[str, Any]:
    """Node settings for these runs: Orthanc may call, subgroups from a PatientID table, quick retries."""
    return {
        "port": port,
        "ae_title": NODE_AET,
        "allowed_calling_aets": [ORTHANC_AET],
        "work_dir": str(Path(work) / "state"),
        "quiet_seconds": quiet_seconds,
        "subgroup_source": {"mode": "lookup", "table": str(subgroup_table), "key": "PatientID"},
        "retry": {"initial_seconds": 1, "max_seconds": 10, "factor": 2},
        **extra,
    }


class NodeProcess:
    """The DICOM node in its own process (``python -m dicom_node``), killable like a real crash.

    Args:
        work: folder for the override config and the node's log.
        overrides: config settings over ``deploy/dicom_node.json`` (port, work_dir, destinations, ...).
        args: further command-line options, e.g. ``["--cold"]`` (also settable between runs).
    """

    def __init__(self, work: Path, overrides: dict[str, Any], args: list[str] | None = None):
        self.work = Path(work)
        self.overrides = overrides
        self.args = list(args or [])
        self.proc: subprocess.Popen | None = None
        self.runs = 0
        self.echo_tls_args: tuple | None = None  # pynetdicom tls_args of the readiness C-ECHO when TLS is on

    def start(self, timeout: float = 120.0, **changes: Any) -> None:
        """Start (or restart) the node; returns once it answers C-ECHO."""
        from pynetdicom import AE
        from pynetdicom.sop_class import Verification

        self.overrides.update(changes)
        self.work.mkdir(parents=True, exist_ok=True)
        self.runs += 1
        cfg = self.work / f"node_overrides_{self.runs}.json"
        cfg.write_text(json.dumps(self.overrides, indent=2))
        self.log_path = self.work / f"node_{self.runs}.log"
        self._log = open(self.log_path, "w")  # noqa: SIM115 (closed in stop/kill)
        path = os.pathsep.join([str(BUNDLE), str(REPO / "deploy")])
        env = dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
        cmd = [sys.executable, "-m", "dicom_node", "--config", str(REPO / "deploy" / "dicom_node.json"), str(cfg),
               *self.args]  # fmt: skip
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        ae = AE(ae_title=self.overrides.get("allowed_calling_aets", [ORTHANC_AET])[0])
        ae.add_requested_context(Verification)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the node exited with {self.proc.returncode}; log: {self.log_path}")
            assoc = ae.associate("127.0.0.1", int(self.overrides["port"]), ae_title=NODE_AET,
                                 tls_args=self.echo_tls_args)  # fmt: skip
            if assoc.is_established:
                status = assoc.send_c_echo()
                assoc.release()
                if status and status.Status == 0:
                    return
            time.sleep(0.5)
        raise RuntimeError(f"the node did not answer C-ECHO within {timeout} s; log: {self.log_path}")

    def kill(self) -> None:
        """SIGKILL: no clean-up, as a power cut or OOM kill would leave it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        self._log.close()

    def stop(self) -> None:
        terminate(self.proc, 60)
        if getattr(self, "_log", None):
            self._log.close()

    def log_text(self) -> str:
        return "".join(p.read_text(errors="replace") for p in sorted(self.work.glob("node_*.log")))

    def metric(self, line_start: str) -> float | None:
        """The value of the first ``/metrics`` line starting with ``line_start`` (e.g.
        ``'fairdro_node_refusals_total{cause="pending_limit"}'``), read from the node's health endpoint
        (``health.enabled`` in the overrides); None when absent."""
        health = self.overrides["health"]
        url = f"http://{health.get('bind_address', '127.0.0.1')}:{int(health['port'])}/metrics"
        with urllib.request.urlopen(url, timeout=10) as resp:
            text = resp.read().decode()
        for line in text.splitlines():
            if line.startswith(line_start + " "):
                return float(line.split()[-1])
        return None


def restamp(datasets: list[pydicom.Dataset]) -> list[pydicom.Dataset]:
    """``datasets`` (one series) given new Study, Series, Frame of Reference and SOP Instance UIDs, in place: a series
    the node and the PACS have not seen, in a study and frame of its own; returns them."""
    from pydicom.uid import generate_uid

    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    for ds in datasets:
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    return datasets


def renamed_series(files: list[Path], out: Path) -> list[Path]:
    """Copies of one series' files under ``out`` with new Study, Series and SOP Instance UIDs (same patient, pixels
    and geometry): a series the node and Orthanc have not seen, in a study of its own."""
    from pydicom.uid import generate_uid

    out.mkdir(parents=True)
    study, series, written = generate_uid(), generate_uid(), []
    for path in files:
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.save_as(out / path.name)
        written.append(out / path.name)
    return written


def _hold_silent(host: str, port: int, source: str, count: int, seconds: float) -> None:
    """Keep ``count`` TCP connections from ``source`` to ``host:port`` open and silent for ``seconds``; a connection
    the server closes is reopened at once (at most one reopen per connection per 10 ms). Prints the reopen count."""
    import selectors

    sel, reopened, deadline = selectors.DefaultSelector(), 0, time.monotonic() + seconds
    stop: list[int] = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))  # SilentClients.stop: report, then exit

    def open_one() -> None:
        sock = socket.create_connection((host, port), timeout=5, source_address=(source, 0))
        sock.setblocking(False)
        sel.register(sock, selectors.EVENT_READ)

    for _ in range(count):
        open_one()
    while time.monotonic() < deadline and not stop:
        for key, _ in sel.select(timeout=0.2):
            sock = key.fileobj
            try:
                data = sock.recv(65536)
            except OSError:
                data = b""
            if data:
                continue  # a TLS alert or an A-ABORT: wait for the close
            sel.unregister(sock)
            sock.close()
            time.sleep(0.01)
            open_one()
            reopened += 1
    print(json.dumps({"reopened": reopened}), flush=True)


class SilentClients:
    """``count`` silent connections to the node from ``source`` (127.0.0.2), held by a separate process for at most
    ``seconds`` (reopened as soon as the node closes them), like a port scanner that never speaks."""

    def __init__(self, port: int, count: int = 50, source: str = "127.0.0.2", seconds: float = 120.0,
                 host: str = "127.0.0.1"):  # fmt: skip
        args = [sys.executable, __file__, "--silent", host, str(port), source, str(count), str(seconds)]
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)

    def stop(self) -> dict[str, Any]:
        """Stop the process; returns ``{"reopened": n}`` (empty when it printed nothing)."""
        terminate(self.proc, 10)
        out = self.proc.stdout.read() if self.proc.stdout else ""
        return json.loads(out) if out.strip() else {}

    def __enter__(self) -> SilentClients:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


if __name__ == "__main__" and sys.argv[1:2] == ["--silent"]:
    _host, _port, _source, _count, _seconds = sys.argv[2:7]
    _hold_silent(_host, int(_port), _source, int(_count), float(_seconds))


def closed_by_peer(sock: socket.socket, seconds: float) -> bool:
    """Whether the other end closes ``sock`` within ``seconds`` (EOF or reset; data before it is read and dropped)."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            if sock.recv(1024) == b"":
                return True
        except ConnectionResetError:
            return True
        except (TimeoutError, socket.timeout):
            return False
    return False
