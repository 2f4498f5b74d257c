"""Crash-safe checkpoint writing and verified, pickle-free checkpoint loading.

Why this module exists (checked against monai 1.6.1 and pytorch-ignite 0.5.5):

- MONAI's :class:`monai.handlers.CheckpointSaver` builds ignite's ``DiskSaver`` with ``atomic=False`` (its
  comment: atomic files would be readable by the owner only), so ``torch.save`` writes straight into
  ``model.pt``. Worse, with a fixed ``key_metric_filename`` ignite's ``Checkpoint`` first *removes* the
  previous best file and only then writes the new one. A run killed in between leaves no ``model.pt`` or a
  truncated one. ignite's own ``atomic=True`` path writes a temporary file and ``os.replace``-s it, but does not
  ``fsync`` it (after a power loss the renamed file can be empty) and still deletes the old file first.
  :class:`AtomicCheckpointSaver` writes to a temporary file in the same folder, ``fsync``-s it, checks that
  ``torch.load(weights_only=True)`` reads it back, ``os.replace``-s it over the target and ``fsync``-s the
  folder; an old file is removed only after its successor is safely on disk.
- MONAI 1.6 loads checkpoints with ``weights_only=True``, so a checkpoint must hold only tensors and plain
  containers. The saver converts what it safely can (MONAI ``MetaTensor`` -> ``torch.Tensor``, numpy scalars ->
  Python numbers, named tuples -> tuples) and refuses anything else by name, at save time rather than at the
  first load.
- ignite's ``Checkpoint`` already unwraps a ``DistributedDataParallel``/``DataParallel`` network before taking
  its ``state_dict``, so the saved keys carry no ``module.`` prefix; the saver also unwraps ``torch.compile``
  (``_orig_mod.``). A prefixed checkpoint from elsewhere is still common, and MONAI Label loads with
  ``strict=False``: a prefixed ``model.pt`` would silently serve random weights. :func:`load_weights` and
  :class:`VerifiedCheckpointLoader` strip such a prefix and load strictly by default.
- :func:`load_weights` and :class:`VerifiedCheckpointLoader` verify a file's hash against an expected value or
  the bundle's ``large_files.yml`` (MONAI's ``download_large_files`` format) before unpickling a single byte, and
  hash exactly the bytes they load.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import pickle
import tempfile
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import yaml
from monai.handlers import CheckpointLoader, CheckpointSaver
from monai.utils import IgniteInfo, min_version, optional_import

Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")
Checkpoint, _ = optional_import("ignite.handlers", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Checkpoint")
DiskSaver, _HAS_DISK_SAVER = optional_import("ignite.handlers", IgniteInfo.OPT_IMPORT_VERSION, min_version, "DiskSaver")
# without ignite (the MONAI Deploy / Label environments) the checkpoint saver below is unusable, the rest is not
_DiskSaverBase = DiskSaver if _HAS_DISK_SAVER else object
idist, _ = optional_import("ignite.distributed")
if TYPE_CHECKING:
    from ignite.engine import Engine

logger = logging.getLogger(__name__)

__all__ = [
    "AtomicCheckpointSaver",
    "CheckpointVerificationError",
    "VerifiedCheckpointLoader",
    "atomic_save",
    "atomic_write_bytes",
    "atomic_write_dicom",
    "atomic_write_json",
    "expected_hash",
    "file_hash",
    "load_checkpoint",
    "load_weights",
    "match_key_prefix",
    "read_large_files",
    "sha256_file",
    "to_plain",
]

#: key prefixes added by wrappers: DistributedDataParallel/DataParallel, torch.compile
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_CHUNK = 1 << 20
_PLAIN_SCALARS = (str, bytes, int, float, bool, complex, type(None), torch.dtype, torch.device)


class CheckpointVerificationError(ValueError):
    """A checkpoint file was refused: wrong hash, pickled objects, or not a readable torch file."""


# --------------------------------------------------------------------------------------------- hashing


def file_hash(path: str | os.PathLike, hash_type: str = "sha256") -> str:
    """Hex digest of a file, read in 1 MiB chunks.

    Args:
        path: the file.
        hash_type: a ``hashlib`` algorithm name (``sha256``, ``md5``, ``sha512`` ...).
    """
    try:
        digest = hashlib.new(hash_type.lower())
    except ValueError as e:
        raise ValueError(f"unknown hash_type {hash_type!r}; use one of sha256, sha512, sha1, md5.") from e
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    """SHA-256 hex digest of a file (what ``large_files.yml`` should record with ``hash_type: sha256``)."""
    return file_hash(path, "sha256")


def read_large_files(path: str | os.PathLike) -> list[dict]:
    """Entries of a ``large_files.yml``/``.yaml``/``.json`` (``path``, ``url``, ``hash_val``, ``hash_type``).

    YAML is read with PyYAML (``yaml.safe_load``), as MONAI's ``download_large_files`` reads it.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file has no ``large_files`` list or cannot be parsed.
    """
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    try:
        content = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as e:
        raise ValueError(f"{path} cannot be parsed: {e}") from e
    entries = content.get("large_files") if isinstance(content, Mapping) else None
    if not isinstance(entries, list) or not all(isinstance(e, Mapping) and "path" in e for e in entries):
        raise ValueError(f"{path} must hold a 'large_files' list of entries with 'path', 'hash_val', 'hash_type'.")
    return [dict(e) for e in entries]


def expected_hash(path: str | os.PathLike, large_files_yml: str | os.PathLike) -> tuple[str, str]:
    """``(hash_val, hash_type)`` recorded for ``path`` in ``large_files_yml``.

    Entry paths are relative to the folder holding ``large_files_yml`` (the bundle root). A missing ``hash_type``
    means ``md5``, MONAI's ``download_url`` default.

    Raises:
        CheckpointVerificationError: no entry names ``path``, or its entry has no ``hash_val``.
    """
    root = Path(large_files_yml).resolve().parent
    target = os.path.realpath(path)
    entries = read_large_files(large_files_yml)
    for entry in entries:
        if os.path.realpath(root / str(entry["path"])) == target:
            hash_val = str(entry.get("hash_val") or "").strip().lower()
            if not hash_val:
                raise CheckpointVerificationError(
                    f"the entry for {path} in {large_files_yml} has no hash_val: nothing to verify it against; "
                    f"record its hash (sha256: {sha256_file(path)}) with hash_type: sha256."
                )
            return hash_val, str(entry.get("hash_type") or "md5").strip().lower()
    listed = [str(e["path"]) for e in entries]
    raise CheckpointVerificationError(
        f"{large_files_yml} has no entry for {path} (entries: {listed}); add one with its hash or pass the "
        "expected hash explicitly."
    )


def _verify_bytes(data: bytes, path: str, expected_sha256: str | None, large_files_yml: str | None) -> None:
    """Check ``data`` (the bytes read from ``path``) against every expected hash given."""
    checks: list[tuple[str, str, str]] = []  # (hash_type, expected, source)
    if expected_sha256 is not None:
        checks.append(("sha256", str(expected_sha256).strip().lower(), "expected_sha256"))
    if large_files_yml is not None:
        hash_val, hash_type = expected_hash(path, large_files_yml)
        checks.append((hash_type, hash_val, str(large_files_yml)))
    if not checks:
        logger.info("no expected hash given for %s: loading it unverified (weights_only=True still applies).", path)
        return
    for hash_type, expected, source in checks:
        try:
            actual = hashlib.new(hash_type, data).hexdigest()
        except ValueError as e:
            raise CheckpointVerificationError(f"unknown hash_type {hash_type!r} for {path} in {source}.") from e
        if actual != expected:
            raise CheckpointVerificationError(
                f"{path} does not match its expected {hash_type} hash (from {source}): expected {expected}, got "
                f"{actual}. The file is corrupt, incomplete or not the released one; download it again "
                "(python -m monai.bundle download_large_files --bundle_path <bundle>) or update the expected hash "
                "if you replaced the weights on purpose."
            )
    logger.info("verified %s (%s).", path, ", ".join(f"{t} from {s}" for t, _, s in checks))


# --------------------------------------------------------------------------------------------- loading


def _torch_load(data: bytes, path: str, map_location: Any) -> Any:
    try:
        return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointVerificationError(
            f"{path} holds pickled Python objects, not only tensors and plain containers, so it is refused "
            "(loading it could run arbitrary code). If you trust its origin, load it once with weights_only=False "
            f"and re-save just the state_dict: torch.save(model.state_dict(), path). Detail: {str(e)[:300]}"
        ) from e
    except (RuntimeError, EOFError) as e:
        raise CheckpointVerificationError(
            f"{path} is not a readable torch checkpoint (truncated or corrupt?): {type(e).__name__}: {str(e)[:300]}"
        ) from e


def load_checkpoint(
    path: str | os.PathLike,
    *,
    expected_sha256: str | None = None,
    large_files_yml: str | os.PathLike | None = None,
    map_location: Any = "cpu",
) -> Any:
    """Read a checkpoint once, verify its hash, then ``torch.load(weights_only=True)`` those same bytes.

    Args:
        path: the checkpoint.
        expected_sha256: SHA-256 the file must have.
        large_files_yml: a ``large_files.yml`` whose entry for ``path`` gives the expected hash.
        map_location: as for ``torch.load``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointVerificationError: hash mismatch, pickled objects, or an unreadable file.
    """
    path = str(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    with open(path, "rb") as f:
        data = f.read()
    _verify_bytes(data, path, expected_sha256, None if large_files_yml is None else str(large_files_yml))
    return _torch_load(data, path, map_location)


def match_key_prefix(state_dict: Mapping[str, Any], reference_keys: Any) -> dict[str, Any]:
    """Drop wrapper prefixes (``module.``, ``_orig_mod.``) that the target network does not have.

    A prefix is removed only when every key of ``state_dict`` carries it and the network's own keys do not, so a
    network whose real first submodule is called ``module`` is left alone.

    Args:
        state_dict: the checkpoint's state dict.
        reference_keys: the target network's state-dict keys.
    """
    ref = list(reference_keys)
    out = dict(state_dict)
    changed = True
    while changed and out:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in out) and not (ref and all(k.startswith(prefix) for k in ref)):
                out = {k[len(prefix) :]: v for k, v in out.items()}
                logger.info("stripped the %r prefix from the checkpoint's keys.", prefix)
                changed = True
    return out


def _unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The network inside DistributedDataParallel / DataParallel / torch.compile wrappers."""
    while True:
        if isinstance(module, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            module = module.module
        elif isinstance(getattr(module, "_orig_mod", None), torch.nn.Module):
            module = module._orig_mod
        else:
            return module


def _short(keys: list[str], limit: int = 10) -> str:
    return ", ".join(keys[:limit]) + (f" ... (+{len(keys) - limit} more)" if len(keys) > limit else "")


def _load_module_state(network: torch.nn.Module, state: Mapping[str, Any], strict: bool, source: str) -> Any:
    """Load ``state`` into ``network``: prefixes matched, keys checked with messages that name them."""
    target = _unwrap(network)
    own = target.state_dict()
    state = match_key_prefix(state, own.keys())
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k}: checkpoint {tuple(v.shape)} vs network {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and isinstance(v, torch.Tensor) and tuple(v.shape) != tuple(own[k].shape)
    ]
    if shapes:
        raise ValueError(f"{source} does not fit the network: shapes differ for {_short(shapes, 5)}.")
    if len(missing) == len(own) and own:
        raise ValueError(
            f"no key of {source} matches the network (first network keys: {_short(list(own), 3)}; first checkpoint "
            f"keys: {_short(list(state), 3)}); loading it would leave random weights. Is it this network's checkpoint?"
        )
    if strict and (missing or unexpected):
        raise ValueError(
            f"{source} does not match the network: missing keys [{_short(missing)}]; unexpected keys "
            f"[{_short(unexpected)}]. Check that the network settings (features, experts ...) match those it was "
            "trained with, or pass strict=False to load the matching part."
        )
    if missing or unexpected:
        logger.warning("%s: missing keys [%s]; unexpected keys [%s].", source, _short(missing), _short(unexpected))
    return target.load_state_dict(state, strict=strict)


