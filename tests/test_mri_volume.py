"""Volumes in and out: NIfTI geometry and dtype, which axis is low-resolution, DICOM series in and derived series out."""
from __future__ import annotations

import random
import shutil
import subprocess

import nibabel as nib
import numpy as np
import pytest

from medsr_dist.mri.sample_data import build_mr_series, dataset_bytes
from medsr_dist.mri.simulate import simulate_anisotropic
from medsr_dist.mri.volume import (
    Volume,
    VolumeError,
    low_resolution_axis,
    plane_normal_axes,
    read_dicom_series,
    read_nifti,
    resampled_affine,
    write_dicom_series,
    write_nifti,
)

DCIODVFY = shutil.which("dciodvfy")


def world(affine: np.ndarray, ijk) -> np.ndarray:
    return (affine @ np.array([*ijk, 1.0]))[:3]


def oblique_affine(spacing=(0.9, 1.1, 3.0)) -> np.ndarray:
    """A rotated (not axis-aligned) grid with a translation: catches index/axis mix-ups an identity would hide."""
    theta = np.deg2rad(17.0)
    rot = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1.0]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag(spacing)
    affine[:3, 3] = [-40.0, 12.5, 7.0]
    return affine


def nifti_bytes(data, affine, dtype=np.int16, slope=None, inter=None, gz=True) -> bytes:
    img = nib.Nifti1Image(np.asarray(data).astype(dtype), affine)
    img.header.set_qform(affine, code=1)
    raw = img.to_bytes()
    if slope is not None:  # nibabel resets scaling on write: patch scl_slope/scl_inter (NIfTI-1 offsets 112/116)
        raw = raw[:112] + np.array([slope, inter], "<f4").tobytes() + raw[120:]
    import gzip
    return gzip.compress(raw) if gz else raw


def test_nifti_int16_with_scaling_round_trips_exactly_and_keeps_dtype():
    rng = np.random.default_rng(0)
    stored = rng.integers(-3000, 3000, size=(9, 7, 5)).astype(np.int16)
    affine = oblique_affine()
    vol = read_nifti(nifti_bytes(stored, affine, slope=0.25, inter=-10.0), "scan.nii.gz")
    assert vol.stored_dtype == np.int16 and (vol.scl_slope, vol.scl_inter) == (0.25, -10.0)
    np.testing.assert_array_equal(vol.data, stored * np.float32(0.25) - 10)  # physical values
    np.testing.assert_allclose(vol.spacing, [0.9, 1.1, 3.0], rtol=1e-6)
    again = nib.Nifti1Image.from_bytes(__import__("gzip").decompress(write_nifti(vol)))
    assert again.get_data_dtype() == np.int16
    assert (again.dataobj.slope, again.dataobj.inter) == (0.25, -10.0)  # the source's scaling, not a new one
    np.testing.assert_array_equal(np.asarray(again.dataobj.get_unscaled()), stored)
    np.testing.assert_allclose(again.affine, affine, atol=1e-5)


