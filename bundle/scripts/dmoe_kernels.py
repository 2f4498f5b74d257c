"""Fused sparse expert dispatch of the dMoE layer for eager PyTorch (the CPU training and inference path).

:func:`sparse_experts` computes what :meth:`scripts.dmoe.ExpertBank.forward_sparse` computes, for every (token,
expert) pair ``y[t] = sum_j w[j, t] * E_{e[j, t]}(h[t])``, as one autograd node with a hand-written backward. It is
shaped by three measurements on the project's 2-core CPU (``bench/bench_dmoe.py``, bundle docs, Performance):

- **Channel-first tokens.** The feature map is already (B, C, N); the tokens stay (C, T) and the pairs (C, P), so the
  layer needs no token transpose (a transposed copy of a (T, 8) tensor is slower than the gather itself), and every
  matrix product is taken in the orientation whose output has the long axis last: with C = 8 channels a product
  with an 8-column output (``z @ W2``, ``gz @ W1^T``, ``z^T @ go``) runs 3-4x slower in MKL than its transpose.
- **Gathers only.** Forward gathers the pairs' tokens in expert order and gathers the expert outputs back to pair
  order; backward does the same with the gradients (no scatter-add, single-threaded on CPU).
- **The experts in two halves at once.** At these sizes MKL runs each product on one thread, so with two to four
  torch threads the experts are split in two groups of about equal pair count and the second group runs on a helper
  thread (:func:`_run_split`), which runs torch with one intra-op thread (:func:`_one_thread`). The split changes no
  arithmetic: each expert's products are the same either way.

The router, the noise and dropout are not touched here, so the random streams are those of the unfused layer.
Outputs and gradients equal the dense dispatch to float rounding (``tests/test_dmoe_kernels.py``). TorchScript cannot
script an autograd function: scripted modules use :meth:`ExpertBank.forward_sparse`.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

__all__ = ["Routing", "SPLIT_MAX_THREADS", "SPLIT_MIN_PAIRS", "expert_routing", "pair_keys", "sparse_experts"]

#: run the two expert halves on two threads only from this many (token, expert) pairs on (smaller: not worth it)
SPLIT_MIN_PAIRS = 4096
#: ... and only with 2 to this many torch threads: measured with 2; with more, the intra-op thread teams of the two
#: halves would oversubscribe the cores, so larger machines keep the plain loop
SPLIT_MAX_THREADS = 4

Segment = Tuple[int, int, int]  # (expert, first sorted position, number of pairs)
Work = Callable[[List[Segment]], List[Tensor]]

_pool: Optional[ThreadPoolExecutor] = None
_pool_pid = -1
_pool_lock = threading.Lock()


class Routing(NamedTuple):
    """The (token, expert) pairs sorted by expert.

    Pair ``p = j * T + t`` is the j-th expert of token t. ``order`` (P,): pair at each sorted position; ``src`` (P,):
    its token; ``inv`` (P,): sorted position of each pair; ``counts``: pairs per expert, E + 1 entries (the last one
    counts the skipped pairs of zero weight).
    """

    order: Tensor
    src: Tensor
    inv: Tensor
    counts: List[int]


def pair_keys(weights: Tensor, experts: Tensor, num_experts: int, drop_zero: bool) -> Tuple[Tensor, Tensor]:
    """The expert of every (token, expert) pair and its gate weight, in pair order ``p = j * T + t``.

    Args:
        weights, experts: gates (B, K, N) and their expert indices (B, K, N), T = B * N tokens.
        num_experts: E.
        drop_zero: send pairs of weight exactly zero to bucket E (skipped; the dense fallback gates of unknown cases).

    Returns:
        ``(key, w_pairs)``: key (P,) int64 in ``[0, E]``, w_pairs (K, T).
    """
    b, k, n = experts.shape
    key = experts.transpose(0, 1).reshape(-1)
    w_pairs = weights.transpose(0, 1).reshape(k, b * n)
    if drop_zero:
        key = torch.where(w_pairs.reshape(-1) == 0, torch.full_like(key, num_experts), key)
    return key, w_pairs


def expert_routing(key: Tensor, num_experts: int, num_tokens: int) -> Routing:
    """Sort the pairs by expert (stable radix sort on a small integer key); ``key`` (P,) in ``[0, E]`` (E = skip)."""
    small = torch.uint8 if num_experts < 255 else torch.int32
    order = torch.sort(key.to(small), stable=True)[1]
    inv = torch.empty_like(order)
    inv[order] = torch.arange(order.shape[0], device=key.device)
    counts: List[int] = torch.bincount(key, minlength=num_experts + 1).tolist()
    return Routing(order, torch.remainder(order, num_tokens), inv, counts)


def sparse_experts(ht: Tensor, w_pairs: Tensor, params: Tuple[Tensor, Tensor, Tensor, Tensor], r: Routing) -> Tensor:
    """Gate-weighted sum of each token's experts, channel-first.

    Args:
        ht: tokens (C, T), channel-first.
        w_pairs: gate weight of each pair (k, T); pairs of zero weight may be skipped (routed to bucket E).
        params: the experts' (w1 (E, C, H), b1 (E, H), w2 (E, H, C), b2 (E, C)), cast to ``ht``'s dtype.
        r: the pairs sorted by expert, from :func:`expert_routing`.

    Returns:
        (C, T): ``y[:, t] = sum_j w_pairs[j, t] * E_{e(j, t)}(ht[:, t])``, in ``ht``'s dtype (autocast is off inside:
        the products run in that dtype).
    """
    w1, b1, w2, b2 = params
    return _SparseExperts.apply(ht, w_pairs, w1, b1, w2, b2, r)


def _segments(counts: List[int]) -> List[Segment]:
    """(expert, start, length) of the non-empty expert segments, in expert order."""
    out, s = [], 0
    for i, n in enumerate(counts[:-1]):
        if n:
            out.append((i, s, n))
        s += n
    return out


def _run_split(work: Work, segs: List[Segment], on_cpu: bool = True) -> List[Tensor]:
    """``work(segs)``, with the segments after the pair-count midpoint on the helper thread when that pays off (CPU
    tensors only: a GPU queues its kernels asynchronously, and a helper thread would use another current stream)."""
    total = sum(n for _, _, n in segs)
    threads_ok = 2 <= torch.get_num_threads() <= SPLIT_MAX_THREADS
    if not on_cpu or not threads_ok or total < SPLIT_MIN_PAIRS or len(segs) < 2:
        return work(segs)
    cut, acc = 1, segs[0][2]
    while cut < len(segs) - 1 and acc + segs[cut][2] <= total // 2:
        acc += segs[cut][2]
        cut += 1
    later = _helper().submit(_quiet, work, segs[cut:])
    first = work(segs[:cut])
    return first + later.result()


def _quiet(work: Work, segs: List[Segment]) -> List[Tensor]:
    """Run ``work`` on the helper thread as it would run in the autograd function: no grad, no autocast."""
    with torch.no_grad(), torch.autocast("cpu", enabled=False):
        return work(segs)


def _helper() -> ThreadPoolExecutor:
    """The one helper thread of this process (made again after a fork: a child does not inherit threads), running
    torch with one intra-op thread (:func:`_one_thread`)."""
    global _pool, _pool_pid
    with _pool_lock:
        if _pool is None or _pool_pid != os.getpid():
            _pool = ThreadPoolExecutor(1, thread_name_prefix="dmoe-experts")
            _pool_pid = os.getpid()
            threads = torch.get_num_threads()
            _pool.submit(_one_thread).result()
            torch.set_num_threads(threads)  # torch's count for threads made later: the caller's again
        return _pool


def _one_thread() -> None:
    """One intra-op thread for the calling (helper) thread. With the default count, the helper's first parallel op
    gave it an OpenMP thread team of its own that stayed alive; with 2 torch threads on the 2-core machine every
    later step of the process, the plain backbone's included, then ran about twice as slow (0.064 s against 0.032 s;
    bundle docs, Performance). Its products run on one thread at these sizes anyway (see the module docstring)."""
    torch.get_num_threads()  # torch's per-thread set-up first, so it does not reset the count later
    torch.set_num_threads(1)


class _SparseExperts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ht, w_pairs, w1, b1, w2, b2, r: Routing):  # type: ignore[override]
        with torch.autocast(ht.device.type, enabled=False):
            dt = ht.dtype
            w1, b1, w2, b2 = w1.to(dt), b1.to(dt), w2.to(dt), b2.to(dt)
            c, t = ht.shape
            k = w_pairs.shape[0]
            xst = ht.index_select(1, r.src)  # (C, P), pairs in expert order
            w2t = w2.transpose(1, 2)  # (E, C, H)

            def mlp(segs: List[Segment]) -> List[Tensor]:
                out: List[Tensor] = []
                for i, s, n in segs:
                    z = torch.addmm(b1[i], xst[:, s : s + n].t(), w1[i]).relu_()  # (n, H)
                    out += [z, torch.addmm(b2[i].view(c, 1), w2t[i], z.t())]  # and its output (C, n)
                return out

            done = _run_split(mlp, _segments(r.counts), ht.device.type == "cpu")
            zs, outs = done[0::2], done[1::2]
            if r.counts[-1]:
                outs.append(ht.new_zeros(c, r.counts[-1]))
            og = torch.cat(outs, 1).index_select(1, r.inv).view(c, k, t)  # (C, k, T), back in pair order
            w = w_pairs.to(dt)
            y = og[:, 0] * w[0]
            for j in range(1, k):
                y = torch.addcmul(y, og[:, j], w[j])
        ctx.save_for_backward(xst, og, w, w1, w2, *zs)
        ctx.routing = r
        return y

    @staticmethod
    def backward(ctx, gy):  # type: ignore[override]
        xst, og, w, w1, w2, *zs = ctx.saved_tensors
        r: Routing = ctx.routing
        c, k, t = og.shape
        gy = gy.to(og.dtype).contiguous()
        gw = (og * gy.view(c, 1, t)).sum(0)  # (k, T): <expert output, grad> per pair
        got = gy.index_select(1, r.src).mul_(w.reshape(-1).index_select(0, r.order))  # (C, P), expert order
        e, hid = w1.shape[0], w1.shape[2]
        gw1, gb1 = torch.zeros_like(w1), w1.new_zeros(e, hid)
        gw2t, gb2 = w1.new_zeros(e, c, hid), w1.new_zeros(e, c)
        w2t = w2.transpose(1, 2)
        segs = _segments(r.counts)
        z_of = {seg[0]: z for seg, z in zip(segs, zs)}

        def grads(part: List[Segment]) -> List[Tensor]:
            out: List[Tensor] = []
            for i, s, n in part:
                go, z = got[:, s : s + n], z_of[i]
                gb2[i] = go.sum(1)
                gw2t[i] = go @ z
                gz = torch.ops.aten.threshold_backward(go.t() @ w2t[i], z, 0.0)  # (n, H), through the ReLU
                gb1[i] = gz.sum(0)
                gw1[i] = xst[:, s : s + n] @ gz
                out.append(w1[i] @ gz.t())  # (C, n): gradient of the pairs' tokens
            return out

        gx = _run_split(grads, segs, gy.device.type == "cpu")
        if r.counts[-1]:
            gx.append(gy.new_zeros(c, r.counts[-1]))
        gh = torch.cat(gx, 1).index_select(1, r.inv).view(c, k, t).sum(1)  # (C, T): each token's k pairs summed
        return gh, gw, gw1, gb1, gw2t.transpose(1, 2), gb2, None
