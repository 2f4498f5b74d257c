"""Reading CT series: ordering, geometry on every storage variant, MONAI consistency, and refused inputs."""

from __future__ import annotations

import logging
import shutil

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from monai.data import ITKReader
from monai.transforms import Compose, Invertd, LoadImage, LoadImaged, Orientationd, Spacingd
from pydicom.dataset import Dataset, FileMetaDataset
from scripts.dicom_series import (
    AmbiguousSeriesError,
    CorruptDicomError,
    GantryTiltError,
    InconsistentGeometryError,
    LoadDicomSeriesd,
    MissingAttributeError,
    MissingSliceError,
    NonUniformSpacingError,
    NoSeriesError,
    TooFewSlicesError,
    UnsupportedModalityError,
    find_refusal,
    read_ct_series,
    read_series_info,
    refusal_line,
)
from scripts.synthetic_dicom import VARIANTS, align_to_grid, phantom_case, write_case_dicom, write_ct_series

SECRET_NAME = "SECRETNAME^PATIENT"
SECRET_ID = "PID-SECRET-4711"


@pytest.fixture(scope="module")
def phantom():
    return phantom_case((48, 40, 12), (1.0, 1.0, 3.0), seed=3)


@pytest.fixture(scope="module")
def series(tmp_path_factory, phantom):
    """Each storage variant of the phantom written once: variant -> WrittenSeries."""
    image, _, affine = phantom
    root = tmp_path_factory.mktemp("series")
    return {
        v: write_ct_series(image, affine, root / v, variant=v, seed=5, patient_name=SECRET_NAME, patient_id=SECRET_ID)
        for v in VARIANTS
    }


def _copy(written, tmp_path):
    target = tmp_path / "ct"
    shutil.copytree(written.series_dir, target)
    return target, {f.name: target / f.name for f in written.files}, [target / f.name for f in written.files]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_variant_reads_back_the_same_voxels_in_the_same_place(series, phantom, variant):
    image, _, _ = phantom
    written = series[variant]
    volume, info = read_ct_series(written.series_dir)
    assert volume.dtype == np.float32 and volume.shape == info.shape
    # align_to_grid succeeds only if both grids hold the same voxel centres in world space
    np.testing.assert_array_equal(volume, align_to_grid(image.astype(np.float32), written.affine_ras, info.affine_ras))
    assert info.shape[2] == image.shape[2]
    assert set(info.sop_instance_uids) == set(written.sop_instance_uids)
    assert np.all(np.diff(info.slice_offsets) > 0)


def test_identity_keeps_the_affine_and_orders_by_position_not_file_name(series, phantom):
    _, _, affine = phantom
    written = series["identity"]
    _, info = read_ct_series(written.series_dir)
    np.testing.assert_allclose(info.affine_ras, affine, atol=1e-5)
    assert list(info.sop_instance_uids) == list(written.sop_instance_uids)
    assert [f.name for f in info.files] != sorted(f.name for f in info.files)  # names are not in slice order


def test_reverse_slices_ignores_instance_number(series):
    written = series["reverse_slices"]
    _, info = read_ct_series(written.series_dir)
    numbers = [int(h.InstanceNumber) for h in info.headers]
    assert numbers == sorted(numbers, reverse=True)
    assert list(info.sop_instance_uids) == list(reversed(written.sop_instance_uids))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_matches_monai_itkreader(series, variant):
    volume, info = read_ct_series(series[variant].series_dir)
    reader = ITKReader(affine_lps_to_ras=True)
    itk_array, itk_meta = reader.get_data(reader.read(str(series[variant].series_dir)))
    np.testing.assert_allclose(itk_array, volume)
    np.testing.assert_allclose(itk_meta["affine"], info.affine_ras, atol=1e-4)


