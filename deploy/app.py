"""FairDRO CTV segmentation as a MONAI Deploy App SDK application.

CT DICOM folder in; DICOM SEG (the SDK's highdicom writer) and RTSTRUCT (the bundle's writer) out::

    FAIRDRO_SUBGROUP=T2 python deploy/app.py -i DICOM_DIR -o OUT -m bundle/models/model.ts

Pipeline: DICOMDataLoaderOperator -> DICOMSeriesSelectorOperator (the CT series) ->
DICOMSeriesToVolumeOperator -> SubgroupBundleInferenceOperator (the SDK's MonaiBundleInferenceOperator
reading ``extra/inference.json`` from ``model.ts``, with the subgroup added) -> DICOMSegmentationWriterOperator
and RTStructWriterOperator. Environment, commands and what `make test-deploy` checks: the model card
(bundle/docs/README.md), section "MONAI Deploy App SDK".
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _bundle_dir() -> Path:
    """The bundle folder whose ``scripts`` package the TorchScript configs reference.

    A MAP build copies ``scripts/`` beside this file (``make deploy-stage``); in the repository it is ``../bundle``.
    """
    for candidate in (HERE, HERE.parent / "bundle"):
        if (candidate / "scripts" / "__init__.py").is_file():
            return candidate
    raise RuntimeError(
        f"the bundle's scripts package is neither in {HERE} nor in {HERE.parent / 'bundle'}; "
        "copy bundle/scripts beside app.py (make deploy-stage)."
    )


BUNDLE_DIR = _bundle_dir()
if str(BUNDLE_DIR) not in sys.path:
    sys.path.insert(0, str(BUNDLE_DIR))
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from fairdro_operators import RTStructWriterOperator, SubgroupBundleInferenceOperator  # noqa: E402
from monai.deploy.conditions import CountCondition  # noqa: E402
from monai.deploy.core import AppContext, Application, Image, IOType  # noqa: E402
from monai.deploy.operators.dicom_data_loader_operator import DICOMDataLoaderOperator  # noqa: E402
from monai.deploy.operators.dicom_seg_writer_operator import (  # noqa: E402
    DICOMSegmentationWriterOperator,
    SegmentDescription,
)
from monai.deploy.operators.dicom_series_selector_operator import DICOMSeriesSelectorOperator  # noqa: E402
from monai.deploy.operators.dicom_series_to_volume_operator import DICOMSeriesToVolumeOperator  # noqa: E402
from monai.deploy.operators.monai_bundle_inference_operator import BundleConfigNames, IOMapping  # noqa: E402
from pydicom.sr.codedict import codes  # noqa: E402
from scripts.dicom_write import ensure_output_outside  # noqa: E402

#: the CT series of the study; RTSTRUCT/SEG objects in the same folder are ignored
CT_SELECTION = json.dumps({"selections": [{"name": "CT", "conditions": {"Modality": "(?i)^CT$"}}]})


def _bundle_version() -> str:
    meta = BUNDLE_DIR / "configs" / "metadata.json"
    try:
        return str(json.loads(meta.read_text())["version"])
    except (OSError, KeyError, ValueError):
        return "unknown"


class FairDROSegApp(Application):
    """FairDRO CTV segmentation: DICOM CT in, DICOM SEG + RTSTRUCT out."""

    def compose(self) -> None:
        app_context: AppContext = Application.init_app_context(self.argv)
        input_dir, output_dir = Path(app_context.input_path), Path(app_context.output_path).resolve()
        check_folders(input_dir, output_dir)
        version = _bundle_version()

        loader = DICOMDataLoaderOperator(self, CountCondition(self, 1), input_folder=input_dir, name="dcm_loader")
        selector = DICOMSeriesSelectorOperator(self, rules=CT_SELECTION, name="ct_selector")
        to_volume = DICOMSeriesToVolumeOperator(self, name="series_to_volume")
        infer = SubgroupBundleInferenceOperator(
            self,
            input_mapping=[IOMapping("image", Image, IOType.IN_MEMORY)],
            output_mapping=[IOMapping("pred", Image, IOType.IN_MEMORY)],
            app_context=app_context,
            bundle_config_names=BundleConfigNames(config_names=["inference"]),
            name="fairdro_inference",
        )
        segment = SegmentDescription(
            segment_label="CTV",
            segmented_property_category=codes.cid7150.AnatomicalStructure,
            segmented_property_type=codes.SCT.ClinicalTargetVolume,
            algorithm_name="FairDRO",
            algorithm_family=codes.DCM.ArtificialIntelligence,
            algorithm_version=version,
        )
        seg_writer = DICOMSegmentationWriterOperator(
            self, segment_descriptions=[segment], output_folder=output_dir, name="seg_writer"
        )
        rt_writer = RTStructWriterOperator(
            self, output_folder=output_dir, algorithm_version=version, name="rtstruct_writer"
        )

        self.add_flow(loader, selector, {("dicom_study_list", "dicom_study_list")})
        self.add_flow(selector, to_volume, {("study_selected_series_list", "study_selected_series_list")})
        self.add_flow(to_volume, infer, {("image", "image")})
        self.add_flow(selector, seg_writer, {("study_selected_series_list", "study_selected_series_list")})
        self.add_flow(infer, seg_writer, {("pred", "seg_image")})
        self.add_flow(selector, rt_writer, {("study_selected_series_list", "study_selected_series_list")})
        self.add_flow(infer, rt_writer, {("pred", "seg_image")})
        logging.info("FairDRO app composed: %s -> %s (bundle %s)", input_dir, output_dir, version)


def check_folders(input_dir: Path, output_dir: Path) -> None:
    """Refuse a missing input folder and an output folder inside it (the bundle's own rule: inputs are never written).

    Raises:
        FileNotFoundError, ValueError: naming the folder(s).
    """
    if not input_dir.is_dir():
        raise FileNotFoundError(f"input folder {input_dir} does not exist (give -i DICOM_DIR).")
    ensure_output_outside(output_dir, input_dir)


def check_paths(argv: list[str]) -> None:
    """:func:`check_folders` on ``-i``/``-o`` before the SDK creates the output folder (it does so before compose)."""
    import argparse

    ap = argparse.ArgumentParser(add_help=False)
    ap.add_argument("-i", "--input", type=Path)
    ap.add_argument("-o", "--output", type=Path)
    args, _ = ap.parse_known_args(argv)
    if args.input is not None and args.output is not None:
        try:
            check_folders(args.input, args.output)
        except (FileNotFoundError, ValueError) as err:
            raise SystemExit(str(err)) from None


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    check_paths(sys.argv[1:])
    FairDROSegApp().run()
