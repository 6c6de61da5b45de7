"""Reconstruction through the one inference engine: round trip, geometry, fusion, bad volumes; 3-D metrics."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from medsr_dist.infer.engine import TileSpec
from medsr_dist.mri.metrics import foreground_mask, interpolation_baseline, psnr_3d, score, ssim_3d
from medsr_dist.mri.reconstruct import fourier_burst_accumulation, plan_reconstruction, reconstruct
from medsr_dist.mri.simulate import crop_to_multiple, degrade_axis
from medsr_dist.mri.volume import Volume, VolumeError, read_nifti, resampled_affine


class IdentityBackend:
    """A scale-1 backend that returns its tiles: what the engine adds (tiling, blending, clipping) must be nothing."""

    scale = 1
    size_multiple = 1

    def __init__(self):
        self.calls, self.tiles = 0, 0

    def __call__(self, batch):
        self.calls += 1
        self.tiles += batch.shape[0]
        return batch.copy()


class RowSmoothBackend(IdentityBackend):
    """Blurs along the rows only: shows which axis the engine's slices carry as rows."""

    def __call__(self, batch):
        super().__call__(batch)
        return ndimage.uniform_filter1d(batch, 3, axis=2, mode="nearest")


def bspline_along(data, axis, k):
    return np.apply_along_axis(lambda line: ndimage.zoom(line, k, order=3, grid_mode=True, mode="reflect"),
                               axis, data.astype(np.float64))


def oblique(spacing):
    theta = np.deg2rad(25.0)
    affine = np.eye(4)
    affine[:3, :3] = np.array([[1, 0, 0], [0, np.cos(theta), -np.sin(theta)], [0, np.sin(theta), np.cos(theta)]]) @ np.diag(spacing)
    affine[:3, 3] = [10.0, -20.0, 30.0]
    return affine


@pytest.mark.parametrize("lr_axis,k", [(2, 4), (0, 3), (1, 2)])
def test_identity_backend_gives_back_the_bspline_interpolated_input(lr_axis, k):
    rng = np.random.default_rng(lr_axis)
    shape = [14, 12, 10]
    shape[lr_axis] = 6
    spacing = [1.0, 1.0, 1.0]
    spacing[lr_axis] = float(k)
    data = ndimage.gaussian_filter(rng.random(shape), 1.0).astype(np.float32) * 900 - 50
    vol = Volume(data, oblique(spacing), source="thick.nii.gz", stored_dtype=np.int16)
    backend = IdentityBackend()
    # tiles smaller than the slices: tiling, batching across slices and blending must add nothing
    out = reconstruct(vol, backend, k, tile=TileSpec(tile=5, overlap=2, blend=1, batch_size=4))
    expect = bspline_along(data, lr_axis, k)
    assert out.shape == expect.shape
    np.testing.assert_allclose(out.data, expect, atol=2e-3 * 950 / 1000)  # float32 rounding of values ~1e3
    assert backend.tiles > 2 * sum(out.shape[b] for b in range(3) if b != lr_axis)  # slices were tiled
    # geometry: the fine spacing exactly, the same field of view, input voxels at the centroid of their k
    fine_spacing = np.array(spacing)
    fine_spacing[lr_axis] /= k
    np.testing.assert_allclose(out.spacing, fine_spacing, rtol=1e-12)
    np.testing.assert_allclose(resampled_affine(out.affine, lr_axis, k), vol.affine, atol=1e-9)
    assert out.stored_dtype == np.int16 and out.facts["lr_axis"] == lr_axis
    np.testing.assert_array_equal(vol.data, data)  # input untouched


def test_fourier_fusion_of_two_identity_stacks_is_the_interpolation_too():
    rng = np.random.default_rng(7)
    data = ndimage.gaussian_filter(rng.random((12, 10, 5)), 1.0).astype(np.float32) * 100
    vol = Volume(data, np.diag([1.0, 1.0, 3.0, 1.0]))
    out = reconstruct(vol, IdentityBackend(), 3, fusion="fourier")
    np.testing.assert_allclose(out.data, bspline_along(data, 2, 3), atol=1e-3)


def test_the_engine_sees_the_low_resolution_axis_as_rows_in_both_orientations():
    rng = np.random.default_rng(3)
    vol = Volume(rng.random((10, 9, 4)).astype(np.float32), np.diag([1.0, 1.0, 2.0, 1.0]))
    out = reconstruct(vol, RowSmoothBackend(), 2)
    interp = bspline_along(vol.data, 2, 2)
    # smoothing along the k axis only: every (i, j) column along k changed, nothing mixes across i or j
    smoothed = ndimage.uniform_filter1d(interp, 3, axis=2, mode="nearest")
    window = plan_reconstruction(vol, 2).window
    np.testing.assert_allclose(out.data, smoothed, atol=2e-6 * (window.high - window.low) * 10)


