"""The last line of defence: :func:`decode_image` in a child process under a memory cap and a wall-time cap.

The header checks (:func:`~medsr_dist.io.image.probe_image`, the codestream checks) bound what an honest-looking
header can ask for; a codec bug on a frame whose header is honest is not pre-checkable. Here such a decode kills
one child process — an :class:`DecodeKilled` (an ImageDecodeError) for the caller to record — never the task's
own process, its node, or the night.

The children are forked by a ``forkserver`` that has imported the codecs once (a fork from a clean, single-threaded
server; the calling process may run threads, as a Ray worker does). What it costs per decode — start a child, send
the file, hand the pixels back through shared memory — is measured by ``jobs/bench_hostile.py --bounded-cost`` (docs/RELIABILITY.md).
"""
from __future__ import annotations

import multiprocessing
import os
import resource
import threading
from multiprocessing import resource_tracker
from multiprocessing.shared_memory import SharedMemory

import numpy as np

from medsr_dist.io.dicom import MAX_INFLATED_BYTES
from medsr_dist.io.image import decode_image
from medsr_dist.io.medical_image import ImageDecodeError, MedicalImage

__all__ = ["DecodeKilled", "decode_image_bounded", "decode_image_capped"]

_context_lock = threading.Lock()
_context = None


class DecodeKilled(ImageDecodeError):
    """The decode ran past its memory or time cap (or crashed the child) and was stopped. ``str()`` names the
    cap; ``cap`` says which: ``"memory"``, ``"time"`` or ``"crash"`` (Serve answers 413 for memory, 422 else);
    picklable."""

    def __init__(self, name: str, reason: str, cap: str = "crash"):
        super().__init__(name, reason)
        self.cap = cap

    def __reduce__(self):
        return type(self), (self.name, self.reason, self.cap)


def _forkserver():
    global _context
    with _context_lock:
        if _context is None:
            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload(["medsr_dist.io.image"])
            _context = context
        return _context


def _vm_size() -> int:
    """This process's virtual size in bytes (RLIMIT_AS counts from there)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


def _child(connection, data: bytes, name: str, memory_bytes: int, max_inflated_bytes: int) -> None:
    limit = _vm_size() + memory_bytes
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    try:
        result = ("ok", decode_image(data, name, max_inflated_bytes=max_inflated_bytes))
    except MemoryError:
        result = ("memory", None)
    except ImageDecodeError as exc:
        cause = exc.__cause__
        # OpenCV and the plugins report a failed allocation in their own exception types ("Insufficient memory",
        # "Failed to allocate"): under the cap, that is the cap speaking (the text is read here, never passed on)
        if cause is not None and any(w in str(cause).lower() for w in ("memory", "allocat")):
            result = ("memory", None)
        else:
            result = ("error", exc)
    if result[0] == "ok":  # the pixels go through shared memory (a pickle through the pipe costs ~3x more)
        image = result[1]
        try:
            block = SharedMemory(create=True, size=max(image.pixels.nbytes, 1))
        except (MemoryError, OSError):
            result = ("memory", None)
        else:
            resource_tracker.unregister(block._name, "shared_memory")  # the parent unlinks it, not our exit
            np.ndarray(image.pixels.shape, image.pixels.dtype, buffer=block.buf)[...] = image.pixels
            result = ("shared", (block.name, image.pixels.shape, str(image.pixels.dtype), image.meta, image.header))
            block.close()
    connection.send(result)
    connection.close()


def _take_shared(name: str, shape, dtype: str) -> np.ndarray:
    """The pixels the child left in shared memory ``name``, copied out; the block is unlinked."""
    block = SharedMemory(name=name)
    try:
        return np.array(np.ndarray(shape, dtype, buffer=block.buf))
    finally:
        block.close()
        block.unlink()


def decode_image_bounded(data: bytes, name: str, *, memory_bytes: int, seconds: float,
                         max_inflated_bytes: int = MAX_INFLATED_BYTES) -> MedicalImage:
    """:func:`~medsr_dist.io.image.decode_image` of ``data`` in a child process whose address space may grow by
    at most ``memory_bytes`` (RLIMIT_AS over its size at start) and that is killed after ``seconds``.

    Raises ImageDecodeError as ``decode_image`` does, and :class:`DecodeKilled` when the child ran out of its
    memory, its time, or died (a crash in a codec), naming which. The result is the same as ``decode_image``'s;
    its pixels come back through shared memory (two copies: into the block, out of it)."""
    context = _forkserver()
    receiver, sender = context.Pipe(duplex=False)
    child = context.Process(target=_child, args=(sender, data, name, memory_bytes, max_inflated_bytes), daemon=True)
    child.start()
    sender.close()
    try:
        if not receiver.poll(seconds):
            raise DecodeKilled(name, f"decoding took longer than {seconds:g} s; stopped", "time")
        try:
            status, value = receiver.recv()
        except EOFError:
            child.join(5)
            raise DecodeKilled(name, f"the decoder process died (exit code {child.exitcode})", "crash") from None
    finally:
        if child.is_alive():
            child.kill()
        child.join(5)
        receiver.close()
    if status == "memory":
        raise DecodeKilled(name, f"decoding needed more than {memory_bytes:,} bytes; stopped", "memory")
    if status == "error":
        raise value
    block, shape, dtype, meta, header = value
    return MedicalImage(pixels=_take_shared(block, shape, dtype), meta=meta, header=header)


def decode_image_capped(data: bytes, name: str, *, memory_bytes: int, seconds: float,
                        max_inflated_bytes: int = MAX_INFLATED_BYTES) -> MedicalImage:
    """The one decode call of every entry point (nightly read stage, ``prepare``, Serve's replica, ``eval``): in a
    capped child (:func:`decode_image_bounded`) when both ``memory_bytes`` and ``seconds`` are > 0, else
    :func:`~medsr_dist.io.image.decode_image` in this process (a ``0`` key: uncapped, e.g. where a per-item
    process start would cost more than the item)."""
    if memory_bytes > 0 and seconds > 0:
        return decode_image_bounded(data, name, memory_bytes=memory_bytes, seconds=seconds,
                                    max_inflated_bytes=max_inflated_bytes)
    return decode_image(data, name, max_inflated_bytes=max_inflated_bytes)