def test_loader_matches_nifti_loading_and_carries_references(series, tmp_path):
    volume, info = read_ct_series(series["oblique"].series_dir)
    nifti_path = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(volume.astype(np.int16), info.affine_ras), nifti_path)
    from_nifti = LoadImaged(keys="image", ensure_channel_first=True)({"image": str(nifti_path)})["image"]
    from_dicom = LoadDicomSeriesd(keys="image", ensure_channel_first=True)({"image": str(info.series_dir)})["image"]
    assert from_dicom.shape == from_nifti.shape == (1, *info.shape)
    torch.testing.assert_close(from_dicom.as_tensor(), from_nifti.as_tensor())
    torch.testing.assert_close(from_dicom.affine, from_nifti.affine, atol=1e-4, rtol=0)
    assert from_dicom.meta["space"] == "RAS"
    assert from_dicom.meta["dicom_series_instance_uid"] == info.series_instance_uid
    assert from_dicom.meta["dicom_series_dir"] == str(info.series_dir)
    assert from_dicom.meta["dicom_frame_of_reference_uid"] == info.frame_of_reference_uid


def test_invertd_restores_the_dicom_grid(series):
    folder = str(series["flip_xy"].series_dir)
    pre = Compose(
        [
            LoadDicomSeriesd(keys="image", ensure_channel_first=True),
            Orientationd(keys="image", axcodes="LPS"),
            Spacingd(keys="image", pixdim=(2.0, 2.0, 3.0), mode="nearest"),
        ]
    )
    data = pre({"image": folder})
    data["pred"] = data["image"].clone()
    inverted = Invertd(keys="pred", transform=pre, orig_keys="image", nearest_interp=True)(data)["pred"]
    original = LoadDicomSeriesd(keys="image", ensure_channel_first=True)({"image": folder})["image"]
    assert inverted.shape == original.shape
    torch.testing.assert_close(inverted.affine, original.affine, atol=1e-4, rtol=0)


def test_monai_loader_refuses_instead_of_falling_back(series, tmp_path):
    folder, by_name, ordered = _copy(series["identity"], tmp_path)
    ordered[5].unlink()
    with pytest.raises(MissingSliceError):
        LoadDicomSeriesd(keys="image")({"image": str(folder)})
    with pytest.raises(ValueError, match="own DicomSeriesReader"):
        LoadDicomSeriesd(keys="image")({"image": str(folder)}, reader=ITKReader())


def test_missing_slice_names_the_gap_or_resamples(series, phantom, tmp_path):
    image, _, _ = phantom
    folder, _, ordered = _copy(series["identity"], tmp_path)
    ordered[5].unlink()
    with pytest.raises(MissingSliceError) as err:
        read_ct_series(folder)
    message = str(err.value)
    assert "1 missing slice" in message and ordered[4].name in message and ordered[6].name in message
    assert "6.000 mm" in message and series["identity"].series_instance_uid in message
    volume, info = read_ct_series(folder, allow_resample=True)
    assert info.shape == image.shape and info.resampled_from is not None and info.resampled_from.shape[2] == 11
    np.testing.assert_allclose(info.slice_offsets, np.arange(12) * 3.0 + info.slice_offsets[0], atol=1e-6)
    np.testing.assert_allclose(volume[:, :, 4], image[:, :, 4])
    np.testing.assert_allclose(volume[:, :, 5], (image[:, :, 4].astype(float) + image[:, :, 6]) / 2, atol=1e-3)


def test_non_uniform_spacing_is_refused(series, tmp_path):
    folder, _, ordered = _copy(series["identity"], tmp_path)
    ds = pydicom.dcmread(ordered[3])
    ds.ImagePositionPatient = [ds.ImagePositionPatient[0], ds.ImagePositionPatient[1], ds.ImagePositionPatient[2] + 1]
    ds.save_as(ordered[3])
    with pytest.raises(NonUniformSpacingError, match="non-uniform slice spacing") as err:
        read_ct_series(folder)
    assert not isinstance(err.value, MissingSliceError)


