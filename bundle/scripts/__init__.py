"""Custom components of the FairDRO bundle, reached from the configs as ``scripts.<module>.<Name>``.

The public names are also re-exported here (``from scripts import FairDRO``), lazily: a submodule is
imported on first use of one of its names, so heavy optional dependencies (highdicom, matplotlib,
pandas) are loaded only by the code paths that need them and the inference path runs in lean
environments such as MONAI Label's.
"""

from importlib import import_module
from pathlib import Path

#: absolute path of this bundle (the folder holding ``configs/`` and ``scripts/``); the configs'
#: ``bundle_root`` refers to it so that commands work from the repository root and from ``bundle/``.
BUNDLE_ROOT = str(Path(__file__).resolve().parents[1])

_EXPORTS = {
    "DMoE": "dmoe",
    "DMoEResUNet": "dmoe_unet",
    "PerSampleDiceCELoss": "losses",
    "FairDRO": "fairdro",
    "FairDROTrainer": "engine",
    "FairDROHandler": "engine",
    "FairDROSampler": "engine",
    "SubgroupIndexd": "transforms",
    "CaseIdd": "transforms",
    "LabelCentredCropd": "transforms",
    "BankRefreshHandler": "bank_refresh",
    "IntraGroupDiagnostic": "cvar_diagnostic",
    "intra_group_diagnostic": "cvar_diagnostic",
    "JTTWeights": "jtt",
    "warmup_cosine": "schedules",
    "FairnessMetric": "fairness_metrics",
    "FairnessMetricHandler": "fairness_metrics",
    "CaseMetricsHandler": "fairness_metrics",
    "FairnessReportHandler": "fairness_report",
    "ReportSettings": "fairness_report",
    "write_fairness_report": "fairness_report",
    "LoadDicomSeriesd": "dicom_series",
    "read_ct_series": "dicom_series",
    "SaveDicomOutputsd": "dicom_write",
    "write_dicom_outputs": "dicom_write",
    "write_rtstruct": "rtstruct",
    "rasterise_roi": "rtstruct",
    "CohortCheck": "check_data",
    "check_datalist": "check_data",
    "AtomicCheckpointSaver": "safe_io",
    "VerifiedCheckpointLoader": "safe_io",
    "load_weights": "safe_io",
    "generate_cohort": "synthetic",
    "RNGState": "resume",
    "ResumeFromCheckpoint": "resume",
}
__all__ = ["BUNDLE_ROOT", *_EXPORTS]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'scripts' has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{module}"), name)
