"""The parameters of the evaluation protocols (``eval.protocol`` plus ``eval.params``): the named presets, their rules
and how overrides apply, declared here so the config validates them before any Ray work. What a protocol does with an
image (:meth:`~medsr_dist.eval.protocols.Protocol.make_pair`) and the papers' steps are
:mod:`medsr_dist.eval.protocols`.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["PRESETS", "VOLUME_PRESETS", "ProtocolParameters", "VolumeProtocol", "resolve_protocol_parameters"]

_HR_RESIZE = ("none", "lanczos", "cubic", "area")
_LR_FROM = ("hr", "source", "paired", "no_reference")
#: lr_from values whose model input is a file as given (no synthetic degradation)
GIVEN_LR = ("paired", "no_reference")
_DOWNSAMPLE = ("matlab", "opencv")
_LR_QUANTIZATION = ("source", "8bit", "none")


@dataclass(frozen=True)
class ProtocolParameters:
    """The parameters of a 2-D evaluation protocol and their rules; :class:`medsr_dist.eval.protocols.Protocol` adds
    :meth:`~medsr_dist.eval.protocols.Protocol.make_pair`. See :mod:`medsr_dist.eval.protocols` for what each
    parameter does."""

    name: str
    scale: int
    description: str = ""
    reference: str = ""
    source_size: int | None = None
    hr_size: int | None = None
    hr_resize: str = "none"
    lr_from: str = "hr"
    downsample: str = "matlab"
    blur_sigma: float = 0.0
    test_y_channel: bool = False
    crop_border: int = 0
    lr_quantization: str = "source"

    def __post_init__(self) -> None:
        if self.scale < 1:
            raise ValueError(f"scale must be >= 1, got {self.scale}")
        if self.hr_resize not in _HR_RESIZE:
            raise ValueError(f"hr_resize must be one of {_HR_RESIZE}, got {self.hr_resize!r}")
        if self.lr_from not in _LR_FROM:
            raise ValueError(f"lr_from must be one of {_LR_FROM}, got {self.lr_from!r}")
        if self.downsample not in _DOWNSAMPLE:
            raise ValueError(f"downsample must be one of {_DOWNSAMPLE}, got {self.downsample!r}")
        if self.lr_quantization not in _LR_QUANTIZATION:
            raise ValueError(f"lr_quantization must be one of {_LR_QUANTIZATION}, got {self.lr_quantization!r}")
        if self.blur_sigma < 0:
            raise ValueError(f"blur_sigma must be >= 0, got {self.blur_sigma}")
        if self.crop_border < 0:
            raise ValueError(f"crop_border must be >= 0, got {self.crop_border}")
        if self.hr_size is not None and self.hr_size % self.scale:
            raise ValueError(f"hr_size {self.hr_size} is not a multiple of scale {self.scale}")
        if self.hr_size is None and self.hr_resize != "none":
            raise ValueError(f"hr_resize {self.hr_resize!r} needs hr_size (the size to resize to)")
        if self.lr_from == "source" and self.hr_size is None:
            raise ValueError("lr_from 'source' needs hr_size (the input is source resized to hr_size / scale)")
        if self.lr_from in GIVEN_LR:
            # the input is a real low-resolution file, scored as given: nothing may resize, blur or round it
            made = [k for k, v in (("hr_size", self.hr_size), ("blur_sigma", self.blur_sigma or None)) if v is not None]
            if made:
                raise ValueError(f"lr_from {self.lr_from!r} scores the given low-resolution files as they are; "
                                 f"{made} would make a synthetic input (leave them unset)")
        if self.source_size is not None and self.hr_size is None and self.source_size % self.scale:
            raise ValueError(f"source_size {self.source_size} is not a multiple of scale {self.scale}")

    @property
    def has_reference(self) -> bool:
        """Whether there is a ground truth to score against (not ``lr_from: no_reference``)."""
        return self.lr_from != "no_reference"

    @property
    def degradation(self) -> str:
        """One line saying how the model input is made, e.g. for report captions."""
        metric = ("Y channel" if self.test_y_channel else "all channels") + f", crop border {self.crop_border}"
        if self.lr_from == "paired":
            return (f"ground truth: the high-resolution file, exactly x{self.scale} its low-resolution partner; input: the "
                    f"low-resolution file of the same name (eval.lr_dataset) as given, no synthetic degradation; "
                    f"metrics: {metric}")
        if self.lr_from == "no_reference":
            return (f"no ground truth: input: the low-resolution files as given; x{self.scale} outputs scored without "
                    f"reference (consistency with the input, NIQE)")
        gt = (f"{'source' if self.hr_resize == 'none' else self.hr_resize + ' resize to'} {self.hr_size}x{self.hr_size}"
              if self.hr_size else f"source modcropped to a multiple of {self.scale}")
        kernel = "MATLAB bicubic (antialiased)" if self.downsample == "matlab" else "OpenCV bicubic"
        lr = f"{kernel} x{self.scale} downsampling of the {'ground truth' if self.lr_from == 'hr' else 'source'}"
        if self.lr_from == "source":
            lr = f"{kernel} resize of the source to {self.hr_size // self.scale}x{self.hr_size // self.scale}"
        if self.blur_sigma > 0:
            lr += f", then Gaussian blur sigma {self.blur_sigma:g}"
        lr += {"source": ", rounded to the source's bit depth", "8bit": ", rounded to 8 bits", "none": " (float, not rounded)"}[
            self.lr_quantization]
        metric = ("Y channel" if self.test_y_channel else "all channels") + f", crop border {self.crop_border}"
        return f"ground truth: {gt}; input: {lr}; metrics: {metric}"

    def parameters(self) -> dict[str, Any]:
        """The parameters as a JSON-ready dict (what the report prints)."""
        return dataclasses.asdict(self)

    def with_params(self, overrides: Mapping[str, Any]) -> ProtocolParameters:
        """A copy with some parameters replaced.

        Raises:
            ValueError: an unknown parameter, or a combination :meth:`__post_init__` rejects.
        """
        known = {f.name for f in dataclasses.fields(self)} - {"name", "description", "reference"}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"protocol {self.name}: unknown parameter(s) {unknown} (known: {sorted(known)})")
        return dataclasses.replace(self, **dict(overrides))


# ------------------------------------------------------------------------------------------------------------
# Presets
# ------------------------------------------------------------------------------------------------------------
def _classic(scale: int) -> ProtocolParameters:
    return ProtocolParameters(
        name=f"bicubic-x{scale}", scale=scale, downsample="matlab", test_y_channel=True, crop_border=scale,
        description=f"Classic SR benchmark (Set5/Set14/BSD100/Urban100/Manga109 style), x{scale} 'BI' degradation",
        reference="MATLAB imresize bicubic downsampling of the modcropped ground truth; PSNR/SSIM on Y, crop border = scale",
    )


#: The named protocols. Configs ``configs/eval_<name>.yaml`` select them and may override any parameter.
PRESETS: dict[str, ProtocolParameters] = {
    "drive-x2": ProtocolParameters(
        name="drive-x2", scale=2, hr_size=512, hr_resize="lanczos", downsample="opencv", blur_sigma=1.0,
        description="Retinal fundus (DRIVE), x2: the Real-ESRGAN fine-tuning paper",
        reference="ground truth = image resized to 512x512 (Lanczos); input = bicubic x2 downsampling, then Gaussian blur",
    ),
    "nih-x4": ProtocolParameters(
        name="nih-x4", scale=4, source_size=1024, downsample="opencv", blur_sigma=1.0,
        description="Chest X-ray (NIH ChestX-ray14), x4",
        reference="ground truth = the 1024x1024 image; input = bicubic x4 downsampling, then Gaussian blur",
    ),
    "cxr14-ldm": ProtocolParameters(
        name="cxr14-ldm", scale=4, source_size=1024, hr_size=256, hr_resize="cubic", lr_from="source",
        downsample="opencv",
        description="Chest X-ray (NIH ChestX-ray14), x4 at 64 -> 256: the latent-diffusion chest X-ray paper",
        reference="from the 1024x1024 image, HR 256x256 and LR 64x64 by two OpenCV bicubic resizes",
    ),
    **{f"bicubic-x{s}": _classic(s) for s in (2, 3, 4)},
}


# ------------------------------------------------------------------------------------------------------------
# 3-D: isotropic volume -> simulated thick-slice volume (medsr_dist/eval/volume_eval.py runs these)
# ------------------------------------------------------------------------------------------------------------
_PLANES = ("axial", "coronal", "sagittal")
_PROFILES = ("gaussian", "box")
_FUSIONS = ("mean", "fourier")


@dataclass(frozen=True)
class VolumeProtocol:
    """An MRI through-plane protocol: from an isotropic volume (the ground truth), the thick-slice input.

    Steps: the ground truth is the volume cropped to a multiple of ``scale`` along the normal of ``axis``
    (``axial``: the voxel axis closest to S/I, from the affine); the input is
    :func:`~medsr_dist.mri.simulate.simulate_anisotropic` of it along that axis (``profile``: ``gaussian`` slice
    profile of FWHM = the thick spacing, or ``box`` = mean of ``scale`` slices), its affine the thick grid's (same
    field of view); ``profile_known: false`` ("profile unknown"): the consistency score re-degrades with the
    profile estimated from the thick input (:func:`~medsr_dist.mri.profile.estimate_profile`) instead of the true
    one, and the report gives the estimate beside the truth; with ``lr_quantization: source`` (default) the thick values are rounded to the source's stored
    integer levels (its dtype and scl_slope/inter, like a real thick-slice file), ``none`` keeps float32.
    Methods: trilinear and cubic B-spline (scipy.ndimage order 3) interpolation back along that axis, and each
    model through :func:`~medsr_dist.mri.reconstruct.reconstruct` (``fusion``). Metrics: 3-D PSNR/SSIM inside the
    ground truth's foreground mask (:mod:`medsr_dist.mri.metrics`), data range = the ground truth's range.
    """

    name: str
    scale: int
    description: str = ""
    reference: str = ""
    axis: str = "axial"
    profile: str = "gaussian"
    fusion: str = "mean"
    lr_quantization: str = "source"
    profile_known: bool = True

    def __post_init__(self) -> None:
        if int(self.scale) != self.scale or self.scale < 2:
            raise ValueError(f"scale must be an integer >= 2 for a volume protocol, got {self.scale}")
        if self.axis not in _PLANES:
            raise ValueError(f"axis must be one of {_PLANES} (the plane whose normal gets thick slices), got {self.axis!r}")
        if self.profile not in _PROFILES:
            raise ValueError(f"profile must be one of {_PROFILES}, got {self.profile!r}")
        if self.fusion not in _FUSIONS:
            raise ValueError(f"fusion must be one of {_FUSIONS}, got {self.fusion!r}")
        if self.lr_quantization not in ("source", "none"):
            raise ValueError(f"lr_quantization must be 'source' or 'none' for a volume protocol, got {self.lr_quantization!r}")

    @property
    def degradation(self) -> str:
        profile = "Gaussian slice profile (FWHM = thick spacing)" if self.profile == "gaussian" else "box (mean) slice profile"
        quant = ", rounded to the source's stored levels" if self.lr_quantization == "source" else " (float, not rounded)"
        if not self.profile_known:
            quant += "; the profile is not told to the methods (estimated from the input)"
        return (f"ground truth: the isotropic volume cropped to a multiple of {self.scale} along the {self.axis} normal; "
                f"input: x{self.scale} thick slices along it, {profile}{quant}; methods reconstruct with {self.fusion} "
                f"fusion; metrics: 3-D PSNR/SSIM inside the Otsu foreground mask of the ground truth")

    def parameters(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def with_params(self, overrides: Mapping[str, Any]) -> VolumeProtocol:
        """A copy with some parameters replaced (``scale``, ``axis``, ``profile``, ``profile_known``, ``fusion``,
        ``lr_quantization``).

        Raises:
            ValueError: a parameter of the 2-D protocols, an unknown one, or a bad value.
        """
        known = {f.name for f in dataclasses.fields(self)} - {"name", "description", "reference"}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"protocol {self.name}: parameter(s) {unknown} do not apply to a volume protocol "
                             f"(known: {sorted(known)})")
        return dataclasses.replace(self, **dict(overrides))


def _aniso(k: int) -> VolumeProtocol:
    return VolumeProtocol(
        name=f"mri-aniso-x{k}", scale=k,
        description=f"3-D MRI, x{k} thick slices along the axial normal reconstructed to isotropic",
        reference="simulated from an isotropic T1 volume; trilinear and cubic B-spline interpolation against the "
                  "cross-plane reconstruction (SMORE/ECLARE-style evaluation)",
    )


#: Volume protocols by name (``eval.protocol: mri-aniso-x4``); ``configs/eval_mri-aniso-x4.yaml`` selects one.
VOLUME_PRESETS: dict[str, VolumeProtocol] = {f"mri-aniso-x{k}": _aniso(k) for k in (2, 3, 4)}


def resolve_protocol_parameters(name: str, overrides: Mapping[str, Any] | None = None) -> ProtocolParameters | VolumeProtocol:
    """The preset ``name`` (2-D :data:`PRESETS` or volume :data:`VOLUME_PRESETS`) with ``overrides`` applied.

    Raises:
        ValueError: unknown preset (the message lists them) or invalid parameters.
    """
    preset = PRESETS.get(name) or VOLUME_PRESETS.get(name)
    if preset is None:
        raise ValueError(f"unknown evaluation protocol {name!r} (known: {', '.join([*PRESETS, *VOLUME_PRESETS])})")
    overrides = {k: v for k, v in (overrides or {}).items()}
    if isinstance(preset, VolumeProtocol):
        # the config's Params section lists every protocol's keys; nulls of 2-D-only keys are "not set" here
        overrides = {k: v for k, v in overrides.items() if v is not None}
    if overrides.get("lr_from") in GIVEN_LR:
        # a real low-resolution file replaces the preset's synthetic degradation: its settings are dropped (given
        # explicitly alongside, __post_init__ refuses them)
        overrides = {"hr_size": None, "hr_resize": "none", "blur_sigma": 0.0, **overrides}
    return preset.with_params(overrides)
