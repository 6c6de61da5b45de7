"""``mri``: 3-D MRI slice-pair simulation and volume reconstruction."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from medsr_dist.config.base import Section


class MriConfig(Section):
    """3-D MRI (``medsr mri``, medsr_dist/mri): slice-pair simulation (``prepare``) and volume reconstruction."""

    mode: Literal["supervised", "self"] = Field(
        "supervised", description="supervised: isotropic volumes -> the six pairings; self: each anisotropic "
        "volume's own in-plane slices degraded to its through-plane resolution (SMORE)")
    factor: float = Field(4, gt=1, le=8, description="Slice-thickness factor k (output spacing = input spacing / "
                          "k); need not be an integer (3.3 mm slices to 1 mm: 3.3, resampled onto a fine grid that "
                          "keeps the field of view)")
    profile: Literal["estimate", "box", "gaussian"] = Field(
        "estimate", description="Slice profile of the thick slices: estimate (from the thick volume itself, "
        "medsr_dist/mri/profile.py: generalised-Gaussian FWHM and shape fitted so the in-plane data blurred with it "
        "look like the through-plane data; shapes that fit about equally well are ties, and "
        "self-supervised pairs take every tied fit in turn by slice; recorded in the provenance; supervised "
        "pairs from isotropic volumes "
        "have nothing to estimate from and use the Gaussian), box (mean of k) or gaussian (FWHM k)")
    skip_empty: float = Field(0.02, ge=0, lt=1, description="Drop pairs whose ground truth has at most this "
                              "fraction of foreground voxels (5 % of the volume's range above its minimum)")
    include: list[str] = Field(default_factory=lambda: ["**/*.nii", "**/*.nii.gz", "*.nii", "*.nii.gz"],
                               description="Volume files under prepare.input")
    val_every: int = Field(10, ge=2, description="self mode: every n-th slice pair goes to val (one volume has "
                           "no patient split; val only monitors training)")
    fusion: Literal["mean", "fourier"] = Field("mean", description="How the two refined orientations are fused")
    subimage: int = Field(0, ge=0, description="prepare: cut each slice pair into overlapping sub-images of this "
                          "size (step half of it, the last one flush with the border; 0: whole slices). A single "
                          "volume has few slices: sub-images give the training stream enough rows for long runs, "
                          "and decoding one costs a fraction of a whole slice")

    @field_validator("factor")
    @classmethod
    def _integral_factor_is_an_int(cls, v: float) -> int | float:
        """4.0 is 4: an integral factor keeps the integer path (and the output keys and provenance it had)."""
        return int(v) if float(v).is_integer() else float(v)
