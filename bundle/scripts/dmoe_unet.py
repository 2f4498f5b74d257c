"""3D (or 2D) residual U-Net with a distribution-aware mixture-of-experts (dMoE) layer after every encoder stage.

The layout follows the public dMoE 3D model (Oh et al., ICML 2025, https://arxiv.org/abs/2502.00619): five residual
encoder stages with channels ``[f, f, 2f, 4f, 8f]`` that *all* downsample by 2 (so the network never computes at full
resolution), a decoder of transposed-conv up-sampling + skip concatenation + residual blocks (no MoE), and a final
transposed convolution back to the input resolution. With ``use_dmoe=False`` the same class is the plain backbone of
the ERM and GroupDRO baselines (identical parameter names, minus the ``*.moe.*`` ones). ``spatial_dims=2`` builds
the same network on 2D images (the same blocks with 3x3 / 2x2 kernels, the same dMoE layers and routing).

At initialisation the dMoE network computes exactly its backbone: every dMoE layer starts as the identity (zero expert
output layers) and, for the same seed, the backbone weights are identical with and without dMoE (see
:class:`DMoEResUNet`).
"""

from __future__ import annotations

import logging
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution, UnetResBlock, UnetrUpBlock
from torch import Tensor, nn

from .dmoe import DMoE, check_moe_args, normalize_subgroup

__all__ = ["DMoEResUNet", "EncoderStage"]

logger = logging.getLogger(__name__)

NUM_STAGES = 5
#: every encoder stage halves the resolution: inputs are padded to a multiple of this
SIZE_DIVISOR = 2**NUM_STAGES
PAD_MODES = ("replicate", "constant")
SPATIAL_DIMS = (2, 3)


class EncoderStage(nn.Module):
    """One encoder stage: a residual block with stride 2, optionally followed by a dMoE layer.

    Args:
        block: the residual block, (B, C_in, *S) -> (B, C, *S/2).
        moe: the dMoE layer applied to the block's output, or None (plain backbone; :class:`DMoEResUNet` sets
            it after building the whole backbone).

    Shapes:
        x: (B, C_in, H, W, D) in 3D or (B, C_in, H, W) in 2D; subgroup indices: (B,) int64 in ``[0, G]`` (validated
        by the network). Returns (B, C, H/2, W/2, D/2) in 3D, (B, C, H/2, W/2) in 2D.
    """

    def __init__(self, block: nn.Module, moe: Optional[DMoE]) -> None:
        super().__init__()
        self.block = block
        self.moe = moe

    def forward(self, x: Tensor, idx: Tensor) -> Tensor:
        """Run the block, then the dMoE layer if there is one."""
        x = self.block(x)
        moe = self.moe
        if moe is not None:
            x = moe.forward_indexed(x, idx)
        return x


