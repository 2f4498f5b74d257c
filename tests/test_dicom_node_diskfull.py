"""A full disk during inference: the series stays in processing/, is tried again every
``limits.disk_full_retry_seconds`` until space returns, then delivered once; nothing partial is kept or sent and
nothing goes to failed/. Other errors still move the series to failed/.

The end-to-end test fills a size-limited tmpfs mounted on ``work_dir`` where this process may mount one (root with
CAP_SYS_ADMIN, as in CI); elsewhere it injects ENOSPC into the node's file writes, so it never skips."""

import errno
import json
import logging
import os
import shutil
import subprocess
import time
from pathlib import Path

import pydicom
import pytest
import torch
from conftest import run_bundle_workflow
from dicom_node import DicomNodeError
from dicom_node.limits import Limits
from dicom_node.storage import disk_full_error
from scripts import safe_io
from test_dicom_node import NET, Receiver, _node, _send, _uid, _wait, build_cohort

RETRY = 1.5  # limits.disk_full_retry_seconds in these tests
ENOSPC_TEXT = os.strerror(errno.ENOSPC)  # "No space left on device"


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """The node tests' cohort, with a checkpoint whose head marks every voxel: an RTSTRUCT with a contour on every
    slice, so a partial result is told from a complete one."""
    cohort = build_cohort(tmp_path_factory.mktemp("node_diskfull_cohort"))
    state = torch.load(cohort.ckpt, weights_only=True)
    state["head.conv.bias"].copy_(torch.tensor([-1.0, 1.0]))
    cohort.ckpt = cohort.ckpt.with_name("everywhere.pt")
    torch.save(state, cohort.ckpt)
    return cohort


def _mount_tmpfs(folder: Path, size: str) -> bool:
    """Mount a tmpfs of ``size`` on ``folder``; False where this process may not (not root, no CAP_SYS_ADMIN)."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    command = ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(folder)]
    return subprocess.run(command, capture_output=True).returncode == 0


class SmallDisk:
    """``work_dir`` on a tmpfs of ``size`` (``kind`` "tmpfs") that ``fill`` fills with a ballast file, or, where no
    tmpfs can be mounted (``kind`` "injected"), a plain folder whose atomic writes raise ENOSPC while it is full."""

    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch, tmpfs: bool, size: str = "16m"):
        self.work_dir, self.ballast, self.full = root / "node", root / "node" / "ballast", False
        self.work_dir.mkdir(parents=True)
        mounted = tmpfs and _mount_tmpfs(self.work_dir, size)
        self.kind = "tmpfs" if mounted else "injected"
        if not mounted:
            real = safe_io.atomic_save

            def atomic_save(obj, path, *args, **kwargs):
                if self.full and Path(path).is_relative_to(self.work_dir):
                    raise OSError(errno.ENOSPC, ENOSPC_TEXT, str(path))
                return real(obj, path, *args, **kwargs)

            monkeypatch.setattr(safe_io, "atomic_save", atomic_save)

    def fill(self) -> None:
        """Leave no free byte: write the ballast until the file system answers ENOSPC."""
        self.full = True
        if self.kind != "tmpfs":
            return
        with open(self.ballast, "wb", buffering=0) as f:
            block = b"\0" * 4096
            try:
                while True:
                    f.write(block)
            except OSError as err:
                assert err.errno == errno.ENOSPC
        assert shutil.disk_usage(self.work_dir).free == 0

    def free(self) -> None:
        self.full = False
        self.ballast.unlink(missing_ok=True)

    def close(self) -> None:
        if self.kind == "tmpfs" and subprocess.run(["umount", str(self.work_dir)]).returncode != 0:
            subprocess.run(["umount", "-l", str(self.work_dir)], check=True)


@pytest.fixture(params=["tmpfs", "injected"])
def small_disk(request, tmp_path, monkeypatch):
    """Param "tmpfs": a real full file system where one can be mounted, else injected; "injected": always so."""
    disk = SmallDisk(tmp_path, monkeypatch, tmpfs=request.param == "tmpfs")
    yield disk
    disk.close()


class Attempts:
    """Wraps ``node.inference.run``: records each attempt's start and end (monotonic) and its error; runs
    ``before(n, out_dir)`` just before the real inference of attempt ``n`` (1-based)."""

    def __init__(self, node, before=None):
        self.before, self.log = before, []
        self.real, node.inference.run = node.inference.run, self.run

    def run(self, input_dir, output_dir, subgroup):
        entry = {"start": time.monotonic(), "error": None}
        self.log.append(entry)
        try:
            if self.before:
                self.before(len(self.log), Path(output_dir))
            self.real(input_dir, output_dir, subgroup)
        except Exception as err:
            entry["error"] = err
            raise
        finally:
            entry["end"] = time.monotonic()


def _refusals(node, cause="disk_full") -> int:
    return node.status()["refusals"].get(cause, 0)


def _errors(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.startswith("dicom_node") and r.levelno == logging.ERROR]


def _contoured_slices(rtstruct) -> list[str]:
    """SOP Instance UIDs of the CT slices the RTSTRUCT's contours lie on, one per contour."""
    return [
        str(image.ReferencedSOPInstanceUID)
        for roi in rtstruct.ROIContourSequence
        for contour in getattr(roi, "ContourSequence", [])
        for image in contour.ContourImageSequence
    ]