def _state_dict_of(checkpoint: Any, source: str, key: str) -> Mapping[str, Any]:
    if isinstance(checkpoint, Mapping) and isinstance(checkpoint.get(key), Mapping):
        return checkpoint[key]
    if isinstance(checkpoint, Mapping) and checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        return checkpoint
    found = list(checkpoint) if isinstance(checkpoint, Mapping) else type(checkpoint).__name__
    raise ValueError(f"{source} is neither a state dict nor a dict with a {key!r} state dict (it holds {found}).")


def load_weights(
    path: str | os.PathLike,
    network: torch.nn.Module,
    *,
    expected_sha256: str | None = None,
    large_files_yml: str | os.PathLike | None = None,
    strict: bool = True,
    key: str = "model",
    map_location: Any = "cpu",
) -> torch.nn.Module:
    """Load verified, pickle-free weights into ``network``.

    Args:
        path: a plain state dict, or a dict holding one under ``key`` (as a multi-object ignite checkpoint does).
        network: the target (a DDP/DataParallel/compiled wrapper is unwrapped).
        expected_sha256: SHA-256 the file must have.
        large_files_yml: a ``large_files.yml`` whose entry for ``path`` gives the expected hash.
        strict: require the keys to match exactly (a checkpoint matching no key is refused even when ``False``).
        key: entry holding the state dict in a multi-object checkpoint.
        map_location: as for ``torch.load``.

    Returns:
        ``network``, loaded.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointVerificationError: hash mismatch, pickled objects, unreadable file.
        ValueError: the keys or shapes do not match the network (the message names them).
    """
    checkpoint = load_checkpoint(
        path, expected_sha256=expected_sha256, large_files_yml=large_files_yml, map_location=map_location
    )
    state = _state_dict_of(checkpoint, str(path), key)
    _load_module_state(network, state, strict, str(path))
    logger.info("loaded weights from %s.", path)
    return network


