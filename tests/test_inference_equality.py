"""The fast post-processing (``InvertForegroundd``) gives the masks of the previous one (``Invertd`` of both softmax
channels on the whole grid, then argmax), on every storage variant of the input, for NIfTI and DICOM inference.

The previous path stays in ``inference.json`` as ``postprocessing_whole_volume``; each test runs both on the same
prediction (or the same network) and compares."""

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import run_bundle_workflow
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from scripts.dicom_series import read_ct_series
from scripts.synthetic_dicom import VARIANTS, phantom_case, write_ct_series
from scripts.transforms import InvertForegroundd, foreground_window, foreground_windows, grid_within, target_box

CONFIGS = Path(__file__).resolve().parents[1] / "bundle" / "configs"
NIFTI, DICOM = ["inference.json"], ["inference.json", "inference_dicom.json"]
#: the phantom's body is 40 HU, its target 70 HU (noise 5 HU); the window maps -200..250 HU to 0..1
TARGET_ONLY, WHOLE_BODY = (55 + 200) / 450, (-100 + 200) / 450


class IntensityNet(torch.nn.Module):
    """A stand-in network: target where the windowed intensity exceeds ``threshold`` (logit slope 60), so the masks
    have the phantom's shapes and boundaries fall between voxels."""

    def __init__(self, threshold: float = TARGET_ONLY) -> None:
        super().__init__()
        self.threshold = torch.nn.Parameter(torch.tensor(float(threshold)))

    def forward(self, x: torch.Tensor, subgroup: torch.Tensor | None = None) -> torch.Tensor:
        diff = 60.0 * (x - self.threshold)
        return torch.cat([-diff / 2, diff / 2], 1)


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    """The phantom (resampled by the preprocessing: 0.9 x 0.85 x 2.5 mm) in each storage variant, as a DICOM series
    and as the NIfTI of the same grid: variant -> (nifti path, series folder)."""
    root = tmp_path_factory.mktemp("storage")
    image, _, affine = phantom_case((48, 40, 24), (0.9, 0.85, 2.5), seed=3)
    out = {}
    for variant in VARIANTS:
        series = root / variant
        write_ct_series(image, affine, series, variant=variant, seed=5)
        volume, info = read_ct_series(series)
        nifti = root / f"{variant}.nii.gz"
        nib.Nifti1Image(volume.astype(np.int16), info.affine_ras).to_filename(nifti)
        out[variant] = (nifti, series)
    return out


def _parser(files, **override) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / f) for f in files])
    parser.update(override)
    return parser


def _both_paths(parser: ConfigParser, item: dict, threshold: float):
    """Preprocess ``item``, predict with :class:`IntensityNet` and post-process with both paths (without saving):
    ``(new mask, previous mask, the new path's InvertForegroundd)``."""
    data = parser.get_parsed_content("preprocessing")(dict(item))
    image = data["image"]
    with torch.no_grad():
        probs = torch.softmax(IntensityNet(threshold)(image.as_tensor()[None]), 1)[0]
    out = []
    for name in ("postprocessing", "postprocessing_whole_volume"):
        d = {**data, "pred": MetaTensor(probs.clone(), meta=dict(image.meta))}
        transforms = parser.get_parsed_content(name).transforms[1:-1]  # softmax done above; no saver
        for t in transforms:
            d = t(d)
        out.append((d["pred"], transforms[0]))
    return out[0][0], out[1][0], out[0][1]


