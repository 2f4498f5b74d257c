"""Distribution-aware mixture of experts (dMoE) layer for 3D feature maps.

A dMoE layer (Oh et al., "Distribution-aware fairness learning in medical image segmentation from a control-theoretic
perspective", ICML 2025, https://arxiv.org/abs/2502.00619) adds to a feature map ``h`` of shape (B, C, H, W, D) a
per-voxel mixture of E shared expert MLPs whose mixing weights come from a noisy top-k router (Shazeer et al.,
"Outrageously large neural networks: the sparsely-gated mixture-of-experts layer", ICLR 2017,
https://arxiv.org/abs/1701.06538) selected by the case's subgroup a (e.g. tumour stage or institution)::

    h_out[v] = h[v] + dropout( sum_{i in topk} g_i^{a}(h[v]) * E_i(h[v]) )      for every voxel v

The module is split the way the MoE literature splits it:

- :class:`SubgroupNoisyTopKRouter` is the gating *policy*: tokens -> sparse gates (weights (B, K, N) and expert
  indices (B, K, N)); it owns the subgroups, the noise and the unknown-subgroup fallback.
- :class:`ExpertBank` holds the E experts and the two dispatch *mechanisms*: ``dense`` (every expert on every token,
  weighted by the mostly-zero gates, as two large matmuls) and ``sparse`` (token/expert pairs sorted by expert,
  gathered, one matmul pair per expert, permuted back). Both compute the same function. In eager mode ``sparse``
  runs as one fused autograd node on channel-first tokens (:mod:`scripts.dmoe_kernels`); TorchScript keeps the
  per-expert path. On the CPU, :class:`DMoE` replaces all of this (and the router, dropout and residual) by the
  native kernels of :mod:`scripts.dmoe_native` when they are built: the same function, voxel by voxel.
- :class:`DMoE` glues them: layouts, residual add, dropout, routing statistics and the optional auxiliary
  load-balancing loss.

The experts' output layers are zero-initialised, so a freshly built layer is exactly the identity (see :class:`DMoE`).

Layouts: the router works channel-first on ``x.view(B, C, N)`` (N = number of voxels, no copy; top-k is a
reduction over the small expert axis, vectorised over voxels); the sparse experts work on channel-last tokens (T, C)
with T = B*N.

Subgroup index convention (shared with the bundle's transforms): ``0 .. G-1`` are the named subgroups, ``G``
(== ``num_subgroups``) means "unknown", and ``None`` means unknown for every case.

Side effect on import: this module calls :func:`scripts.allocator.keep_freed_memory` once, which sets glibc's malloc
mmap and trim thresholds for the whole process so that the large tensors of every training step and forward are
reused instead of being returned to the system and faulted in again (same results; no effect outside glibc, with
``FAIRDRO_DEFAULT_MALLOC=1``, or when the user tuned malloc through its environment variables).
"""

from __future__ import annotations

import logging
import math
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .allocator import keep_freed_memory
from .dmoe_kernels import expert_routing, pair_keys, sparse_experts
from .dmoe_native import lane_threshold, native_experts, native_layer, random64, usable_for

__all__ = [
    "DISPATCH_MODES",
    "DMoE",
    "ExpertBank",
    "SubgroupNoisyTopKRouter",
    "check_moe_args",
    "fast_dropout",
    "normalize_subgroup",
    "top_k_along",
]

logger = logging.getLogger(__name__)

keep_freed_memory()  # the process's malloc settings (see the module docstring)

DISPATCH_MODES = ("auto", "dense", "sparse")
#: on CPU, ``dispatch="auto"`` uses the dense mechanism when its (T, E*4C) hidden tensor is at most this large
DENSE_MAX_HIDDEN = 2**18


def normalize_subgroup(subgroup: Optional[Tensor], batch_size: int, num_subgroups: int, device: torch.device) -> Tensor:
    """Validate a subgroup tensor and return one subgroup index per batch element.

    Args:
        subgroup: integer subgroup indices: shape (B,), or (1,) / 0-d to broadcast over the batch (e.g. over the
            window batch of a sliding-window inferer); ``None`` means "unknown" for every element. Values
            ``0 .. num_subgroups-1`` are named subgroups, ``num_subgroups`` means "unknown".
        batch_size: B, the batch size of the feature map the indices belong to.
        num_subgroups: G, the number of named subgroups.
        device: device of the returned tensor.

    Returns:
        int64 tensor of shape (B,) with values in ``[0, G]``. Under ``torch.jit.trace`` the value checks are skipped.

    Raises:
        TypeError: when ``subgroup`` is a floating point or complex tensor.
        ValueError: when its shape does not broadcast to (B,) or a value is < 0 or > G.
    """
    if subgroup is None:
        return torch.full((batch_size,), num_subgroups, dtype=torch.long, device=device)
    if subgroup.is_floating_point() or subgroup.is_complex():
        raise TypeError(f"subgroup must be an integer tensor of subgroup indices, got dtype {subgroup.dtype}.")
    idx = subgroup.reshape(-1).to(device=device, dtype=torch.long)
    if torch.jit.is_tracing():  # a trace cannot keep data-dependent checks: broadcast (1,) or keep (B,)
        return idx.expand(batch_size)
    n = idx.shape[0]
    if n == 1:
        idx = idx.expand(batch_size)
    elif n != batch_size:
        raise ValueError(
            f"subgroup must have shape (B,) = ({batch_size},), (1,) or (), got shape {list(subgroup.shape)}."
        )
    if batch_size > 0:
        lo = int(idx.min())
        hi = int(idx.max())
        if lo < 0 or hi > num_subgroups:
            bad = lo if lo < 0 else hi
            raise ValueError(
                f"subgroup index {bad} is out of range: expected 0..{num_subgroups - 1} for the named subgroups "
                f"or {num_subgroups} for 'unknown'."
            )
    return idx


