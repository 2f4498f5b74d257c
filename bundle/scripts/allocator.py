"""Keep freed memory in the process for reuse: glibc ``malloc`` settings for CPU training and inference.

With glibc's defaults, a CPU training step returns most of its large tensors to the operating system when it frees
them (allocations above a dynamic threshold are ``mmap``-ed and unmapped on ``free``; the top of the heap is trimmed
above twice that threshold), and the next step gets fresh pages that the kernel must fault in and zero: about 3,000
minor page faults and 4 ms of system time per step of the default dMoE network at 64x64x32 (bundle docs,
Performance). :func:`keep_freed_memory` sets two ``mallopt`` parameters so that the freed memory stays in the heap
and is reused:

- ``M_MMAP_THRESHOLD`` = 32 MiB (:data:`MMAP_THRESHOLD`): blocks below it come from the heap. 32 MiB is glibc's own
  upper bound for its dynamic threshold on 64-bit systems and the largest value every glibc version accepts; the
  tensors of a training step at the default patch size lie well below it, while very large buffers (a whole CT
  volume and its probability map in sliding-window inference) are still mapped and returned to the system on free.
- ``M_TRIM_THRESHOLD`` = 64 MiB (:data:`TRIM_THRESHOLD`, twice the mmap threshold, glibc's own ratio): the process
  keeps at most this much free memory at the top of its heap instead of returning it after every step.

The results are the same bits (only where memory comes from changes). The setting applies to the whole process and
can only be made once it runs, so :mod:`scripts.dmoe` calls :func:`keep_freed_memory` when it is imported (every
dMoE network and the backbone load that module): ``python -m monai.bundle run training`` and inference get it
without a config key.

It does nothing (and logs why at debug level) where the C library is not glibc (macOS, Windows, musl), when
``FAIRDRO_DEFAULT_MALLOC=1`` is set (keep glibc's defaults, e.g. to compare), or when the user already tuned malloc
through ``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_`` or a ``glibc.malloc`` entry of ``GLIBC_TUNABLES``
(their setting is kept).
"""

from __future__ import annotations

import ctypes
import logging
import os
from typing import Optional

__all__ = ["ENV_VAR", "MMAP_THRESHOLD", "TRIM_THRESHOLD", "keep_freed_memory"]

logger = logging.getLogger(__name__)

#: set to 1 to keep glibc's default malloc settings
ENV_VAR = "FAIRDRO_DEFAULT_MALLOC"
#: blocks smaller than this come from the heap (glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit)
MMAP_THRESHOLD = 32 * 2**20
#: free memory kept at the top of the heap before it is returned to the system
TRIM_THRESHOLD = 64 * 2**20
#: mallopt parameter numbers (glibc's malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
#: environment variables through which a user tunes glibc malloc directly
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")

_applied: Optional[bool] = None


def keep_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds (see the module docstring) once per process.

    Returns:
        True when the settings are in effect (set by this or an earlier call), False when nothing was changed.
    """
    global _applied
    if _applied is None:
        _applied = _apply()
    return _applied


def _apply() -> bool:
    reason = _skip_reason()
    if reason:
        logger.debug("allocator: glibc malloc settings left unchanged (%s).", reason)
        return False
    libc = _glibc()
    if libc is None:
        logger.debug("allocator: the C library is not glibc (no mallopt); malloc settings left unchanged.")
        return False
    if not (libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)):
        logger.debug("allocator: mallopt refused the thresholds; malloc settings may be partly unchanged.")
        return False
    logger.debug("allocator: glibc malloc keeps freed memory (mmap threshold %d, trim threshold %d bytes).",
                 MMAP_THRESHOLD, TRIM_THRESHOLD)  # fmt: skip
    return True


def _skip_reason() -> str:
    """Why the settings must not be changed ('' when they may be)."""
    if os.environ.get(ENV_VAR, "").strip() == "1":
        return f"{ENV_VAR}=1"
    given = [name for name in USER_SETTINGS if name in os.environ]
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        given.append("GLIBC_TUNABLES")
    return f"set by the user through {', '.join(given)}" if given else ""


def _glibc() -> Optional[ctypes.CDLL]:
    """The process's C library when it is glibc (it exports ``gnu_get_libc_version``), else None."""
    try:
        libc = ctypes.CDLL(None)
    except (OSError, TypeError):  # Windows: no handle for the main program
        return None
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return None
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    return libc
