"""Admission of a request at the ingress: header probe and limits, before any pixel is decoded.

:func:`check_limits` probes the header and holds it against ``serve.max_input_pixels`` / ``max_output_pixels`` /
``max_input_bytes``. :class:`ProbePool` runs it in a few worker processes of the ingress, not on its event loop nor
in its threads: a file that is slow or costly to probe (a parser without a bound) holds neither the event loop nor
the GIL of the process answering every other request and ``/healthz``, its memory is capped (``RLIMIT_AS``), and
past ``serve.probe_timeout_s`` the workers are killed and replaced. No Ray, no torch here: the workers import only
this module and the image readers.
"""
from __future__ import annotations

import asyncio
import logging
import multiprocessing
import resource
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from medsr_dist.io.image import FORMATS, ImageDecodeError, NotAnImageObject, detect_format, probe_image
from medsr_dist.io.phi import phi_values, sanitize_reason

log = logging.getLogger(__name__)


class RequestError(Exception):
    """A request the model cannot serve, with the HTTP status it maps to (never raised across Serve)."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason

    def __reduce__(self):  # crosses the probe workers' process boundary
        return RequestError, (self.status, self.reason)


def decoded_bytes(probe) -> int:
    """Bytes of the decoded image: pixels x channels x bytes per sample (float32 as the engine works, or more for
    wider stored samples)."""
    return probe.pixels * max(1, probe.channels) * max(4, -(-int(probe.bits) // 8))


def check_limits(data: bytes, scale: float, limits: dict):
    """Probe the header (nothing decoded) and hold its dimensions against the pixel limits (``max_input_pixels``,
    ``max_output_pixels``) and, when given, the decoded size (``max_input_bytes``: pixels x channels x bytes per
    sample).

    Returns the :class:`~medsr_dist.io.image.ImageProbe`. Raises :class:`RequestError`: 415 for a format that is
    not an image format read here or a DICOM object without an image, 400 for an unreadable header (any exception
    of the probe: malformed is never a 503), 413 over a limit.
    """
    if detect_format(data) is None:
        raise RequestError(415, f"not a supported image file (supported: {', '.join(FORMATS)}; the format is read "
                                f"from the content)")
    try:
        probe = probe_image(data, "request")
    except NotAnImageObject as exc:
        raise RequestError(415, exc.reason) from None
    except ImageDecodeError as exc:
        if isinstance(exc.__cause__ or exc.__context__, MemoryError):  # a reader that wraps it: still out of memory
            raise RequestError(413, "probing the image header needs more memory than serve.probe_memory_mb; "
                                    "not decoded") from None
        raise RequestError(400, sanitize_reason(exc.reason, secrets=phi_values(data))) from None
    except MemoryError:
        raise RequestError(413, "probing the image header needs more memory than serve.probe_memory_mb; "
                                "not decoded") from None
    except (ValueError, TypeError, KeyError, IndexError, EOFError, OverflowError) as exc:
        # e.g. a DICOM header value the probe could not parse: the request can never succeed (400, never 503)
        raise RequestError(400, f"unreadable image header ({type(exc).__name__})") from None
    frames = f" x {probe.frames} frames" if probe.frames > 1 else ""
    if probe.pixels > limits["max_input_pixels"]:
        raise RequestError(413, f"{probe.height} x {probe.width}{frames} = {probe.pixels:,} pixels exceeds "
                                f"serve.max_input_pixels {limits['max_input_pixels']:,}; not decoded")
    decoded = decoded_bytes(probe)
    if "max_input_bytes" in limits and decoded > limits["max_input_bytes"]:
        raise RequestError(413, f"{probe.height} x {probe.width}{frames} x {probe.channels} channels decodes to "
                                f"{decoded:,} bytes, over serve.max_input_bytes {limits['max_input_bytes']:,}; "
                                f"not decoded")
    out_h, out_w = max(1, round(probe.height * scale)), max(1, round(probe.width * scale))
    if probe.frames * out_h * out_w > limits["max_output_pixels"]:
        raise RequestError(413, f"output at x{scale:g} would be {out_h} x {out_w}{frames} = "
                                f"{probe.frames * out_h * out_w:,} pixels, over serve.max_output_pixels "
                                f"{limits['max_output_pixels']:,}; not decoded")
    return probe


def _cap_memory(limit_bytes: int) -> None:
    """Probe worker initializer: its address space is capped, so a parser that inflates without bound fails there
    with MemoryError (a 413) instead of growing the ingress."""
    if limit_bytes > 0:
        resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, limit_bytes))


def _probe(data: bytes, scale: float, limits: dict) -> None:
    check_limits(data, scale, limits)  # the probe itself is not needed back: only its verdict


class ProbePool:
    """``workers`` probe processes (spawned, so that nothing of the Ray worker is forked) with ``memory_bytes`` of
    address space each.

    :meth:`check` answers None (admitted) or raises :class:`RequestError`: the probe's own (400/413/415), 422 past
    ``timeout_s`` (the workers are then killed and replaced: a probe that does not end is stopped) or when a worker
    died while probing (a parser crashed; a probe in flight when another one was stopped shares that answer).
    """

    def __init__(self, workers: int, memory_bytes: int):
        self.workers, self.memory_bytes = int(workers), int(memory_bytes)
        self._pool = self._start()

    def _start(self) -> ProcessPoolExecutor:
        pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_cap_memory, initargs=(self.memory_bytes,))
        for _ in range(self.workers):  # start them now, not on the first request
            pool.submit(int)
        return pool

    def _restart(self, pool: ProcessPoolExecutor) -> None:
        if pool is not self._pool:
            return  # another request restarted it already
        self._pool = self._start()
        for process in list(getattr(pool, "_processes", {}).values()):  # no public call stops a running task
            process.kill()
        pool.shutdown(wait=False, cancel_futures=True)

    async def check(self, data: bytes, scale: float, limits: dict, timeout_s: float | None) -> None:
        pool = self._pool
        try:
            await asyncio.wait_for(asyncio.wrap_future(pool.submit(_probe, data, scale, limits)), timeout_s)
        except asyncio.TimeoutError:
            log.warning("probe past serve.probe_timeout_s %ss: probe workers replaced", timeout_s)
            self._restart(pool)
            raise RequestError(422, f"the image header could not be read within serve.probe_timeout_s "
                                    f"{timeout_s}s; not decoded") from None
        except BrokenProcessPool:  # a worker died (a parser crashed, or another request's probe was stopped)
            self._restart(pool)
            raise RequestError(422, "the image header could not be probed (the probe process stopped); "
                                    "not decoded") from None

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