def top_k_along(x: Tensor, k: int, dim: int) -> Tuple[Tensor, Tensor]:
    """The k largest entries of ``x`` along ``dim``, in decreasing order (ties: lowest index first).

    The indices come from k rounds of "max, then rank of the first maximum" on a detached float32 copy, written with
    reductions and float arithmetic only (no boolean temporaries), vectorised over the other axes: for a short axis
    such as the E experts and many voxels it is several times faster than ``torch.topk`` on CPU. Chosen entries are
    pushed to -1e30 before the next round. The values are then gathered from ``x``, so gradients flow to the
    selected entries only.

    Args:
        x: floating tensor with finite values above -1e29, e.g. logits (B, E, N).
        k: number of entries, ``1 <= k <= x.shape[dim]``.
        dim: the axis to select along.

    Returns:
        ``(values, indices)``, both shaped like x with ``x.shape[dim]`` replaced by k; indices int64.
    """
    if dim < 0:
        dim = dim + x.dim()
    e = x.shape[dim]
    shape = [1] * x.dim()
    shape[dim] = e
    rank = torch.arange(e, 0, -1, device=x.device, dtype=torch.float32).view(shape)  # first entry scores highest
    indices: List[Tensor] = []
    cur = x.detach().float()
    for j in range(k):
        m = cur.amax(dim=dim, keepdim=True)
        score = (cur - m).sign_().add_(1.0).mul_(rank)  # rank where cur == m (cur - m <= 0), 0 elsewhere
        r = score.amax(dim=dim, keepdim=True)  # rank of the first maximum (>= 1)
        indices.append(e - r.long())
        if j + 1 < k:
            chosen = (score - r).sign_().add_(1.0)  # one-hot of that entry: score - r is 0 there, < 0 elsewhere
            cur = cur - chosen.mul_(1e30)
    idx = torch.cat(indices, dim=dim)
    return x.gather(dim, idx), idx


def fast_dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """Inverted dropout ``x * mask / (1 - p)``, ``mask ~ Bernoulli(1 - p)`` i.i.d. per element (like ``F.dropout``).

    The mask is built from 16-bit lanes of ``random_()`` int64 draws (three per draw), so it needs a third of the
    generator calls of ``rand_like`` and a seventh of those of ``bernoulli_``: on CPU the random number generation is
    the cost of dropout on the large first-stage token tensors. The drop probability is ``p`` rounded to a multiple
    of 2^-16. Identity when not training or ``p == 0``. TorchScript (which has no dtype view) uses ``F.dropout``.
    """
    if not training or p == 0.0:
        return x
    if torch.jit.is_scripting():
        return F.dropout(x, p, True)
    return x * _lane_mask(x.numel(), p, x.dtype, x.device).view(x.shape)


