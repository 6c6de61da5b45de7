"""``eval``: models scored under a paper's evaluation protocol."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_serializer, model_validator

from medsr_dist.config.base import Section
from medsr_dist.config.models import SamplingOverride
from medsr_dist.config.protocols import resolve_protocol_parameters


class EvalConfig(Section):
    """`medsr eval`: score models under a paper's evaluation protocol (see ``medsr_dist.eval.protocols``).

    Nested sections are defined inside this class so the evaluation adds one section to the tree.
    """

    class Model(Section):
        name: str = Field(..., min_length=1, description="Label of the model in tables and figures")
        source: str = Field(
            ..., min_length=1,
            description="'bicubic'; a model file (model.pth with meta.json beside it, or a plain BasicSR RRDBNet "
            "checkpoint such as RealESRGAN_x4plus.pth); or a zoo name (e.g. RealESRGAN_x4plus) found under eval.weights_dir "
            "or in the model zoo's cache (nothing is downloaded)",
        )
        baseline: bool = Field(False, description="Compare every model with the first baseline (default: the first model)")
        sampling: SamplingOverride | None = Field(
            None, description="ldm models: sampler/steps/samples/seed instead of the export's (list one model per "
            "sampler to compare them)")

    class Params(Section):
        """Overrides of the preset's parameters; a key left out keeps the preset's value (null is a value)."""

        scale: int | None = Field(None, ge=1, description="Super-resolution factor")
        source_size: int | None = Field(None, ge=1, description="Required side of the source images (null: any)")
        hr_size: int | None = Field(None, ge=1, description="Side of the ground truth (null: the source, modcropped)")
        hr_resize: Literal["none", "lanczos", "cubic", "area"] | None = Field(None, description="How the source becomes hr_size")
        lr_from: Literal["hr", "source", "paired", "no_reference"] | None = Field(
            None, description="Downsample the ground truth ('hr') or the source ('source'); 'paired': real low-resolution "
            "files in eval.lr_dataset, matched to the ground truth by name (stem) and scored as given; 'no_reference': "
            "eval.dataset holds low-resolution files without ground truth (scored by consistency and NIQE)")
        downsample: Literal["matlab", "opencv"] | None = Field(None, description="Bicubic kernel: MATLAB imresize (antialiased) or cv2 INTER_CUBIC")
        blur_sigma: float | None = Field(None, ge=0, description="Gaussian blur after downsampling (0: none)")
        test_y_channel: bool | None = Field(None, description="Metrics on the Y channel of RGB images")
        crop_border: int | None = Field(None, ge=0, description="Pixels ignored at each edge by the metrics")
        lr_quantization: Literal["source", "8bit", "none"] | None = Field(
            None, description="Round the model input like a real low-resolution file: 'source' (every preset) to the "
            "source's levels (255 / 4095 for 12-bit DICOM / 65535), '8bit' to 255 levels, 'none' keeps float")
        axis: Literal["axial", "coronal", "sagittal"] | None = Field(
            None, description="Volume protocols (mri-aniso-x*): the plane whose normal gets the thick slices")
        profile: Literal["gaussian", "box"] | None = Field(
            None, description="Volume protocols: slice profile of the simulated thick slices")
        profile_known: bool | None = Field(
            None, description="Volume protocols: false = 'profile unknown' mode: the consistency score uses the profile "
            "estimated from the thick input, and the report gives it beside the true one")
        fusion: Literal["mean", "fourier"] | None = Field(
            None, description="Volume protocols: fusion of the two refined orientations of the models")

        @model_serializer(mode="wrap")
        def _only_set(self, handler):
            # Only the keys given are overrides (null included): dump just those, so a dumped config
            # (shipped to Ray workers, or printed by `medsr config`) loads back to the same protocol.
            return {k: v for k, v in handler(self).items() if k in self.model_fields_set}

    class Lpips(Section):
        enabled: bool = True
        net: Literal["alex", "vgg", "squeeze"] = "alex"
        backbone: str = Field(
            "torchvision",
            description="ImageNet weights of the LPIPS backbone: 'torchvision' (the TORCH_HOME hub cache) or a "
            "path/URI of that file; when absent the LPIPS column says 'unavailable' and the report says why",
        )

    class Bootstrap(Section):
        samples: int = Field(10000, ge=100, description="Bootstrap resamples of the paired differences")
        confidence: float = Field(0.95, gt=0, lt=1)
        seed: int = 0

    protocol: str = Field("nih-x4", description="Preset: drive-x2, nih-x4, cxr14-ldm, bicubic-x2, bicubic-x3, bicubic-x4; "
                          "volumes (NIfTI): mri-aniso-x2, mri-aniso-x3, mri-aniso-x4")
    params: Params = Field(default_factory=Params)
    dataset: str | None = Field(None, description="Images prefix, or a prepared dataset when split is set (default: prepare.output)")
    lr_dataset: str | None = Field(
        None, description="eval.params.lr_from=paired: folder of the low-resolution files, each named like its ground "
        "truth in eval.dataset (same stem, any image extension), exactly 1/scale its size")
    split: str | None = Field("test", description="Split of a prepared dataset; null: dataset is a prefix of image files")
    include: list[str] = Field(default_factory=lambda: ["*"])
    exclude: list[str] = Field(default_factory=list)
    limit: int | None = Field(None, ge=1, description="Evaluate only the first N images (sorted by key)")
    output: str | None = Field(None, description="Report prefix (default: <run.root>/eval/<protocol>)")
    models: list[Model] = Field(default_factory=lambda: [EvalConfig.Model(name="bicubic", source="bicubic")])
    weights_dir: str | None = Field(None, description="Where zoo names are looked up as <name>/model.pth or <name>.pth (default: <run.root>/weights, then the torch hub cache); then the model zoo's cache")
    figures: int = Field(4, ge=0, description="Images shown as LR | bicubic | models | ground truth figures")
    figure_images: list[str] = Field(default_factory=list, description="Names of the figure images (default: the first ones)")
    crop_box: tuple[int, int, int, int] | None = Field(None, description="Magnified region [y, x, height, width] in ground-truth pixels; null: where models disagree most")
    zoom: int = Field(4, ge=1, description="Magnification of the region row")
    figure_panel: int = Field(512, ge=16, description="Largest side of a figure panel; larger images are drawn downscaled (the magnified row keeps full resolution)")
    lpips: Lpips = Field(default_factory=Lpips)
    bootstrap: Bootstrap = Field(default_factory=Bootstrap)
    backend: str = Field("torch", description="Inference backend: a name registered with medsr_dist.infer.backends "
                         "(torch, onnxruntime, ...), checked by medsr_dist.preflight before Ray starts")
    precision: Literal["fp32", "fp16", "bf16"] = "fp32"
    tile: int = Field(0, ge=0, description="Tile size in input pixels; 0: whole image")
    tile_overlap: int = Field(64, ge=0, description="Context pixels beyond each tile; 64 keeps RealESRGAN_x4plus "
                              "within 2/255 of its untiled output, 16 leaves seams of ~25/255 (docs/PERFORMANCE.md)")
    batch_size: int = Field(4, ge=1, description="Images per Ray Data batch (at most: the images are split evenly over "
                            "the replicas); tiles per model call are the backend's default, as enhance.batch_size's "
                            "(1 on CPU, 8 on a GPU)")
    replicas: int | Literal["auto"] = Field(
        "auto", description="Model replicas (actors holding every model; one GPU each when present); auto: from the "
        "Ray cluster as enhance.max_replicas (one per GPU; on CPU-only nodes the CPUs less 0.25 per score worker "
        "and 0.25 for the pair-making tasks)")
    cpus_per_replica: float | Literal["auto"] = Field(
        "auto", description="CPUs of a model replica without a GPU (its intra-op threads: ceil of this); auto: "
        "sized from the cluster with replicas; the report records the sizing that ran")
    score_workers: int = Field(1, ge=1, description="CPU actors computing metrics and figures")
    decode_timeout_s: float = Field(
        300.0, ge=0, description="Wall-time cap of one image file's decode, which runs in a child process (the last "
        "line of defence for codec faults no header check can foresee): past it the child is killed and the image "
        "is an error row for every model; 0 (or decode_memory_bytes 0): decode in the pair-making task, uncapped")
    decode_memory_bytes: int = Field(
        8 << 30, ge=0, description="Memory cap (address space the decode may add) of that child process; a decode "
        "that needs more is stopped the same way")

    @model_validator(mode="after")
    def _check(self) -> "EvalConfig":
        for key in ("replicas", "cpus_per_replica"):
            if getattr(self, key) != "auto" and getattr(self, key) <= 0:
                raise ValueError(f"{key} must be 'auto' or a positive number, got {getattr(self, key)}")
        # raises ValueError naming the bad parameter
        protocol = resolve_protocol_parameters(self.protocol, {k: getattr(self.params, k) for k in self.params.model_fields_set})
        lr_from = getattr(protocol, "lr_from", "hr")
        if lr_from in ("paired", "no_reference") and self.split is not None:
            raise ValueError(f"eval.params.lr_from={lr_from} reads a folder of image files: set eval.split=null")
        if lr_from == "paired" and not self.lr_dataset:
            raise ValueError("eval.params.lr_from=paired needs eval.lr_dataset (the folder of low-resolution files)")
        if lr_from != "paired" and self.lr_dataset:
            raise ValueError(f"eval.lr_dataset is only read with eval.params.lr_from=paired (lr_from is {lr_from})")
        names = [m.name for m in self.models]
        if not names and not hasattr(protocol, "fusion"):  # volume protocols always score their interpolations
            raise ValueError("eval.models is empty: list at least one model (e.g. {name: bicubic, source: bicubic})")
        if len(set(names)) != len(names):
            raise ValueError(f"eval.models: model names must be unique, got {names}")
        return self
