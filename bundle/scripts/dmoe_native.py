"""Build, load and call the native CPU kernels of the dMoE layer (``scripts/dmoe_cpu.cpp``: experts, dropout and
residual; ``scripts/dmoe_router_cpu.cpp``: router; ``scripts/dmoe_rng_cpu.cpp``: the layer's random numbers;
``scripts/dmoe_layer_cpu.cpp``: the layer's whole forward in one call, :func:`native_layer`).

The kernels compute, for each voxel where it lies in the (B, C, N) feature map, the router's top-k gates and the
layer's output ``h + dropout(gate-weighted sum of the chosen experts' MLPs)``, and in the backward pass all
gradients (see the C++ files' headers). They replace the per-expert matrix products, gathers, sort and element-wise
operations of the Python paths on the CPU (bundle docs, Performance). The layer's random numbers (router noise,
dropout draws) come from torch's default generator either way: :func:`randn` and :func:`random64` draw the same
values as ``torch.randn`` and ``random_()`` and leave the generator where they leave it, only faster (checked
against torch once per process, see :func:`rng_agrees`).

The sources are compiled on first use with PyTorch's C++ extension builder (a C++ compiler and ``ninja`` are
needed; about 20 s on 2 cores) into PyTorch's extension cache (``TORCH_EXTENSIONS_DIR``, default
``~/.cache/torch_extensions``), under a name that carries a hash of the sources, the flags and the torch version, so
changed sources or another torch get their own build. When the build fails, a warning names the reason once and the
dMoE layers keep the Python path (same function).

Environment variable ``FAIRDRO_DMOE_NATIVE``: ``auto`` (default: build on first use, fall back when that fails),
``0`` (never build or use them), ``1`` (build, and raise when that fails: for CI and benchmarks).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "ENV_VAR",
    "NativeKernelError",
    "available",
    "load",
    "lane_threshold",
    "native_experts",
    "native_layer",
    "native_route",
    "randn",
    "random64",
    "rng_agrees",
    "usable_for",
]

logger = logging.getLogger(__name__)

ENV_VAR = "FAIRDRO_DMOE_NATIVE"
HERE = Path(__file__).parent
#: the extension's sources (experts, router, random numbers, the layer in one call) and their headers
SOURCES = [HERE / "dmoe_cpu.cpp", HERE / "dmoe_router_cpu.cpp", HERE / "dmoe_rng_cpu.cpp", HERE / "dmoe_layer_cpu.cpp"]
HEADERS = [HERE / "dmoe_cpu_common.h", HERE / "dmoe_ops.h"]
#: compile flags: -fopenmp makes at::parallel_for use torch's OpenMP threads (linked from torch, not the system)
CFLAGS = ["-O3", "-fopenmp"]
#: added where torch runs AVX2 (or AVX-512) code on this CPU: about 20 % faster kernels for C = 8 (bundle docs,
#: Performance). The flags are part of the build name, so machines of different kinds sharing a cache each get theirs
AVX2_FLAGS = ["-mavx2", "-mfma"]
#: added where torch runs AVX-512 code (its "AVX512" level needs F, BW, VL and DQ): 16-float vectors for the hidden
#: layer of C = 8 and 32 vector registers, the C = 8 kernels 1.6x faster at the same bits (bundle docs, Performance);
#: loops the compiler vectorises itself keep 256-bit vectors, as they had with AVX2 alone
AVX512_FLAGS = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mprefer-vector-width=256"]


def cflags(capability: Optional[str] = None) -> List[str]:
    """The compile flags for a CPU of torch's ``capability`` (default: this machine's, as torch detects it; the
    environment variable ``ATEN_CPU_CAPABILITY`` lowers it, e.g. ``avx2`` to build and test the AVX2 code here)."""
    level = capability or torch.backends.cpu.get_cpu_capability()
    return CFLAGS + (AVX2_FLAGS if level in ("AVX2", "AVX512") else []) + (AVX512_FLAGS if level == "AVX512" else [])


_MODES = ("auto", "0", "1")
#: a build takes well under a minute on 2 cores; torch's build lock older than this was left by an interrupted one
STALE_LOCK_S = 600.0

_lock = threading.Lock()
_state: dict = {}  # "ok": bool once tried; "error": the reason of a failed build
_rng_checked: dict = {}  # "normal" / "random64": whether the kernels' draws equal torch's on this machine


class NativeKernelError(RuntimeError):
    """The native dMoE kernels were required (``FAIRDRO_DMOE_NATIVE=1``) but could not be built or loaded."""


def mode() -> str:
    """The value of ``FAIRDRO_DMOE_NATIVE`` (``auto`` when unset); raises ValueError naming a bad value."""
    value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if value not in _MODES:
        raise ValueError(f"{ENV_VAR}={value!r}: expected one of {', '.join(_MODES)}.")
    return value


def build_name() -> str:
    """Extension name: changes with the source, the flags and the torch version (each gets its own cached build)."""
    text = b"".join(f.read_bytes() for f in SOURCES + HEADERS)
    digest = hashlib.sha256(text + " ".join(cflags() + [torch.__version__]).encode()).hexdigest()
    return f"fairdro_dmoe_{digest[:12]}"


def load(verbose: bool = False) -> None:
    """Compile (or reuse the cached build of) the kernels and register ``torch.ops.fairdro_dmoe``; raises on failure."""
    from torch.utils.cpp_extension import _get_build_directory
    from torch.utils.cpp_extension import load as load_extension

    name = build_name()
    clear_stale_lock(Path(_get_build_directory(name, verbose)) / "lock")
    with _ninja_on_path():
        load_extension(
            name=name,
            sources=[str(f) for f in SOURCES],
            extra_cflags=cflags(),
            extra_include_paths=[str(HERE)],
            is_python_module=False,
            verbose=verbose,
        )


def clear_stale_lock(lock: Path, max_age_s: float = STALE_LOCK_S) -> bool:
    """Remove torch's build lock ``lock`` when it is older than ``max_age_s`` (a build interrupted by Ctrl-C or a kill
    leaves it, and torch's builder then waits for it forever, saying nothing); returns whether it was removed."""
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return False
    if age <= max_age_s:
        return False  # another process may be building right now
    logger.warning(
        "dMoE: removing %s, left %.0f min ago by an interrupted build of the native kernels.", lock, age / 60
    )
    lock.unlink(missing_ok=True)
    return True


