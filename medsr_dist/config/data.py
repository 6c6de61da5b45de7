"""Data sections: the sample archive, ``prepare`` (split, multi-scale copies, sub-images) and the degradation
that makes training pairs (Real-ESRGAN second order, classic bicubic BI, the LDM augmentation)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from medsr_dist.config.base import Range, Section, _check_probs, _check_range


class SampleConfig(Section):
    """Procedural sample archive (radiograph-like images in every supported file form)."""

    n_images: int = Field(12, ge=1)
    n_holdout: int = Field(2, ge=0, description="Extra images written to the hold-out folder for `enhance`")
    size: int = Field(512, ge=64)
    archive: str | None = Field(None, description="Default: <run.root>/archive")
    holdout: str | None = Field(None, description="Default: <run.root>/holdout")


class SplitConfig(Section):
    train: float = Field(0.7, ge=0, le=1)
    val: float = Field(0.2, ge=0, le=1)
    test: float = Field(0.1, ge=0, le=1)
    group_by: Literal["patient_id", "filename"] = Field(
        "patient_id", description="Group images of one patient: DICOM PatientID (filename pattern as fallback) or filename only"
    )
    filename_pattern: str = Field(
        r"^(?P<patient>[^_/]+)_", description="Regex with a 'patient' group, applied to the file name (NIH: <patient>_<followup>.png)"
    )

    @model_validator(mode="after")
    def _sums_to_one(self) -> "SplitConfig":
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"train + val + test must be 1, got {total:g}")
        return self


class MultiscaleConfig(Section):
    """Real-ESRGAN's generate_multiscale_DF2K: Lanczos copies at ``scales`` plus a shortest-edge copy (train split)."""

    enabled: bool = False
    scales: list[float] = Field(default_factory=lambda: [0.75, 0.5, 1 / 3])
    shortest_edge: int | None = Field(400, ge=16, description="Also a copy whose shorter side is this; empty: none")

    @field_validator("scales")
    @classmethod
    def _scales_in_range(cls, v: list[float]) -> list[float]:
        if any(not 0 < s < 1 for s in v):
            raise ValueError(f"scales must lie in (0, 1), got {v}")
        return v


class SubimageConfig(Section):
    """Real-ESRGAN's extract_subimages: overlapping crops of the (multi-scale) train images."""

    enabled: bool = False
    crop_size: int = Field(400, ge=16)
    step: int = Field(200, ge=1)
    thresh_size: int = Field(0, ge=0, description="Keep a last crop flush with the edge when more than this remains")


class PrepareConfig(Section):
    input: str | None = Field(None, description="Archive prefix to read (default: sample.archive)")
    output: str | None = Field(None, description="Dataset prefix to write (default: <run.root>/dataset)")
    include: list[str] = Field(default_factory=lambda: ["*"], description="Glob patterns relative to input")
    exclude: list[str] = Field(default_factory=list)
    split: SplitConfig = Field(default_factory=SplitConfig)
    rows_per_shard: int = Field(64, ge=1, description="Images per Parquet shard")
    fail_on_error: bool = Field(False, description="Exit non-zero when any file could not be read")
    multiscale: MultiscaleConfig = Field(default_factory=MultiscaleConfig)
    subimages: SubimageConfig = Field(default_factory=SubimageConfig)
    paired_lq: str | None = Field(
        None, description="Paired-data mode: prefix of low-resolution images matching `input` (ground truth) by "
        "relative path and file stem; training then crops these pairs instead of degrading",
    )
    group_secret_file: str | None = Field(
        None, description="File (path or URI) holding the site secret (>= 16 bytes) that pseudonymises (HMAC-SHA256) "
        "DICOM PatientIDs for the patient-level split, and the keys, file-name groups and Study/Series/SOP Instance "
        "UIDs the prepared dataset names its rows by; default: the MEDSR_GROUP_SECRET environment variable. Required "
        "(prepare refuses before reading without one); the same secret keeps the same split and pseudonyms",
    )
    max_input_pixels: int = Field(
        100_000_000, ge=1, description="Largest input (height x width x frames), read from its header before "
        "decoding; larger files are skipped undecoded (an error row, counted in summary.json)")
    max_input_bytes: int = Field(
        1 << 30, ge=1, description="Largest input file in bytes, from the listing before it is read; larger files "
        "are skipped unread (an error row, counted in summary.json)")
    decode_timeout_s: float = Field(
        300.0, ge=0, description="Wall-time cap of one file's decode, which runs in a child process (the last line "
        "of defence for codec faults no header check can foresee): past it the child is killed and the file is an "
        "error row (decode_killed, counted in summary.json); 0 (or decode_memory_bytes 0): decode in the prepare "
        "task itself, uncapped. Costs a process start and one copy of the pixels per file (docs/RELIABILITY.md)")
    decode_memory_bytes: int = Field(
        8 << 30, ge=0, description="Memory cap (address space the decode may add) of that child process; a decode "
        "that needs more is stopped the same way. 8 GiB holds a 100 M-pixel RGB decode (max_input_pixels) with room")