def test_resampled_output_has_exact_pixdim_and_keeps_voxel_centres_in_world():
    affine = oblique_affine((1.0, 1.0, 1.0))
    rng = np.random.default_rng(1)
    iso = Volume(rng.random((8, 6, 12)).astype(np.float32) * 100, affine, source="iso", stored_dtype=np.int16)
    for k in (2, 3, 4):
        thick = simulate_anisotropic(iso, axis=2, k=k)
        assert thick.shape == (8, 6, 12 // k)
        # a thick voxel's centre is the centroid of the k fine voxels it averages
        for n in range(thick.shape[2]):
            fine = np.mean([world(affine, (3, 2, n * k + m)) for m in range(k)], axis=0)
            np.testing.assert_allclose(world(thick.affine, (3, 2, n)), fine, atol=1e-9)
        # and back to the fine grid: the same geometry, so every input voxel centre stays where it was
        fine_aff = resampled_affine(thick.affine, 2, 1.0 / k)
        np.testing.assert_allclose(fine_aff, affine, atol=1e-9)
        written = nib.Nifti1Image.from_bytes(__import__("gzip").decompress(write_nifti(thick)))
        np.testing.assert_allclose(written.header.get_zooms(), [1.0, 1.0, float(k)], rtol=1e-6)
        np.testing.assert_allclose(written.affine, thick.affine, atol=1e-5)
        assert written.get_data_dtype() == np.int16
    # odd k: an input voxel centre is exactly an output voxel centre
    fine = resampled_affine(affine, 1, 1.0 / 3)
    np.testing.assert_allclose(world(affine, (2, 4, 5)), world(fine, (2, 4 * 3 + 1, 5)), atol=1e-9)


def test_low_resolution_axis_is_the_largest_spacing_and_ambiguity_is_refused():
    assert low_resolution_axis([0.9, 0.9, 5.0]) == 2
    assert low_resolution_axis([4.0, 1.0, 1.0]) == 0
    with pytest.raises(VolumeError, match="no single low-resolution axis"):
        low_resolution_axis([1.0, 1.0, 1.05])
    with pytest.raises(VolumeError, match="no single low-resolution axis"):
        low_resolution_axis([1.0, 3.0, 3.0])
    with pytest.raises(VolumeError, match="4-D"):
        low_resolution_axis([1.0, 1.0, 3.0, 2.0])


def test_plane_names_follow_the_anatomy_of_the_affine():
    assert plane_normal_axes(np.diag([1.0, 1.0, 3.0, 1.0])) == {"sagittal": 0, "coronal": 1, "axial": 2}
    coronal_acq = np.array([[1.0, 0, 0, 0], [0, 0, 3.0, 0], [0, 1.0, 0, 0], [0, 0, 0, 1]])  # k runs along A
    assert plane_normal_axes(coronal_acq) == {"sagittal": 0, "axial": 1, "coronal": 2}


def test_bad_nifti_volumes_are_refused_clearly():
    affine = np.diag([1.0, 1.0, 3.0, 1.0])
    four_d = nib.Nifti1Image(np.zeros((4, 4, 4, 3), np.int16), affine).to_bytes()
    with pytest.raises(VolumeError, match=r"dwi\.nii: expected a 3-D volume.*4-D series"):
        read_nifti(four_d, "dwi.nii")
    sheared = affine.copy()
    sheared[0, 1] = 0.5  # the i and j axes are no longer perpendicular
    img = nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), sheared)
    with pytest.raises(VolumeError, match=r"sheared\.nii: the orientation matrix is not orthonormal"):
        read_nifti(img.to_bytes(), "sheared.nii")
    with pytest.raises(VolumeError, match=r"junk\.nii: not a readable NIfTI"):
        read_nifti(b"not a nifti file at all" * 30, "junk.nii")
    with pytest.raises(VolumeError, match=r"cut\.nii\.gz: truncated or corrupt gzip"):
        read_nifti(nifti_bytes(np.zeros((4, 4, 4)), affine)[:40], "cut.nii.gz")
    # a trailing time axis of length 1 is just a 3-D volume
    assert read_nifti(nib.Nifti1Image(np.ones((4, 4, 4, 1), np.int16), affine).to_bytes(), "one.nii").shape == (4, 4, 4)


def test_real_anisotropic_volume_from_dipy_keeps_geometry_through_a_write(mri_sample):
    path = mri_sample("aniso_vox")
    vol = read_nifti(path.read_bytes(), path.name)
    assert vol.shape == (58, 58, 24) and vol.stored_dtype == np.int16
    assert low_resolution_axis(vol.spacing, path.name) == 2  # 4 x 4 x 5 mm
    back = read_nifti(write_nifti(vol), "again.nii.gz")
    np.testing.assert_array_equal(back.data, vol.data)
    np.testing.assert_allclose(back.affine, vol.affine, atol=1e-5)
    assert back.facts["axis_codes"] == vol.facts["axis_codes"]


# ------------------------------------------------------------------------------------------------ DICOM series

def series_files(data, spacing=(0.9, 0.8, 3.0), **kw):
    files = [(f"IM{k:04d}.dcm", dataset_bytes(ds)) for k, ds in enumerate(build_mr_series(data, spacing, **kw))]
    random.Random(3).shuffle(files)  # arrival order is not slice order
    return files