@contextlib.contextmanager
def _ninja_on_path() -> Iterator[None]:
    """PyTorch's builder runs ``ninja`` from PATH; a virtual environment used without activation has the pip ``ninja``
    package's binary elsewhere, so its folder is put in front of PATH for the build (and PATH restored after)."""
    old = os.environ.get("PATH", "")
    try:
        import ninja  # the pip package (requirements.txt)

        if shutil.which("ninja") is None:
            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + old
    except ImportError:
        pass  # a system ninja may still be on PATH; otherwise the builder names what is missing
    try:
        yield
    finally:
        os.environ["PATH"] = old


def available() -> bool:
    """Whether the kernels are loaded, building them on the first call (unless ``FAIRDRO_DMOE_NATIVE=0``).

    Raises:
        NativeKernelError: with ``FAIRDRO_DMOE_NATIVE=1`` when the build or load fails.
    """
    wanted = mode()
    if wanted == "0":
        return False
    with _lock:
        if "ok" not in _state:
            _try_load()
    if not _state["ok"] and wanted == "1":
        raise NativeKernelError(
            f"{ENV_VAR}=1 but the native dMoE kernels could not be built: {_state['error']}. Install a C++ compiler "
            f"and ninja (requirements.txt), or set {ENV_VAR}=auto or 0 to use the Python path."
        )
    return _state["ok"]


def _try_load() -> None:
    try:
        load()
        _state["ok"] = True
    except Exception as err:  # noqa: BLE001 - any build failure (no compiler, no ninja, ...) means the Python path
        _state.update(ok=False, error=f"{type(err).__name__}: {str(err).strip()[-500:]}")
        logger.warning(
            "dMoE: native CPU kernels unavailable (%s); using the Python expert path (same results, slower). "
            "Set %s=0 to skip the build.",
            _state["error"],
            ENV_VAR,
        )


def usable_for(h: Tensor) -> bool:
    """Whether the kernels can run on ``h``: a CPU float32/float64 tensor outside CPU autocast, kernels available."""
    if h.device.type != "cpu" or h.dtype not in (torch.float32, torch.float64):
        return False
    if torch.is_autocast_enabled("cpu"):
        return False  # autocast runs the expert products in bf16; the kernels compute in h's dtype
    return available()


