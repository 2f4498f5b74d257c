"""Crash-safe checkpoint saving and verified, pickle-free loading."""

import hashlib
import io
import os
import signal
import sys
import time

import pytest
import torch
from ignite.engine import Engine, Events
from monai.data import MetaTensor
from monai.handlers import CheckpointLoader, CheckpointSaver
from scripts.safe_io import (
    AtomicCheckpointSaver,
    CheckpointVerificationError,
    VerifiedCheckpointLoader,
    atomic_save,
    atomic_write_dicom,
    load_weights,
    match_key_prefix,
    read_large_files,
    sha256_file,
    to_plain,
)


class Pickled:
    """Any custom class: torch.save pickles it, torch.load(weights_only=True) refuses it."""

    def __init__(self):
        self.payload = 1


class Wrapper(torch.nn.Module):
    """A network whose real first submodule is called ``module`` (its keys legitimately start with it)."""

    def __init__(self):
        super().__init__()
        self.module = torch.nn.Linear(3, 2)


def _net(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _engine_with_metric(values):
    """An engine whose epoch ``e`` ends with ``metrics['dice'] = values[e - 1]``."""
    engine = Engine(lambda e, b: None)

    @engine.on(Events.EPOCH_COMPLETED)
    def _set_metric(e):
        e.state.metrics["dice"] = values[e.state.epoch - 1]

    return engine


def _crashing_save(real_save, watched=None, seen=None):
    """A torch.save that writes half the checkpoint and dies, as a kill or a full disk would leave it.

    When ``watched`` is given, ``seen`` records whether that file existed when the save began.
    """

    def save(obj, f, **kwargs):
        if watched is not None:
            seen.append(os.path.exists(watched))
        buffer = io.BytesIO()
        real_save(obj, buffer)
        data = buffer.getvalue()[: len(buffer.getvalue()) // 2]
        if isinstance(f, (str, os.PathLike)):
            with open(f, "wb") as out:
                out.write(data)
        else:
            f.write(data)
        raise OSError("simulated crash in the middle of torch.save")

    return save


# ---- is MONAI's saver atomic? (evidence for why AtomicCheckpointSaver exists)


@pytest.mark.parametrize("saver_cls", [CheckpointSaver, AtomicCheckpointSaver])
def test_crash_during_save_keeps_previous_model(tmp_path, monkeypatch, saver_cls):
    net = _net()
    saver = saver_cls(
        save_dir=str(tmp_path), save_dict={"model": net}, save_key_metric=True, key_metric_name="dice",
        key_metric_filename="model.pt",
    )  # fmt: skip
    engine = _engine_with_metric([0.5, 0.6])
    saver.attach(engine)
    first = {k: v.clone() for k, v in net.state_dict().items()}
    existed = []  # did model.pt exist when the second save began?

    @engine.on(Events.EPOCH_COMPLETED(once=1))
    def _change_weights_and_arm_crash(e):  # runs after the saver wrote epoch 1's model.pt
        torch.nn.init.ones_(net[0].weight)
        monkeypatch.setattr(torch, "save", _crashing_save(torch.save, tmp_path / "model.pt", existed))

    with pytest.raises(OSError, match="simulated crash"):
        engine.run([0], max_epochs=2)
    path = tmp_path / "model.pt"
    if saver_cls is CheckpointSaver:
        # MONAI 1.6.1 passes atomic=False to ignite's DiskSaver, and ignite's Checkpoint removes the old best file
        # before writing the new one: after the crash model.pt is a truncated file that does not load
        assert existed == [False]
        with pytest.raises(Exception):  # noqa: B017 - whatever torch raises for a truncated zip
            torch.load(path, weights_only=True)
        return
    assert existed == [True]
    state = torch.load(path, weights_only=True)  # the previous best, complete
    assert state.keys() == first.keys() and all(torch.equal(state[k], first[k]) for k in state)
    assert sorted(os.listdir(tmp_path)) == ["model.pt"]  # the temporary file was cleaned up


def test_ignite_atomic_mode_does_not_fsync(tmp_path, monkeypatch):
    """ignite's own atomic=True writes a temp file and renames it, but never fsyncs: not enough after power loss."""
    from ignite.handlers import DiskSaver

    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd) or real_fsync(fd))
    DiskSaver(str(tmp_path), atomic=True, require_empty=False)({"w": torch.ones(2)}, "ignite.pt")
    assert synced == []
    atomic_save({"w": torch.ones(2)}, tmp_path / "ours.pt")
    assert len(synced) >= 1  # the file (and the folder, where supported)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_sigkill_during_save_leaves_previous_model(tmp_path):
    path = tmp_path / "model.pt"
    old = _net(0)
    atomic_save(old.state_dict(), path)
    buffer = io.BytesIO()
    torch.save(_net(1).state_dict(), buffer)
    payload = buffer.getvalue()
    marker = tmp_path / "half_written"

    def stalled_save(obj, f):  # writes half the new checkpoint to disk, then hangs until killed
        f.write(payload[: len(payload) // 2])
        f.flush()
        os.fsync(f.fileno())
        marker.touch()
        time.sleep(60)

    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        try:
            atomic_save({"ignored": 0}, path, save_func=stalled_save, verify=False)
        finally:
            os._exit(0)
    deadline = time.monotonic() + 20
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    assert marker.exists()
    restored = _net(2)
    restored.load_state_dict(torch.load(path, weights_only=True))
    assert _same(restored, old)
    leftovers = [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
    assert leftovers and all(n.startswith(".model.pt.") for n in leftovers)  # a stray temp file, never model.pt


# ---- what the saver writes


def test_saver_writes_plain_prefix_free_readable_files(tmp_path):
    net = torch.nn.DataParallel(_net())  # keys of a wrapped network start with "module."
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    saver = AtomicCheckpointSaver(
        save_dir=str(tmp_path), save_dict={"model": net, "optimizer": optimizer}, save_key_metric=True,
        key_metric_name="dice", key_metric_filename="model.pt", key_metric_save_state=True,
        save_interval=1, n_saved=2, file_prefix="ckpt",
    )  # fmt: skip
    engine = _engine_with_metric([0.5, 0.7, 0.6])
    saver.attach(engine)
    engine.run([0], max_epochs=3)
    names = sorted(n for n in os.listdir(tmp_path))
    assert names == ["ckpt_checkpoint_epoch=2.pt", "ckpt_checkpoint_epoch=3.pt", "model.pt"]
    best = torch.load(tmp_path / "model.pt", weights_only=True)
    assert set(best) == {"model", "optimizer", "checkpointer"}
    assert not any(k.startswith("module.") for k in best["model"])
    assert best["checkpointer"]["_saved"][0][0] == pytest.approx(0.7)
    plain = _net(3)
    plain.load_state_dict(best["model"])  # strict
    assert _same(plain, net.module)
    mode = os.stat(tmp_path / "model.pt").st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask  # not the owner-only mode of a temporary file


def test_saver_takes_every_monai_saver_argument():
    import inspect

    ours = inspect.signature(AtomicCheckpointSaver.__init__).parameters
    theirs = inspect.signature(CheckpointSaver.__init__).parameters
    assert list(ours) == list(theirs)
    assert all(ours[k].default == theirs[k].default for k in theirs)


def test_saver_unwraps_distributed_data_parallel(tmp_path, monkeypatch):
    import ignite.distributed as idist
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("gloo backend not available")
    monkeypatch.setenv("LOCAL_RANK", "0")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(_net())
        assert all(k.startswith("module.") for k in ddp.state_dict())
        saver = AtomicCheckpointSaver(str(tmp_path), {"model": ddp}, save_final=True, final_filename="model.pt")
        engine = Engine(lambda e, b: None)
        saver.attach(engine)
        engine.run([0], max_epochs=1)
    finally:
        dist.destroy_process_group()
        idist.sync()  # ignite caches the distributed context: back to serial for the other tests
    state = torch.load(tmp_path / "model.pt", weights_only=True)
    assert state.keys() == _net().state_dict().keys()  # no "module." prefix: MONAI Label's strict=False is safe


def test_saver_refuses_non_plain_objects_at_save_time(tmp_path):
    class Holder:
        def state_dict(self):
            return {"thing": Pickled()}

        def load_state_dict(self, state):
            pass

    saver = AtomicCheckpointSaver(str(tmp_path), {"model": _net(), "holder": Holder()}, save_interval=1)
    engine = Engine(lambda e, b: None)
    saver.attach(engine)
    with pytest.raises(TypeError, match=r"\['holder'\]\['thing'\].*Pickled"):
        engine.run([0], max_epochs=1)
    assert [n for n in os.listdir(tmp_path)] == []


def test_to_plain_converts_what_it_safely_can(tmp_path):
    import numpy as np

    obj = {"t": MetaTensor(torch.ones(2)), "n": np.float32(0.5), "a": np.arange(3), "s": torch.Size([2, 3])}
    plain = to_plain(obj)
    assert type(plain["t"]) is torch.Tensor and plain["n"] == 0.5 and plain["s"] == (2, 3)
    atomic_save(plain, tmp_path / "x.pt")
    back = torch.load(tmp_path / "x.pt", weights_only=True)
    assert torch.equal(back["a"], torch.arange(3))
    with pytest.raises(TypeError, match="checkpoint\\['p'\\]"):
        to_plain({"p": Pickled()})


def test_monai_checkpoint_loader_reads_saver_output(tmp_path):
    net = _net()
    AtomicCheckpointSaver(str(tmp_path), {"model": net}, save_final=True, final_filename="model.pt").attach(
        engine := Engine(lambda e, b: None)
    )
    engine.run([0], max_epochs=1)
    target = _net(5)
    CheckpointLoader(str(tmp_path / "model.pt"), {"model": target})(Engine(lambda e, b: None))
    assert _same(target, net)


# ---- loading


@pytest.fixture
def weights(tmp_path):
    net = _net()
    path = tmp_path / "models" / "model.pt"
    path.parent.mkdir()
    torch.save(net.state_dict(), path)
    return net, path


def _write_yml(tmp_path, path, hash_val, hash_type="sha256"):
    yml = tmp_path / "large_files.yml"
    rel = os.path.relpath(path, tmp_path)
    yml.write_text(
        "large_files:\n"
        f'  - path: "{rel}"  # the released weights\n'
        '    url: "https://example.org/model.pt"\n'
        f'    hash_val: "{hash_val}"\n'
        f'    hash_type: "{hash_type}"\n'
    )
    return yml


def test_sha256_file(weights):
    _, path = weights
    assert sha256_file(path) == hashlib.sha256(path.read_bytes()).hexdigest()


def test_load_weights_verified_against_hash_and_yml(tmp_path, weights):
    net, path = weights
    yml = _write_yml(tmp_path, path, sha256_file(path))
    target = load_weights(path, _net(7), expected_sha256=sha256_file(path), large_files_yml=yml)
    assert _same(target, net)
    md5_yml = _write_yml(tmp_path, path, hashlib.md5(path.read_bytes()).hexdigest(), "md5")
    assert _same(load_weights(path, _net(7), large_files_yml=md5_yml), net)


def test_tampered_file_is_refused(tmp_path, weights):
    _, path = weights
    good = sha256_file(path)
    yml = _write_yml(tmp_path, path, good)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # one byte changed
    path.write_bytes(bytes(data))
    bad = sha256_file(path)
    for kwargs in ({"expected_sha256": good}, {"large_files_yml": yml}):
        with pytest.raises(CheckpointVerificationError) as excinfo:
            load_weights(path, _net(), **kwargs)
        message = str(excinfo.value)
        assert str(path) in message and good in message and bad in message


def test_file_missing_from_yml_is_refused(tmp_path, weights):
    _, path = weights
    yml = _write_yml(tmp_path, tmp_path / "models" / "other.pt", "0" * 64)
    with pytest.raises(CheckpointVerificationError, match="no entry for"):
        load_weights(path, _net(), large_files_yml=yml)


def test_pickle_bearing_checkpoint_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": _net().state_dict(), "extra": Pickled()}, path)
    with pytest.raises(CheckpointVerificationError, match="pickled Python objects") as excinfo:
        load_weights(path, _net())
    assert str(path) in str(excinfo.value)


def test_truncated_checkpoint_is_refused(weights):
    _, path = weights
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointVerificationError, match="not a readable torch checkpoint"):
        load_weights(path, _net())


def test_module_prefixed_checkpoint_loads_into_plain_network(tmp_path):
    net = _net()
    path = tmp_path / "ddp.pt"
    torch.save({"model": {f"module.{k}": v for k, v in net.state_dict().items()}}, path)
    assert _same(load_weights(path, _net(9)), net)
    # a network whose own keys start with "module." keeps them
    wrapper = Wrapper()
    torch.save(wrapper.state_dict(), path)
    assert _same(load_weights(path, Wrapper()), wrapper)
    assert list(match_key_prefix({"_orig_mod.a": 1}, ["a"])) == ["a"]  # torch.compile's prefix


def test_missing_key_raises_with_its_name(tmp_path):
    state = _net().state_dict()
    del state["2.bias"]
    path = tmp_path / "partial.pt"
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"missing keys \[2\.bias\]") as excinfo:
        load_weights(path, _net())
    assert str(path) in str(excinfo.value)
    load_weights(path, _net(), strict=False)  # allowed when asked for, with a warning
    torch.save({"encoder.weight": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="random weights"):  # nothing matches: refused even when not strict
        load_weights(path, _net(), strict=False)


def test_large_files_reader_accepts_yaml_and_json(tmp_path):
    yml = _write_yml(tmp_path, tmp_path / "models" / "model.pt", "ab" * 32)
    (entry,) = read_large_files(yml)
    assert entry == {
        "path": "models/model.pt",
        "url": "https://example.org/model.pt",
        "hash_val": "ab" * 32,
        "hash_type": "sha256",
    }
    as_json = tmp_path / "large_files.json"
    as_json.write_text('{"large_files": [{"path": "models/model.pt", "hash_val": "x"}]}')
    assert read_large_files(as_json)[0]["hash_val"] == "x"
    (tmp_path / "bad.yml").write_text("something: else\n")
    with pytest.raises(ValueError, match="large_files"):
        read_large_files(tmp_path / "bad.yml")


def test_verified_checkpoint_loader(tmp_path, weights):
    net, path = weights
    yml = _write_yml(tmp_path, path, sha256_file(path))
    target = _net(4)
    engine = Engine(lambda e, b: None)
    VerifiedCheckpointLoader(str(path), {"model": target}, large_files_yml=str(yml)).attach(engine)
    engine.run([0], max_epochs=1)
    assert _same(target, net)
    # model + optimizer checkpoint, with the DDP prefix
    optimizer = torch.optim.SGD(net.parameters(), lr=0.3)
    both = tmp_path / "both.pt"
    torch.save({"model": {f"module.{k}": v for k, v in net.state_dict().items()}, "opt": optimizer.state_dict()}, both)
    target, target_opt = _net(5), torch.optim.SGD(_net(5).parameters(), lr=0.01)
    VerifiedCheckpointLoader(str(both), {"model": target, "opt": target_opt})(Engine(lambda e, b: None))
    assert _same(target, net) and target_opt.param_groups[0]["lr"] == 0.3
    # a tampered file stops the engine before the first iteration
    path.write_bytes(path.read_bytes()[:-1] + bytes([path.read_bytes()[-1] ^ 1]))
    engine = Engine(lambda e, b: pytest.fail("must not run"))
    VerifiedCheckpointLoader(str(path), {"model": _net()}, large_files_yml=str(yml)).attach(engine)
    with pytest.raises(CheckpointVerificationError, match="does not match its expected sha256"):
        engine.run([0], max_epochs=1)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))


def _dicom(uid: str):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, RTStructureSetStorage

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = RTStructureSetStorage
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = RTStructureSetStorage, uid
    return ds


def test_atomic_write_dicom_syncs_and_leaves_the_old_file_on_failure(tmp_path, monkeypatch):
    import pydicom

    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd) or real_fsync(fd))
    path = tmp_path / "out" / "RS_1.dcm"
    assert atomic_write_dicom(_dicom("1.2.3"), path) == path
    raw = path.read_bytes()
    assert raw[128:132] == b"DICM"  # Part 10: 128-byte preamble, then the magic, then File Meta
    assert pydicom.dcmread(path).SOPInstanceUID == "1.2.3"
    assert len(synced) == 2  # the file, then its folder
    broken = _dicom("1.2.4")
    del broken.file_meta.TransferSyntaxUID  # pydicom cannot encode it: the write fails half way
    with pytest.raises(Exception):  # noqa: B017 (whatever pydicom raises, the target must stay intact)
        atomic_write_dicom(broken, path)
    assert path.read_bytes() == raw
    assert sorted(p.name for p in path.parent.iterdir()) == ["RS_1.dcm"]  # no temporary file left