@torch.jit.unused
def lane_draws(n: int, device: torch.device, native: bool = False) -> Tensor:
    """The int64 random draws behind a dropout mask of n elements: (n + 2) // 3 draws of 63 random bits, three
    16-bit lanes used from each (see :func:`_lane_mask`; the native kernels read the same lanes). ``native``: drawn
    by :func:`scripts.dmoe_native.random64` (the same draws, faster; for the native path, whose kernels are loaded)."""
    if native:
        return random64((n + 2) // 3, device)
    return torch.empty((n + 2) // 3, dtype=torch.int64, device=device).random_()


@torch.jit.unused
def _lane_mask(n: int, p: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The scaled keep mask of :func:`fast_dropout` for n elements, 1-D of ``dtype`` (no grad: built from integers)."""
    lanes = lane_draws(n, device).view(torch.int16).view(-1, 4)[:, :3].reshape(-1)[:n]  # uniform over [-2^15, 2^15)
    return (lanes >= lane_threshold(p)).to(dtype).mul_(1.0 / (1.0 - p))


class SubgroupNoisyTopKRouter(nn.Module):
    """Noisy top-k gating with one router per subgroup (the gating policy of the dMoE layer).

    For a token h (C,) of a case in subgroup a, with router weights ``W_a`` and noise weights ``W_a^noise`` (C, E):

    - logits = h @ W_a; in training (and ``noise=True``) add ``randn * softplus(h @ W_a^noise)``;
    - keep the ``top_k`` largest logits, softmax over them, all other gates are zero.

    **Unknown-subgroup fallback** (index ``G`` or ``subgroup=None``): the gate distribution is the *average of the G
    routers' top-k gate distributions*, ``g^unk(h) = (1/G) sum_a g^a(h)``. Because the layer is linear in the gates,
    the dMoE branch then equals the mean of the branches every named subgroup would get (a uniform prior over
    subgroups). It has up to ``min(E, G*k)`` non-zero gates and is deterministic in eval mode (noise only in
    training, drawn independently per router). Routing statistics count its ``k`` largest gates.

    Args:
        in_channels: C, the token feature size.
        num_experts: E, the number of experts.
        top_k: k, the number of experts kept per token (1 <= k <= E).
        num_subgroups: G, the number of named subgroups (one router each).
        noise: add the trainable Gaussian noise to the logits in training mode.

    Parameters:
        weight: (G, C, E), ``W_a`` stacked over subgroups, initialised like ``nn.Linear``.
        noise_weight: (G, C, E), ``W_a^noise``, initialised to 0 (noise scale softplus(0) = ln 2 at the start).
    """

    def __init__(self, in_channels: int, num_experts: int, top_k: int, num_subgroups: int, noise: bool = True) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.num_experts = num_experts
        self.top_k = top_k
        self.num_subgroups = num_subgroups
        self.noise = noise
        bound = 1.0 / math.sqrt(in_channels)
        self.weight = nn.Parameter(torch.empty(num_subgroups, in_channels, num_experts).uniform_(-bound, bound))
        self.noise_weight = nn.Parameter(torch.zeros(num_subgroups, in_channels, num_experts))

    def _noisy(self, clean: Tensor, noise_logits: Tensor) -> Tensor:
        return clean + torch.randn_like(clean) * F.softplus(noise_logits)

    def forward(self, h: Tensor, subgroup: Tensor, need_probs: bool = False) -> Tuple[Tensor, Tensor, Tensor]:
        """Route the voxels of a channel-first feature map.

        Args:
            h: features, (B, C, N).
            subgroup: validated subgroup indices, (B,) int64 in ``[0, G]`` (``G`` = unknown).
            need_probs: also return the full softmax of the clean logits (for the load-balancing loss).

        Returns:
            ``(weights, experts, probs)``. When every case has a named subgroup: weights (B, k, N) (softmax over the
            kept logits) and experts (B, k, N) int64. When some case is unknown: weights (B, E, N) (the full gate
            vectors, zeros included) and experts = ``arange(E)`` expanded to (B, E, N). probs: (B, E, N) if
            ``need_probs`` (for unknown cases the mean of the G routers' softmaxes), else an empty tensor.
        """
        b, c, n = h.shape
        e, g = self.num_experts, self.num_subgroups
        use_noise = self.training and self.noise
        unknown = subgroup == g
        # under torch.jit.trace always take the general path: it is exact for named subgroups too, and a trace
        # cannot keep the data-dependent branch
        if not torch.jit.is_tracing() and not bool(unknown.any()):
            if use_noise:
                w = torch.cat([self.weight, self.noise_weight], dim=-1)[subgroup]  # (B, C, 2E): one fused matmul
                both = torch.bmm(w.transpose(1, 2).to(h.dtype), h)  # (B, 2E, N)
                clean, noise_logits = both[:, :e], both[:, e:]
                logits = self._noisy(clean, noise_logits)
            else:
                clean = torch.bmm(self.weight[subgroup].transpose(1, 2).to(h.dtype), h)  # (B, E, N)
                logits = clean
            top, experts = top_k_along(logits, self.top_k, 1)
            weights = torch.softmax(top, dim=1)
            probs = torch.softmax(clean, dim=1) if need_probs else h.new_empty(0)
            return weights, experts, probs

        # Fallback: evaluate all G routers; unknown cases get the mean of their sparse gate distributions.
        w_all = self.weight.permute(0, 2, 1).reshape(g * e, c).to(h.dtype)
        clean_all = torch.matmul(w_all, h).view(b, g, e, n)
        logits_all = clean_all
        if use_noise:
            wn_all = self.noise_weight.permute(0, 2, 1).reshape(g * e, c).to(h.dtype)
            logits_all = self._noisy(clean_all, torch.matmul(wn_all, h).view(b, g, e, n))
        top, top_i = top_k_along(logits_all, self.top_k, 2)  # (B, G, k, N)
        gates_all = torch.zeros_like(logits_all).scatter(2, top_i, torch.softmax(top, dim=2))  # (B, G, E, N)
        rows = torch.arange(b, device=h.device)
        named = subgroup.clamp(max=g - 1)
        is_unk = unknown.view(b, 1, 1)
        weights = torch.where(is_unk, gates_all.mean(dim=1), gates_all[rows, named])  # (B, E, N)
        experts = torch.arange(e, device=h.device).view(1, e, 1).expand(b, e, n)
        if need_probs:
            p_all = torch.softmax(clean_all, dim=2)
            probs = torch.where(is_unk, p_all.mean(dim=1), p_all[rows, named])
        else:
            probs = h.new_empty(0)
        return weights, experts, probs


class _GatherPairs(torch.autograd.Function):
    """``h[src]`` for the expert-sorted pairs; backward = gather back to pair order + sum over the k pairs."""

    @staticmethod
    def forward(ctx, h: Tensor, src: Tensor, inv: Tensor, k: int) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(inv)
        ctx.k = k
        return h.index_select(0, src)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        (inv,) = ctx.saved_tensors
        g = grad.index_select(0, inv)  # (P, C) in pair order j * T + t
        return g.view(ctx.k, -1, g.shape[1]).sum(dim=0), None, None, None


class _PermuteRows(torch.autograd.Function):
    """``x[perm]`` for a row permutation with inverse ``inv``; backward = the gather ``grad[inv]``."""

    @staticmethod
    def forward(ctx, x: Tensor, perm: Tensor, inv: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(inv)
        return x.index_select(0, perm)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        (inv,) = ctx.saved_tensors
        return grad.index_select(0, inv), None, None


@torch.jit.unused
def _gather_pairs_autograd(h: Tensor, src: Tensor, inv: Tensor, k: int) -> Tensor:
    return _GatherPairs.apply(h, src, inv, k)


@torch.jit.unused
def _permute_rows_autograd(x: Tensor, perm: Tensor, inv: Tensor) -> Tensor:
    return _PermuteRows.apply(x, perm, inv)


def gather_pairs(h: Tensor, src: Tensor, inv: Tensor, k: int) -> Tensor:
    """Token rows for the expert-sorted (token, expert) pairs.

    Args:
        h: tokens (T, C).
        src: (P,) token of each sorted pair, P = k*T.
        inv: (P,) inverse of the sort permutation (pair id ``j * T + t`` -> sorted position).
        k: pairs per token.

    Returns:
        (P, C) = ``h[src]``. In eager autograd the backward uses gathers only (``index_select``'s own backward is a
        scatter-add, single-threaded and slow on CPU); TorchScript uses plain ``index_select``.
    """
    if torch.jit.is_scripting():
        return h.index_select(0, src)
    return _gather_pairs_autograd(h, src, inv, k)


def permute_rows(x: Tensor, perm: Tensor, inv: Tensor) -> Tensor:
    """``x[perm]`` for a row permutation ``perm`` (P,) of x (P, C) whose inverse is ``inv`` (gather-only backward)."""
    if torch.jit.is_scripting():
        return x.index_select(0, perm)
    return _permute_rows_autograd(x, perm, inv)


class ExpertBank(nn.Module):
    """E per-voxel expert MLPs ``C -> 4C -> C`` with ReLU, stored as stacked weights, and two dispatch mechanisms.

    Expert i computes ``E_i(h) = relu(h @ W1_i + b1_i) @ W2_i + b2_i``. The weights of all experts live in four tensors
    (w1 (E, C, 4C), b1 (E, 4C), w2 (E, 4C, C), b2 (E, C)); see :meth:`reset_parameters` for their initialisation
    (the output layer w2, b2 starts at zero, so every expert starts as the zero map). Both mechanisms return, for
    token ``t = b * N + n``, ``y[t] = sum_j weights[b, j, n] * E_{experts[b, j, n]}(h[t])``.

    Args:
        in_channels: C.
        num_experts: E.
        hidden_ratio: hidden width as a multiple of C (4 in the dMoE paper).
    """

    def __init__(self, in_channels: int, num_experts: int, hidden_ratio: int = 4) -> None:
        super().__init__()
        c, e, hid = in_channels, num_experts, hidden_ratio * in_channels
        self.in_channels = c
        self.num_experts = e
        self.hidden = hid
        self.w1 = nn.Parameter(torch.empty(e, c, hid))
        self.b1 = nn.Parameter(torch.empty(e, hid))
        self.w2 = nn.Parameter(torch.empty(e, hid, c))
        self.b2 = nn.Parameter(torch.empty(e, c))
        self.reset_parameters()

    def reset_parameters(self, zero_output: bool = True) -> None:
        """Initialise the experts: the input layer (w1, b1) like ``nn.Linear``, the output layer (w2, b2) to zero.

        With a zero output layer every expert is the zero map, so a :class:`DMoE` layer ``h + sum_k g_k E_k(h)``
        starts as the identity and a network with dMoE layers starts as its backbone. Training leaves that point at
        once: the output layer's gradient ``g_k relu(h W1_k + b1_k)`` is non-zero from the first step (the router's
        gradient, proportional to ``E_k(h)``, is zero until then). Only the input layer draws random numbers.

        Args:
            zero_output: False initialises w2, b2 like ``nn.Linear`` too (uniform in +-1/sqrt(4C)), e.g. to test
                the layer with non-trivial experts.
        """
        b_in, b_out = 1.0 / math.sqrt(self.in_channels), 1.0 / math.sqrt(self.hidden)
        with torch.no_grad():
            self.w1.uniform_(-b_in, b_in)
            self.b1.uniform_(-b_in, b_in)
            if zero_output:
                self.w2.zero_()
                self.b2.zero_()
            else:
                self.w2.uniform_(-b_out, b_out)
                self.b2.uniform_(-b_out, b_out)

    def forward_dense(self, h: Tensor, weights: Tensor, experts: Tensor) -> Tensor:
        """Dense dispatch: every expert on every voxel, combined with the (mostly zero) gates.

        ``y = (gates (x) relu(h W1_cat + b1)) W2_cat + gates b2`` with W1_cat (C, E*4C) and W2_cat (E*4C, C): two
        large GEMMs around a (T, E*4C) hidden intermediate; no sort, no gather, no host synchronisation.

        Args:
            h: channel-last tokens, (T, C) with T = B*N.
            weights: gate weights, (B, K, N).
            experts: expert index of each gate, (B, K, N) int64.

        Returns:
            (T, C), channel-last like ``h``.
        """
        b, k, n = experts.shape
        t, c = h.shape
        e, hid = self.num_experts, self.hidden
        dt = h.dtype
        gates = torch.zeros(b, e, n, dtype=dt, device=h.device).scatter(1, experts, weights.to(dt))
        gates = gates.transpose(1, 2).reshape(t, e)  # (T, E)
        w1 = self.w1.permute(1, 0, 2).reshape(c, e * hid).to(dt)
        z = torch.addmm(self.b1.reshape(1, e * hid).to(dt), h, w1).relu_()  # (T, E*4C)
        z = (z.view(t, e, hid) * gates.unsqueeze(-1)).view(t, e * hid)
        return torch.addmm(gates @ self.b2.to(dt), z, self.w2.reshape(e * hid, c).to(dt))  # (T, C)

    def forward_tokens(self, h: Tensor, weights: Tensor, experts: Tensor, dense: bool, drop_zero: bool) -> Tensor:
        """:meth:`forward_dense` or :meth:`forward_sparse` on the channel-first map h (B, C, N), through channel-last
        tokens (B*N, C): the TorchScript, trace and dense path. Returns (B, C, N), a view with channels-last strides."""
        b, c = h.shape[0], h.shape[1]
        tokens = h.transpose(1, 2).reshape(-1, c)
        if dense:
            y = self.forward_dense(tokens, weights, experts)
        else:
            y = self.forward_sparse(tokens, weights, experts, drop_zero)
        return y.view(b, -1, c).transpose(1, 2)

    @torch.jit.unused
    def forward_fused(self, h: Tensor, weights: Tensor, experts: Tensor, drop_zero: bool = False) -> Tensor:
        """Sparse dispatch in eager mode: :func:`scripts.dmoe_kernels.sparse_experts` on channel-first tokens.

        The same function as :meth:`forward_sparse` (to float rounding), computed by one autograd node that keeps
        the (B, C, N) layout, takes every matrix product in its fast orientation and runs the two halves of the
        experts on two threads (see :mod:`scripts.dmoe_kernels`).

        Args:
            h: channel-first feature map, (B, C, N).
            weights: gate weights, (B, K, N).
            experts: expert index of each gate, (B, K, N) int64.
            drop_zero: skip pairs whose weight is exactly zero (the dense fallback gates of unknown cases).

        Returns:
            (B, C, N), a transposed view of a (C, B, N) tensor.
        """
        b, _, n = experts.shape
        c, e, t = self.in_channels, self.num_experts, b * n
        key, w_pairs = pair_keys(weights, experts, e, drop_zero)  # pair p = j * T + t: the j-th expert of token t
        ht = h.transpose(0, 1).reshape(c, t)  # (C, T), token t = b * N + n
        params = (self.w1, self.b1, self.w2, self.b2)
        y = sparse_experts(ht, w_pairs, params, expert_routing(key, e, t))
        return y.view(c, b, n).transpose(0, 1)

    def forward_sparse(self, h: Tensor, weights: Tensor, experts: Tensor, drop_zero: bool = False) -> Tensor:
        """Sparse dispatch: each expert only sees the voxels routed to it (the TorchScript path of ``"sparse"``).

        The P = K*T (voxel, expert) pairs are sorted by expert (stable radix sort on a small integer key), their
        tokens gathered in that order (P, C), each expert's contiguous segment goes through its MLP (two ``addmm``),
        and the results are permuted back to pair order and combined with the gate weights. No (T, E, 4C)
        intermediate, and in eager mode no scatter-add in forward or backward.

        Args:
            h: channel-last tokens, (T, C) with T = B*N.
            weights: gate weights, (B, K, N).
            experts: expert index of each gate, (B, K, N) int64.
            drop_zero: skip pairs whose weight is exactly zero (the dense fallback gates of unknown cases).

        Returns:
            (T, C), channel-last like ``h``.
        """
        k = experts.shape[1]
        t, c = h.shape
        e = self.num_experts
        dt = h.dtype
        key, w_pairs = pair_keys(weights, experts, e, drop_zero)  # pair p = j * T + t: the j-th expert of token t
        r = expert_routing(key, e, t)
        order, inv, counts = r.order, r.inv, r.counts
        xs = gather_pairs(h, r.src, inv, k)  # (P, C), grouped by expert
        segments = torch.split(xs, counts)  # views; their backward is one cat
        w1, b1 = self.w1.to(dt).unbind(0), self.b1.to(dt).unbind(0)
        w2, b2 = self.w2.to(dt).unbind(0), self.b2.to(dt).unbind(0)
        outs: List[Tensor] = []
        for i in range(e):
            if counts[i] > 0:
                z = torch.addmm(b1[i], segments[i], w1[i]).relu_()
                outs.append(torch.addmm(b2[i], z, w2[i]))
        if counts[e] > 0:
            outs.append(torch.zeros(counts[e], c, dtype=dt, device=h.device))
        ys = permute_rows(torch.cat(outs), inv, order).view(k, t, c)  # back to pair order
        return (ys * w_pairs.view(k, t, 1).to(dt)).sum(dim=0)  # (T, C): gate-weighted sum over the k experts


class DMoE(nn.Module):
    """Distribution-aware mixture-of-experts layer: ``h + dropout(sum_{i in topk} g_i^{a}(h) E_i(h))`` per voxel.

    **Starts as the identity**: each expert's output layer is zero-initialised (:meth:`ExpertBank.reset_parameters`),
    so at initialisation the layer returns ``h`` exactly, for every subgroup, dispatch, mode and noise draw. A network
    with dMoE layers therefore starts as its backbone, and an ``erm`` and a ``dmoe`` run with the same seed start from
    the same function (see :class:`scripts.dmoe_unet.DMoEResUNet`). The first optimiser step moves the experts'
    output layers away from zero; the routers get gradient from the second step on.

    Dropout (rate ``dropout``) acts on the combined expert output, one mask entry per voxel and channel; the
    public dMoE code drops each expert's output separately, which has the same expectation but needs k times as many
    random numbers (the dominant cost on CPU).

    Args:
        in_channels: C, channels of the feature map.
        num_experts: E, number of shared experts (default 8).
        top_k: k, experts per voxel (default 2), ``1 <= k <= E``.
        num_subgroups: G, number of named subgroups (one router each, default 4).
        dropout: dropout rate on the mixture output (default 0.1), in ``[0, 1)``.
        noise: trainable router noise in training mode (default True; never in eval).
        dispatch: ``"dense"``, ``"sparse"`` or ``"auto"`` (see :meth:`resolve_dispatch`). Same result.
        aux_loss_weight: if > 0, every training forward also computes the Switch-Transformer load-balancing loss
            ``E * sum_e f_e P_e`` (f_e: fraction of the N*k routing slots sent to expert e, P_e: mean router
            probability of e; 1 when balanced), available through :meth:`aux_loss` times this weight.

    Shapes:
        x: (B, C, *spatial) (any number of spatial dims); subgroup: (B,), (1,), 0-d int64 or None.
        output: same shape and dtype as x.

    Routing statistics (off by default, :meth:`set_routing_stats`) accumulate in ``routing_counts`` (G+1, E) the
    number of voxels whose k selected experts include expert e, per subgroup index (row G = unknown).

    Attribute ``native`` (default True): on the CPU, in eager mode, with ``dispatch`` ``"auto"`` or ``"sparse"``,
    compute the layer with the native kernels (:mod:`scripts.dmoe_native`) when they are available (see
    :meth:`uses_native`); False keeps the Python paths (same function, same random numbers).
    """

    def __init__(
        self,
        in_channels: int,
        num_experts: int = 8,
        top_k: int = 2,
        num_subgroups: int = 4,
        dropout: float = 0.1,
        noise: bool = True,
        dispatch: str = "auto",
        aux_loss_weight: float = 0.0,
    ) -> None:
        super().__init__()
        check_moe_args(in_channels, num_experts, top_k, num_subgroups, dropout, dispatch, aux_loss_weight)
        self.in_channels = in_channels
        self.num_experts = num_experts
        self.top_k = top_k
        self.num_subgroups = num_subgroups
        self.dropout = float(dropout)
        self.dispatch = dispatch
        self.dense_max_hidden = DENSE_MAX_HIDDEN
        self.native = True
        self.aux_loss_weight = float(aux_loss_weight)
        self.record_stats = False
        self.warn_unknown = True
        self.router = SubgroupNoisyTopKRouter(in_channels, num_experts, top_k, num_subgroups, noise)
        self.experts = ExpertBank(in_channels, num_experts)
        self.register_buffer(
            "routing_counts", torch.zeros(num_subgroups + 1, num_experts, dtype=torch.long), persistent=False
        )
        self._aux_loss: Optional[Tensor] = None

    def resolve_dispatch(self, device: torch.device, num_tokens: int) -> str:
        """The dispatch used for ``num_tokens`` voxels on ``device``: the constructor's choice, ``"auto"`` resolved.

        ``"auto"`` (measured with ``bench/bench_dmoe.py``): on CPU ``"sparse"``, except when the dense hidden tensor
        (T x E*4C) has at most ``self.dense_max_hidden`` elements (default ``DENSE_MAX_HIDDEN``: the deep, small
        stages), where the few large ops of ``"dense"`` beat the per-expert loop; on other devices ``"dense"`` (no
        host synchronisation for the per-expert counts, only large GEMMs; not measured on a GPU in this project).
        This is the rule of the Python paths: where :meth:`uses_native` holds, ``"auto"`` and ``"sparse"`` run the
        native kernels at every size instead.
        """
        if self.dispatch != "auto":
            return self.dispatch
        if device.type != "cpu" or num_tokens * self.experts.num_experts * self.experts.hidden <= self.dense_max_hidden:
            return "dense"
        return "sparse"

    def forward(self, x: Tensor, subgroup: Optional[Tensor] = None) -> Tensor:
        """Apply the layer.

        Args:
            x: feature map, (B, C, *spatial).
            subgroup: subgroup indices (B,), (1,) or 0-d int64, or None (= unknown for all). Unknown cases use
                the fallback routing of :class:`SubgroupNoisyTopKRouter`, with a warning logged once per layer.

        Returns:
            ``x + dMoE(x)``, same shape and dtype as x.

        Raises:
            ValueError: wrong channel count, or a subgroup index outside ``0..G``.
        """
        if x.dim() < 3 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected x of shape (B, {self.in_channels}, *spatial), got {list(x.shape)}.")
        idx = normalize_subgroup(subgroup, x.shape[0], self.num_subgroups, x.device)
        if not torch.jit.is_scripting() and not torch.jit.is_tracing():
            if self.warn_unknown and bool((idx == self.num_subgroups).any()):
                self._log_unknown_once()
        return self.forward_indexed(x, idx)

    @torch.jit.unused
    def _native_layer(self, h: Tensor, idx: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """``(x + dropout(mixture) as (B, C, N), weights, experts)`` by :func:`scripts.dmoe_native.native_layer`, the
        native path's route and mix in one call, when every case has a named subgroup and no load-balancing loss is
        asked for: the noisy router of :func:`scripts.dmoe_native.native_route` and :meth:`_eager_mix`'s native
        experts (the same function and random numbers as :class:`SubgroupNoisyTopKRouter` and the Python paths)."""
        r, bank = self.router, self.experts
        p = self.dropout if self.training else 0.0
        params = (bank.w1, bank.b1, bank.w2, bank.b2)
        return native_layer(h.contiguous(), idx, (r.weight, r.noise_weight), params, r.top_k, r.training and r.noise, p)

    @torch.jit.unused
    def _eager_mix(
        self, x: Tensor, h: Tensor, weights: Tensor, experts: Tensor, dense: bool, fallback: bool, native: bool
    ) -> Tensor:
        """``x + dropout(experts' mixture)`` in eager mode: the native CPU kernels (mixture, residual and dropout in
        one pass, the same random draws) when ``native`` (see :meth:`uses_native`), else the dense or the fused sparse
        Python path (``dense``: :meth:`resolve_dispatch` chose dense) and :meth:`_add_dropped`."""
        if native:
            p = self.dropout if self.training else 0.0
            draws = lane_draws(h.numel(), h.device, native=True) if p > 0.0 else None
            params = (self.experts.w1, self.experts.b1, self.experts.w2, self.experts.b2)
            return native_experts(h, weights, experts, params, fallback, draws, p).view(x.shape)
        if dense:
            y = self.experts.forward_tokens(h, weights, experts, True, fallback)
        else:
            y = self.experts.forward_fused(h, weights, experts, fallback)  # a transposed view
        return self._add_dropped(x, y.reshape(x.shape))

    @torch.jit.unused
    def uses_native(self, h: Tensor) -> bool:
        """Whether a forward on ``h`` (B, C, N) runs the native CPU kernels (:mod:`scripts.dmoe_native`) for every
        size: ``native`` is on, ``dispatch`` is not ``"dense"``, and h is a CPU float tensor outside autocast for
        which the kernels are built (:func:`scripts.dmoe_native.usable_for`)."""
        return self.native and self.dispatch != "dense" and usable_for(h)

    @torch.jit.unused
    def _log_unknown_once(self) -> None:
        self.warn_unknown = False
        logger.warning(
            "dMoE: subgroup unknown or missing for some cases; using the average of the %d subgroup routers' gates "
            "(logged once per layer).",
            self.num_subgroups,
        )

    def forward_indexed(self, x: Tensor, idx: Tensor) -> Tensor:
        """:meth:`forward` with validated indices ``idx`` (B,) int64 in ``[0, G]`` (no checks, no logging)."""
        b, c = x.shape[0], x.shape[1]
        h = x.reshape(b, c, -1)  # (B, C, N), a view for contiguous x
        need_aux = self.training and self.aux_loss_weight > 0
        # with unknown cases (and always under torch.jit.trace) weights/experts are (B, E, N) full gate vectors
        fallback = torch.jit.is_tracing() or bool((idx == self.num_subgroups).any())
        dense = torch.jit.is_tracing() or self.resolve_dispatch(x.device, b * h.shape[2]) == "dense"
        if torch.jit.is_scripting():
            weights, experts, probs = self.router(h, idx, need_aux)
            y = self.experts.forward_tokens(h, weights, experts, dense, fallback)
            out = self._add_dropped(x, y.reshape(x.shape))
        else:
            native = not torch.jit.is_tracing() and self.uses_native(h)  # decided once per forward
            if native and not fallback and not need_aux:  # the common case: the whole layer in one native call
                y, weights, experts = self._native_layer(h, idx)
                out = y.view(x.shape)
            else:  # unknown subgroups (fallback gates), the load-balancing loss, or the Python paths
                weights, experts, probs = self.router(h, idx, need_aux)
                out = self._eager_mix(x, h, weights, experts, dense, fallback, native)
        if self.record_stats or need_aux:
            top = top_k_along(weights.detach(), self.top_k, 1)[1] if fallback else experts  # (B, k, N)
            if self.record_stats:
                self._record(idx, top)
            if need_aux and not torch.jit.is_scripting():
                self._store_aux_loss(self.aux_loss_weight * self._load_balance(top, probs))
        return out

    def _add_dropped(self, x: Tensor, y: Tensor) -> Tensor:
        """``x + dropout(y)``: one mask entry per voxel and channel, drawn in token order (voxel-major, then channel).

        The mask is :func:`fast_dropout`'s, drawn for the channel-last (B, N, C) token layout whatever the layout of
        y, so every dispatch uses the same random numbers for the same element; eager mode adds and multiplies in one
        ``addcmul``.
        """
        if not self.training or self.dropout == 0.0:
            return x + y.to(x.dtype)
        if torch.jit.is_scripting():
            return x + F.dropout(y, self.dropout, True).to(x.dtype)
        b, c = x.shape[0], x.shape[1]
        mask = _lane_mask(y.numel(), self.dropout, x.dtype, x.device).view(b, -1, c).transpose(1, 2)
        return torch.addcmul(x, y.to(x.dtype), mask.reshape(x.shape))

    def _record(self, idx: Tensor, top: Tensor) -> None:
        """Add the k selected experts per voxel (top (B, k, N)) to ``routing_counts`` (G+1, E), row = subgroup."""
        e = self.num_experts
        key = (idx.view(-1, 1, 1) * e + top.detach()).reshape(-1)
        counts = torch.bincount(key, minlength=(self.num_subgroups + 1) * e)
        self.routing_counts += counts.view(self.num_subgroups + 1, e).to(self.routing_counts.device)

    def _load_balance(self, top: Tensor, probs: Tensor) -> Tensor:
        """Switch-Transformer load-balancing loss ``E * sum_e f_e P_e`` (1 for a perfectly uniform router).

        Args:
            top: selected experts (B, k, N).
            probs: softmax of the clean router logits (B, E, N).
        """
        e = self.num_experts
        frac = torch.bincount(top.reshape(-1), minlength=e).to(probs.dtype) / float(top.numel())
        mean_p = probs.transpose(0, 1).reshape(e, -1).mean(dim=1)
        return e * (frac * mean_p).sum().float()

    @torch.jit.unused
    def _store_aux_loss(self, loss: Tensor) -> None:
        self._aux_loss = loss

    @torch.jit.unused
    def aux_loss(self, clear: bool = True) -> Tensor:
        """Weighted load-balancing loss of the last training forward, a 0-d tensor attached to its graph.

        Zero (on CPU) when ``aux_loss_weight == 0``, in eval mode, or if nothing was stored since the last read.
        With ``clear`` (default) the stored loss is released, so the module does not keep the autograd graph
        alive (which would also make ``copy.deepcopy`` fail).
        """
        loss = self._aux_loss
        if clear:
            self._aux_loss = None
        return loss if loss is not None else torch.zeros(())

    @torch.jit.unused
    def set_routing_stats(self, enabled: bool = True) -> None:
        """Switch recording of routing statistics on or off (off by default)."""
        self.record_stats = bool(enabled)

    @torch.jit.unused
    def reset_routing_stats(self) -> None:
        """Zero the accumulated routing counts."""
        self.routing_counts.zero_()

    @torch.jit.unused
    def routing_stats(self) -> Tensor:
        """Accumulated counts (G+1, E) int64 on CPU: row a = subgroup index a (row G = unknown), column = expert."""
        return self.routing_counts.detach().cpu().clone()


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_moe_args(
    in_channels: int,
    num_experts: int,
    top_k: int,
    num_subgroups: int,
    dropout: float,
    dispatch: str,
    aux_loss_weight: float,
) -> None:
    """Raise ``ValueError`` naming the first invalid dMoE argument (see :class:`DMoE` for their meaning)."""
    checks: List[Tuple[str, object, bool]] = [
        ("in_channels", in_channels, _is_int(in_channels) and in_channels >= 1),
        ("num_experts", num_experts, _is_int(num_experts) and num_experts >= 1),
        ("top_k", top_k, _is_int(top_k) and top_k >= 1),
        ("num_subgroups", num_subgroups, _is_int(num_subgroups) and num_subgroups >= 1),
        ("dropout", dropout, isinstance(dropout, (int, float)) and 0.0 <= dropout < 1.0),
        ("aux_loss_weight", aux_loss_weight, isinstance(aux_loss_weight, (int, float)) and aux_loss_weight >= 0.0),
    ]
    for name, value, ok in checks:
        if not ok:
            raise ValueError(f"invalid {name}={value!r}: see the DMoE docstring for the allowed values.")
    if top_k > num_experts:
        raise ValueError(f"top_k={top_k} must not exceed num_experts={num_experts}.")
    if dispatch not in DISPATCH_MODES:
        raise ValueError(f"dispatch must be one of {DISPATCH_MODES}, got {dispatch!r}.")