def native_experts(
    h: Tensor,
    weights: Tensor,
    experts: Tensor,
    params: Tuple[Tensor, Tensor, Tensor, Tensor],
    skip_zero: bool,
    draws: Optional[Tensor] = None,
    p: float = 0.0,
) -> Tensor:
    """The dMoE layer's output ``h + dropout(sum_j weights[:, j] * E_{experts[:, j]}(h))`` per voxel, differentiable.

    Args:
        h: channel-first tokens (B, C, N), float32 or float64, on the CPU.
        weights: gate weights (B, K, N); experts: their expert indices (B, K, N), int64 in ``[0, E)``.
        params: ``(w1 (E, C, H), b1 (E, H), w2 (E, H, C), b2 (E, C))``, cast to h's dtype.
        skip_zero: pairs of weight exactly zero are skipped (and get zero weight gradient).
        draws: the int64 random draws of the dropout mask (:func:`scripts.dmoe.lane_draws` for B*C*N elements, in
            token order), or None for no dropout (evaluation).
        p: the dropout rate of ``draws``.

    Returns:
        (B, C, N), contiguous, h's dtype.
    """
    dt = h.dtype
    w1, b1, w2, b2 = (t.to(dt) for t in params)
    if draws is None:
        draws, p = h.new_empty(0, dtype=torch.int64), 0.0
    w = weights.to(dt).contiguous()
    return torch.ops.fairdro_dmoe.experts(
        h.contiguous(), w, experts.contiguous(), w1, b1, w2, b2, skip_zero, draws, *_dropout_args(p)
    )


def native_layer(
    h: Tensor,
    subgroup: Tensor,
    router: Tuple[Tensor, Tensor],
    params: Tuple[Tensor, ...],
    k: int,
    noise: bool,
    p: float,
) -> Tuple[Tensor, Tensor, Tensor]:
    """The dMoE layer's forward on the native path in one call (``scripts/dmoe_layer_cpu.cpp``): the router noise and
    its term, :func:`native_route`, the dropout draws and :func:`native_experts`, the same ops in the same order (the
    same values, gradients and random numbers), for cases that all have a named subgroup.

    Args:
        h: channel-first tokens (B, C, N), contiguous, float32 or float64, on the CPU.
        subgroup: (B,) int64 in ``[0, G)``.
        router: the routers' ``(weight, noise_weight)``, each (G, C, E).
        params: the experts' ``(w1, b1, w2, b2)``.
        k: experts per voxel; noise: add the router noise (training); p: the dropout rate (0: none).

    Returns:
        ``(y (B, C, N), weights (B, k, N), experts (B, k, N) int64)``: the output (residual included), the gates.
    """
    fast = (_rng_ok("normal") if noise else False, _rng_ok("random64") if p > 0.0 else False)
    y, weights, experts = torch.ops.fairdro_dmoe.layer(
        h, subgroup, *router, *params, k, noise, p > 0.0, *_dropout_args(p), *fast
    )
    return y, weights, experts


def _dropout_args(p: float) -> Tuple[int, float]:
    """The kernels' ``(threshold, scale)`` of dropout rate p: :func:`lane_threshold` and ``1 / (1 - p)``; ``(0, 1.0)``
    for no dropout."""
    return (lane_threshold(p), 1.0 / (1.0 - p)) if p > 0.0 else (0, 1.0)


def lane_threshold(p: float) -> int:
    """The 16-bit lane threshold of dropout rate p: a lane (uniform over [-2^15, 2^15)) at or above it keeps its
    element, so the drop probability is p rounded to a multiple of 2^-16."""
    return int(round(p * 65536.0)) - 32768