def test_fourier_burst_accumulation_takes_each_frequency_from_the_sharper_stack():
    rng = np.random.default_rng(5)
    truth = rng.random((16, 16, 16)).astype(np.float32)
    blur_x = ndimage.gaussian_filter1d(truth, 2.0, axis=0)  # each stack lost detail along a different axis
    blur_y = ndimage.gaussian_filter1d(truth, 2.0, axis=1)
    from scipy import fft

    fused = fourier_burst_accumulation([fft.rfftn(blur_x), fft.rfftn(blur_y)], truth.shape, sigma=0.0)
    mean = (blur_x + blur_y) / 2
    # (white noise: frequencies high along both x and y are lost in both stacks, so the gain is bounded)
    assert psnr_3d(fused, truth, data_range=1.0) > psnr_3d(mean, truth, data_range=1.0) + 0.5
    same = fourier_burst_accumulation([fft.rfftn(truth), fft.rfftn(truth)], truth.shape)
    np.testing.assert_allclose(same, truth, atol=1e-5)


def test_bad_volumes_are_refused_before_any_slice_is_processed():
    backend = IdentityBackend()
    iso = Volume(np.zeros((8, 8, 8), np.float32), np.eye(4), source="iso.nii")
    with pytest.raises(VolumeError, match="iso.nii: no single low-resolution axis"):
        reconstruct(iso, backend, 2)
    skew = np.diag([1.0, 1.0, 3.0, 1.0])
    skew[0, 2] = 1.5
    with pytest.raises(VolumeError, match="skew.nii: the orientation matrix is not orthonormal"):
        reconstruct(Volume(np.zeros((8, 8, 4), np.float32), skew, source="skew.nii"), backend, 2)
    thick = Volume(np.zeros((8, 8, 4), np.float32), np.diag([1.0, 1.0, 3.0, 1.0]))

    class X4:
        scale, size_multiple = 4, 1

    with pytest.raises(ValueError, match="scale-1 backend"):
        reconstruct(thick, X4(), 2)
    with pytest.raises(ValueError, match="fusion must be one of"):
        reconstruct(thick, backend, 2, fusion="median")
    with pytest.raises(ValueError, match="factor must be a number > 1"):
        reconstruct(thick, backend, 1)
    with pytest.raises(VolumeError, match="expected a 3-D volume"):
        Volume(np.zeros((4, 4, 4, 2)), np.eye(4), source="dwi.nii")
    assert backend.calls == 0


def test_real_anisotropic_volume_reconstructs_with_the_right_geometry(tmp_path):
    from medsr_dist.mri.sample_data import sample_volume_path
    from medsr_dist.mri.volume import write_nifti

    try:
        path = sample_volume_path("aniso_vox")
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    vol = read_nifti(path.read_bytes(), path.name)  # 4 x 4 x 5 mm, low resolution along k
    vol = vol.with_data(vol.data[10:40, 12:44])
    out = reconstruct(vol, IdentityBackend(), 2, tile=TileSpec(tile=0, batch_size=8))
    np.testing.assert_allclose(out.spacing, [4.0, 4.0, 2.5], rtol=1e-6)
    written = read_nifti(write_nifti(out), "iso.nii.gz")
    assert written.stored_dtype == np.int16 and written.shape == (30, 32, 48)
    np.testing.assert_allclose(written.data, np.clip(np.rint(bspline_along(vol.data, 2, 2)), -32768, 32767), atol=1)


def test_metrics_inside_the_mask_and_baselines_ordered_on_a_smooth_volume():
    rng = np.random.default_rng(0)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, 24)] * 3, indexing="ij")
    head = ((x ** 2 + y ** 2 + z ** 2) < 0.7).astype(np.float32)
    ref = ndimage.gaussian_filter(head * (0.6 + 0.4 * np.sin(6 * x) * np.cos(4 * z)) + 0.02 * rng.random(head.shape), 1.0)
    ref = ref.astype(np.float32) * 1000
    mask = foreground_mask(ref)
    assert 0.2 < mask.mean() < 0.5  # the ball, not the air
    k = 4
    ref = crop_to_multiple(ref, 2, k)
    mask = mask[:, :, : ref.shape[2]]
    thick = degrade_axis(ref, 2, k)
    scores = score({name: interpolation_baseline(thick, 2, k, name) for name in ("trilinear", "bspline")}, ref, mask)
    assert scores["bspline"]["psnr"] > scores["trilinear"]["psnr"] > 15
    assert 0 < scores["trilinear"]["ssim"] < scores["bspline"]["ssim"] < 1
    assert psnr_3d(ref, ref, mask) == float("inf") and ssim_3d(ref, ref, mask) == pytest.approx(1.0)
    # the mask matters: errors in the air are not counted
    noisy = ref + np.where(mask, 0, 300).astype(np.float32)
    assert psnr_3d(noisy, ref, mask) == float("inf") and psnr_3d(noisy, ref) < 30