class BicubicConfig(Section):
    """Classic "BI" pairs: optional Gaussian blur, bicubic downsampling, optional Gaussian noise (per sample)."""

    kernel: Literal["matlab", "opencv"] = Field(
        "matlab", description="matlab: MATLAB imresize bicubic (antialiased, the SR benchmarks' BI); opencv: cv2 INTER_CUBIC"
    )
    blur_sigma: Range = Field((0.0, 0.0), description="Gaussian blur sigma range (GT pixels) before downsampling; 0: none")
    noise_sigma: Range = Field((0.0, 0.0), description="Gaussian noise std range on the LQ, in 8-bit grey levels; 0: none")

    @field_validator("blur_sigma", "noise_sigma")
    @classmethod
    def _non_negative_range(cls, v: Range) -> Range:
        _check_range(v)
        if v[0] < 0:
            raise ValueError(f"must be non-negative, got {v}")
        return v


class AugmentConfig(Section):
    """The LDM reference's augmentation of HR crops (the LR is made from the augmented HR, so both stay aligned)."""

    prob: float = Field(0.7, ge=0, le=1, description="Share of samples augmented at all")
    hflip: float = Field(0.5, ge=0, le=1)
    rotate: float = Field(0.5, ge=0, le=1, description="Probability of a rotation by 90, 180 or 270 degrees")
    resized_crop: float = Field(0.5, ge=0, le=1, description="Probability of a random resized crop")
    resized_crop_scale: float = Field(0.8, gt=0, le=1, description="Side of that crop relative to the image (the reference's 80 %)")
    cutout: float = Field(0.3, ge=0, le=1, description="Probability of a cutout (the reference's 30 %)")
    cutout_size: float = Field(0.2, gt=0, lt=1, description="Side of the zeroed square relative to the image (20 %)")


KERNEL_TYPES = ("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso")
KERNEL_PROBS = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)