def _assert_waited(attempts: list[dict], retry: float) -> None:
    """Each attempt after a failed one starts ``retry`` seconds (at least) after the failure."""
    for previous, current in zip(attempts, attempts[1:]):
        gap = current["start"] - previous["end"]
        assert retry - 0.01 <= gap <= retry + 15.0, f"retry after {gap:.2f} s, expected {retry} s"


def _assert_clean(work: Path, uid: str) -> None:
    """Nothing left over: no spool, processing, failed or hidden temp folder; one result folder."""
    assert not any((work / "spool").iterdir()) and not any((work / "processing").iterdir())
    assert not any((work / "failed").iterdir())
    assert [p.name for p in (work / "results").iterdir()] == [uid]


# ---------------------------------------------------------------------------------------------------- unit


def test_disk_full_error_follows_the_exception_chain():
    full, quota = OSError(errno.ENOSPC, ENOSPC_TEXT), OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))
    wrapped = RuntimeError("applying transform SaveImaged")
    wrapped.__cause__ = full
    outer = ValueError("engine failed")
    outer.__context__ = wrapped
    assert disk_full_error(outer) is full
    assert disk_full_error(quota) is quota
    assert disk_full_error(OSError(errno.EIO, "I/O error")) is None
    assert disk_full_error(ValueError(ENOSPC_TEXT)) is None  # only the errno counts, not the wording
    loop_a, loop_b = RuntimeError("a"), RuntimeError("b")
    loop_a.__context__, loop_b.__context__ = loop_b, loop_a
    assert disk_full_error(loop_a) is None and disk_full_error(None) is None


def test_retry_interval_is_a_limit_with_a_safe_default(tmp_path):
    config = json.loads((Path(__file__).resolve().parents[1] / "deploy" / "dicom_node.json").read_text())
    assert Limits().disk_full_retry_seconds == config["limits"]["disk_full_retry_seconds"] == 60
    assert "disk_full_retry_seconds" in config["settings_help"]["limits"]
    for bad in (0, -1, "soon"):
        with pytest.raises(DicomNodeError, match="disk_full_retry_seconds"):
            Limits.parse({"disk_full_retry_seconds": bad})
    node = _node(tmp_path, "x.pt", limits={"disk_full_retry_seconds": 2.5})
    assert node.worker.disk_full_retry_seconds == 2.5


# ------------------------------------------------------------------------------------------------ end to end


