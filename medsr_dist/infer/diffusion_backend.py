"""The iterative-sampler :class:`~medsr_dist.infer.backends.Backend` of the latent diffusion family.

The one engine (:mod:`medsr_dist.infer.engine`) tiles, batches and blends as for every family; this backend
receives a batch of same-sized LR tiles (B, 3, h, w) in [0, 1] and runs the whole sampler on it: bicubic x4 +
VAE encoding of every tile, then ``steps`` denoising steps in which **all B x K samples share each U-Net call**
(tiles of many images batched together), then VAE decoding. Images larger than ``enhance.tile`` are cut by the
engine (``configs/ldm_cxr_x4.yaml`` sets the 64-px window the model was trained on) and cross-faded.

Determinism: sample k of a tile is seeded from (sha256 of that tile's float32 pixels, k, ``sampling.seed``)
(:mod:`medsr_dist.models.samplers`), so its noise does not depend on the batch it landed in. The arithmetic does
depend on the batch *size* by ~1e-6 (CPU kernels are chosen by batch size); a replica therefore pads every batch to
its fixed tile batch (:meth:`DiffusionBackend.prepare`), and a nightly re-run gives the same bits on the same
backend whatever shares the tile's batch (tests/test_ldm.py: a tile alone and among others, padded, bit for bit).

Uncertainty: with ``sampling.samples`` K > 1 the backend returns the mean of the K samples (or the first) and keeps
each tile's per-pixel standard deviation (over the K samples, per channel). :func:`enhance_with_uncertainty` runs
the engine once for the image and once more over the kept std tiles (no second sampling: the std view looks the
tiles up by content) so the std map is tiled and blended exactly like the image. It is a hallucination-risk
indicator: high where the samples disagree, i.e. where the LR input does not determine the output. Its limits: it
measures the model's own spread, not its error — a confidently wrong model (a systematic bias, an out-of-domain
input it maps confidently) shows a low std; K samples estimate the std with ~1/sqrt(2K) relative error; and blended
tile borders average two independent estimates.

Runtimes: ``torch`` (the export's networks) or ``onnxruntime`` (the U-Net and the VAE encoder/decoder exported by
``medsr export --format onnx``: ``<stem>.unet.onnx``, ``<stem>.vae_encoder.onnx``, ``<stem>.vae_decoder.onnx``
beside the export's ``model.onnx`` path; the sampler loop itself stays in Python).
"""
from __future__ import annotations

import io
import logging
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import numpy as np
import pydicom
import torch
from pydicom.uid import generate_uid

from medsr_dist.infer.backends import set_torch_threads, torch_precision
from medsr_dist.infer.engine import TileSpec, enhance_array
from medsr_dist.infer.model_file import ONNX_PARTS as ONNX_PARTS_OF_FAMILY
from medsr_dist.infer.model_file import onnx_part_uri
from medsr_dist.infer.registry import register_family_backend
from medsr_dist.io.dicom import encode_dicom
from medsr_dist.io.image import ImageMeta
from medsr_dist.models import samplers
from medsr_dist.models.ldm import LatentDiffusionSR, upsample_lr

if TYPE_CHECKING:
    from medsr_dist.infer.model_file import ModelFile

log = logging.getLogger(__name__)

ONNX_PARTS = ONNX_PARTS_OF_FAMILY["ldm"]