class DMoEResUNet(nn.Module):
    """dMoE residual U-Net (3D, or 2D with ``spatial_dims=2``) for subgroup-aware segmentation.

    Encoder stage i (i = 0..4) is a MONAI ``UnetResBlock`` (3x3x3 convs, instance norm, LeakyReLU, stride 2) with
    ``[f, f, 2f, 4f, 8f][i]`` output channels, followed by a :class:`~scripts.dmoe.DMoE` layer. The decoder is four
    MONAI ``UnetrUpBlock`` (2x2x2 transposed conv, skip concatenation, residual block) and a final 2x2x2 transposed
    convolution (with bias) to ``out_channels`` logits at the input resolution. In 2D the kernels are 3x3 and 2x2;
    the dMoE layers (per-pixel routing by subgroup) are the same.

    Inputs whose spatial size is not a multiple of 32 are padded internally (split evenly before/after, mode
    ``pad_mode``) to the next multiple of 32 and the logits are cropped back, so any patch size works
    (e.g. 96x96x48, or 70x50 in 2D); patch sizes that are multiples of 32 avoid the padding cost and edge effect.
    Instance norm needs more than one voxel per channel in training, so the padded size must exceed 32 in at least
    one axis (e.g. 64x32x32 or 64x32 or larger).

    **Starts as its backbone.** The backbone modules (encoder blocks, decoder, head) are created first and the dMoE
    layers after them, so after ``torch.manual_seed(s)`` the backbone parameters are the same with ``use_dmoe=True``
    and ``use_dmoe=False``; and every dMoE layer ``h + sum_k g_k E_k(h)`` starts as the identity because each
    expert's output layer is zero (:meth:`scripts.dmoe.ExpertBank.reset_parameters`). So with the same seed the
    ``dmoe`` network at initialisation computes exactly the ``erm`` network's function, and comparisons between the
    variants start from the same model; training moves the experts off zero from the first step.

    Args:
        in_channels: input channels (1 for CT).
        out_channels: output channels (logits), 2 for background/CTV.
        features: f, channels of the first stage (public dMoE default 24).
        num_experts: E, experts per dMoE layer.
        top_k: k, experts per voxel.
        num_subgroups: G, number of named subgroup values (routers per layer); index G means "unknown".
        use_dmoe: False removes every dMoE layer (the plain backbone).
        dropout: dropout rate on each dMoE layer's mixture output (see ``DMoE``).
        noise: trainable router noise in training mode (never in eval).
        dispatch: expert dispatch, ``"auto"`` | ``"dense"`` | ``"sparse"`` (same result; see ``DMoE``).
        aux_loss_weight: weight of the optional load-balancing loss returned by :meth:`aux_loss` (0 = off).
        pad_mode: ``"replicate"`` or ``"constant"`` (zeros), padding used for sizes not divisible by 32.
        spatial_dims: 3 (volumes, the default) or 2 (images). With 3, parameter names, initial values (the same
            random draws) and the computed function are those of the network before this argument existed.

    Shapes:
        x: (B, in_channels, H, W, D) in 3D, (B, in_channels, H, W) in 2D; subgroup: (B,) int64, (1,)/0-d
        (broadcast, e.g. over sliding-window patches) or None (unknown). Returns logits (B, out_channels, H, W, D)
        in 3D, (B, out_channels, H, W) in 2D, in x's floating dtype.

    Raises:
        ValueError: a channel count or ``features`` is not a positive integer, ``pad_mode`` or ``spatial_dims`` is
            not one of the allowed values, or a dMoE argument is invalid (:func:`scripts.dmoe.check_moe_args`).

    Example::

        net = DMoEResUNet(features=8, num_subgroups=4)
        logits = net(torch.rand(2, 1, 64, 64, 32), torch.tensor([0, 3]))  # (2, 2, 64, 64, 32)
        net2d = DMoEResUNet(features=8, num_subgroups=4, spatial_dims=2)
        logits = net2d(torch.rand(2, 1, 70, 50), torch.tensor([1, 2]))  # (2, 2, 70, 50)
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 2,
        features: int = 24,
        num_experts: int = 8,
        top_k: int = 2,
        num_subgroups: int = 4,
        use_dmoe: bool = True,
        dropout: float = 0.1,
        noise: bool = True,
        dispatch: str = "auto",
        aux_loss_weight: float = 0.0,
        pad_mode: str = "replicate",
        spatial_dims: int = 3,
    ) -> None:
        super().__init__()
        if not isinstance(spatial_dims, int) or isinstance(spatial_dims, bool) or spatial_dims not in SPATIAL_DIMS:
            raise ValueError(f"invalid spatial_dims={spatial_dims!r}: must be 2 (images) or 3 (volumes).")
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels), ("features", features)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"invalid {name}={value!r}: must be a positive integer.")
        if pad_mode not in PAD_MODES:
            raise ValueError(f"pad_mode must be one of {PAD_MODES}, got {pad_mode!r}.")
        check_moe_args(features, num_experts, top_k, num_subgroups, dropout, dispatch, aux_loss_weight)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.num_subgroups = num_subgroups
        self.use_dmoe = bool(use_dmoe)
        self.pad_mode = pad_mode
        self.spatial_dims = spatial_dims
        self.size_divisor = SIZE_DIVISOR
        self.warn_unknown = True
        f = features
        channels = [f, f, 2 * f, 4 * f, 8 * f]
        ins = [in_channels] + channels[:-1]
        dims = spatial_dims
        self.stages = nn.ModuleList(
            [
                EncoderStage(UnetResBlock(dims, c_in, c, kernel_size=3, stride=2, norm_name="instance"), None)
                for c_in, c in zip(ins, channels)
            ]
        )
        self.decoders = nn.ModuleList(
            [
                UnetrUpBlock(dims, channels[i + 1], channels[i], 3, 2, norm_name="instance", res_block=True)
                for i in reversed(range(NUM_STAGES - 1))
            ]
        )
        self.head = Convolution(
            dims, f, out_channels, strides=2, kernel_size=2, padding=0, output_padding=0, is_transposed=True,
            conv_only=True, bias=True,
        )  # fmt: skip
        if self.use_dmoe:  # after the whole backbone, so that it draws the same random numbers as without dMoE
            for stage, c in zip(self.stages, channels):
                stage.moe = DMoE(c, num_experts, top_k, num_subgroups, dropout, noise, dispatch, aux_loss_weight)

    def forward(self, x: Tensor, subgroup: Optional[Tensor] = None) -> Tensor:
        """Segment a batch of patches.

        Args:
            x: images, (B, in_channels, H, W, D) in 3D, (B, in_channels, H, W) in 2D.
            subgroup: subgroup index per case, (B,) int64; (1,) or 0-d broadcast over the batch; index
                ``num_subgroups`` or None = unknown (fallback routing, one warning per network).

        Returns:
            logits, (B, out_channels, H, W, D) in 3D, (B, out_channels, H, W) in 2D.

        Raises:
            ValueError: x is not ``spatial_dims + 2``-D with ``in_channels`` channels, or a subgroup index is outside
                ``0..G``.
        """
        if not torch.jit.is_tracing() and (x.dim() != self.spatial_dims + 2 or x.shape[1] != self.in_channels):
            axes = "H, W, D" if self.spatial_dims == 3 else "H, W"
            raise ValueError(
                f"expected x of shape (B, {self.in_channels}, {axes}) for spatial_dims={self.spatial_dims}, "
                f"got {list(x.shape)}."
            )
        if not torch.jit.is_scripting():
            # MONAI pipelines hand in MetaTensors; computing on the plain tensor avoids their per-op overhead
            x, subgroup = _plain(x), _plain_opt(subgroup)
        idx = normalize_subgroup(subgroup, x.shape[0], self.num_subgroups, x.device)
        if not torch.jit.is_scripting() and not torch.jit.is_tracing():
            if self.use_dmoe and self.warn_unknown and bool((idx == self.num_subgroups).any()):
                self._log_unknown_once()
        x, crop = self._pad(x)
        skips: List[Tensor] = []
        h = x
        for stage in self.stages:
            h = stage(h, idx)
            skips.append(h)
        skips.pop()  # the deepest stage is the decoder's input, not a skip
        for dec in self.decoders:
            h = dec(h, skips.pop())
        return _crop(self.head(h), crop)

    def _pad(self, x: Tensor) -> Tuple[Tensor, List[int]]:
        """Pad (B, C, *S) to multiples of 32; return it with the crop box [start, size] per spatial axis, flattened:
        [h0, H, w0, W(, d0, D)]."""
        pads: List[int] = []
        crop: List[int] = []
        for s in x.shape[2:]:
            total = (self.size_divisor - s % self.size_divisor) % self.size_divisor
            before = total // 2
            crop.extend([before, s])
            pads = [before, total - before] + pads  # F.pad wants the last dimension first
        if torch.jit.is_tracing() or sum(pads) > 0:  # a trace records the padding for its example shape
            x = F.pad(x, pads, mode=self.pad_mode)
        return x, crop

    @torch.jit.unused
    def _log_unknown_once(self) -> None:
        self.warn_unknown = False
        logger.warning(
            "DMoEResUNet: subgroup unknown or missing (index %d or None) for some cases; routing them with the "
            "average of the %d subgroup routers' gates. Logged once.",
            self.num_subgroups,
            self.num_subgroups,
        )

    @torch.jit.unused
    def moe_layers(self) -> Dict[str, DMoE]:
        """The dMoE layers by module name (``"stages.0.moe"`` .. ``"stages.4.moe"``); empty for the backbone."""
        return {name: m for name, m in self.named_modules() if isinstance(m, DMoE)}

    @torch.jit.unused
    def aux_loss(self, clear: bool = True) -> Tensor:
        """Sum over the dMoE layers of their weighted load-balancing losses from the last training forward.

        A 0-d tensor on the network's device; zero unless ``aux_loss_weight > 0`` (and for the plain backbone).
        Add it to the segmentation loss; ``forward`` never returns it. ``clear`` releases the stored graphs (see
        :meth:`scripts.dmoe.DMoE.aux_loss`).
        """
        total = torch.zeros((), device=self.head.conv.weight.device)
        for m in self.moe_layers().values():
            total = total + m.aux_loss(clear).to(total.device)
        return total

    @torch.jit.unused
    def set_routing_stats(self, enabled: bool = True) -> None:
        """Turn routing-statistics recording on or off in every dMoE layer (off by default)."""
        for m in self.moe_layers().values():
            m.set_routing_stats(enabled)

    @torch.jit.unused
    def reset_routing_stats(self) -> None:
        """Zero the routing counts of every dMoE layer."""
        for m in self.moe_layers().values():
            m.reset_routing_stats()

    @torch.jit.unused
    def routing_stats(self) -> Dict[str, Tensor]:
        """Routing counts per layer: ``{layer name: (G+1, E) int64 CPU tensor}``.

        Entry ``[a, e]`` counts the voxels of subgroup index ``a`` (row G = unknown) whose k selected experts include
        expert ``e``; each row sums to k times the number of voxels seen for that subgroup at that layer.
        """
        return {name: m.routing_stats() for name, m in self.moe_layers().items()}


def _crop(out: Tensor, crop: List[int]) -> Tensor:
    """``out`` (B, C, *S_padded) cut to the box ``crop`` = [start, size] per spatial axis (see ``_pad``): a view."""
    for axis in range(len(crop) // 2):
        out = out.narrow(axis + 2, crop[2 * axis], crop[2 * axis + 1])
    return out


@torch.jit.unused
def _plain(t: Tensor) -> Tensor:
    """The underlying ``torch.Tensor`` of a MONAI ``MetaTensor`` (or ``t`` itself)."""
    return t.as_tensor() if hasattr(t, "as_tensor") else t


@torch.jit.unused
def _plain_opt(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else _plain(t)
