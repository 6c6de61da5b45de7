"""The MRI knobs: how slice pairs are simulated and how volumes are reconstructed.

One pydantic section (``MriConfig``), built like every section of :mod:`medsr_dist.config` so it can be mounted
in the config tree as ``mri:``; until it is, ``medsr mri`` takes these as command-line options and validates them
here before any Ray work.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from medsr_dist.config import Section


class MriConfig(Section):
    """Slice-pair simulation (``medsr mri prepare``) and reconstruction (``medsr mri reconstruct``)."""

    mode: Literal["supervised", "self"] = Field(
        "supervised", description="supervised: isotropic volumes -> the six pairings; self: each anisotropic "
        "volume's own in-plane slices degraded to its through-plane resolution (SMORE)")
    factor: int = Field(4, ge=2, le=8, description="Slice-thickness factor k (output spacing = input spacing / k)")
    profile: Literal["box", "gaussian"] = Field(
        "gaussian", description="Slice profile of the simulated thick slices: box (mean of k) or Gaussian (FWHM k)")
    skip_empty: float = Field(0.02, ge=0, lt=1, description="Drop pairs whose ground truth has at most this "
                              "fraction of foreground voxels (5 % of the volume's range above its minimum)")
    include: list[str] = Field(default_factory=lambda: ["**/*.nii", "**/*.nii.gz", "*.nii", "*.nii.gz"],
                               description="Volume files under prepare.input")
    val_every: int = Field(10, ge=2, description="self mode: every n-th slice pair goes to val (one volume has "
                           "no patient split; val only monitors training)")
    fusion: Literal["mean", "fourier"] = Field("mean", description="How the two refined orientations are fused")
