"""Simulation for training: slice profiles, the six pairings of an isotropic volume, SMORE self-supervised pairs."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from scipy import ndimage

from medsr_dist.mri.simulate import (
    check_factor,
    crop_to_multiple,
    degrade_axis,
    intensity_window,
    interpolate_axis,
    self_supervised_pairs,
    slice_profile_matrix,
    supervised_pairs,
    upsample_matrix,
)


@pytest.mark.parametrize("k", [2, 3, 4])
def test_box_profile_is_the_mean_of_each_slab(k):
    rng = np.random.default_rng(k)
    vol = rng.random((5, 4, 4 * k + 1)).astype(np.float32)  # one extra voxel: dropped, not averaged in
    thick = degrade_axis(vol, 2, k, "box")
    assert thick.shape == (5, 4, 4)
    np.testing.assert_allclose(thick[..., 1], vol[..., k:2 * k].mean(axis=2), rtol=1e-5)


def test_gaussian_profile_has_fwhm_k_and_is_centred_on_the_slab():
    k, n = 4, 64
    m = slice_profile_matrix(n, k, "gaussian")
    row = m[8]  # centred on 8*4 + 1.5 = 33.5
    centre = (row * np.arange(n)).sum()
    assert centre == pytest.approx(33.5, abs=1e-9)
    half = row.max() / 2
    fine = np.interp(np.linspace(0, n - 1, 6301), np.arange(n), row)
    above = np.linspace(0, n - 1, 6301)[fine >= half]
    assert above[-1] - above[0] == pytest.approx(k, abs=0.35)  # FWHM = k fine voxels (sampled on a grid)
    assert np.allclose(m.sum(axis=1), 1.0)
    assert (m[8] > 0).sum() > k  # overlaps the neighbouring slabs, unlike the box


@pytest.mark.parametrize("k", [2, 3, 4])
def test_interpolation_operator_equals_scipy_cubic_bspline_zoom(k):
    rng = np.random.default_rng(10 + k)
    x = rng.random((3, 11, 5)).astype(np.float32)
    ours = interpolate_axis(x, 1, k)
    # scipy's 1-D cubic B-spline zoom of every line along the axis (a 3-D zoom also prefilters the untouched axes,
    # which on short axes moves values by ~1e-4: not what "interpolate one axis" means)
    ref = np.apply_along_axis(lambda line: ndimage.zoom(line, k, order=3, grid_mode=True, mode="reflect"), 1, x)
    np.testing.assert_allclose(ours, ref, atol=2e-6)
    np.testing.assert_allclose(upsample_matrix(11, k).sum(axis=1), 1.0, atol=1e-9)


def test_window_leaves_room_for_the_interpolators_overshoot():
    step = np.zeros((4, 4, 12), np.float32)
    step[..., 6:] = 1000.0
    w = intensity_window(step, 4, 12)
    up = w.to_unit(interpolate_axis(step, 2, 4))
    assert up.min() >= 0.0 and up.max() <= 1.0
    assert up.min() < w.to_unit(np.float32(0.0))  # there is overshoot, and the window took it in


def rng_volume(shape):
    return np.random.default_rng(1).random(shape).astype(np.float32)


@pytest.mark.parametrize("k", [3.3, 2.5, 4.0])
def test_a_non_integer_factor_makes_thick_slices_of_that_spacing_and_aligned_pairs(k):
    """3.3 mm slices over 1 mm voxels: slab n covers the fine extent [3.3 n, 3.3 (n + 1)); a box averages it
    (edge voxels by their overlap), and the interpolation back lands on the original voxels: a linear ramp
    comes back as itself (a 0.5-voxel misalignment would show as 0.5 x its slope)."""
    n = 70
    ramp = np.broadcast_to(np.arange(n, dtype=np.float32), (3, 4, n)).copy()
    gt = crop_to_multiple(ramp, 2, k)
    thick = degrade_axis(gt, 2, k, "box")
    slabs = int(np.floor(n / k + 1e-9))
    assert thick.shape == (3, 4, slabs) and gt.shape[2] == int(np.ceil(slabs * k - 1e-9))
    centres = (np.arange(slabs) + 0.5) * k - 0.5  # the mean of a ramp over a slab is the ramp at its centre (up to
    np.testing.assert_allclose(thick[0, 0], centres, atol=0.05)  # the voxels' piecewise-constant edges: < 1/(8k))
    back = interpolate_axis(thick, 2, k)
    assert back.shape == gt.shape
    inner = slice(int(5 * k), gt.shape[2] - int(5 * k))  # away from the mirror boundary (the prefilter)
    np.testing.assert_allclose(back[..., inner], gt[..., inner], atol=0.05)
    pairs = list(self_supervised_pairs(rng_volume((n, n - 3, 9)), 2, k))
    assert all(p.lq.shape == p.gt.shape for p in pairs)
    assert check_factor(k) == k and isinstance(check_factor(4.0), int)
    with pytest.raises(ValueError, match="factor must be a number > 1"):
        check_factor(1.0)


def test_the_six_pairings_of_an_isotropic_volume():
    k = 2
    rng = np.random.default_rng(0)
    vol = ndimage.gaussian_filter(rng.random((8, 10, 12)), 1).astype(np.float32)
    pairs = list(supervised_pairs(vol, k))
    # (slice axis / degraded axis): each degraded axis paired in the two planes that contain it
    counts = Counter(p.orientation for p in pairs)
    assert counts == {"1/0": 10, "2/0": 12, "0/1": 8, "2/1": 12, "0/2": 8, "1/2": 10}
    window = intensity_window(vol, k, min(vol.shape) // k)
    for p in pairs:
        assert p.lq.shape == p.gt.shape and p.lq.dtype == np.float32
        a, b = p.degraded_axis, p.slice_axis
        fine = window.to_unit(np.take(vol, p.index, axis=b))
        others = [x for x in range(3) if x != b]
        if others[0] != a:
            fine = fine.T  # the degraded axis is always the rows
        np.testing.assert_allclose(p.gt, fine, atol=1e-6)
        # the lq rows are the degraded-and-interpolated rows; columns are untouched in-plane resolution
        thick = degrade_axis(fine[None], 1, k)[0]
        np.testing.assert_allclose(p.lq, interpolate_axis(thick[None], 1, k)[0], atol=1e-5)
        # re-degrading the pair's lq along its rows gives back the thick slice up to the interpolation's residual
        assert np.abs(degrade_axis(p.lq[None], 1, k)[0] - thick).max() < 0.05
    # in the slice of O along axis 0 degraded along axis 2, the rows are the k axis: 12 long
    p02 = next(p for p in pairs if p.orientation == "0/2")
    assert p02.gt.shape == (12, 10)


def test_self_supervised_pairs_degrade_in_plane_slices_along_each_in_plane_axis():
    k = 3
    rng = np.random.default_rng(1)
    aniso = ndimage.gaussian_filter(rng.random((12, 9, 5)), 1).astype(np.float32)  # low resolution along k
    pairs = list(self_supervised_pairs(aniso, lr_axis=2, k=k, profile="gaussian"))
    assert Counter(p.orientation for p in pairs) == {"2/0": 5, "2/1": 5}
    window = intensity_window(aniso, k, 5)
    for p in pairs:
        plane = window.to_unit(aniso[:, :, p.index])
        gt = plane if p.degraded_axis == 0 else plane.T
        np.testing.assert_allclose(p.gt, gt[: gt.shape[0] // k * k], atol=1e-6)
        expect = interpolate_axis(degrade_axis(p.gt[None], 1, k, "gaussian"), 1, k)[0]
        np.testing.assert_allclose(p.lq, expect, atol=1e-5)
    assert not any(np.allclose(p.lq, p.gt, atol=1e-3) for p in pairs)


def test_self_supervised_pairs_from_several_profiles_take_turns_by_slice():
    """An estimate's tied fits: profile (index + o) % n for the o-th in-plane axis, each pair exactly the pair that
    profile alone makes; a one-element sequence is the profile itself; an empty one is refused."""
    from medsr_dist.mri.profile import BOX_SHAPE, SliceProfile

    k = 4
    rng = np.random.default_rng(2)
    aniso = ndimage.gaussian_filter(rng.random((24, 20, 7)), 1).astype(np.float32)
    profiles = [SliceProfile(4.0, BOX_SHAPE), SliceProfile(4.4, 2.0), SliceProfile(3.9, 4.0)]
    alone = [list(self_supervised_pairs(aniso, 2, k, prof)) for prof in profiles]
    mixed = list(self_supervised_pairs(aniso, 2, k, profiles))
    assert [(p.orientation, p.index) for p in mixed] == [(p.orientation, p.index) for p in alone[0]]
    for n, pair in enumerate(mixed):
        o = 0 if pair.orientation == "2/0" else 1
        expect = alone[(pair.index + o) % 3][n]
        np.testing.assert_allclose(pair.lq, expect.lq, atol=1e-6)
        np.testing.assert_array_equal(pair.gt, expect.gt)
        others = [alone[j][n] for j in range(3) if j != (pair.index + o) % 3]
        assert not any(np.allclose(pair.lq, other.lq, atol=1e-4) for other in others)
    single = list(self_supervised_pairs(aniso, 2, k, profiles[:1]))
    assert all(np.array_equal(a.lq, b.lq) for a, b in zip(single, alone[0]))
    with pytest.raises(ValueError, match="no slice profile"):
        list(self_supervised_pairs(aniso, 2, k, []))


def test_empty_background_slices_can_be_skipped():
    vol = np.zeros((8, 8, 8), np.float32)
    vol[2:6, 2:6, 2:6] = 100.0
    all_pairs = list(supervised_pairs(vol, 2))
    kept = list(supervised_pairs(vol, 2, skip_empty=0.01))
    assert 0 < len(kept) < len(all_pairs)
    with pytest.raises(ValueError, match="shorter than 2 x factor 4"):
        list(supervised_pairs(np.zeros((6, 8, 8), np.float32), 4))