class VerifiedCheckpointLoader(CheckpointLoader):
    """:class:`monai.handlers.CheckpointLoader` that verifies the file's hash before loading it.

    The file is read once; its bytes are hashed and then loaded with ``weights_only=True``. Networks in
    ``load_dict`` get wrapper prefixes matched and key errors that name the keys and the file; other objects
    (optimizer, trainer ...) load through ignite's ``Checkpoint.load_objects``. A refused file raises
    :class:`CheckpointVerificationError` when the engine starts.

    Args:
        load_path: the checkpoint.
        load_dict: objects to load, e.g. ``{"model": network}``; a single object may match a plain state dict.
        large_files_yml: a ``large_files.yml`` whose entry for ``load_path`` gives the expected hash.
        expected_sha256: SHA-256 the file must have.
        name: logger name (default: the engine's logger).
        map_location: as for ``torch.load``.
        strict: require the keys to match exactly.
    """

    def __init__(
        self,
        load_path: str,
        load_dict: dict,
        large_files_yml: str | None = None,
        expected_sha256: str | None = None,
        name: str | None = None,
        map_location: Any = None,
        strict: bool = True,
    ) -> None:
        if not load_path:
            raise ValueError("load_path must name the checkpoint file.")
        if not isinstance(load_dict, Mapping) or not load_dict:
            raise ValueError(f"load_dict must be a non-empty dict of objects to load, got {load_dict!r}.")
        super().__init__(load_path=load_path, load_dict=dict(load_dict), name=name, map_location=map_location)
        self.strict = strict
        self.large_files_yml = large_files_yml
        self.expected_sha256 = expected_sha256

    def __call__(self, engine: Engine) -> None:
        """Verify and load; keep the engine's ``max_epochs`` when the trainer state is restored."""
        checkpoint = load_checkpoint(
            self.load_path,
            expected_sha256=self.expected_sha256,
            large_files_yml=self.large_files_yml,
            map_location=self.map_location,
        )
        source = str(self.load_path)
        if len(self.load_dict) == 1:
            only = next(iter(self.load_dict))
            if not (isinstance(checkpoint, Mapping) and only in checkpoint):
                checkpoint = {only: checkpoint}
        if not isinstance(checkpoint, Mapping):
            raise ValueError(f"{source} holds a {type(checkpoint).__name__}, expected a dict of state dicts.")
        absent = [k for k in self.load_dict if k not in checkpoint]
        if absent:
            raise ValueError(f"{source} has no entry for {absent} (it holds {list(checkpoint)}).")
        others = {}
        for k, obj in self.load_dict.items():
            if isinstance(obj, torch.nn.Module):
                _load_module_state(obj, checkpoint[k], self.strict, f"{source} [{k}]")
            else:
                others[k] = obj
        if others:
            max_epochs = engine.state.max_epochs
            Checkpoint.load_objects(to_load=others, checkpoint=dict(checkpoint), strict=self.strict)
            if max_epochs is not None and engine.state.epoch > max_epochs:
                raise ValueError(
                    f"{source} was saved at epoch {engine.state.epoch}, beyond this run's max_epochs {max_epochs}; "
                    "raise max_epochs to continue training from it."
                )
            engine.state.max_epochs = max_epochs
        self.logger.info("restored %s from %s", list(self.load_dict), source)