def test_mixed_series_require_a_uid(series, tmp_path):
    folder, _, _ = _copy(series["identity"], tmp_path)
    for f in series["flip_xy"].files:
        shutil.copy(f, folder / f"other_{f.name}")
    with pytest.raises(AmbiguousSeriesError) as err:
        read_ct_series(folder)
    assert series["identity"].series_instance_uid in str(err.value)
    assert series["flip_xy"].series_instance_uid in str(err.value)
    _, info = read_ct_series(folder, series["flip_xy"].series_instance_uid)
    assert info.series_instance_uid == series["flip_xy"].series_instance_uid
    with pytest.raises(NoSeriesError, match="1.2.3.4.5"):
        read_ct_series(folder, "1.2.3.4.5")


def test_rtstruct_beside_the_series_is_set_aside(phantom, tmp_path):
    image, label, affine = phantom
    case_dir, rtstruct = write_case_dicom(image, label, affine, tmp_path, "case01")
    _, info = read_ct_series(case_dir)
    assert rtstruct not in info.files and info.shape == image.shape


def test_mr_series_is_refused(series, tmp_path):
    folder, _, ordered = _copy(series["identity"], tmp_path)
    for path in ordered:
        ds = pydicom.dcmread(path)
        ds.Modality = "MR"
        ds.save_as(path)
    with pytest.raises(UnsupportedModalityError, match="Modality \\['MR'\\]") as err:
        read_ct_series(folder)
    assert series["identity"].series_instance_uid in str(err.value)


@pytest.mark.parametrize("damage", ["garbage", "truncated_header", "truncated_pixels"])
def test_corrupt_file_is_named(series, tmp_path, damage):
    folder, _, ordered = _copy(series["identity"], tmp_path)
    victim = ordered[7]
    raw = victim.read_bytes()
    if damage == "garbage":
        victim.write_bytes(b"this is not DICOM" * 20)
    elif damage == "truncated_header":
        victim.write_bytes(raw[:300])
    else:
        victim.write_bytes(raw[:-500])
    if damage == "garbage":  # not DICOM: skipped, and the geometry check catches the slice it replaced
        with pytest.raises(MissingSliceError, match="1 missing slice"):
            read_ct_series(folder)
        return
    with pytest.raises(CorruptDicomError) as err:
        read_ct_series(folder)
    assert str(victim) in str(err.value)


def test_gantry_tilt_is_refused_from_the_header(series, tmp_path):
    folder, _, ordered = _copy(series["identity"], tmp_path)
    ds = pydicom.dcmread(ordered[2])
    ds.GantryDetectorTilt = "12.5"
    ds.save_as(ordered[2])
    with pytest.raises(GantryTiltError, match="GantryDetectorTilt 12.5") as err:
        read_ct_series(folder)
    assert str(ordered[2]) in str(err.value) and "dcm2niix" in str(err.value)
    with pytest.raises(GantryTiltError, match="allow_resample does not correct tilt"):
        read_ct_series(folder, allow_resample=True)


def test_gantry_tilt_is_refused_from_the_positions(series, tmp_path):
    folder, _, ordered = _copy(series["identity"], tmp_path)
    for k, path in enumerate(ordered):  # 10 degree shear along y, header says nothing
        ds = pydicom.dcmread(path)
        del ds.GantryDetectorTilt
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y + k * 3.0 * np.tan(np.radians(10)), z]
        ds.save_as(path)
    with pytest.raises(GantryTiltError, match="about 10.00 degrees"):
        read_ct_series(folder)


