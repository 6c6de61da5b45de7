"""The Real-ESRGAN model zoo: official pretrained weights by name, downloaded once into a local cache.

A zoo name (``RealESRGAN_x4plus``) stands for an official GitHub release file and its sha256. On first use the
file is downloaded (urllib, with a timeout) into a temporary file in the cache directory, its sha256 is checked,
and only then is it renamed into place, so the cache never holds a partial or unverified file under the real
name. Later uses read the cached file and check its sha256 again.

Cache directory: ``$MEDSR_CACHE`` when set, else ``~/.cache/medsr-dist/weights``. An air-gapped machine can be
seeded by copying the release files there under their release names (``RealESRGAN_x4plus.pth``): the digest is
checked the same way.

Entries whose sha256 could not be confirmed from independent sources carry ``sha256=None``: they are refused
unless the caller passes ``allow_unverified=True`` (CLI: ``medsr weights fetch NAME --allow-unverified``). That
explicit acceptance records the downloaded file's digest beside it (``<file>.sha256``); later uses are checked
against that recorded digest (trust on first use) instead of being refused.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from medsr_dist.models.weights_error import WeightsError

log = logging.getLogger(__name__)

CACHE_ENV = "MEDSR_CACHE"
DEFAULT_CACHE = Path("~/.cache/medsr-dist/weights")
DOWNLOAD_TIMEOUT_S = 60.0
_CHUNK = 1 << 20
_RELEASES = "https://github.com/xinntao/Real-ESRGAN/releases/download"


@dataclass(frozen=True)
class ZooEntry:
    """One pretrained network.

    Attributes:
        name: zoo name, also the cached file's stem (``<name>.pth``).
        url: where the file is downloaded from.
        sha256: hex digest of the whole file, or None when it could not be confirmed (see module docstring).
        size: file size in bytes when known (checked after download), else None.
        net: which network the weights are for: ``generator`` (RRDBNet) or ``discriminator`` (UNetDiscriminatorSN).
        scale: the generator's scale (RRDBNet num_feat 64, 23 blocks, grow 32); for a discriminator, the scale of
            the generator it was trained with.
        key: the checkpoint key holding the weights (BasicSR saves ``params_ema`` for G, ``params`` for D).
        description: one line for ``medsr weights list``.
    """

    name: str
    url: str
    sha256: str | None
    size: int | None
    net: Literal["generator", "discriminator"]
    scale: int
    key: str
    description: str

    @property
    def filename(self) -> str:
        return f"{self.name}.pth"


# sha256/size: the digests printed by many independent projects that pin these release files (e.g. the Arch
# Linux python-realesrgan PKGBUILD, ComfyUI/Stable-Diffusion model lists and download scripts). No digest for the
# netD file was found anywhere, so it stays unverified.
ZOO: dict[str, ZooEntry] = {
    e.name: e
    for e in (
        ZooEntry("RealESRGAN_x4plus", f"{_RELEASES}/v0.1.0/RealESRGAN_x4plus.pth",
                 "4fa0d38905f75ac06eb49a7951b426670021be3018265fd191d2125df9d682f1", 67_040_989,
                 "generator", 4, "params_ema", "Real-ESRGAN x4 generator (GAN-trained), v0.1.0"),
        ZooEntry("RealESRGAN_x4plus_netD", f"{_RELEASES}/v0.2.2.3/RealESRGAN_x4plus_netD.pth",
                 None, None,
                 "discriminator", 4, "params", "U-Net discriminator trained with RealESRGAN_x4plus, v0.2.2.3"),
        ZooEntry("RealESRNet_x4plus", f"{_RELEASES}/v0.1.1/RealESRNet_x4plus.pth",
                 "a820b9bde89a874d7599d545567308ce6c128fc8754a53208eda016d40aa81df", 67_040_989,
                 "generator", 4, "params_ema", "Real-ESRNet x4 generator (L1 only, before GAN training), v0.1.1"),
        ZooEntry("RealESRGAN_x2plus", f"{_RELEASES}/v0.2.1/RealESRGAN_x2plus.pth",
                 "49fafd45f8fd7aa8d31ab2a22d14d91b536c34494a5cfe31eb5d89c2fa266abb", 67_061_725,
                 "generator", 2, "params_ema", "Real-ESRGAN x2 generator (pixel-unshuffle), v0.2.1"),
    )
}


class ChecksumMismatch(WeightsError):
    """Downloaded or cached bytes do not have the expected sha256 (nothing was put into the cache)."""


class UnverifiedWeights(WeightsError):
    """A zoo entry has no known sha256 and the caller did not accept an unverified file."""


class DownloadError(WeightsError):
    """The download failed (network, HTTP status, timeout, truncated body)."""


ProgressFn = Callable[[int, int | None], None]
"""``progress(bytes_so_far, total_or_None)``, called after every chunk."""


def is_zoo_name(source: str) -> bool:
    return source in ZOO


def zoo_entry(name: str) -> ZooEntry:
    try:
        return ZOO[name]
    except KeyError:
        raise WeightsError(f"unknown model zoo name {name!r} (known: {', '.join(ZOO)})") from None


def cache_dir() -> Path:
    """``$MEDSR_CACHE`` or ``~/.cache/medsr-dist/weights`` (not created here)."""
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE).expanduser()


def cached_path(name: str, cache: str | os.PathLike | None = None) -> Path:
    """Where ``name`` lives (or will live) in the cache."""
    return Path(cache or cache_dir()) / zoo_entry(name).filename


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download(
    url: str,
    dest: str | os.PathLike,
    *,
    sha256: str | None,
    size: int | None = None,
    timeout: float = DOWNLOAD_TIMEOUT_S,
    progress: ProgressFn | None = None,
) -> str:
    """Download ``url`` to ``dest`` atomically; returns the file's sha256.

    The body streams into a temporary file beside ``dest`` while being hashed; it is renamed to ``dest`` only
    when the length (Content-Length and ``size`` when known) and ``sha256`` (when given) match. On any failure the
    temporary file is removed and ``dest`` is left as it was.

    Raises:
        DownloadError: network error, HTTP error status, timeout, or a body shorter/longer than announced.
        ChecksumMismatch: the body's sha256 is not ``sha256``.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    digest = hashlib.sha256()
    received = 0
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                request = urllib.request.Request(url, headers={"User-Agent": "medsr-dist"})
                with urllib.request.urlopen(request, timeout=timeout) as response:
                    announced = response.headers.get("Content-Length")
                    total = int(announced) if announced and announced.isdigit() else size
                    for chunk in iter(lambda: response.read(_CHUNK), b""):
                        out.write(chunk)
                        digest.update(chunk)
                        received += len(chunk)
                        if progress is not None:
                            progress(received, total)
            except (urllib.error.URLError, OSError, ValueError) as exc:  # HTTPError and timeouts are URLError/OSError
                raise DownloadError(f"download of {url} failed after {received} bytes: {exc}") from None
        if announced and announced.isdigit() and received != int(announced):
            raise DownloadError(f"download of {url} truncated: {received} of {announced} bytes")
        if size is not None and received != size:
            raise ChecksumMismatch(f"{url}: got {received} bytes, the zoo expects {size}")
        got = digest.hexdigest()
        if sha256 is not None and got != sha256.lower():
            raise ChecksumMismatch(f"{url}: sha256 {got} does not match the expected {sha256}; not cached")
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
        return got
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _pin_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def fetch(
    name: str,
    *,
    cache: str | os.PathLike | None = None,
    allow_unverified: bool = False,
    timeout: float = DOWNLOAD_TIMEOUT_S,
    progress: ProgressFn | None = None,
) -> Path:
    """Local path of zoo weights ``name``, downloading them into the cache on first use.

    A cached file is re-hashed on every call (about 0.2 s for 64 MiB); a cached file with the wrong digest is
    removed and downloaded again.

    Raises:
        WeightsError: unknown name.
        UnverifiedWeights: the entry has no known sha256, ``allow_unverified`` is False and no digest was recorded
            by an earlier explicit acceptance.
        DownloadError, ChecksumMismatch: see :func:`download`.
    """
    entry = zoo_entry(name)
    path = cached_path(name, cache)
    pin = _pin_path(path)
    expected = entry.sha256
    if expected is None and pin.is_file():
        expected = pin.read_text().split()[0]  # recorded when the file was accepted unverified
    if expected is None and not allow_unverified:
        raise UnverifiedWeights(
            f"{name}: no sha256 is known for {entry.url}, so medsr-dist will not use it unverified. "
            f"Accept it explicitly once with `medsr weights fetch {name} --allow-unverified` (records its "
            f"digest in {pin}), or pass allow_unverified=True, or give a local path / s3:// URI instead."
        )
    if path.is_file():
        got = file_sha256(path)
        if expected is None:
            log.warning("%s: accepting UNVERIFIED cached weights %s (sha256 %s); recorded in %s", name, path, got, pin)
            pin.write_text(f"{got}  {entry.filename}\n")
            return path
        if got == expected:
            return path
        log.warning("%s: cached %s has sha256 %s, expected %s; downloading again", name, path, got, expected)
        path.unlink()
    log.info("downloading %s from %s into %s", name, entry.url, path.parent)
    got = download(entry.url, path, sha256=expected, size=entry.size, timeout=timeout, progress=progress)
    if expected is None:
        log.warning("%s: downloaded UNVERIFIED weights (sha256 %s); recorded in %s", name, got, pin)
        pin.write_text(f"{got}  {entry.filename}\n")
    return path


def cache_state(name: str, cache: str | os.PathLike | None = None) -> str:
    """``missing``, ``cached`` (digest checked), ``cached (accepted unverified)`` or ``corrupt`` (wrong digest)."""
    entry = zoo_entry(name)
    path = cached_path(name, cache)
    if not path.is_file():
        return "missing"
    expected = entry.sha256
    if expected is None:
        pin = _pin_path(path)
        if not pin.is_file():
            return "cached (unverified, not accepted)"
        expected, label = pin.read_text().split()[0], "cached (accepted unverified)"
    else:
        label = "cached"
    return label if file_sha256(path) == expected else "corrupt"
