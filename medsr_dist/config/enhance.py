"""``enhance``: the nightly batch job (2-D images and volume items)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from medsr_dist.config.base import Section
from medsr_dist.config.models import SamplingOverride
from medsr_dist.uris import Endpoint, is_dicomweb


class EnhanceVolumesConfig(Section):
    """Volume items of the nightly job (medsr_dist/enhance/volumes.py): NIfTI files and DICOM series folders are
    reconstructed to isotropic by the cross-plane method (``mri.factor``, ``mri.fusion``, ``mri.profile``)."""

    enabled: bool = Field(True, description="Treat .nii/.nii.gz inputs and series folders as volumes (off: they go "
                          "the 2-D way, where NIfTI files are error rows)")
    checkpoint: str | None = Field(None, description="Scale-1 through-plane model (medsr mri prepare + train, or "
                                   "self-sr's export); empty: enhance.checkpoint when that is scale 1, else volume "
                                   "items are error rows saying so")
    series_folders: list[str] = Field(
        default_factory=list, description="Glob patterns (relative to enhance.input, e.g. 'mri/*/*') of folders that "
        "each hold the single-frame slices of ONE DICOM series: every file directly in such a folder is part of that "
        "folder's volume item (decided at listing time, no file read); other DICOM files stay 2-D items")


class EnhanceConfig(Section):
    input: str | None = Field(None, description="Archive prefix to enhance (default: sample.holdout)")
    output: str | None = Field(None, description="Output prefix (default: <run.root>/enhanced)")
    checkpoint: str | None = Field(None, description="Model file (default: <train.output>/export/model.pth)")
    include: list[str] = Field(default_factory=lambda: ["*"])
    exclude: list[str] = Field(default_factory=list)
    backend: str = Field("auto", description="Inference backend: auto (chosen per model and hardware before outputs "
                         "are keyed: GPU replicas torch; CPU replicas onnxruntime when the model's ONNX export exists, "
                         "else torch; the choice and its reason are logged and in the run's metadata) or a name "
                         "registered with medsr_dist.infer.backends (torch, onnxruntime, compiled), checked by "
                         "medsr_dist.preflight before Ray starts")
    precision: Literal["fp32", "fp16", "bf16"] = Field(
        "fp32", description="fp16: GPU only (CPU replicas run fp32), up to 1.24/255 of the range off fp32 (~20 stored "
        "values at 12 bits, ~320 at 16); bf16: GPU or a CPU with bf16 hardware, ~2x there but 8-18/255 off fp32 "
        "(130-290 at 12 bits; docs/PERFORMANCE.md). Applies to every input: keep fp32 for archives above 8 bits. "
        "Outputs record the precision that ran")
    tile: int = Field(0, ge=0, description="Tile size in input pixels; 0: whole image")
    tile_overlap: int = Field(64, ge=0, description="Context pixels beyond each tile; 64 keeps RealESRGAN_x4plus "
                              "within 2/255 of its untiled output, 16 leaves seams of ~25/255 (docs/PERFORMANCE.md)")
    batch_size: int | None = Field(
        None, ge=1, description="Tiles per model call; empty: 1 on CPU (fastest there), 8 on a GPU"
    )
    tile_blend: int = Field(4, ge=0, description="Half-width of the cross-fade between neighbouring tiles (0: hard crop)")
    images_per_batch: int = Field(
        4, ge=1, description="Images handed to a model replica at once, at most (a pass splits its items evenly over "
        "its replicas: 12 items on 2 replicas go as 4 batches of 3); tiles of same-sized images share model calls"
    )
    outscale: float | None = Field(None, gt=0, description="Final scale (Lanczos after the model); empty: model scale")
    onnx_model: str | None = Field(None, description="ONNX export for backend onnxruntime (default: model.onnx beside checkpoint)")
    min_replicas: int | Literal["auto"] = Field(
        "auto", description="Model replicas the pass waits for before reading (replica_start_timeout_s); auto: "
        "max_replicas, or on a shared cluster the replicas that fit in the resources free at the start (at least "
        "1; the pool grows to max_replicas). With replicas serve:<app>: the job's client actors (auto: 1)")
    max_replicas: int | Literal["auto"] = Field(
        "auto", description="Model replicas at most; auto: from the Ray cluster at plan time (medsr_dist/runtime.py "
        "size_replicas): one per GPU on GPU clusters; on CPU-only nodes one single-threaded replica per CPU (fewer, "
        "with more threads, where the node's memory holds fewer replicas of 3 GiB) sharing the node's CPUs less 0.5 "
        "for decode/encode (a 2-CPU node: two replicas of 0.75 CPU and 1 thread)")
    cpus_per_replica: float | Literal["auto"] = Field(
        "auto", description="CPUs of a model replica when it has no GPU; its torch/onnxruntime intra-op threads are "
        "ceil(this) when set; auto: sized from the cluster with max_replicas (see there). Run logs and manifests record the "
        "sizing that ran")
    replica_start_timeout_s: int = Field(
        600, ge=0, description="Seconds a pass waits for its min_replicas model replicas to start before it reads any "
        "item (Ray Data's wait_for_min_actors_s; on CPU-only nodes the decode/encode tasks would otherwise take the "
        "CPUs a pending replica needs and the pass would run on fewer); the run fails naming enhance.min_replicas "
        "if they do not start in time; 0: do not wait")
    replicas: str = Field(
        "local", pattern=r"^(local|serve:.+)$", description="Where the model runs: 'local' (the job's own actor pool "
        "of min_replicas..max_replicas) or 'serve:<app>' (the model deployment of a running Serve application "
        "serving the same model file, by sha256, through a DeploymentHandle: one GPU pool for on-demand and batch "
        "work; tile, backend and precision must equal the app's; min/max_replicas then count the job's client "
        "actors, each keeping images_per_batch images in flight)")
    fail_on_error: bool = False
    consistency_threshold_db: float = Field(
        30.0, description="Rows whose consistency PSNR (output degraded back vs input) is below this are flagged for review"
    )
    report_images: int = Field(2, ge=0, description="Side-by-side figures in the report (hold-out ground truth needed)")
    max_input_pixels: int = Field(
        100_000_000, ge=1, description="Largest input (height x width x frames) read from its header before decoding; "
        "larger ones are refused unread (error row). The default fits a 4k x 5k mammogram with room to spare")
    max_output_pixels: int = Field(
        400_000_000, ge=1, description="Largest output (height x width x frames after outscale); 4k x 5k at x4 is "
        "320 M. The replica's float32 RGB canvas is 12 bytes per output pixel")
    max_input_bytes: int = Field(
        1 << 30, ge=1, description="Largest input file in bytes, checked from the listing's size before it is read "
        "(and from the bytes read where the listing has no size, e.g. PACS): larger ones are error rows naming this "
        "key. Also the most a Deflated DICOM body may inflate to (an inflated body is no bigger than an uncompressed "
        "file that would be accepted). 1 GiB holds an uncompressed 100 M-pixel RGB 16-bit object (max_input_pixels)")
    decode_timeout_s: float = Field(
        300.0, ge=0, description="Wall-time cap of one input's decode, which runs in a child process (the last line "
        "of defence for codec faults no header check can foresee): past it the child is killed and the item is an "
        "error row, counted like a replica crash towards max_attempts; 0 (or decode_memory_bytes 0): decode in the "
        "read task itself, uncapped. Costs ~80 ms per item plus one copy of the pixels (docs/RELIABILITY.md)")
    decode_memory_bytes: int = Field(
        8 << 30, ge=0, description="Memory cap (address space the decode may add) of that child process; a decode "
        "that needs more is stopped the same way. 8 GiB holds a 100 M-pixel RGB decode (max_input_pixels) with room")
    max_attempts: int = Field(
        3, ge=1, description="Runs in which an input may kill its model replica or its decode (crash, out of memory, "
        "decode_timeout_s) before it is "
        "'quarantined' and no longer tried (until its content changes)")
    lease_ttl_s: float = Field(
        600.0, gt=0, description="One run per output prefix: a run's lease (_manifest/lease.json), refreshed every "
        "third of this, may be taken over by another run once it is this old")
    sampling: SamplingOverride = Field(
        default_factory=SamplingOverride, description="ldm models: sampler, steps, samples K, output (mean | first), "
        "seed instead of the export's model.sampling; part of every output's key and provenance")
    uncertainty_threshold: float | None = Field(
        0.05, ge=0, description="ldm with K > 1 samples: rows whose uncertainty_p99 (99th percentile of the per-pixel "
        "std map, in units of the intensity range) exceeds this are flagged for review; empty: never flagged for it")
    follow_symlinks: Literal["never", "within_root"] = Field(
        "never", description="Symbolic links under a local enhance.input: 'never' (each link is an error row saying "
        "so, nothing behind it is read) or 'within_root' (a link is followed when its real path stays under the "
        "input's real path; links leading out, dangling or looping are error rows). A link loop never fails the "
        "listing. Writes never follow a link out of enhance.output / enhance.manifest (refused, naming the key)")
    provenance_source: Literal["item_id", "key"] = Field(
        "item_id", description="What an output's embedded provenance names its input by: 'item_id' (the opaque id "
        "the manifest maps back to the key, under the manifest's access control) or 'key' (the input key itself; "
        "keys often hold names or accession numbers, and outputs travel further than manifests)")
    log_keys: bool = Field(False, description="Name input keys in job logs (keys often embed accession numbers); "
                           "off: logs name items by item id. Manifests always keep keys")
    dicom_compression: Literal["none", "rle", "jpeg2000-lossless"] = Field(
        "none", description="Transfer syntax of derived DICOM objects: none (Explicit VR Little Endian), rle (RLE "
        "Lossless) or jpeg2000-lossless (JPEG 2000 Lossless Only); every stored value is kept, never lossy")
    volumes: EnhanceVolumesConfig = Field(default_factory=EnhanceVolumesConfig,
                                          description="NIfTI volumes and DICOM series as items (3-D MRI)")
    manifest: str | None = Field(
        None, description="Where manifests, item records, the run lease and the PACS watermark live (a local path or "
        "object-store prefix; default: enhance.output). Required when enhance.output is a DICOMweb endpoint "
        "(dicomweb+http(s)://host:port/<root>; pacs section), since a PACS holds DICOM objects only",
        validate_default=True)

    @model_validator(mode="after")
    def _replicas(self) -> "EnhanceConfig":
        for key in ("min_replicas", "max_replicas", "cpus_per_replica"):
            value = getattr(self, key)
            if value != "auto" and value <= 0:
                raise ValueError(f"{key} must be 'auto' or a positive number, got {value}")
        if "auto" not in (self.min_replicas, self.max_replicas) and self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) exceeds max_replicas ({self.max_replicas})")
        return self

    @field_validator("input", "output")
    @classmethod
    def _endpoint(cls, v: str | None) -> str | None:
        """A DICOMweb endpoint is well formed: no credentials or query in it, its root rather than one instance."""
        if is_dicomweb(v):
            _, ref = Endpoint.parse(v)
            if ref is not None:
                raise ValueError("name the DICOMweb endpoint (its root), not one instance")
        return v

    @field_validator("manifest")
    @classmethod
    def _manifest(cls, v: str | None, info: ValidationInfo) -> str | None:
        if is_dicomweb(v):
            raise ValueError("must be a local path or an object-store prefix, not a DICOMweb endpoint")
        if is_dicomweb(info.data.get("output")) and not v:
            raise ValueError("required when enhance.output is a DICOMweb endpoint (the manifest, item records and the "
                             "run's lease cannot live in a PACS): give a local path or s3:// prefix")
        return v