def test_dicom_series_is_sorted_along_the_normal_and_matches_the_voxel_grid():
    rng = np.random.default_rng(2)
    data = np.rint(rng.random((10, 8, 5)) * 1000)
    # an oblique orientation: sorting by the normal, not by z or by InstanceNumber, matters
    c, s = np.cos(0.3), np.sin(0.3)
    vol = read_dicom_series(series_files(data, orientation=(c, s, 0.0, 0.0, 0.0, -1.0)), "ax_t1")
    np.testing.assert_array_equal(vol.data, data)
    np.testing.assert_allclose(vol.spacing, [0.9, 0.8, 3.0], atol=1e-9)
    assert vol.stored_dtype == np.int16 and vol.format == "dicom"
    # voxel (i, j, k) sits at IPP_k + i*dc*row + j*dr*col in LPS, i.e. flipped x, y in RAS
    row, col = np.array([c, s, 0.0]), np.array([0.0, 0.0, -1.0])
    normal = np.cross(row, col)
    lps = np.array([-60.0, -70.0, -20.0]) + 3 * 3.0 * normal + 4 * 0.9 * row + 2 * 0.8 * col
    np.testing.assert_allclose(world(vol.affine, (4, 2, 3)), lps * [-1, -1, 1], atol=1e-6)
    assert low_resolution_axis(vol.spacing) == 2


def test_bad_series_name_the_series_and_the_problem_without_patient_data():
    data = np.zeros((6, 6, 6))
    files = series_files(data, patient_id="PAT-SECRET-7")
    files.sort()
    missing = files[:2] + files[3:]
    with pytest.raises(VolumeError, match=r"series ax_t1: 1 missing slice\(s\) between IM0001\.dcm and IM0003\.dcm") as err:
        read_dicom_series(missing, "ax_t1")
    assert "PAT-SECRET-7" not in str(err.value) and "SAMPLE^" not in str(err.value)
    other = series_files(data, orientation=(1.0, 0.0, 0.0, 0.0, 0.0, -1.0), patient_id="PAT-SECRET-7")
    with pytest.raises(VolumeError, match="series mix: mixed orientations"):
        read_dicom_series(files[:3] + other[:3], "mix")
    with pytest.raises(VolumeError, match="series dup: duplicate slice position"):
        read_dicom_series(files + [("copy.dcm", files[0][1])], "dup")
    uneven = series_files(data)
    import pydicom, io
    ds = pydicom.dcmread(io.BytesIO(sorted(uneven)[5][1]))
    ds.ImagePositionPatient = [-60.0, -70.0, -20.0 + 4 * 3.0 + 1.3]
    bad = sorted(uneven)[:5] + [("IM0005.dcm", dataset_bytes(ds))]
    with pytest.raises(VolumeError, match="series uneven: inconsistent slice spacing"):
        read_dicom_series(bad, "uneven")
    with pytest.raises(VolumeError, match=r"series junk: notes\.txt: not a DICOM file"):
        read_dicom_series(files[:2] + [("notes.txt", b"hello")], "junk")
    with pytest.raises(VolumeError, match="at least 2 slices"):
        read_dicom_series(files[:1], "single")