# --------------------------------------------------------------------------------------------- saving


def to_plain(obj: Any, where: str = "checkpoint") -> Any:
    """Copy of ``obj`` made of tensors and plain containers only, so ``torch.load(weights_only=True)`` reads it.

    Converted: tensor subclasses (MONAI ``MetaTensor``) to ``torch.Tensor``, numpy arrays to tensors, numpy scalars
    to Python numbers, named tuples to tuples, ``torch.Size`` to a tuple.

    Raises:
        TypeError: for any other object, naming where in the checkpoint it is.
    """
    if isinstance(obj, torch.Tensor):
        return obj.detach().as_subclass(torch.Tensor) if type(obj) is not torch.Tensor else obj.detach()
    if isinstance(obj, _PLAIN_SCALARS):
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        if obj.dtype == object:
            raise TypeError(f"{where} is a numpy array of Python objects; store numbers or tensors instead.")
        return torch.from_numpy(np.array(obj))
    if isinstance(obj, Mapping):
        out = OrderedDict() if isinstance(obj, OrderedDict) else {}
        for k, v in obj.items():
            key = to_plain(k, f"{where} key {k!r}")
            out[key] = to_plain(v, f"{where}[{k!r}]")
        return out
    if isinstance(obj, (list, tuple)):  # torch.Size and named tuples become plain tuples
        items = [to_plain(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        return items if isinstance(obj, list) else tuple(items)
    raise TypeError(
        f"{where} is a {type(obj).__module__}.{type(obj).__qualname__} object: a checkpoint may only hold tensors "
        "and plain containers (dict, list, tuple, str, numbers), so that torch.load(weights_only=True) can read it; "
        "save its state_dict() instead."
    )


def default_file_mode() -> int:
    """Permission bits a plain ``open()`` would give a new file under the current umask (``mkstemp`` uses 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def fsync_folder(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not supported (e.g. Windows): the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_save(obj: Any, path: str | os.PathLike, save_func: Callable = torch.save, verify: bool = True) -> None:
    """Write ``obj`` so that ``path`` holds either its previous content or the complete new one, never a mix.

    Steps: serialise into a temporary file in the same folder (``.<name>.<random>.tmp``), flush and ``fsync`` it,
    optionally read it back with ``torch.load(weights_only=True)``, give it the target's permissions (or the
    umask's default), ``os.replace`` it over ``path``, ``fsync`` the folder. On any error the temporary file is
    removed and ``path`` is untouched; a ``SIGKILL`` can leave a stray ``.tmp`` file, never a damaged ``path``.

    Args:
        obj: what to save (already plain; see :func:`to_plain`).
        path: the target file.
        save_func: serialiser called as ``save_func(obj, file_object)``.
        verify: read the temporary file back before replacing the target.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    mode = os.stat(path).st_mode & 0o777 if os.path.exists(path) else default_file_mode()
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            save_func(obj, f)
            f.flush()
            os.fsync(f.fileno())
        if verify:
            torch.load(tmp, map_location="cpu", weights_only=True, mmap=True)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_folder(folder)


def atomic_write_bytes(data: bytes, path: str | os.PathLike) -> None:
    """:func:`atomic_save` of raw bytes (temp file, ``fsync``, rename, folder ``fsync``)."""
    atomic_save(data, path, save_func=lambda blob, f: f.write(blob), verify=False)


def atomic_write_json(obj: Any, path: str | os.PathLike) -> None:
    """:func:`atomic_save` of ``obj`` as indented JSON with a final newline."""
    atomic_write_bytes((json.dumps(obj, indent=2) + "\n").encode("utf-8"), path)


def _write_dicom_file(ds: Any, f: Any) -> None:
    ds.save_as(f, enforce_file_format=True)  # DICOM Part 10: preamble, File Meta, then the dataset


def atomic_write_dicom(ds: Any, path: str | os.PathLike) -> Path:
    """:func:`atomic_save` of a pydicom ``Dataset`` (with ``file_meta``) as a DICOM file; returns ``path``.

    The clinical outputs (SEG, RTSTRUCT) are written this way, so a PACS or planning system watching the folder
    never sees a half-written file, and a file that is there survives a power loss.
    """
    atomic_save(ds, path, save_func=_write_dicom_file, verify=False)
    return Path(path)


class _AtomicDiskSaver(_DiskSaverBase):
    """ignite ``DiskSaver`` that writes with :func:`atomic_save` and defers removals until the next save is done.

    ignite's ``Checkpoint`` removes an outdated file *before* it writes its successor; here the removal waits until
    the new file is on disk. With a fixed ``filename`` (MONAI's ``key_metric_filename``/``final_filename``) the new
    file simply replaces the old one.
    """

    def __init__(self, dirname: str, filename: str | None = None) -> None:
        super().__init__(dirname=dirname, atomic=False, create_dir=True, require_empty=False)
        self.filename = filename
        self._pending_removal: list[str] = []

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        name = self.filename if self.filename is not None else filename
        super().__call__(checkpoint=checkpoint, filename=name, metadata=metadata)
        pending, self._pending_removal = self._pending_removal, []
        if idist.get_rank() == self.save_on_rank:
            for old in pending:
                if old != name:
                    (self.dirname / old).unlink(missing_ok=True)

    def _save_func(self, checkpoint: Mapping, path: Path, func: Callable) -> None:
        atomic_save(to_plain(checkpoint), path, save_func=func)

    def remove(self, filename: str) -> None:
        name = self.filename if self.filename is not None else filename
        if name not in self._pending_removal:
            self._pending_removal.append(name)


class _Unwrapped:
    """What ignite's ``Checkpoint`` sees for a network: the state dict of the innermost module (no prefixes)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module

    def state_dict(self) -> dict[str, Any]:
        return _unwrap(self.module).state_dict()

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True) -> Any:
        return _unwrap(self.module).load_state_dict(state_dict, strict=strict)


class AtomicCheckpointSaver(CheckpointSaver):
    """:class:`monai.handlers.CheckpointSaver` whose files are always complete, plain and prefix-free.

    Same arguments and behaviour as MONAI's saver, except that every file is written by :func:`atomic_save`
    (temporary file, ``fsync``, read-back check, ``os.replace``), holds only tensors and plain containers
    (:func:`to_plain`; anything else raises ``TypeError`` at save time), a replaced checkpoint is removed only after
    its successor is on disk, and a DDP/DataParallel/``torch.compile`` network is saved without ``module.`` or
    ``_orig_mod.`` prefixes. Only rank 0 writes (ignite's ``DiskSaver`` rule).

    Args:
        save_dir: folder of the checkpoints.
        save_dict: objects to save, e.g. ``{"model": network}`` (a single object is saved as its bare state dict).
        name, file_prefix, save_final, final_filename, save_key_metric, key_metric_name, key_metric_n_saved,
        key_metric_filename, key_metric_save_state, key_metric_greater_or_equal, key_metric_negative_sign,
        epoch_level, save_interval, n_saved: as for :class:`monai.handlers.CheckpointSaver`.
    """

    def __init__(
        self,
        save_dir: str,
        save_dict: dict,
        name: str | None = None,
        file_prefix: str = "",
        save_final: bool = False,
        final_filename: str | None = None,
        save_key_metric: bool = False,
        key_metric_name: str | None = None,
        key_metric_n_saved: int = 1,
        key_metric_filename: str | None = None,
        key_metric_save_state: bool = False,
        key_metric_greater_or_equal: bool = False,
        key_metric_negative_sign: bool = False,
        epoch_level: bool = True,
        save_interval: int = 0,
        n_saved: int | None = None,
    ) -> None:
        if not save_dir:
            raise ValueError("save_dir must name the folder the checkpoints are written to.")
        if not isinstance(save_dict, Mapping) or not save_dict:
            raise ValueError(f"save_dict must be a non-empty dict of objects to save, got {save_dict!r}.")
        adapted = {k: _Unwrapped(v) if isinstance(v, torch.nn.Module) else v for k, v in save_dict.items()}
        super().__init__(
            save_dir=save_dir,
            save_dict=adapted,
            name=name,
            file_prefix=file_prefix,
            save_final=save_final,
            final_filename=final_filename,
            save_key_metric=save_key_metric,
            key_metric_name=key_metric_name,
            key_metric_n_saved=key_metric_n_saved,
            key_metric_filename=key_metric_filename,
            key_metric_save_state=key_metric_save_state,
            key_metric_greater_or_equal=key_metric_greater_or_equal,
            key_metric_negative_sign=key_metric_negative_sign,
            epoch_level=epoch_level,
            save_interval=save_interval,
            n_saved=n_saved,
        )
        self.save_dict = save_dict
        # MONAI keeps its three ignite Checkpoint objects in these attributes; swap in the atomic writer
        for checkpoint in (self._final_checkpoint, self._key_metric_checkpoint, self._interval_checkpoint):
            if checkpoint is not None:
                fixed = getattr(checkpoint.save_handler, "filename", None)
                checkpoint.save_handler = _AtomicDiskSaver(dirname=save_dir, filename=fixed)