class DegradationConfig(Section):
    """Real-ESRGAN second-order degradation; defaults are `finetune_realesrgan_x4plus.yml`."""

    gt_size: int = Field(256, ge=16, description="Ground-truth crop size (pixels)")
    use_hflip: bool = True
    usm_sharpen_gt: bool = Field(True, description="Sharpen GT with USM for the L1/perceptual losses")
    # first degradation
    blur_kernel_size: int = 21
    kernel_list: list[str] = Field(default_factory=lambda: list(KERNEL_TYPES))
    kernel_prob: list[float] = Field(default_factory=lambda: list(KERNEL_PROBS))
    sinc_prob: float = Field(0.1, ge=0, le=1)
    blur_sigma: Range = (0.2, 3.0)
    betag_range: Range = (0.5, 4.0)
    betap_range: Range = (1.0, 2.0)
    resize_prob: list[float] = Field(default_factory=lambda: [0.2, 0.7, 0.1], description="up, down, keep")
    resize_range: Range = (0.15, 1.5)
    gaussian_noise_prob: float = Field(0.5, ge=0, le=1)
    noise_range: Range = (1.0, 30.0)
    poisson_scale_range: Range = (0.05, 3.0)
    gray_noise_prob: float | None = Field(
        None, ge=0, le=1, description="Probability that the noise is gray (equal on every channel); null: 1.0 for gray "
        "sources (a radiograph never has chroma noise), 0.4 (Real-ESRGAN) for colour ones")
    jpeg_range: Range = (30.0, 95.0)
    # second degradation
    second_blur_prob: float = Field(0.8, ge=0, le=1)
    blur_kernel_size2: int = 21
    kernel_list2: list[str] = Field(default_factory=lambda: list(KERNEL_TYPES))
    kernel_prob2: list[float] = Field(default_factory=lambda: list(KERNEL_PROBS))
    sinc_prob2: float = Field(0.1, ge=0, le=1)
    blur_sigma2: Range = (0.2, 1.5)
    betag_range2: Range = (0.5, 4.0)
    betap_range2: Range = (1.0, 2.0)
    resize_prob2: list[float] = Field(default_factory=lambda: [0.3, 0.4, 0.3])
    resize_range2: Range = (0.3, 1.2)
    gaussian_noise_prob2: float = Field(0.5, ge=0, le=1)
    noise_range2: Range = (1.0, 25.0)
    poisson_scale_range2: Range = (0.05, 2.5)
    gray_noise_prob2: float | None = Field(None, ge=0, le=1, description="As gray_noise_prob, second degradation")
    jpeg_range2: Range = (30.0, 95.0)
    final_sinc_prob: float = Field(0.8, ge=0, le=1)
    # placement: CPU actors sized separately from the trainers
    num_actors: int = Field(1, ge=1, description="Degradation actors (Ray Data actor pool size)")
    cpus_per_actor: float = Field(1.0, gt=0)
    shuffle_buffer: int = Field(180, ge=0, description="Training-pair pool: local shuffle buffer in samples")
    lq_quantization: Literal["source", "8bit"] = Field(
        "source", description="Grid of the LQ values: 'source' = the source's significant bits (a 12-bit CT trains on "
        "12-bit inputs, as inference feeds it; its JPEG steps add libjpeg's error without 8-bit rounding), '8bit' = "
        "Real-ESRGAN's round(x*255)/255 for every source. 8-bit sources degrade the same either way")
    bicubic: "BicubicConfig" = Field(default_factory=lambda: BicubicConfig(), description="Classic BI pairs (families with model.degradation: bicubic)")
    augment: "AugmentConfig" = Field(default_factory=lambda: AugmentConfig(), description="Augmentation of the HR crops (families with model.degradation: bicubic_augmented)")

    _ranges = field_validator(
        "blur_sigma", "betag_range", "betap_range", "resize_range", "noise_range", "poisson_scale_range",
        "jpeg_range", "blur_sigma2", "betag_range2", "betap_range2", "resize_range2", "noise_range2",
        "poisson_scale_range2", "jpeg_range2",
    )(_check_range)
    _probs = field_validator("kernel_prob", "kernel_prob2", "resize_prob", "resize_prob2")(_check_probs)

    @field_validator("kernel_list", "kernel_list2")
    @classmethod
    def _known_kernels(cls, v: list[str]) -> list[str]:
        unknown = [k for k in v if k not in KERNEL_TYPES]
        if unknown:
            raise ValueError(f"unknown kernel types {unknown} (known: {', '.join(KERNEL_TYPES)})")
        return v

    @field_validator("blur_kernel_size", "blur_kernel_size2")
    @classmethod
    def _odd_kernel(cls, v: int) -> int:
        if v < 3 or v % 2 == 0:
            raise ValueError(f"kernel size must be odd and >= 3, got {v}")
        return v

    @model_validator(mode="after")
    def _lists_match(self) -> "DegradationConfig":
        for names, probs in (("kernel_list", "kernel_prob"), ("kernel_list2", "kernel_prob2")):
            if len(getattr(self, names)) != len(getattr(self, probs)):
                raise ValueError(f"{names} and {probs} must have the same length")
        return self
