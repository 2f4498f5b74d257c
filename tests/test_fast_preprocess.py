"""The faster preprocessing classes (``scripts/fast_preprocess.py``) against the MONAI transforms they replace: the
same arrays (the resampling within one float32 unit in the last place), metadata, transform records and inverses,
and the same masks from ``inference.json`` for a NIfTI and a DICOM input."""

import copy
import gzip
import zlib
from pathlib import Path
from unittest import mock

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from monai.transforms import CropForegroundd, LoadImaged, ScaleIntensityRanged, Spacingd
from PIL import Image
from scripts import fast_preprocess as fp
from scripts.synthetic_dicom import phantom_case, write_ct_series

CONFIGS = Path(__file__).resolve().parents[1] / "bundle" / "configs"


# ---------------------------------------------------------------------------------------------------------- helpers
def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return torch.equal(torch.as_tensor(a), torch.as_tensor(b))
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return np.array_equal(np.asarray(a), np.asarray(b), equal_nan=np.asarray(a).dtype.kind == "f")
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float) and np.isnan(a) and np.isnan(b):
        return True
    return a == b


def _record(op: dict) -> dict:
    """A transform record without what names the object that made it (id, class)."""
    out = {k: v for k, v in op.items() if k not in ("id", "class")}
    if "pad_info" in out.get("extra_info", {}):
        out["extra_info"] = {**out["extra_info"], "pad_info": _record(out["extra_info"]["pad_info"])}
    return out


def _assert_same_history(fast: MetaTensor, ref: MetaTensor) -> None:
    ops = list(zip(fast.applied_operations, ref.applied_operations, strict=True))
    assert all(_same(_record(a), _record(b)) for a, b in ops)
    assert _same(dict(fast.meta), dict(ref.meta))
    assert torch.equal(fast.affine, ref.affine)


def _assert_within_one_ulp(fast: torch.Tensor, ref: torch.Tensor, most_differing: float = 1e-3) -> None:
    """Equal, or one float32 unit in the last place apart (or, where neighbours of opposite sign cancel, float64
    rounding of the data's magnitude), at a small share of the voxels."""
    fast, ref = torch.as_tensor(fast), torch.as_tensor(ref)
    assert fast.shape == ref.shape and fast.dtype == ref.dtype == torch.float32
    floor = 1e-12 * float(ref.abs().max())
    ulp = (torch.finfo(torch.float32).eps * ref.abs()).clamp_min(floor)
    diff = (fast - ref).abs()
    assert bool((diff <= ulp).all()), float(diff.max())
    assert int((diff > 0).sum()) <= most_differing * ref.numel()


def _volume(shape=(23, 19, 11), channels=1, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(channels, *shape, generator=g) * 2000 - 1000).round()  # HU-like integers


# ---------------------------------------------------------------------------------------------------------- reading
@pytest.mark.parametrize("dtype", [np.float32, np.int16, None])
def test_c_ordered_equals_numpy(dtype):
    rng = np.random.default_rng(0)
    base = rng.integers(-1000, 3000, size=(7, 5, 4)).astype(np.int16)
    cases = [
        np.asfortranarray(base),
        np.ascontiguousarray(base),
        np.asfortranarray(base.astype(np.float64) / 3),
        np.asfortranarray(base)[:, ::2],  # neither order
        np.asfortranarray(base.astype(">i2")),  # big-endian
        np.asfortranarray(base[:, :, 0]),  # 2D
    ]
    for a in cases:
        out = fp.c_ordered(a, dtype)
        expected = np.ascontiguousarray(a, dtype=dtype or a.dtype)
        assert out.flags.c_contiguous and out.dtype == expected.dtype and np.array_equal(out, expected)


def test_inflate_reads_every_member_and_names_a_truncated_file(tmp_path):
    two = tmp_path / "two.gz"
    two.write_bytes(gzip.compress(b"first member ") + gzip.compress(b"second"))
    assert fp.inflate(str(two)) == b"first member second"
    cut = tmp_path / "cut.gz"
    cut.write_bytes(gzip.compress(bytes(range(256)) * 64)[:-20])
    with pytest.raises(zlib.error, match="cut.gz"):
        fp.inflate(str(cut))