def test_duplicate_and_inconsistent_slices_are_refused(series, tmp_path):
    folder, _, ordered = _copy(series["identity"], tmp_path)
    ds = pydicom.dcmread(ordered[4])
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(folder / "duplicate.dcm")
    with pytest.raises(InconsistentGeometryError, match="same slice position"):
        read_ct_series(folder)
    (folder / "duplicate.dcm").unlink()
    ds = pydicom.dcmread(ordered[4])
    ds.ImageOrientationPatient = [0, 1, 0, 1, 0, 0]
    ds.save_as(ordered[4])
    with pytest.raises(InconsistentGeometryError, match="one orientation") as err:
        read_ct_series(folder)
    assert str(ordered[4]) in str(err.value)


def test_rescale_slope_and_intercept_are_applied(series, tmp_path):
    folder, _, ordered = _copy(series["identity"], tmp_path)
    reference, _ = read_ct_series(folder)
    ds = pydicom.dcmread(ordered[0])
    pixels = ds.pixel_array.astype(np.int32)  # stored = HU + 1024
    ds.PixelData = ((pixels - 24) // 2).astype("<i2").tobytes()  # HU = 2 * stored - 1000 (even HU only)
    ds.RescaleSlope, ds.RescaleIntercept = "2", "-1000"
    ds.save_as(ordered[0])
    volume, _ = read_ct_series(folder)
    expected = 2 * ((pixels - 24) // 2) - 1000
    np.testing.assert_array_equal(volume[:, :, 0], expected.T)
    np.testing.assert_array_equal(volume[:, :, 1:], reference[:, :, 1:])


def test_empty_folder_and_missing_folder(tmp_path):
    with pytest.raises(NoSeriesError):
        read_series_info(tmp_path)
    with pytest.raises(NoSeriesError):
        read_series_info(tmp_path / "absent")


def test_no_patient_identifiers_in_logs_or_errors(series, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    folder, _, ordered = _copy(series["identity"], tmp_path)
    read_ct_series(folder)
    ordered[5].unlink()
    messages = []
    for kwargs in ({}, {"allow_resample": True}):
        try:
            read_ct_series(folder, **kwargs)
        except ValueError as err:
            messages.append(str(err))
    text = caplog.text + "\n".join(messages)
    assert messages and SECRET_NAME not in text and SECRET_ID not in text
    assert SECRET_NAME.split("^")[0] not in text


def test_loadimage_with_a_folder_reads_through_the_reader(series):
    from scripts.dicom_series import DicomSeriesReader

    image = LoadImage(image_only=True)(str(series["identity"].series_dir), reader=DicomSeriesReader())
    assert tuple(image.shape) == tuple(read_series_info(series["identity"].series_dir).shape)


def _non_image(sop_class: str, modality: str, series_uid: str) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, pydicom.uid.generate_uid()
    ds.Modality, ds.SeriesInstanceUID = modality, series_uid
    return ds


def _save(ds: Dataset, path, preamble: bool = True):
    if preamble:
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
        ds.save_as(path, enforce_file_format=True)
    else:  # as some exports store RTSTRUCTs: no preamble, no File Meta, implicit VR little endian
        ds.save_as(path, implicit_vr=True, little_endian=True)


def test_export_clutter_is_skipped_with_one_info_line(series, phantom, tmp_path, caplog):
    image, label, affine = phantom
    case_dir, rtstruct = write_case_dicom(image, label, affine, tmp_path, "case")
    (case_dir / "notes.txt").write_text("exported by TPS\n")
    (case_dir / "DIRFILE").write_bytes(b"\x00" * 64)
    dicomdir = _non_image("1.2.840.10008.1.3.10", "", "")
    _save(dicomdir, case_dir / "DICOMDIR")
    bare = pydicom.dcmread(rtstruct)
    del bare.file_meta
    _save(bare, case_dir / "rtstruct_no_preamble", preamble=False)
    for n, (cls, modality) in enumerate(
        [
            (pydicom.uid.RTPlanStorage, "RTPLAN"),
            ("1.2.840.10008.5.1.4.1.1.88.22", "SR"),
            ("1.2.840.10008.5.1.4.1.1.11.1", "PR"),
        ]
    ):
        _save(_non_image(cls, modality, pydicom.uid.generate_uid()), case_dir / f"obj{n}.dcm")
    caplog.set_level(logging.INFO, logger="scripts.dicom_series")
    volume, info = read_ct_series(case_dir)
    assert info.shape == image.shape and len(info.files) == image.shape[2]
    lines = [r.getMessage() for r in caplog.records if "Skipped" in r.getMessage()]
    assert len(lines) == 1, lines
    for kind in ("1 not DICOM", "2 DICOMDIR", "2 RTSTRUCT", "1 RTPLAN", "1 SR", "1 PR"):
        assert kind in lines[0], lines[0]


def test_other_series_and_undecodable_slice_of_the_chosen_one(series, tmp_path):
    folder, _, ordered = _copy(series["identity"], tmp_path)
    other = series["flip_xy"]
    for f in other.files:
        shutil.copy(f, folder / f"other_{f.name}")
    uid = series["identity"].series_instance_uid
    _, info = read_ct_series(folder, uid)
    assert info.shape[2] == len(ordered)
    victim = folder / f"other_{other.files[0].name}"
    victim.write_bytes(victim.read_bytes()[:600])  # a damaged slice of another series, UID still readable in it
    raw = ordered[3].read_bytes()
    ordered[3].write_bytes(raw[: raw.index(uid.encode()) + len(uid) + 40])  # header cut after the series UID
    with pytest.raises(CorruptDicomError, match="claims to be a slice of series") as err:
        read_ct_series(folder, uid)
    assert str(ordered[3]) in str(err.value)


@pytest.mark.parametrize("count", [1, 2])
def test_too_few_slices_are_refused(series, tmp_path, count):
    folder, _, ordered = _copy(series["identity"], tmp_path)
    for path in ordered[count:]:
        path.unlink()
    with pytest.raises(TooFewSlicesError, match=f"has {count} slice\\(s\\).*at least 3") as err:
        read_series_info(folder)
    assert series["identity"].series_instance_uid in str(err.value)
    if count == 2:
        assert read_series_info(folder, min_slices=2).shape[2] == 2
    with pytest.raises(ValueError, match="min_slices must be at least 2"):
        LoadDicomSeriesd(keys="image", min_slices=1)


@pytest.mark.parametrize(
    "keyword",
    ["StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID", "SOPInstanceUID", "ImagePositionPatient",
     "ImageOrientationPatient", "PixelSpacing"],
)  # fmt: skip
@pytest.mark.parametrize("how", ["deleted", "empty"])
def test_missing_type1_attribute_is_named(series, tmp_path, keyword, how):
    folder, _, ordered = _copy(series["identity"], tmp_path)
    paths = ordered if keyword == "SeriesInstanceUID" else ordered[4:5]
    for path in paths:
        ds = pydicom.dcmread(path)
        if how == "deleted":
            delattr(ds, keyword)
        else:
            ds[keyword].value = "" if ds[keyword].VR == "UI" else []
        ds.save_as(path)
    with pytest.raises(MissingAttributeError, match=f"has no {keyword}") as err:
        read_series_info(folder)
    assert str(paths[0]) in str(err.value) or keyword == "SeriesInstanceUID"


def test_refusal_line_digs_through_wrapped_errors():
    try:
        try:
            raise MissingSliceError("Series 1.2.3: 1 missing slice(s) in /x. Re-export the complete series.")
        except MissingSliceError as inner:
            raise RuntimeError("applying transform <LoadDicomSeriesd>") from inner
    except RuntimeError as outer:
        wrapped = outer
    found = find_refusal(wrapped)
    assert isinstance(found, MissingSliceError)
    assert (
        refusal_line(found)
        == "ERROR MissingSliceError: Series 1.2.3: 1 missing slice(s) in /x. Re-export the complete series."
    )
    assert find_refusal(RuntimeError("unrelated")) is None