def _assert_same_mask(new, old):
    assert new.shape == old.shape
    np.testing.assert_allclose(np.asarray(new.affine), np.asarray(old.affine), atol=1e-6)
    a, b = np.asarray(new[0]) > 0, np.asarray(old[0]) > 0
    assert b.sum() > 0, "the comparison needs foreground"
    dice = 2 * (a & b).sum() / (a.sum() + b.sum())
    assert dice >= 0.999 and (a != b).sum() <= max(1, b.sum() // 1000), (dice, int((a != b).sum()))


@pytest.mark.parametrize("threshold", [TARGET_ONLY, WHOLE_BODY], ids=["target", "whole_body"])
@pytest.mark.parametrize("storage", ["nifti", "dicom"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_new_postprocessing_equals_the_previous_one(stored, variant, storage, threshold):
    nifti, series = stored[variant]
    files, path = (NIFTI, nifti) if storage == "nifti" else (DICOM, series)
    new, old, inverter = _both_paths(_parser(files), {"image": str(path), "id": variant}, threshold)
    _assert_same_mask(new, old)
    assert new.shape[1:] == nib.load(nifti).shape  # the loaded grid, whatever the storage
    # the whole body reaches the crop's edges: the shortcut handles that too (crops undone first)
    assert inverter.last_path["pred"] == "window"
    assert new.dtype == torch.float32 and set(np.unique(np.asarray(new))) <= {0.0, 1.0}


def test_interpolation_wider_than_one_voxel_takes_the_whole_volume_path(stored):
    nifti, _ = stored["oblique"]
    parser = _parser(NIFTI)
    parser["preprocessing::transforms::5::mode"] = 3  # cubic spline overshoots: the stencil argument fails
    new, old, inverter = _both_paths(parser, {"image": str(nifti), "id": "x"}, TARGET_ONLY)
    assert inverter.last_path["pred"] == "whole volume"
    _assert_same_mask(new, old)


def test_empty_prediction_gives_an_empty_mask_on_the_loaded_grid(stored):
    nifti, _ = stored["transpose_xy"]
    new, old, inverter = _both_paths(_parser(NIFTI), {"image": str(nifti), "id": "x"}, threshold=2.0)
    assert inverter.last_path["pred"] == "empty"
    assert new.shape == old.shape and not np.asarray(new).any() and not np.asarray(old).any()
    np.testing.assert_allclose(np.asarray(new.affine), nib.load(nifti).affine, atol=1e-5)


def test_foreground_window_and_target_box_by_hand():
    fg = torch.zeros(10, 8, 6, dtype=torch.bool)
    fg[4, 3, 2] = fg[6, 5, 2] = True
    assert foreground_window(fg, 2) == ([2, 1, 0], [8, 7, 4])  # grown by 2, clipped at 0 and at size - 1
    assert foreground_window(torch.zeros(4, 4, 4, dtype=torch.bool), 2) is None
    # source voxels 2 mm apart from origin 10 mm; destination 1 mm voxels from origin 0: voxel i -> 10 + 2 i
    src, dst = torch.diag(torch.tensor([2.0, 2.0, 2.0, 1.0], dtype=torch.float64)), torch.eye(4, dtype=torch.float64)
    src[:3, 3] = 10.0
    assert target_box(([1, 0, 0], [3, 2, 1]), src, dst, (40, 40, 40)) == ([12, 10, 10], [16, 14, 12])
    assert target_box(([1, 0, 0], [3, 2, 1]), src, dst, (15, 40, 40)) == ([12, 10, 10], [14, 14, 12])  # clipped
    assert target_box(([1, 0, 0], [3, 2, 1]), src, dst, (5, 40, 40)) is None  # entirely outside


def test_foreground_windows_split_clusters_by_hand():
    fg = torch.zeros(64, 48, 40, dtype=torch.bool)
    fg[5:9, 6:8, 3:5] = True  # block (0, 0, 0)
    fg[50, 40, 30] = True  # block (3, 2, 1): not touching the first
    assert sorted(foreground_windows(fg, 2)) == [([3, 4, 1], [10, 9, 6]), ([48, 38, 28], [52, 42, 32])]
    fg[16:34, 7, 4] = True  # a bar through blocks (1, 0, 0) and (2, 0, 0) joins the first cluster only
    assert len(foreground_windows(fg, 2)) == 2 and ([3, 4, 1], [35, 9, 6]) in foreground_windows(fg, 2)
    assert foreground_windows(fg, 2, most=1) == [([3, 4, 1], [52, 42, 32])]  # too many clusters: one window
    assert foreground_windows(torch.zeros(8, 8, 8, dtype=torch.bool), 2) == []


def test_grid_within_by_hand():
    src = torch.eye(4, dtype=torch.float64)  # 10 voxels of 1 mm from 0
    dst = torch.diag(torch.tensor([2.0, 2.0, 2.0, 1.0], dtype=torch.float64))  # voxels 2 mm apart from 0
    assert grid_within(src, (10, 10, 10), dst, (5, 5, 5))  # last centre at 8 mm <= 9
    assert not grid_within(src, (10, 10, 10), dst, (6, 5, 5))  # 10 mm > 9


def test_scattered_foreground_gives_the_previous_mask(stored):
    """Specks far from the target (a network's false positives) and the target: several windows, same mask."""
    nifti, _ = stored["oblique"]
    parser = _parser(NIFTI)
    data = parser.get_parsed_content("preprocessing")({"image": str(nifti), "id": "x"})
    image = data["image"]
    with torch.no_grad():
        logits = IntensityNet(TARGET_ONLY)(image.as_tensor()[None])
    shape = image.shape[1:]
    for corner in [(0, 0, 0), (shape[0] - 1, shape[1] - 1, shape[2] - 1), (0, shape[1] - 1, 3), (20, 1, 1)]:
        logits[(0, 1, *corner)] = 50.0  # foreground specks, at the grid's corners and edges too
    probs = torch.softmax(logits, 1)[0]
    masks, paths = [], []
    for name in ("postprocessing", "postprocessing_whole_volume"):
        d = {**data, "pred": MetaTensor(probs.clone(), meta=dict(image.meta))}
        for t in parser.get_parsed_content(name).transforms[1:-1]:
            d = t(d)
            paths.append(getattr(t, "last_path", {}).get("pred"))
        masks.append(d["pred"])
    assert paths[0] == "window"
    _assert_same_mask(*masks)


def test_invalid_arguments_and_inputs_are_refused(stored):
    pre = _parser(NIFTI).get_parsed_content("preprocessing")
    with pytest.raises(ValueError, match="margin"):
        InvertForegroundd("pred", pre, margin=1)
    with pytest.raises(ValueError, match="orig_keys"):
        InvertForegroundd(["pred", "pred2"], pre, orig_keys=["image", "image", "image"])
    data = pre({"image": str(stored["identity"][0]), "id": "x"})
    three = MetaTensor(torch.rand(3, *data["image"].shape[1:]))
    with pytest.raises(ValueError, match="2 softmax channels"):
        InvertForegroundd("pred", pre)({**data, "pred": three})
    bare = MetaTensor(data["image"].as_tensor(), affine=data["image"].affine)  # no load-time metadata
    with pytest.raises(ValueError, match="original_affine"):
        InvertForegroundd("pred", pre)({"image": bare, "pred": torch.rand(2, *bare.shape[1:])})


# ------------------------------------------------------------------------------------- the configs end to end
def _infer(files, tmp_path, ckpt, postprocessing=None, **override):
    out = tmp_path / ("previous" if postprocessing else "new")
    extra = {"postprocessing": postprocessing} if postprocessing else {}
    run_bundle_workflow(files, "infer", "inference", output_dir=str(out), ckpt_path=str(ckpt),
                        network_def={"_target_": f"{__name__}.IntensityNet"}, **extra, **override)  # fmt: skip
    return out


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    torch.save(IntensityNet().state_dict(), path)
    return path


@pytest.mark.parametrize("variant", ["identity", "oblique"])
def test_nifti_inference_writes_the_previous_masks(stored, ckpt, tmp_path, variant):
    nifti, _ = stored[variant]
    data = {"dataset#data": [{"image": str(nifti), "id": variant}]}
    new = _infer(NIFTI, tmp_path, ckpt, **data)
    old = _infer(NIFTI, tmp_path, ckpt, postprocessing="@postprocessing_whole_volume", **data)
    a, b = nib.load(new / f"{variant}_seg.nii.gz"), nib.load(old / f"{variant}_seg.nii.gz")
    np.testing.assert_allclose(a.affine, nib.load(nifti).affine, atol=1e-4)
    np.testing.assert_allclose(a.affine, b.affine, atol=1e-6)
    assert a.get_data_dtype() == b.get_data_dtype() == np.uint8
    _assert_same_mask(MetaTensor(np.asarray(a.dataobj)[None]), MetaTensor(np.asarray(b.dataobj)[None]))


def test_dicom_inference_writes_the_previous_masks(stored, ckpt, tmp_path):
    _, series = stored["reverse_slices"]
    new = _infer(DICOM, tmp_path, ckpt, input_dir=str(series))
    old = _infer(DICOM, tmp_path, ckpt, postprocessing="@postprocessing_whole_volume", input_dir=str(series))
    for pattern in ("*_seg.nii.gz", "SEG_*.dcm", "RS_*.dcm"):
        assert len(list(new.glob(pattern))) == len(list(old.glob(pattern))) == 1, pattern
    a, b = (nib.load(next(folder.glob("*_seg.nii.gz"))) for folder in (new, old))
    _assert_same_mask(MetaTensor(np.asarray(a.dataobj)[None]), MetaTensor(np.asarray(b.dataobj)[None]))