def _nifti_cases(tmp_path):
    rng = np.random.default_rng(1)
    vol = rng.integers(-1024, 2000, size=(12, 9, 7)).astype(np.int16)
    affine = np.diag([0.9, 0.8, 2.5, 1.0])
    affine[:3, 3] = [-5.0, 3.0, 10.0]
    scaled = nib.Nifti1Image(vol, affine)
    scaled.header.set_slope_inter(0.5, -1024.0)
    big_endian = nib.Nifti1Image(vol.astype(">i2"), affine)
    cases = {
        "int16.nii.gz": nib.Nifti1Image(vol, affine),
        "scaled.nii.gz": scaled,
        "float32.nii": nib.Nifti1Image(vol.astype(np.float32) / 7, affine),
        "big_endian.nii.gz": big_endian,
        "two_channels.nii.gz": nib.Nifti1Image(np.stack([vol, vol // 2], -1), affine),
    }
    paths = {}
    for name, img in cases.items():
        paths[name] = tmp_path / name
        img.to_filename(paths[name])
    return paths


@pytest.mark.parametrize("dtype", [np.float32, None])
def test_fast_load_equals_loadimaged(tmp_path, dtype):
    for name, path in _nifti_cases(tmp_path).items():
        ref = LoadImaged("image", dtype=dtype, ensure_channel_first=True)({"image": str(path)})["image"]
        fast = fp.FastLoadImaged("image", dtype=dtype, ensure_channel_first=True)({"image": str(path)})["image"]
        assert fast.dtype == ref.dtype and fast.shape == ref.shape, name
        assert torch.equal(fast.as_tensor(), ref.as_tensor()), name
        assert _same(dict(fast.meta), dict(ref.meta)), name


def test_fast_load_leaves_other_formats_to_monai(tmp_path):
    png = tmp_path / "slice.png"
    Image.fromarray(np.arange(48, dtype=np.uint8).reshape(6, 8)).save(png)
    ref = LoadImaged("image", ensure_channel_first=True)({"image": str(png)})["image"]
    loader = fp.FastLoadImaged("image", ensure_channel_first=True)
    fast = loader({"image": str(png)})["image"]
    assert torch.equal(fast.as_tensor(), ref.as_tensor()) and _same(dict(fast.meta), dict(ref.meta))
    names = [type(r).__name__ for r in loader._loader.readers]
    assert "FastNiftiReader" in names and "NibabelReader" not in names


# ------------------------------------------------------------------------------------------------------- resampling
def _image(affine, channels=1, shape=(23, 19, 11), seed=0) -> MetaTensor:
    return MetaTensor(_volume(shape, channels, seed), affine=torch.as_tensor(affine, dtype=torch.float64))


def _oblique(degrees: float = 17.0) -> np.ndarray:
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    return np.array([[c, -s, 0, 0], [s, c, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]]) @ np.diag([0.9, 0.8, 2.5, 1.0])


SPACING_CASES = {
    "ct": (np.diag([0.98, 0.98, 2.5, 1.0]), (1.0, 1.0, 3.0), {}),
    "oblique_scan": (_oblique(), (1.0, 1.0, 3.0), {}),  # Spacing keeps the directions: still one axis to one
    "flipped": (np.diag([-0.9, -0.8, 2.5, 1.0]), (1.0, 1.0, 3.0), {}),
    "upsampled": (np.diag([1.5, 1.2, 3.0, 1.0]), (0.7, 0.5, 1.1), {}),
    "strongly_downsampled": (np.diag([0.5, 0.5, 1.0, 1.0]), (1.7, 2.3, 3.0), {}),
    "zeros_padding": (np.diag([0.98, 0.98, 2.5, 1.0]), (1.0, 1.3, 3.0), {"padding_mode": "zeros"}),
    "align_corners": (np.diag([0.98, 0.9, 2.5, 1.0]), (1.0, 1.0, 3.0), {"align_corners": True}),
}


@pytest.mark.parametrize("case", sorted(SPACING_CASES))
@pytest.mark.parametrize("channels", [1, 2])
def test_fast_spacing_equals_spacingd(case, channels):
    affine, pixdim, kwargs = SPACING_CASES[case]
    affine = affine.copy()
    affine[:3, 3] = [12.5, -7.25, 30.0]
    img = _image(affine, channels)
    ref_t = Spacingd("image", pixdim=pixdim, mode="bilinear", **kwargs)
    fast_t = fp.FastSpacingd("image", pixdim=pixdim, mode="bilinear", **kwargs)
    ref = ref_t({"image": img.clone()})["image"]
    with mock.patch.object(fp, "resample_axis_aligned", wraps=fp.resample_axis_aligned) as fast_path:
        fast = fast_t({"image": img.clone()})["image"]
        assert fast_path.call_count == 1
        _assert_within_one_ulp(fast, ref)
        _assert_same_history(fast, ref)
        assert fast.applied_operations[-1]["class"] == "SeparableResample"
        # the inverse is MONAI's resampling, back onto the input grid
        back_ref = ref_t.inverse({"image": ref})["image"]
        back = fast_t.inverse({"image": fast})["image"]
        assert fast_path.call_count == 1
    assert back.shape == back_ref.shape == img.shape and torch.equal(back.affine, back_ref.affine)
    torch.testing.assert_close(back.as_tensor(), back_ref.as_tensor(), rtol=1e-6, atol=1e-3)
    assert not back.applied_operations and not back_ref.applied_operations


def test_resampling_by_hand():
    """One axis resampled from 2 mm to 1 mm voxels: voxel i of the output lies at input coordinate i / 2."""
    img = MetaTensor(torch.tensor([0.0, 10.0, 30.0]).view(1, 3, 1, 1).expand(1, 3, 2, 2).clone(),
                     affine=torch.diag(torch.tensor([2.0, 1.0, 1.0, 1.0], dtype=torch.float64)))  # fmt: skip
    out = fp.FastSpacingd("image", pixdim=(1.0, 1.0, 1.0), mode="bilinear")({"image": img})["image"]
    assert out.shape == (1, 5, 2, 2)
    assert out[0, :, 0, 0].tolist() == [0.0, 5.0, 10.0, 20.0, 30.0]


CT = np.diag([0.98, 0.98, 2.5, 1.0])


@pytest.mark.parametrize(
    "why,affine,pixdim,kwargs",
    [
        ("oblique scan onto a diagonal grid", _oblique(), (1.0, 1.0, 3.0), {"diagonal": True}),
        ("nearest", CT, (1.0, 1.0, 3.0), {"mode": "nearest"}),
        ("float32 arithmetic", CT, (1.0, 1.0, 3.0), {"dtype": torch.float32}),
        ("same grid", np.diag([1.0, 1.0, 3.0, 1.0]), (1.0, 1.0, 3.0), {}),
        ("affines within AFFINE_TOL (MONAI does not resample)", np.diag([0.3, 0.3, 0.3, 1.0]), (0.3008,) * 3, {}),
        ("metadata not tracked", CT, (1.0, 1.0, 3.0), {"track_meta": False}),
    ],
)
def test_fast_spacing_leaves_other_cases_to_monai(why, affine, pixdim, kwargs):
    from monai.data import set_track_meta

    kwargs = dict(kwargs)
    track = kwargs.pop("track_meta", True)
    img = _image(affine)
    options = {"mode": "bilinear", **kwargs}
    set_track_meta(track)
    try:
        ref = Spacingd("image", pixdim=pixdim, **options)({"image": img.clone()})["image"]
        with mock.patch.object(fp, "resample_axis_aligned") as fast_path:
            fast = fp.FastSpacingd("image", pixdim=pixdim, **options)({"image": img.clone()})["image"]
    finally:
        set_track_meta(True)
    assert fast_path.call_count == 0, why
    assert torch.equal(torch.as_tensor(fast), torch.as_tensor(ref)), why
    if track:
        _assert_same_history(fast, ref)


def test_fast_spacing_lazy_records_what_spacingd_records():
    img = _image(np.diag([0.98, 0.98, 2.5, 1.0]))
    ref = Spacingd("image", pixdim=(1.0, 1.0, 3.0), lazy=True)({"image": img.clone()})["image"]
    fast = fp.FastSpacingd("image", pixdim=(1.0, 1.0, 3.0), lazy=True)({"image": img.clone()})["image"]
    assert torch.equal(fast.as_tensor(), img.as_tensor()) and len(fast.pending_operations) == 1
    assert _same(_record(fast.pending_operations[0]), _record(ref.pending_operations[0]))


def test_fast_spacing_leaves_its_input_untouched():
    img = _image(np.diag([0.98, 0.98, 2.5, 1.0]))
    before = img.clone()
    fp.FastSpacingd("image", pixdim=(1.0, 1.0, 3.0))({"image": img})
    assert torch.equal(img.as_tensor(), before.as_tensor()) and not img.applied_operations
    assert not img.pending_operations and torch.equal(img.affine, before.affine)


# ---------------------------------------------------------------------------------------------- intensity and crop
@pytest.mark.parametrize(
    "kwargs",
    [
        {"a_min": -200, "a_max": 250, "b_min": 0.0, "b_max": 1.0, "clip": True},
        {"a_min": -200.5, "a_max": 250, "b_min": -1.0, "b_max": 3.0, "clip": False},
        {"a_min": 0, "a_max": 1000, "b_min": None, "b_max": None, "clip": False},
    ],
)
def test_fast_intensity_window_equals_monai(kwargs):
    values = _volume((31, 17, 13)).flatten()
    values[:6] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, -200.0, 250.0])
    img = MetaTensor(values.view(1, 31, 17, 13), affine=torch.diag(torch.tensor([2.0, 1.0, 1.0, 1.0])))
    before = img.clone()
    old_chunk = fp.CHUNK_ELEMENTS
    fp.CHUNK_ELEMENTS = 1000  # several slices, a partial one last
    try:
        fast = fp.FastScaleIntensityRanged("image", **kwargs)({"image": img})["image"]
    finally:
        fp.CHUNK_ELEMENTS = old_chunk
    ref = ScaleIntensityRanged("image", **kwargs)({"image": img})["image"]
    torch.testing.assert_close(fast.as_tensor(), ref.as_tensor(), rtol=0, atol=0, equal_nan=True)
    assert torch.equal(torch.signbit(fast.as_tensor()), torch.signbit(ref.as_tensor()))
    _assert_same_history(fast, ref)
    assert torch.equal(img.as_tensor().nan_to_num(), before.as_tensor().nan_to_num())  # input not overwritten
    fast.meta["marker"] = 1
    assert "marker" not in img.meta  # the output's metadata is its own


def _blobs(shape=(30, 26, 14), channels=1, seed=0) -> MetaTensor:
    g = torch.Generator().manual_seed(seed)
    img = torch.rand(channels, *shape, generator=g) - 1.0  # all <= 0 ...
    img[0, 5:9, 20:23, 3:4] = 0.5  # ... but two blobs
    img[-1, 25, 2, 12] = 0.25
    return MetaTensor(img, affine=torch.diag(torch.tensor([0.5, 1.0, 3.0, 1.0], dtype=torch.float64)))


@pytest.mark.parametrize(
    "case,kwargs",
    [
        ("default", {}),
        ("margin", {"margin": 2}),
        ("margin beyond the edges", {"margin": (3, 4, 5), "allow_smaller": False}),
        ("two channels", {"channels": 2}),
        ("empty", {"empty": True}),
        ("nan voxels", {"nan": True}),
        ("k_divisible (MONAI's path)", {"k_divisible": 8}),
    ],
)
def test_fast_crop_equals_cropforegroundd(case, kwargs):
    kwargs = dict(kwargs)
    img = _blobs(channels=kwargs.pop("channels", 1))
    if kwargs.pop("empty", False):
        img = img.clamp(max=0.0)
    if kwargs.pop("nan", False):
        img[0, 0, 0, 0] = float("nan")
        img[0, 29, 25, 13] = float("nan")
    options = {"allow_smaller": True, **kwargs}
    ref_t, fast_t = CropForegroundd("image", "image", **options), fp.FastCropForegroundd("image", "image", **options)
    ref = ref_t({"image": img.clone()})["image"]
    fast = fast_t({"image": img.clone()})["image"]
    assert fast.shape == ref.shape, case
    torch.testing.assert_close(fast.as_tensor(), ref.as_tensor(), rtol=0, atol=0, equal_nan=True)
    _assert_same_history(fast, ref)
    back, back_ref = fast_t.inverse({"image": fast})["image"], ref_t.inverse({"image": ref})["image"]
    torch.testing.assert_close(back.as_tensor(), back_ref.as_tensor(), rtol=0, atol=0, equal_nan=True)


def test_foreground_box_by_hand():
    img = torch.zeros(1, 10, 8, 6)
    img[0, 4, 3, 2] = img[0, 6, 5, 2] = 1.0
    assert fp.foreground_box(img, (0, 0, 0), True) == ([4, 3, 2], [7, 6, 3])
    assert fp.foreground_box(img, (5, 1, 0), True) == ([0, 2, 2], [10, 7, 3])  # clipped to the volume
    assert fp.foreground_box(img, (5, 1, 0), False) == ([-1, 2, 2], [12, 7, 3])
    assert fp.foreground_box(torch.zeros(1, 4, 4, 4), (0, 0, 0), True) == ([0, 0, 0], [0, 0, 0])


# ---------------------------------------------------------------------------------------- the bundle's preprocessing
def _parser(files, monai: bool) -> ConfigParser:
    """inference.json (+ overlays) as shipped, or with each fast class swapped for the MONAI class it replaces."""
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / f) for f in files])
    if monai:
        for item in [parser["loader"], *parser["preprocessing"]["transforms"]]:
            name = item.get("_target_", "").rsplit(".", 1)[-1] if isinstance(item, dict) else ""
            if name in fp.MONAI_EQUIVALENT:
                item["_target_"] = fp.MONAI_EQUIVALENT[name]
    return parser