def test_mean_fusion_is_the_voxelwise_mean_of_the_two_refined_orientations():
    class ByOrientation(IdentityBackend):
        """Adds 0.01 to slices of one orientation and 0.03 to the other's (told apart by their widths)."""

        def __call__(self, batch):
            return batch + (0.01 if batch.shape[-1] == 9 else 0.03)

    rng = np.random.default_rng(11)
    data = ndimage.gaussian_filter(rng.random((7, 9, 5)), 1.0).astype(np.float32) * 400
    vol = Volume(data, np.diag([1.0, 1.0, 3.0, 1.0]))
    window = plan_reconstruction(vol, 3).window
    out = reconstruct(vol, ByOrientation(), 3)  # slices along i are (15, 9), along j (15, 7)
    expect = bspline_along(data, 2, 3) + 0.02 * (window.high - window.low)
    np.testing.assert_allclose(out.data, expect, atol=1e-3)


def test_a_written_reconstruction_keeps_every_input_voxel_centre_in_world_coordinates():
    import gzip

    import nibabel as nib

    from medsr_dist.mri.volume import write_nifti

    rng = np.random.default_rng(2)
    affine = oblique([0.9, 1.1, 4.0])
    vol = Volume(rng.random((6, 5, 4)).astype(np.float32) * 100, affine, source="thick.nii.gz", stored_dtype=np.int16)
    out = reconstruct(vol, IdentityBackend(), 4)
    img = nib.Nifti1Image.from_bytes(gzip.decompress(write_nifti(out)))
    assert img.shape == (6, 5, 16) and img.get_data_dtype() == np.int16
    np.testing.assert_allclose(img.header.get_zooms(), [0.9, 1.1, 1.0], rtol=1e-6)
    np.testing.assert_allclose(img.get_qform(), img.get_sform(), atol=1e-5)
    for ijk in [(0, 0, 0), (5, 4, 3), (2, 3, 1)]:
        centre = affine @ np.array([*ijk, 1.0])
        fine = [img.affine @ np.array([ijk[0], ijk[1], ijk[2] * 4 + m, 1.0]) for m in range(4)]
        np.testing.assert_allclose(np.mean(fine, axis=0), centre, atol=1e-4)  # float32 header precision


@pytest.mark.parametrize("k", [3.3, 2.5])
def test_a_non_integer_factor_resamples_onto_a_fine_grid_that_keeps_the_field_of_view(k):
    """n thick voxels -> round(n k) fine ones over the same extent: the identity network gives back scipy's cubic
    B-spline zoom to that grid, and every input voxel's extent (so its centre) is exactly the fine extent it
    covers, in world coordinates, in the written NIfTI too."""
    import gzip

    import nibabel as nib

    from medsr_dist.mri.volume import write_nifti

    rng = np.random.default_rng(5)
    affine = oblique([0.9, 1.1, 3.3])
    n = 7
    vol = Volume(rng.random((6, 5, n)).astype(np.float32) * 100, affine, source="thick.nii.gz", stored_dtype=np.int16)
    plan = plan_reconstruction(vol, k)
    n_fine = round(n * k)
    r = n_fine / n  # fine voxels per input voxel
    assert plan.output_shape == (6, 5, n_fine) and plan.fine_step == pytest.approx(1 / r)
    assert plan.output_spacing[2] == pytest.approx(3.3 / r)
    out = reconstruct(vol, IdentityBackend(), k)
    window = plan.window
    expect = bspline_along(window.to_unit(vol.data), 2, r) * (window.high - window.low) + window.low
    np.testing.assert_allclose(out.data, expect, atol=1e-3)
    img = nib.Nifti1Image.from_bytes(gzip.decompress(write_nifti(out)))
    assert img.shape == (6, 5, n_fine)
    np.testing.assert_allclose(img.header.get_zooms(), [0.9, 1.1, 3.3 / r], rtol=1e-6)
    for i in range(n):
        for face in (-0.5, 0.5):  # the input voxel's faces are the fine grid's continuous coordinates there
            world_in = affine @ np.array([2, 3, i + face, 1.0])
            world_out = img.affine @ np.array([2, 3, (i + 0.5 + face) * r - 0.5, 1.0])
            np.testing.assert_allclose(world_out, world_in, atol=1e-4)
        centroid = img.affine @ np.array([2, 3, (i + 0.5) * r - 0.5, 1.0])  # of the fine extent it covers
        np.testing.assert_allclose(centroid, affine @ np.array([2, 3, i, 1.0]), atol=1e-4)