class _OrtParts:
    """ONNX Runtime sessions of the three exported networks, as torch callables (CPU tensors in and out)."""

    def __init__(self, blobs: dict[str, bytes], providers: list[str] | None = None, threads: int | None = None):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if threads:
            opts.intra_op_num_threads = threads
        self.providers = providers or ["CPUExecutionProvider"]
        self.sessions = {k: ort.InferenceSession(v, sess_options=opts, providers=self.providers) for k, v in blobs.items()}

    def _run(self, part: str, *arrays: np.ndarray) -> torch.Tensor:
        s = self.sessions[part]
        feeds = {i.name: a for i, a in zip(s.get_inputs(), arrays)}
        return torch.from_numpy(s.run(None, feeds)[0])

    def denoise(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self._run("unet", np.ascontiguousarray(x.numpy(), dtype=np.float32), t.numpy().astype(np.int64))

    def encode(self, lq01: torch.Tensor) -> torch.Tensor:
        return self._run("vae_encoder", np.ascontiguousarray(upsample_lr(lq01).numpy(), dtype=np.float32))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self._run("vae_decoder", np.ascontiguousarray(z.numpy(), dtype=np.float32))


class DiffusionBackend:
    """A :class:`~medsr_dist.infer.backends.Backend` running :class:`~medsr_dist.models.ldm.LatentDiffusionSR`.

    Attributes:
        scale: 4. size_multiple: LR sides must be multiples of this (VAE x U-Net downsampling / 4).
        samples, sampler, steps, seed: the sampling settings that run (the export's unless overridden).
        precision: what runs (torch rules of :func:`~medsr_dist.infer.backends.torch_precision`; ORT: fp32).
    """

    def __init__(self, module: LatentDiffusionSR, *, device: str | None = None, precision: str = "fp32",
                 samples: int | None = None, sampler: str | None = None, steps: int | None = None,
                 seed: int | None = None, ort_parts: _OrtParts | None = None, keep_std: bool = False):
        s = module.unet.sampling
        self.module = module.eval().requires_grad_(False)
        self.scale = module.scale
        self.size_multiple = module.size_multiple
        self.samples = samples or s.samples
        self.sampler = sampler or s.sampler
        self.steps = steps or s.steps
        self.seed = s.seed if seed is None else seed
        self.output = s.output
        self._ort = ort_parts
        if ort_parts is not None:
            self.device = torch.device("cpu")
            self.providers = ort_parts.providers
            self.precision = "fp32"
        else:
            self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
            self.precision = torch_precision(precision, self.device)
            dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[self.precision]
            self.module.to(self.device)
            self.module.unet.to(dtype)  # the U-Net runs reduced precision; VAE and sampler arithmetic stay fp32
            self._dtype = dtype
        #: std tiles of the last batches, keyed by tile content hash (filled when keep_std and samples > 1)
        self.keep_std = keep_std
        self._std: dict[bytes, np.ndarray] = {}
        #: every sampler call runs exactly this many tiles (padded), or as many as given when None (see prepare)
        self.fixed_batch: int | None = None

    @staticmethod
    def set_threads(threads: int) -> None:
        """Intra-op threads of this process's torch (the sampler's arithmetic; ORT sessions take OMP_NUM_THREADS)."""
        set_torch_threads(threads)

    def prepare(self, spec: TileSpec) -> None:
        """Called by :class:`~medsr_dist.infer.replica.ModelReplica` with its tiling: from now on every batch is
        padded to ``spec.batch_size`` tiles. CPU convolution kernels (oneDNN) are chosen by batch size, so a tile's
        float bits differ by ~1e-6 between batch sizes (measured: ~0.6 % of 16-bit output values move by one
        level); they do not depend on the other tiles of a batch of the same size. With a fixed batch the same
        tile gives the same bits in any run, whatever shares its batch. Cost: the last, partial batch of each
        call is computed in full."""
        self.fixed_batch = int(spec.batch_size)

    # ---- construction from an export ----
    @classmethod
    def from_model_file(cls, model: "ModelFile", storage, *, backend: str = "torch", device: str | None = None,
                        precision: str = "fp32", **overrides) -> "DiffusionBackend":
        """The backend of an ``ldm`` export; ``backend`` ``torch`` or ``onnxruntime`` (the ONNX parts must exist).

        Raises:
            ValueError: another backend name. FileNotFoundError: an ONNX part is missing (run ``medsr export``).
        """
        module = model.build(storage)
        if backend == "torch":
            return cls(module, device=device, precision=precision, **overrides)
        if backend == "onnxruntime":
            blobs = {}
            for part in ONNX_PARTS:
                uri = onnx_part_uri(model.onnx_uri, part)
                if not storage.exists(uri):
                    raise FileNotFoundError(f"{uri} does not exist: run `medsr export --format onnx` for {model.uri}")
                blobs[part] = storage.read_bytes(uri)
            return cls(module, ort_parts=_OrtParts(blobs), **overrides)
        raise ValueError(f"the ldm family runs on the torch or onnxruntime backend, not {backend!r}")

    # ---- the Backend contract ----
    def _denoise(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.module.unet(x.to(self._dtype), t).float()

    def sample(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(B, 3, h, w) float32 in [0, 1] -> (output (B, 3, 4h, 4w) in [0, 1], std (B, 3, 4h, 4w) or None for K=1)."""
        if batch.ndim != 4 or batch.shape[1] != 3:
            raise ValueError(f"expected a (B, 3, h, w) batch, got shape {batch.shape}")
        n = len(batch)
        if self.fixed_batch and n > self.fixed_batch:
            raise ValueError(f"batch of {n} tiles exceeds the fixed batch {self.fixed_batch} this backend was prepared for")
        if self.fixed_batch and n < self.fixed_batch:  # padding rows: copies of the last tile, discarded below
            batch = np.concatenate([batch, np.repeat(batch[-1:], self.fixed_batch - n, axis=0)])
        x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))
        contents = [samplers.content_hash(t) for t in x]
        with torch.inference_mode():
            if self._ort is not None:
                imgs = self.module.sample_images(x, samples=self.samples, sampler=self.sampler, steps=self.steps,
                                                 seed=self.seed, denoise=self._ort.denoise, encode=self._ort.encode,
                                                 decode=self._ort.decode, contents=contents)
            else:
                imgs = self.module.sample_images(x.to(self.device), samples=self.samples, sampler=self.sampler,
                                                 steps=self.steps, seed=self.seed, denoise=self._denoise,
                                                 contents=contents)
            imgs = imgs.float().clamp_(0, 1)
            out = imgs.mean(dim=1) if self.output == "mean" else imgs[:, 0]
            std = imgs.std(dim=1, unbiased=True) if self.samples > 1 else None
        out_np = np.ascontiguousarray(out[:n].cpu().numpy())
        std_np = None if std is None else np.ascontiguousarray(std[:n].cpu().numpy())
        contents = contents[:n]
        if self.keep_std and std_np is not None:
            for c, s in zip(contents, std_np):  # counted: identical tiles (black corners) are kept once per use
                entry = self._std.get(c)
                self._std[c] = [s, entry[1] + 1 if entry else 1]
        return out_np, std_np

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """See :meth:`Backend.__call__`."""
        return self.sample(batch)[0]

    def std_view(self) -> "_StdView":
        """A Backend answering each tile with its kept std (no sampling): the engine blends the std map with it."""
        return _StdView(self)

    def clear_std(self) -> None:
        self._std.clear()

    def __repr__(self) -> str:
        runtime = "onnxruntime" if self._ort is not None else f"torch {self.device}"
        return (f"DiffusionBackend({runtime}, {self.sampler} x{self.steps}, samples={self.samples}, seed={self.seed}, "
                f"precision={self.precision})")


@register_family_backend("ldm")
def ldm_backend(model: "ModelFile", backend: str, storage, *, device: str | None = None,
                precision: str = "fp32") -> DiffusionBackend:
    """The engine Backend of an ldm export (:meth:`DiffusionBackend.from_model_file`), whatever ``backend`` the
    configuration names (``torch`` or ``onnxruntime``)."""
    return DiffusionBackend.from_model_file(model, storage, backend=backend, device=device, precision=precision)


class _StdView:
    def __init__(self, parent: DiffusionBackend):
        self.parent = parent
        self.scale, self.size_multiple = parent.scale, parent.size_multiple

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """Each tile's kept std, consumed (an entry is dropped after as many look-ups as the sampler kept it)."""
        x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))
        kept, out = self.parent._std, []
        for t in x:
            c = samplers.content_hash(t)
            entry = kept.get(c)
            if entry is None:
                raise RuntimeError("std view asked for a tile the sampler has not run (tiling differs?)")
            out.append(entry[0])
            entry[1] -= 1
            if entry[1] <= 0:
                del kept[c]
        return np.stack(out)


def enhance_with_uncertainty(backend: DiffusionBackend, images: Iterable[np.ndarray], tile: TileSpec,
                             *, outscale: float | None = None) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    """Like :func:`medsr_dist.infer.engine.enhance_many`, also yielding each image's std map.

    Yields ``(output, std)`` per image in input order: output as the engine returns it ((H*4, W*4[, C]) float32
    in [0, 1]); std the same layout (float32, per-pixel standard deviation of the K samples in [0, 1] units, the
    mean over RGB for gray images), or None when ``backend.samples`` is 1. Memory: the std tiles of one image.
    """
    backend.keep_std = backend.samples > 1
    for image in images:
        backend.clear_std()
        out = enhance_array(backend, image, tile, outscale=outscale)
        std = enhance_array(backend.std_view(), image, tile, outscale=outscale) if backend.samples > 1 else None
        backend.clear_std()
        yield out, std


def samples_uncertainty(backend) -> bool:
    """Whether ``backend`` draws K > 1 samples per image, so that :func:`std_map` can follow each image."""
    return isinstance(backend, DiffusionBackend) and backend.samples > 1


def std_map(backend: DiffusionBackend, image: np.ndarray, tile: TileSpec, *,
            outscale: float | None = None) -> np.ndarray:
    """The per-pixel std map of an image ``backend`` has just enhanced with ``keep_std`` on (same ``tile`` and
    ``outscale``): its kept std tiles tiled and blended by the engine like the image, no sampling. Returns
    (H', W') float32, the image's output grid, in [0, 1] intensity units (the mean over channels for RGB).
    Consumes those tiles. Raises RuntimeError when a tile was not kept (another tiling)."""
    std = enhance_array(backend.std_view(), image, tile, outscale=outscale)
    return np.ascontiguousarray(std.mean(axis=2) if std.ndim == 3 else std, dtype=np.float32)


#: std maps are written as 16-bit images: 65535 = this std (a quarter of the intensity range; clipped above)
STD_FULL_SCALE = 0.25


def uncertainty_dicom(std16: np.ndarray, header: bytes, provenance: dict[str, str], *, scale: float,
                      samples: int, compression: str = "none") -> bytes:
    """The std map of a DICOM input as a derived object of **its own series** (not the enhanced image's).

    ``std16``: (F, H', W') uint16 of :func:`std_to_png16` (65535 = :data:`STD_FULL_SCALE`); ``header``: the source's
    ``MedicalImage.header``; ``provenance``: the enhanced image's. MONOCHROME2, BitsStored 16, no modality or VOI
    LUT of the source (RescaleSlope = full scale / 65535 in units of the intensity range, a window over the whole
    range); its own SeriesInstanceUID and SOPInstanceUID (deterministic from the source, model hash and parameters),
    SeriesDescription suffix ``[SR std]``, DerivationDescription saying what the values are. Study, patient and
    frame-of-reference modules are the source's, so a viewer shows it beside the enhanced series.
    """
    frames = std16.shape[0]
    meta = ImageMeta(format="dicom", dtype="uint16", bits_stored=16, channels=1, photometric="MONOCHROME2",
                     frames=frames)
    data = encode_dicom(std16[..., None], meta, header, scale=scale, provenance=provenance, compression=compression)
    ds = pydicom.dcmread(io.BytesIO(data))
    seed = [str(ds.SeriesInstanceUID), provenance.get("medsr:params", ""), "uncertainty"]
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=seed)
    ds.SOPInstanceUID = generate_uid(entropy_srcs=[*seed, str(ds.SOPInstanceUID)])
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    if "PlanarConfiguration" in ds:  # an RGB source's; the map has one sample per pixel
        del ds.PlanarConfiguration
    if "SeriesNumber" in ds:
        del ds.SeriesNumber  # the enhanced series' number is not this series'
    for keyword in ("RescaleIntercept", "RescaleSlope", "RescaleType", "WindowCenter", "WindowWidth",
                    "WindowCenterWidthExplanation", "VOILUTFunction", "ModalityLUTSequence", "VOILUTSequence",
                    "PresentationLUTShape"):
        if keyword in ds:
            delattr(ds, keyword)
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "0", f"{STD_FULL_SCALE / 65535:.6e}"[:16], "STD"
    ds.WindowCenter, ds.WindowWidth = "32768", "65536"
    ds.ImageType = ["DERIVED", "SECONDARY", "UNCERTAINTY"]
    base = str(ds.get("SeriesDescription", "") or "").strip()
    ds.SeriesDescription = (base[:52] + " [SR std]").strip()
    ds.DerivationDescription = (
        f"Per-pixel standard deviation of {samples} diffusion samples of the super-resolved image (a "
        f"hallucination-risk indicator: high where the input does not determine the output; not an error bar). "
        f"Stored value 65535 = a standard deviation of {STD_FULL_SCALE:g} of the intensity range. "
        f"{ds.get('DerivationDescription', '')}")[:1024]
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def uncertainty_p99(std: np.ndarray) -> float:
    """The 99th percentile of a std map (the manifest's ``uncertainty_p99``), in [0, 1] intensity units."""
    return float(np.percentile(std, 99))


def std_to_png16(std: np.ndarray, full_scale: float = STD_FULL_SCALE) -> np.ndarray:
    """A std map as a 16-bit image: 0 -> 0, ``full_scale`` (a quarter of the intensity range) and above -> 65535."""
    return np.round(np.clip(std / full_scale, 0, 1) * 65535).astype(np.uint16)
