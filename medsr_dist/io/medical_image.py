"""The in-memory form of a medical image and how it was stored: :class:`MedicalImage`, :class:`ImageMeta`,
:class:`ImageProbe`, and the decode errors :class:`ImageDecodeError` / :class:`NotAnImageObject`.

Shared by every codec (``medsr_dist.io.raster`` for PNG/JPEG/TIFF, ``medsr_dist.io.dicom``) and by the format
dispatch in ``medsr_dist.io.image``, which re-exports them as part of its public API.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

FORMATS = ("png", "jpeg", "tiff", "dicom")
_PHOTOMETRICS = ("MONOCHROME1", "MONOCHROME2", "RGB", "RGBA")
_CHANNELS_FOR = {"MONOCHROME1": 1, "MONOCHROME2": 1, "RGB": 3, "RGBA": 4}
MAXVAL = {"uint8": 255, "uint16": 65535}  # stored value meaning 1.0 for PNG/JPEG/TIFF samples
_SIGNED_DTYPES = ("int8", "int16")  # DICOM PixelRepresentation=1 only


class ImageDecodeError(ValueError):
    """Bytes that cannot be decoded into a supported image. ``str()`` is ``"<name>: <reason>"``."""

    def __init__(self, name: str, reason: str):
        super().__init__(f"{name}: {reason}")
        self.name = name
        self.reason = reason

    def __reduce__(self):  # keep it picklable across Ray workers
        return (type(self), (self.name, self.reason))


class NotAnImageObject(ImageDecodeError):
    """A readable DICOM object that holds no image to enhance (SR, waveform, RT plan/dose/structure set,
    presentation state, segmentation, encapsulated document, ...): not an error of the file, a different kind
    of object. Callers give it its own status (the nightly job: ``ignored``) instead of counting it as an error.

    Attributes: ``name`` (file name or key), ``sop_class_uid`` ("" when the object has none), ``sop_class_name``
    (pydicom's name of the SOP class, or the UID itself when unknown, "unknown" when absent), ``reason``.
    ``str()`` is ``"<name>: not an image object (<sop_class_name>, SOP class <uid>): <detail>"``; it never holds
    patient identifiers. It is an ImageDecodeError (so a ValueError): code that only knows ImageDecodeError still
    refuses it cleanly — catch NotAnImageObject first where it must be told apart. Picklable.
    """

    def __init__(self, name: str, sop_class_uid: str, sop_class_name: str, detail: str = "not an image SOP class"):
        label = f"{sop_class_name}, SOP class {sop_class_uid}" if sop_class_uid else "no SOP class"
        super().__init__(name, f"not an image object ({label}): {detail}")
        self.sop_class_uid = sop_class_uid
        self.sop_class_name = sop_class_name
        self.detail = detail

    def __reduce__(self):
        return (type(self), (self.name, self.sop_class_uid, self.sop_class_name, self.detail))


@dataclass
class ImageMeta:
    """How an image was stored, so that a derived image can be written in the same form.

    format: "png" | "jpeg" | "tiff" | "dicom"; dtype: stored sample type "uint8" | "uint16", or for signed DICOM
    pixel data (PixelRepresentation=1: CT, some MR) "int8" | "int16"; bits_stored: significant bits (DICOM
    BitsStored; 8 or 16 elsewhere); channels: 1, 3 or 4 as decoded (colour DICOM of any photometric is RGB);
    photometric: "MONOCHROME1" (stored inverted: low value = bright) | "MONOCHROME2" | "RGB" | "RGBA";
    patient_id: DICOM PatientID, else None; text: text metadata of the file (PNG tEXt/zTXt/iTXt, TIFF
    ImageDescription — a JSON object there is unpacked into its keys —, JPEG COM); dicom: JSON-ready summary of
    the DICOM header (rescale slope/intercept, window centre/width lists, pixel spacing in mm [row, column],
    UIDs, modality, ...; see ``medsr_dist.io.dicom``), else None; frames: number of frames (DICOM
    NumberOfFrames; 1 for every other format) — pixels are (F, H, W, C) when frames > 1.

    Signed samples are mapped into [0, 1] by ``(value + offset) / maxval`` with ``offset = 2**(bits_stored-1)``,
    so ``rint(p * maxval) - offset`` recovers every stored value exactly (see :attr:`offset`).
    """

    format: str
    dtype: str
    bits_stored: int
    channels: int
    photometric: str
    patient_id: str | None = None
    text: dict[str, str] = field(default_factory=dict)
    dicom: dict[str, Any] | None = None
    frames: int = 1

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {self.format!r}")
        if self.dtype not in MAXVAL and not (self.dtype in _SIGNED_DTYPES and self.format == "dicom"):
            raise ValueError(f"dtype must be uint8 or uint16 (int8/int16 for DICOM only), got {self.dtype!r}")
        if self.photometric not in _PHOTOMETRICS:
            raise ValueError(f"photometric must be one of {_PHOTOMETRICS}, got {self.photometric!r}")
        if self.channels != _CHANNELS_FOR[self.photometric]:
            raise ValueError(f"{self.photometric} has {_CHANNELS_FOR[self.photometric]} channels, not {self.channels}")
        limit = 8 if self.dtype in ("uint8", "int8") else 16
        if not 1 <= self.bits_stored <= limit:
            raise ValueError(f"bits_stored {self.bits_stored} does not fit {self.dtype}")
        if isinstance(self.frames, bool) or not isinstance(self.frames, (int, np.integer)) or self.frames < 1:
            raise ValueError(f"frames must be a positive integer, got {self.frames!r}")
        self.frames = int(self.frames)  # a numpy count stays JSON-serialisable
        if self.frames > 1 and self.format != "dicom":
            raise ValueError(f"only DICOM images have several frames, not {self.format}")

    @property
    def signed(self) -> bool:
        """True for signed stored samples (DICOM PixelRepresentation=1)."""
        return self.dtype in _SIGNED_DTYPES

    @property
    def offset(self) -> int:
        """Added to a stored value before normalising: ``2**(bits_stored-1)`` when signed, else 0."""
        return 1 << (self.bits_stored - 1) if self.signed else 0

    @property
    def maxval(self) -> int:
        """The (offset) stored value that means 1.0: ``2**bits_stored - 1`` for DICOM, the dtype maximum
        otherwise. ``rint(p * maxval)`` is always in [0, maxval] <= 65535, so it fits uint16 for every form."""
        return (1 << self.bits_stored) - 1 if self.format == "dicom" else MAXVAL[self.dtype]

    def pixel_shape(self, height: int, width: int) -> tuple[int, ...]:
        """The ``MedicalImage.pixels`` shape of an image of this form: (H, W, C), or (F, H, W, C) if frames > 1."""
        return ((self.frames,) if self.frames > 1 else ()) + (height, width, self.channels)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ImageMeta:
        """Inverse of :meth:`to_json`; JSON written before a field existed gets that field's default."""
        return cls(**json.loads(text))


@dataclass(frozen=True)
class ImageProbe:
    """What an image's header says, read without decoding any pixel data (see :func:`probe_image`).

    format: as :data:`FORMATS`; height, width: pixels per frame as stored (JPEG EXIF orientation not applied);
    frames: DICOM NumberOfFrames, TIFF page count, else 1; channels: samples per pixel as ``decode_image`` will
    return them (PNG palette -> 3, grey+alpha -> 4, DICOM PALETTE COLOR / YBR -> 3); bits: bits per stored sample
    (DICOM BitsAllocated, PNG/TIFF bit depth, JPEG sample precision).
    """

    format: str
    height: int
    width: int
    frames: int
    channels: int
    bits: int

    @property
    def pixels(self) -> int:
        """Pixels of all frames together: frames * height * width."""
        return self.frames * self.height * self.width


@dataclass
class MedicalImage:
    """Display-ready pixels with the metadata needed to write a derived image in the source's form.

    pixels: float32 (H, W, C) — (F, H, W, C) with F = meta.frames when meta.frames > 1 —, C = meta.channels in
    {1, 3, 4}, range [0, 1], RGB(A) order, higher = brighter (MONOCHROME1 already inverted; signed samples offset
    as described in :class:`ImageMeta`). header: DICOM only — the source dataset without PixelData as Explicit VR
    Little Endian Part 10 bytes, for ``encode_image``; None for other formats.
    """

    pixels: np.ndarray
    meta: ImageMeta
    header: bytes | None = None

    def __post_init__(self) -> None:
        frames = self.meta.frames
        ok = self.pixels.dtype == np.float32 and self.pixels.shape[-1:] == (self.meta.channels,)
        ok = ok and (self.pixels.ndim == 3 if frames == 1 else (self.pixels.ndim == 4 and self.pixels.shape[0] == frames))
        if not ok:
            layout = f"(H, W, {self.meta.channels})" if frames == 1 else f"({frames}, H, W, {self.meta.channels})"
            raise ValueError(f"pixels must be float32 {layout}, got {self.pixels.dtype} {self.pixels.shape}")


