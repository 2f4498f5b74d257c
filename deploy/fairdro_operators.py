"""FairDRO operators for the MONAI Deploy App SDK (4.0).

Two operators join the SDK's own DICOM loader / series selector / series-to-volume / SEG writer:

* :class:`SubgroupBundleInferenceOperator`: the SDK's ``MonaiBundleInferenceOperator`` with the patient
  subgroup (e.g. tumour stage) put into the data dict before the bundle's ``preprocessing`` runs, so the
  bundle's ``SubgroupIndexd`` routes the dMoE layers. Without a subgroup the bundle's documented fallback
  (average of the subgroup routers) is used.
* :class:`RTStructWriterOperator`: writes the predicted target as an RTSTRUCT referencing the selected CT
  series, with the bundle's own writer (``scripts.rtstruct``), which the SDK does not have.

Both need the bundle's ``scripts`` package importable (TorchScript does not embed it); ``app.py`` puts
the bundle folder on ``sys.path``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
from monai.deploy.core import Fragment, Image, Operator, OperatorSpec
from monai.deploy.core.domain.dicom_series_selection import StudySelectedSeries
from monai.deploy.operators.monai_bundle_inference_operator import MonaiBundleInferenceOperator

logger = logging.getLogger(__name__)

#: environment variable naming the subgroup of every series this app processes (e.g. ``T2``)
SUBGROUP_ENV = "FAIRDRO_SUBGROUP"


class SubgroupBundleInferenceOperator(MonaiBundleInferenceOperator):
    """``MonaiBundleInferenceOperator`` that routes the bundle's dMoE network by patient subgroup.

    Args:
        fragment: the application.
        subgroup: subgroup value (one of the bundle's ``subgroups``); ``None`` reads ``$FAIRDRO_SUBGROUP``,
            and when that is unset too the bundle's fallback routing is used.
        args: passed to ``MonaiBundleInferenceOperator``.
        kwargs: passed to ``MonaiBundleInferenceOperator``.
    """

    def __init__(self, fragment: Fragment, *args: Any, subgroup: str | None = None, **kwargs: Any) -> None:
        value = subgroup if subgroup is not None else os.environ.get(SUBGROUP_ENV)
        self.subgroup = value.strip() if isinstance(value, str) and value.strip() else None
        super().__init__(fragment, *args, **kwargs)

    def pre_process(self, data: Any, *args: Any, **kwargs: Any) -> Any:
        """Add the case id and the subgroup attribute, then run the bundle's preprocessing."""
        data = dict(data)
        key = self.parser.get("subgroup_key", "stage")
        known = list(self.parser.get("subgroups", []))
        if self.subgroup is not None and known and self.subgroup not in known:
            raise ValueError(
                f"subgroup {self.subgroup!r} (from {SUBGROUP_ENV} or the app) is not one of the bundle's "
                f"subgroups {known}; unset it to use the fallback routing."
            )
        if self.subgroup is not None:
            data[key] = self.subgroup
        image = data.get("image")
        if image is not None and image.ndim == 3:
            # the bundle's LoadImaged adds the channel; the SDK strips LoadImaged and hands over (W, H, D)
            data["image"] = image = image[None]
        meta = getattr(image, "meta", {}) or {}
        data.setdefault("id", str(meta.get("SeriesInstanceUID") or meta.get("series_instance_uid") or "series"))
        logger.info("Subgroup routing: %s", self.subgroup if self.subgroup is not None else "unknown (fallback)")
        return super().pre_process(data, *args, **kwargs)


def _selected_series(study_selected_series_list: list[StudySelectedSeries]):
    for study_selected in study_selected_series_list or []:
        if not isinstance(study_selected, StudySelectedSeries):
            raise ValueError(f"expected StudySelectedSeries, got {type(study_selected).__name__}.")
        for selected in study_selected.selected_series:
            return selected.series
    raise ValueError("No CT series was selected; the RTSTRUCT needs the CT it references.")


def mask_on_series_grid(seg: np.ndarray, sdk_sop_uids: list[str], info: Any) -> np.ndarray:
    """Re-index the SDK's ``(slices, rows, cols)`` mask onto the bundle's ``(X, Y, Z)`` series grid.

    Slices are matched by SOP Instance UID (the SDK and the bundle may sort them differently), so the
    mapping is exact whatever the slice order.

    Args:
        seg: ``(D, H, W)`` mask as the SDK's ``Image`` holds it, slice ``d`` being ``sdk_sop_uids[d]``.
        sdk_sop_uids: SOP Instance UIDs of the SDK's slices, in its order.
        info: the bundle's ``SeriesInfo`` of the same series.

    Raises:
        ValueError: when the slices or the in-plane matrix do not match.
    """
    seg = np.asarray(seg)
    if seg.ndim != 3 or seg.shape[0] != len(sdk_sop_uids):
        raise ValueError(f"mask shape {seg.shape} does not match the {len(sdk_sop_uids)} slices of the series.")
    index = {uid: d for d, uid in enumerate(sdk_sop_uids)}
    missing = [uid for uid in info.sop_instance_uids if uid not in index]
    if missing:
        raise ValueError(f"{len(missing)} slice(s) of {info.describe()} are not in the mask (e.g. {missing[0]}).")
    cols, rows, _ = info.shape
    if seg.shape[1:] != (rows, cols):
        raise ValueError(f"mask slices are {seg.shape[1:]} (rows, cols), the CT is {(rows, cols)}.")
    return np.stack([seg[index[uid]].T for uid in info.sop_instance_uids], axis=-1)


class RTStructWriterOperator(Operator):
    """Write the segmentation as a DICOM RTSTRUCT referencing the selected CT series.

    Named inputs:
        seg_image: the ``Image`` out of the bundle inference operator (label map on the CT grid).
        study_selected_series_list: the SDK series selector's output.

    Args:
        fragment: the application.
        output_folder: where ``RS_<SeriesInstanceUID>.dcm`` is written.
        roi_name: ROI name of the target.
        algorithm_version: recorded in the RTSTRUCT.
        args: passed to ``Operator``.
        kwargs: passed to ``Operator``.
    """

    def __init__(
        self,
        fragment: Fragment,
        *args: Any,
        output_folder: Path,
        roi_name: str = "CTV",
        algorithm_version: str = "unknown",
        **kwargs: Any,
    ) -> None:
        self.output_folder = Path(output_folder)
        self.roi_name = roi_name
        self.algorithm_version = algorithm_version
        self.input_name_seg = "seg_image"
        self.input_name_series = "study_selected_series_list"
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input(self.input_name_seg)
        spec.input(self.input_name_series)

    def compute(self, op_input: Any, op_output: Any, context: Any) -> None:
        series_list = op_input.receive(self.input_name_series)
        seg = op_input.receive(self.input_name_seg)
        seg = seg.asnumpy() if isinstance(seg, Image) else np.asarray(seg)
        self.write(seg, _selected_series(series_list))

    def write(self, seg: np.ndarray, series: Any) -> Path:
        """Write the RTSTRUCT for ``seg`` (``(D, H, W)``, SDK order) against the SDK ``series``."""
        from scripts.dicom_series import build_series_info
        from scripts.rtstruct import write_rtstruct

        sops = [inst.get_native_sop_instance() for inst in series.get_sop_instances()]
        files = [Path(getattr(ds, "filename", "") or "") for ds in sops]
        folder = files[0].parent if files and str(files[0]) else Path(".")
        info = build_series_info(list(zip(files, sops, strict=True)), folder)
        mask = mask_on_series_grid(seg > 0, [str(ds.SOPInstanceUID) for ds in sops], info) > 0
        self.output_folder.mkdir(parents=True, exist_ok=True)
        path = self.output_folder / f"RS_{info.series_instance_uid}.dcm"
        write_rtstruct(
            mask,
            info,
            path,
            roi_name=self.roi_name,
            algorithm_name="FairDRO",
            algorithm_version=self.algorithm_version,
        )
        logger.info("RTSTRUCT written: %s (%d voxels in %s)", path.name, int(mask.sum()), self.roi_name)
        return path