def test_disk_full_during_inference_waits_for_space_then_delivers_once(cohort, small_disk, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    series = cohort.series[0]
    uid, sops = _uid(series), sorted(str(ds.SOPInstanceUID) for ds in series)
    receiver = Receiver()
    dest = {"ae_title": "PACS", "host": "127.0.0.1", "port": receiver.port}
    node = _node(tmp_path, cohort.ckpt, work_dir=small_disk.work_dir, destinations=[dest], send_seg=True,
                 min_free_bytes=0, limits={"disk_full_retry_seconds": RETRY})  # fmt: skip
    work, seen = node.work_dir, []

    def before(n, out_dir):
        # what every attempt finds: the whole series in processing/, no earlier temp folder, nothing failed or sent
        seen.append({
            "processing": sorted(p.stem for p in (work / "processing" / uid).glob("*.dcm")),
            "results": [p.name for p in (work / "results").iterdir()],
            "failed": list((work / "failed").iterdir()),
            "sent": len(receiver.received),
        })  # fmt: skip
        if n == 1:
            small_disk.fill()  # the disk fills up while this series is in inference
        elif n == 3:
            small_disk.free()  # space returns during the second wait

    attempts = Attempts(node, before=before)
    node.start()
    try:
        assert _send(node.port, series) == [0] * len(series)
        assert _wait(lambda: _refusals(node) >= 1, 180), node.status()
        assert node.status()["failed"] == 0  # deferred, not failed
        assert node.wait_idle(240), node.status()
    finally:
        node.stop()
        receiver.stop()
    errors = [e["error"] for e in attempts.log]
    assert [disk_full_error(e) is not None for e in errors] == [True, True, False], (small_disk.kind, errors)
    _assert_waited(attempts.log[:3], RETRY)
    for entry in seen:
        assert entry["processing"] == sops and not entry["failed"] and entry["sent"] == 0
        assert len(entry["results"]) == 1 and entry["results"][0].startswith(f".{uid}.")  # this attempt's temp
    status = node.status()
    assert (status["processed"], status["failed"], status["refusals"]) == (1, 0, {"disk_full": 2})
    _assert_clean(work, uid)

    # one complete result, sent once: an RTSTRUCT with a contour on every slice, equal to an undisturbed run
    result = json.loads((work / "results" / uid / "result.json").read_text())
    assert result["instance_count"] == len(series) and result["sop_instance_uids"] == sops
    sent = {ds.Modality: ds for ds in receiver.received}
    assert sorted(ds.Modality for ds in receiver.received) == ["RTSTRUCT", "SEG"]
    kept = pydicom.dcmread(work / "results" / uid / f"RS_{uid}.dcm")
    assert sent["RTSTRUCT"].SOPInstanceUID == kept.SOPInstanceUID
    assert sorted(_contoured_slices(sent["RTSTRUCT"])) == sops
    reference = _reference_run(cohort, series, tmp_path / "reference")
    assert _contours(sent["RTSTRUCT"]) == _contours(pydicom.dcmread(reference / f"RS_{uid}.dcm"))
    assert sent["SEG"].PixelData == pydicom.dcmread(reference / f"SEG_{uid}.dcm").PixelData

    lines = [m for m in _errors(caplog) if "cause=disk_full" in m]
    assert len(lines) == 2 and all(uid in m and ENOSPC_TEXT in m and f"retried in {RETRY:.1f} s" in m for m in lines)
    assert "attempt 1" in lines[0] and "attempt 2" in lines[1]
    assert not [m for m in _errors(caplog) if "no RTSTRUCT" in m]  # no failed/ line


def _contours(rtstruct) -> list[list[float]]:
    return [[float(v) for v in c.ContourData] for roi in rtstruct.ROIContourSequence for c in roi.ContourSequence]


def _reference_run(cohort, series, root: Path) -> Path:
    """The bundle's own DICOM inference on the series (``monai.bundle run`` as documented), into ``root/out``."""
    series_dir, out = root / _uid(series), root / "out"
    series_dir.mkdir(parents=True)
    for ds in series:
        ds.save_as(series_dir / f"{ds.SOPInstanceUID}.dcm")
    run_bundle_workflow(["inference.json", "inference_dicom.json"], "infer", "inference", input_dir=str(series_dir),
                        output_dir=str(out), ckpt_path=str(cohort.ckpt), **NET)  # fmt: skip
    return out


def test_enospc_while_writing_the_result_records_is_retried(cohort, tmp_path, monkeypatch, caplog):
    """Injected ENOSPC (always runs): the RTSTRUCT and SEG are written, then ``result.json`` cannot be."""
    caplog.set_level(logging.INFO)
    series = cohort.series[1]
    uid = _uid(series)
    receiver = Receiver()
    dest = {"ae_title": "PACS", "host": "127.0.0.1", "port": receiver.port}
    node = _node(tmp_path, cohort.ckpt, destinations=[dest], min_free_bytes=0,
                 limits={"disk_full_retry_seconds": RETRY})  # fmt: skip
    work, written, failures = node.work_dir, [], {"left": 1}
    real_save = safe_io.atomic_save

    def atomic_save(obj, path, *args, **kwargs):
        path = Path(path)
        if path.name == "result.json" and failures["left"]:
            failures["left"] -= 1
            written.append(sorted(p.name for p in path.parent.iterdir()))  # the complete outputs, not yet published
            (path.parent / ".result.json.partial.tmp").write_bytes(b'{"series_inst')  # what a full disk leaves
            raise OSError(errno.ENOSPC, ENOSPC_TEXT, str(path))
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(safe_io, "atomic_save", atomic_save)
    attempts = Attempts(node)
    node.start()
    try:
        assert _send(node.port, series) == [0] * len(series)
        assert _wait(lambda: _refusals(node) == 1, 180), node.status()
        assert node.wait_idle(240), node.status()
    finally:
        node.stop()
        receiver.stop()
    assert written == [sorted([f"RS_{uid}.dcm", f"SEG_{uid}.dcm", f"{uid}_seg.nii.gz"])]
    assert len(attempts.log) == 2 and all(e["error"] is None for e in attempts.log)
    # the retry waits the interval after the failed attempt (its inference ended just before result.json)
    gap = attempts.log[1]["start"] - attempts.log[0]["end"]
    assert RETRY - 0.01 <= gap <= RETRY + 15.0, gap
    _assert_clean(work, uid)
    assert len(receiver.rtstructs(uid)) == 1 and len(receiver.received) == 1
    result = json.loads((work / "results" / uid / "result.json").read_text())
    assert result["instance_count"] == len(series) and (work / "results" / uid / "delivery.json").is_file()
    status = node.status()
    assert (status["processed"], status["failed"], status["refusals"]) == (1, 0, {"disk_full": 1})


def test_other_errors_still_move_the_series_to_failed(cohort, tmp_path, caplog):
    """An I/O error other than a full disk is not retried: failed/ with reason.txt, as before; nothing kept or sent."""
    caplog.set_level(logging.INFO)
    series = cohort.series[2]
    uid = _uid(series)
    receiver = Receiver()
    dest = {"ae_title": "PACS", "host": "127.0.0.1", "port": receiver.port}
    node = _node(tmp_path, cohort.ckpt, destinations=[dest], min_free_bytes=0,
                 limits={"disk_full_retry_seconds": 0.2})  # fmt: skip

    def broken_disk(n, out_dir):
        (out_dir / f"RS_{uid}.dcm").write_bytes(b"DICM partial")  # a writer that died half-way
        raise OSError(errno.EIO, os.strerror(errno.EIO), str(out_dir / f"RS_{uid}.dcm"))

    attempts = Attempts(node, before=broken_disk)
    node.start()
    try:
        assert _send(node.port, series) == [0] * len(series)
        assert node.wait_idle(120), node.status()
        time.sleep(1.0)  # five retry intervals: nothing is tried again
    finally:
        node.stop()
        receiver.stop()
    work = node.work_dir
    assert len(attempts.log) == 1 and receiver.received == []
    reason = (work / "failed" / uid / "reason.txt").read_text()
    assert "OSError" in reason and os.strerror(errno.EIO) in reason
    assert sorted(p.stem for p in (work / "failed" / uid).glob("*.dcm")) == sorted(
        str(ds.SOPInstanceUID) for ds in series
    )
    assert not any((work / "results").iterdir()) and not any((work / "processing").iterdir())
    status = node.status()
    assert (status["processed"], status["failed"], status["refusals"]) == (0, 1, {})
    assert [m for m in _errors(caplog) if "cause=disk_full" in m] == []
