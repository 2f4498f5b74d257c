"""Inferers that route the dMoE layers by the subgroup carried on the image, for hosts that call
``inferer(image, network)`` without extra arguments (MONAI Label, MONAI Deploy's bundle operator)."""

from __future__ import annotations

from typing import Any

import torch
from monai.inferers import SlidingWindowInferer

#: key of the subgroup index in the image's MetaTensor metadata (written by ``scripts.transforms.SubgroupIndexd``)
SUBGROUP_META_KEY = "fairdro_subgroup"


class SubgroupSlidingWindowInferer(SlidingWindowInferer):
    """``SlidingWindowInferer`` that passes ``subgroup`` to the network from the input's metadata when the caller
    gives none.

    The bundle's own evaluators pass ``subgroup`` explicitly (``PrepareBatchExtraInput``); MONAI Label and MONAI
    Deploy call ``inferer(inputs, network)`` only, so without this every request would get the unknown-subgroup
    routing whatever subgroup the request named. The index travels on ``inputs.meta[SUBGROUP_META_KEY]``: a
    0-d or ``(B,)`` value; a single value broadcasts over the batch. Takes every ``SlidingWindowInferer`` argument.
    """

    def __call__(self, inputs: torch.Tensor, network: Any, *args: Any, **kwargs: Any):
        if kwargs.get("subgroup") is None:
            meta = getattr(inputs, "meta", None)
            value = meta.get(SUBGROUP_META_KEY) if isinstance(meta, dict) else None
            if value is not None:
                index = torch.as_tensor(value).reshape(-1).to(device=inputs.device, dtype=torch.long)
                if index.numel() not in (1, inputs.shape[0]):
                    raise ValueError(
                        f"metadata '{SUBGROUP_META_KEY}' holds {index.numel()} subgroup indices for a batch of "
                        f"{inputs.shape[0]}; expected 1 or {inputs.shape[0]}."
                    )
                kwargs["subgroup"] = index
        return super().__call__(inputs, network, *args, **kwargs)
