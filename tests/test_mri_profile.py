"""Slice profiles of any width and shape (gaps, overlaps, non-integer spacings), the fine grid's exact geometry, and
the estimation of the profile from a thick volume alone (medsr_dist/mri/profile.py)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from medsr_dist.mri import simulate
from medsr_dist.mri.profile import (
    BOX_SHAPE,
    SliceProfile,
    degrade,
    TIE,
    estimate_profile,
    fine_count,
    interpolate,
    profile_from_record,
    resolve_profile,
    training_profiles,
    thick_matrix,
    upsample_matrix,
)
from medsr_dist.mri.volume import resampled_affine


def test_named_profiles_match_the_integer_simulation():
    box = thick_matrix(20, 4.0, SliceProfile.named("box", 4))
    np.testing.assert_allclose(box, simulate.slice_profile_matrix(20, 4, "box"), atol=1e-12)
    gauss = thick_matrix(40, 4.0, SliceProfile.named("gaussian", 4))
    old = simulate.slice_profile_matrix(40, 4, "gaussian")  # point samples vs integrals over each voxel: close
    assert np.abs(gauss - old)[2:-2].max() < 0.02
    np.testing.assert_allclose(simulate.slice_profile_matrix(40, 4, SliceProfile(4.0, 2.0)), gauss)
    np.testing.assert_allclose(upsample_matrix(10, 40), simulate.upsample_matrix(10, 4), atol=1e-6)


@pytest.mark.parametrize("spacing, profile", [(3.3, SliceProfile(3.3, BOX_SHAPE)), (4.0, SliceProfile(3.0, 2.0)),
                                              (4.0, SliceProfile(3.0, BOX_SHAPE)), (2.5, SliceProfile(4.0, 6.0))])
def test_thick_slices_sit_at_their_slab_centres_with_the_profile_width(spacing, profile):
    """Non-integer spacing (3.3), a gap (3 mm thick every 4 mm: 1 voxel unsampled between box slabs) and an overlap
    (4 voxels thick every 2.5): each interior row is centred on (n + 1/2) spacing - 1/2, has the profile's width
    and sums to 1."""
    m = thick_matrix(66, spacing, profile)
    assert m.shape == (int(66 // spacing), 66)
    np.testing.assert_allclose(m.sum(axis=1), 1.0)
    x = np.arange(66)
    for n in range(1, m.shape[0] - 1):
        centre = (n + 0.5) * spacing - 0.5
        assert (m[n] * x).sum() == pytest.approx(centre, abs=0.05)  # voxel centres carry partial voxels: ~exact
        if math.isinf(profile.shape):
            assert m[n].max() * profile.fwhm == pytest.approx(1.0, abs=1e-9)  # a box: 1/width inside
    if spacing == 4.0 and math.isinf(profile.shape):  # the gap: 1 of every 4 voxels' worth is seen by no slice
        np.testing.assert_allclose(m.sum(axis=0)[4:8], [1 / 6, 1 / 3, 1 / 3, 1 / 6])  # (3 mm of 4 seen, / 3)


@pytest.mark.parametrize("spacing", [3.3, 4.0])
def test_fine_grid_keeps_the_field_of_view_and_each_thick_voxel_is_the_centroid_of_its_fine_extent(spacing):
    n = 20
    n_fine = fine_count(n, spacing)
    assert n_fine == round(n * spacing)
    affine = np.array([[0.0, 0.0, 3.3, -40.0], [-1.0, 0.0, 0.0, 12.0], [0.0, 0.9, 0.0, 5.0], [0, 0, 0, 1.0]])
    fine = resampled_affine(affine, 2, n / n_fine)
    for i in range(n):  # thick voxel i spans fine continuous indices [i f - 1/2, (i + 1) f - 1/2), f = n_fine / n
        f = n_fine / n
        lo, hi = i * f - 0.5, (i + 1) * f - 0.5
        mid = fine @ np.array([0.0, 0.0, (lo + hi) / 2, 1.0])
        np.testing.assert_allclose(mid, affine @ np.array([0.0, 0.0, i, 1.0]), atol=1e-9)
    edges = [fine @ np.array([0, 0, -0.5, 1.0]), fine @ np.array([0, 0, n_fine - 0.5, 1.0])]
    np.testing.assert_allclose(edges[0], affine @ np.array([0, 0, -0.5, 1.0]), atol=1e-9)  # same field of view
    np.testing.assert_allclose(edges[1], affine @ np.array([0, 0, n - 0.5, 1.0]), atol=1e-9)
    ramp = np.arange(n, dtype=np.float32)[None, None, :] * np.ones((2, 3, 1), np.float32)
    up = interpolate(ramp, 2, n_fine)  # a linear ramp lands on the fine voxels' coordinates exactly (interior)
    coords = (np.arange(n_fine) + 0.5) * n / n_fine - 0.5
    mid_third = slice(n_fine // 3, 2 * n_fine // 3)
    np.testing.assert_allclose(up[0, 0, mid_third], coords[mid_third], atol=1e-3)


def test_profiles_are_validated():
    with pytest.raises(ValueError, match="fwhm"):
        SliceProfile(0.0)
    with pytest.raises(ValueError, match="slice spacing"):
        thick_matrix(10, 1.0, SliceProfile(2.0))
    with pytest.raises(ValueError, match="too few voxels"):
        estimate_profile(np.ones((6, 6, 3), np.float32), 2, 4.0)
    profile, record = resolve_profile("estimate", np.ones((12, 10, 5), np.float32), [1.0, 1.0, 4.0], 2, 4)
    assert profile == "gaussian" and "too few voxels" in record["estimate_failed"]


@pytest.fixture(scope="module")
def mni(request):
    from medsr_dist.mri.sample_data import sample_volume_path
    from medsr_dist.mri.volume import read_nifti

    try:
        path = sample_volume_path("mni152_t1")
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    return read_nifti(path.read_bytes(), path.name).data.astype(np.float32)


TRUE_PROFILES = {"box": SliceProfile(4.0, BOX_SHAPE), "gaussian": SliceProfile(4.0, 2.0),
                 "flattened": SliceProfile(4.0, 4.0), "box-3.3": SliceProfile(3.3, BOX_SHAPE),
                 "gap-box": SliceProfile(3.0, BOX_SHAPE)}


@pytest.mark.parametrize("name, spacing, header", [("box", 4.0, None), ("gaussian", 4.0, None), ("flattened", 4.0, None),
                                                   ("box-3.3", 3.3, None), ("gap-box", 4.0, 3.0)])
def test_the_estimated_width_of_a_thick_mni152_is_close_to_the_true_one(mni, name, spacing, header):
    """MNI152 T1 made thick along its axial normal: a box, a Gaussian and a flattened Gaussian (shape 4) of FWHM 4 mm
    every 4 mm, a box of 3.3 mm every 3.3 mm (a non-integer factor) and a box of 3 mm every 4 mm (a gap, the
    header's SliceThickness saying 3 mm); the estimate from the thick volume alone (the header's thickness, or the
    spacing, only breaks ties between shapes). Measured at seed 0: -2.5 %, +6.1 %, +1.8 %, -2.0 %, +6.5 %; over
    five choices of planes the worst are 2.7, 10.0, 6.4, 4.1 and 9.1 % (docs/RESULTS.md). Not asserted, because
    it misses 10 %: a Gaussian of 3 mm every 4 mm (+11 .. +17 % with the header, +43 % before ties were broken)."""
    true = TRUE_PROFILES[name]
    thick = degrade(mni, 2, spacing, true)
    est = estimate_profile(thick, 2, spacing, thickness=header)
    assert abs(est.profile.fwhm / true.fwhm - 1) <= 0.10, est
    assert est.best_residual <= est.residual <= est.best_residual * (1 + TIE)
    assert est.best_residual <= min(est.gaussian_residual, est.box_residual)
    record = est.provenance(1.0)
    assert record["fwhm_mm"] == pytest.approx(est.profile.fwhm, abs=1e-3) and record["family"] == est.profile.family
    assert profile_from_record(record).fwhm == pytest.approx(est.profile.fwhm, abs=1e-3)
    assert record["prior_fwhm_voxels"] == (header or spacing) and est.profile.family in record["tied_families"]
    low, high = record["tied_fwhm_range"]
    assert low <= record["fwhm_mm"] <= high


def test_a_tie_between_shapes_goes_to_the_prior_width_and_the_prior_chooses_only_among_ties(mni):
    """The box of 3 mm every 4 mm: told the header's 3 mm the estimate is near 3 mm; without a header the prior is
    the 4 mm spacing and the tie goes to the wider fit (+30 %: why the header's thickness is used). Whatever the
    prior, the estimate is one of the same tied fits (a wrong prior of 8 mm takes the widest of them, no wider)."""
    thick = degrade(mni, 2, 4.0, SliceProfile(3.0, BOX_SHAPE))
    told = estimate_profile(thick, 2, 4.0, thickness=3.0)
    untold = estimate_profile(thick, 2, 4.0)
    wrong = estimate_profile(thick, 2, 4.0, thickness=8.0)
    assert abs(told.profile.fwhm / 3.0 - 1) <= 0.10 and untold.profile.fwhm > told.profile.fwhm
    assert told.tied == untold.tied == wrong.tied and told.profile in told.tied
    assert wrong.profile.fwhm == max(p.fwhm for p in told.tied)


def test_self_supervised_pairs_are_made_with_every_tied_fit_and_the_record_says_so(mni):
    """The box of 4 mm every 4 mm ties five shapes on the MNI152 (Gaussian 3.0 .. box 4.3 mm): the record lists
    them, ``training_profiles`` gives them back (what `medsr mri prepare` makes pairs with), and the consistency
    check's profile stays the single tie-broken estimate. A record without ties (a named profile) trains on it."""
    thick = degrade(mni, 2, 4.0, SliceProfile(4.0, BOX_SHAPE))
    profile, record = resolve_profile("estimate", thick, [1.0, 1.0, 4.0], 2, 4)
    est = estimate_profile(thick, 2, 4.0)
    assert profile == est.profile and len(est.tied) >= 2
    assert record["training_pairs"] == "every tied fit, taking turns by slice"
    trained = training_profiles(profile, json.loads(json.dumps(record)))  # as read back from a prepared dataset
    assert [(p.fwhm, p.shape) for p in trained] == [(pytest.approx(p.fwhm, abs=1e-4), p.shape) for p in est.tied]
    assert any(math.isinf(p.shape) for p in trained) and profile in est.tied
    named, named_record = resolve_profile("box", thick, [1.0, 1.0, 4.0], 2, 4)
    assert training_profiles(named, named_record) == "box"


def test_in_plane_axes_of_different_lengths_are_estimated_on_one_common_square(mni):
    """Thick along the first voxel axis: the two in-plane axes give 58 and 47 coarse samples (an earlier version
    failed there with numpy's 'inhomogeneous shape' and fell back to the Gaussian)."""
    thick = degrade(mni, 0, 4.0, SliceProfile(4.0, 2.0))
    est = estimate_profile(thick, 0, 4.0)
    assert abs(est.profile.fwhm / 4.0 - 1) <= 0.25, est


def test_the_eval_preset_in_profile_unknown_mode_scores_consistency_with_the_estimate(mni):
    """mri-aniso-x4 with ``profile_known: false`` on a crop of the MNI152 T1 (box profile): the pair carries the
    estimate beside the truth, and the consistency score re-degrades with the estimate, not the true profile."""
    from medsr_dist.eval.protocols import resolve_protocol
    from medsr_dist.eval.volume_eval import make_volume_pair, score_volume
    from medsr_dist.mri.metrics import foreground_mask, interpolation_baseline
    from medsr_dist.mri.volume import Volume

    vol = Volume(np.ascontiguousarray(mni[50:146, 60:156, 40:136]), np.diag([1.0, 1.0, 1.0, 1.0]), source="mni")
    known = make_volume_pair(vol, resolve_protocol("mri-aniso-x4", {"profile": "box"}))
    unknown = make_volume_pair(vol, resolve_protocol("mri-aniso-x4", {"profile": "box", "profile_known": False}))
    assert known.profile == "box" and "estimated" not in known.profile_record
    rec = unknown.profile_record
    assert rec["true"] == {"family": "box", "fwhm_mm": 4.0} and rec["known_to_methods"] is False
    assert isinstance(unknown.profile, SliceProfile) and rec["estimated"]["fwhm_mm"] == pytest.approx(
        unknown.profile.fwhm, abs=1e-3)
    np.testing.assert_array_equal(known.thick.data, unknown.thick.data)  # the same input either way
    pred = interpolation_baseline(unknown.thick.data, 2, 4, "bspline")
    mask, thick_mask = foreground_mask(unknown.hr.data), foreground_mask(unknown.thick.data)
    p = resolve_protocol("mri-aniso-x4", {"profile": "box", "profile_known": False})
    s_unknown = score_volume(pred, unknown, p, mask, thick_mask)["consistency_psnr_db"]
    s_known = score_volume(pred, known, p, mask, thick_mask)["consistency_psnr_db"]
    assert s_unknown != s_known  # scored with the estimate, which is not exactly the truth


def test_a_dicom_series_with_a_slice_gap_gets_its_thickness_from_the_header_and_the_gap_in_its_pairs():
    """SliceThickness 3 mm, slices every 4 mm (ImagePositionPatient): the spacing comes from the positions, the
    profile's width from SliceThickness, so a named profile's training pairs leave the gap unsampled."""
    from medsr_dist.mri.sample_data import build_mr_series, dataset_bytes
    from medsr_dist.mri.simulate import slice_profile_matrix
    from medsr_dist.mri.volume import read_dicom_series

    data = np.random.default_rng(0).random((20, 18, 10)) * 500
    series = build_mr_series(data, spacing=(1.0, 1.0, 4.0))
    for ds in series:
        ds.SliceThickness = "3"
    vol = read_dicom_series([(f"s{i}.dcm", dataset_bytes(ds)) for i, ds in enumerate(series)])
    np.testing.assert_allclose(vol.spacing, [1.0, 1.0, 4.0], rtol=1e-6)
    assert vol.facts["slice_thickness"] == pytest.approx(3.0)
    profile, record = resolve_profile("box", vol.data, vol.spacing, 2, 4, vol.facts["slice_thickness"])
    assert profile == SliceProfile(3.0, BOX_SHAPE)
    assert record["slice_thickness_mm"] == 3.0 and record["slice_spacing_mm"] == pytest.approx(4.0)
    assert profile_from_record(record) == profile
    m = slice_profile_matrix(20, 4, profile)  # the in-plane degradation of the pairs: 3 of every 4 voxels seen
    np.testing.assert_allclose(m.sum(axis=0)[4:8], [1 / 6, 1 / 3, 1 / 3, 1 / 6])
    same, rec = resolve_profile("box", vol.data, vol.spacing, 2, 4, 4.0)  # thickness = spacing: the named profile
    assert same == "box" and rec == {"method": "given", "family": "box", "fwhm_voxels": 4.0}


def test_self_mode_pairs_use_and_record_the_estimated_profile(mni):
    """``mri.profile: estimate`` (the default) in self mode: the pairs' meta records the estimate (family, FWHM mm,
    residual) of a thick MNI152 crop (Gaussian, 4 mm), and its in-plane degradation is the estimated profile's."""
    from medsr_dist.config import MriConfig
    from medsr_dist.mri.prepare import volume_pairs
    from medsr_dist.mri.volume import Volume, write_nifti

    assert MriConfig().profile == "estimate"
    iso = np.ascontiguousarray(mni[50:146, 60:156, 40:136])
    thick = Volume(degrade(iso, 2, 4.0, SliceProfile(4.0, 2.0)), np.diag([1.0, 1.0, 4.0, 1.0]), source="t.nii.gz")
    thick.stored_dtype = np.dtype(np.float32)
    rows = volume_pairs(write_nifti(thick), "t.nii.gz", "g", "train", MriConfig(mode="self", factor=4, skip_empty=0.3))
    record = json.loads(rows[0]["meta"])["slice_profile"]
    assert record["method"].startswith("estimate") and abs(record["fwhm_mm"] / 4.0 - 1) < 0.25
    assert record["best_residual_log10"] <= record["box_residual_log10"]