@pytest.mark.skipif(DCIODVFY is None, reason="dciodvfy not installed (Debian: apt-get install -y dicom3tools)")
def test_derived_series_has_new_geometry_uids_and_is_dciodvfy_clean(tmp_path):
    rng = np.random.default_rng(4)
    data = np.rint(rng.random((12, 10, 4)) * 800)
    files = series_files(data)
    (tmp_path / "src.dcm").write_bytes(files[0][1])
    vol = read_dicom_series(files, "ax_t1")
    fine = vol.with_data(np.repeat(vol.data, 3, axis=2) + 0.4, resampled_affine(vol.affine, 2, 1.0 / 3))
    out = write_dicom_series(fine, derivation="Through-plane SR x3 by model test@1; not a new acquisition")
    assert len(out) == 12
    import io

    import pydicom
    sets = [pydicom.dcmread(io.BytesIO(b)) for _, b in out]
    src = pydicom.dcmread(io.BytesIO(files[0][1]))
    assert len({d.SeriesInstanceUID for d in sets}) == 1 and sets[0].SeriesInstanceUID != src.SeriesInstanceUID
    assert len({d.SOPInstanceUID for d in sets}) == 12
    assert list(sets[0].ImageType[:2]) == ["DERIVED", "SECONDARY"]
    assert float(sets[0].SliceThickness) == pytest.approx(1.0) and float(sets[0].SpacingBetweenSlices) == pytest.approx(1.0)
    positions = np.array([[float(v) for v in d.ImagePositionPatient] for d in sets])
    np.testing.assert_allclose(np.diff(positions[:, 2]), 1.0, atol=1e-6)
    # each source slice centre is the centroid of the 3 derived slices that subdivide it
    src_z = sorted(float(pydicom.dcmread(io.BytesIO(b)).ImagePositionPatient[2]) for _, b in files)
    np.testing.assert_allclose(positions[:, 2].reshape(4, 3).mean(axis=1), src_z, atol=1e-6)
    again = read_dicom_series(out, "derived")
    np.testing.assert_allclose(again.affine, fine.affine, atol=1e-5)
    np.testing.assert_array_equal(again.data, np.rint(fine.data))
    for name in ("src.dcm",):
        assert dciodvfy_findings(tmp_path / name) == []
    (tmp_path / "out.dcm").write_bytes(out[5][1])
    assert dciodvfy_findings(tmp_path / "out.dcm") == []


def dciodvfy_findings(path) -> list[str]:
    result = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=60)
    return sorted(line for line in (result.stdout + result.stderr).splitlines() if line.startswith(("Error", "Warning")))


@pytest.fixture(scope="session")
def mri_sample():
    from medsr_dist.mri.sample_data import sample_volume_path

    def get(name):
        try:
            return sample_volume_path(name)
        except FileNotFoundError as exc:  # offline and not cached: say why
            pytest.skip(str(exc))

    return get


def test_hostile_files_read_as_volumes_are_refused_within_bounds():
    """Issue #24 through the MRI readers: a .nii.gz whose stream goes on past what its header declares (64 MiB of
    zeros behind a 4x4x4 volume, ~64 KiB on disk) is refused after inflating at most the declared size + 1 MiB;
    a series slice holding a Deflate bomb, a JPEG 2000 SIZ lie or a sequence-item flood is refused by the image
    reader's bounds, naming the file, before any decoder runs. The honest volume and series read as before."""
    import gzip
    import time

    from medsr_dist.data import hostile

    affine = np.diag([1.0, 1.0, 3.0, 1.0])
    raw = nib.Nifti1Image(np.ones((4, 4, 4), np.int16), affine).to_bytes()
    bomb = gzip.compress(raw + b"\0" * (64 << 20), 6)
    assert len(bomb) < 1 << 20
    t0 = time.perf_counter()
    with pytest.raises(VolumeError, match=r"bomb\.nii\.gz: the gzip stream inflates past the [\d,]+ bytes its NIfTI "
                                          r"header declares"):
        read_nifti(bomb, "bomb.nii.gz")
    assert time.perf_counter() - t0 < 5
    assert read_nifti(gzip.compress(raw), "honest.nii.gz").shape == (4, 4, 4)

    files = sorted(series_files(np.zeros((6, 6, 6))))
    crafted = {"bomb.dcm": (hostile.dicom_deflate_bomb(64 * 1024), "inflates past"),
               "j2k.dcm": (hostile.dicom_j2k_lie(3000), "Columns, Rows disagree"),
               "flood.dcm": (hostile.dicom_sequence_flood(60_000), "sequence items")}
    for name, (data, reason) in crafted.items():
        t0 = time.perf_counter()
        with pytest.raises(VolumeError, match=rf"series s: {name.replace('.', '[.]')}: .*{reason}"):
            read_dicom_series(files[:2] + [(name, data)], "s")
        assert time.perf_counter() - t0 < 10, name
    assert read_dicom_series(files, "s").shape == (6, 6, 6)