def native_route(
    h: Tensor, weight: Tensor, noise_weight: Tensor, subgroup: Tensor, noise: Optional[Tensor], k: int
) -> Tuple[Tensor, Tensor]:
    """Noisy top-k routing of channel-first tokens, every case with a named subgroup, differentiable in the weights.

    The same function as :class:`scripts.dmoe.SubgroupNoisyTopKRouter` for named subgroups: logits ``h W_a`` plus
    ``noise * softplus(h W_a^noise)``; the noise term is computed here with torch (autograd carries its gradient),
    the clean logits, top-k and softmax (forward and backward) by the kernel.

    Args:
        h: tokens (B, C, N), float32 or float64, on the CPU.
        weight, noise_weight: the routers' (G, C, E) parameters (cast to h's dtype).
        subgroup: (B,) int64 in ``[0, G)`` (no unknown cases: those take the Python fallback).
        noise: standard normal draws (B, E, N), or None (no noise: evaluation, or ``noise=False``).
        k: experts per voxel.

    Returns:
        ``(weights (B, k, N), experts (B, k, N) int64)``: softmax over the k largest logits, and their experts.
    """
    dt = h.dtype
    h = h.contiguous()
    offset = h.new_empty(0)
    if noise is not None:
        noise_logits = torch.bmm(noise_weight[subgroup].transpose(1, 2).to(dt), h)  # (B, E, N)
        offset = noise.to(dt) * F.softplus(noise_logits)
    weights, experts = torch.ops.fairdro_dmoe.router(
        h, weight.to(dt).contiguous(), subgroup.contiguous(), offset.contiguous(), k
    )
    return weights, experts


def randn(shape: Tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """``torch.randn(shape, dtype=dtype, device=device)``: the same numbers and the same generator state after, drawn
    by the kernels (``fill_normal``) for a float32 CPU tensor of at least 16 elements when :func:`rng_agrees`, else
    by torch."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if dtype == torch.float32 and out.numel() >= 16 and _fast_rng(out, "normal"):
        torch.ops.fairdro_dmoe.fill_normal(out)
        return out
    return out.normal_()


def random64(n: int, device: torch.device) -> Tensor:
    """``torch.empty(n, dtype=torch.int64, device=device).random_()`` (63 random bits a draw): the same draws and the
    same generator state after, drawn by the kernels (``fill_random64``) on the CPU when :func:`rng_agrees`."""
    out = torch.empty(n, dtype=torch.int64, device=device)
    if _fast_rng(out, "random64"):
        torch.ops.fairdro_dmoe.fill_random64(out)
        return out
    return out.random_()


def _fast_rng(out: Tensor, kind: str) -> bool:
    return out.device.type == "cpu" and _rng_ok(kind)


def _rng_ok(kind: str) -> bool:
    """Whether the kernels draw ``kind`` (:func:`rng_agrees`, checked once per process; False without kernels)."""
    if kind not in _rng_checked:
        if not available():
            return False
        with _lock:
            _rng_checked.setdefault(kind, rng_agrees(kind))
    return _rng_checked[kind]


def rng_agrees(kind: str, filler: Optional[Callable[[Tensor], None]] = None) -> bool:
    """Whether the kernels' ``kind`` draws (``"normal"``: ``fill_normal``, ``"random64"``: ``fill_random64``, or
    ``filler`` in their place) equal torch's on this machine: 1,000 values and 700 draws (crossing the generator's
    624-word blocks and a partial 16-value chunk) and the next ``torch.rand`` after them, from the current state of the
    default generator, which is restored. On a mismatch (another CPU or compiler than the ones the kernels were
    checked with) a warning says so and torch draws them: slower, the same numbers. Needs the kernels loaded."""
    ops = torch.ops.fairdro_dmoe
    if filler is None:
        if kind == "normal" and not ops.fast_normal_built():
            return False  # built without AVX2/FMA: torch's Box-Muller step is not the one in the kernels
        filler = ops.fill_normal if kind == "normal" else ops.fill_random64
    make = (lambda: torch.empty(1000)) if kind == "normal" else (lambda: torch.empty(700, dtype=torch.int64))
    state = torch.get_rng_state()
    try:
        expected = (make().normal_() if kind == "normal" else make().random_(), torch.rand(4))
        torch.set_rng_state(state)
        drawn = make()
        filler(drawn)
        same = torch.equal(drawn, expected[0]) and torch.equal(torch.rand(4), expected[1])
    finally:
        torch.set_rng_state(state)
    if not same:
        logger.warning("dMoE: the native kernels' %s draws differ from torch's on this machine; torch draws them", kind)
    return same


def _main(argv: Optional[list] = None) -> None:
    """``python -m scripts.dmoe_native``: build the kernels now (e.g. in ``make setup``) and say where they are."""
    os.environ[ENV_VAR] = "1"
    available()
    print(f"dMoE native kernels ready: {build_name()} (torch {torch.__version__})")


if __name__ == "__main__":
    _main()