@pytest.fixture(scope="module")
def ct(tmp_path_factory):
    """A CT phantom at 0.98 x 0.98 x 2.5 mm as .nii.gz and as a DICOM series (stored LPS: flipped on loading)."""
    root = tmp_path_factory.mktemp("ct")
    image, _, affine = phantom_case((96, 80, 30), (0.98, 0.98, 2.5), seed=4)
    nifti = root / "ct.nii.gz"
    nib.Nifti1Image(image, affine).to_filename(nifti)
    write_ct_series(image, affine, root / "series", seed=2)
    return nifti, root / "series"


@pytest.mark.parametrize("storage", ["nifti", "dicom"])
def test_inference_preprocessing_equals_the_monai_chain(ct, storage):
    files = ["inference.json"] + (["inference_dicom.json"] if storage == "dicom" else [])
    item = {"image": str(ct[0] if storage == "nifti" else ct[1]), "id": "ct", "stage": "T2"}
    fast_parser, ref_parser = _parser(files, monai=False), _parser(files, monai=True)
    fast_pre = fast_parser.get_parsed_content("preprocessing")
    assert {type(t).__name__ for t in fast_pre.transforms} >= {"FastSpacingd", "FastCropForegroundd"}
    fast, ref = fast_pre(dict(item))["image"], ref_parser.get_parsed_content("preprocessing")(dict(item))["image"]
    _assert_within_one_ulp(fast, ref)
    _assert_same_history(fast, ref)
    # the masks: the shipped post-processing inverts each through its own preprocessing's records
    masks = []
    for parser, image in ((fast_parser, fast), (ref_parser, ref)):
        logit = 60.0 * (image.as_tensor() - 0.55)  # target where the windowed CT is above 0.55
        probs = torch.softmax(torch.cat([-logit / 2, logit / 2]), 0)
        d = {"image": image, "pred": MetaTensor(probs, meta=copy.deepcopy(image.meta))}
        for t in parser.get_parsed_content("postprocessing").transforms[1:-1]:  # softmax done; no saver
            d = t(d)
        masks.append(d["pred"])
    assert masks[1].sum() > 0 and torch.equal(masks[0].as_tensor(), masks[1].as_tensor())
    assert torch.equal(masks[0].affine, masks[1].affine)
