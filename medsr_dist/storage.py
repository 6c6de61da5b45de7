# Long module: every whole-file operation, local listing rules (links), write confinement and leases share one
# set of local/object-store semantics; splitting them would scatter that contract.
"""One way to read and write files whether they live on local disk or in S3-compatible object storage.

Every path in medsr-dist may be a local path (``data/scans``, ``/mnt/x``), a ``file://`` URI or an
``s3://bucket/prefix`` URI (how they are spelled and compared: :mod:`medsr_dist.uris`). :class:`Storage` hides
the difference behind a handful of whole-file operations (read, atomic write, list, delete) built on fsspec/s3fs,
and hands out pyarrow filesystems for Ray Data.

S3 credentials are never passed in code: s3fs/botocore find them in the standard places (``AWS_ACCESS_KEY_ID``
and friends, ``~/.aws/credentials``, ``~/.aws/config``, instance roles). :class:`~medsr_dist.config.StorageConfig`
only says *where* storage is (endpoint, region) and *how* to pick credentials (profile, anonymous).

A :class:`Storage` is cheap to pickle: it ships only its config to Ray tasks and actors and builds its
filesystem clients lazily in each process.
"""
from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import logging
import os
import posixpath
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

import fsspec
import pyarrow.fs
from fsspec.implementations.local import LocalFileSystem

from medsr_dist.config import StorageConfig
from medsr_dist.uris import LOCAL, S3, PathLike, StorageError, glob_match, is_remote, join, split_uri


# Local atomic writes go to ``.<name>.<random><suffix>`` beside the target and are renamed into place;
# list_files recognises and skips these in-flight files by this suffix.
PARTIAL_SUFFIX = ".medsr-partial"

# Mode of every local file Storage creates (outputs, manifests, item records, leases, lock files, prepared data's
# index): owner read/write, group read, nothing for others — whatever the process umask (set with fchmod on the
# open file, before it gets its name). Object stores have no modes: their access control is the bucket's policy.
FILE_MODE = 0o640

# How a local listing treats symbolic links (enhance.follow_symlinks): "never" lists each link as refused (a
# FileEntry with ``refused`` set) and follows none; "within_root" follows a link whose real path stays under the
# listing's root (its real path), and refuses the others.
FOLLOW_SYMLINKS = ("never", "within_root")


@dataclass(frozen=True)
class FileEntry:
    """One listed file: ``uri`` spelled like the listing prefix, ``size`` in bytes, and ``version``: what changes
    whenever the content may have changed without a read — ``etag:<ETag>`` on S3, ``mtime_ns:<st_mtime_ns>:<inode>``
    locally (an atomic replace makes a new inode even within one mtime tick)."""

    uri: str
    size: int
    version: str
    refused: str = ""  # why a local listing refused this path (a symbolic link it does not follow); never read


@functools.cache
def _backend_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean 'the storage said no' (as opposed to bugs in the caller)."""
    errors: list[type[BaseException]] = [OSError]
    with contextlib.suppress(ImportError):
        import botocore.exceptions

        errors += [botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError]
    return tuple(errors)


def _describe(exc: BaseException, uri: str) -> str:
    text = str(exc)
    if isinstance(exc, FileNotFoundError):
        if "bucket" in text.lower():
            bucket = split_uri(uri)[1].split("/", 1)[0] if is_remote(uri) else "?"
            return f"no such bucket {bucket!r}"
        return "no such file or object"
    if isinstance(exc, PermissionError):
        return f"permission denied ({text})"
    if isinstance(exc, IsADirectoryError):
        return "is a directory, not a file"
    return f"{type(exc).__name__}: {text}"


@contextlib.contextmanager
def _errors(uri: PathLike, action: str) -> Iterator[None]:
    """Re-raise backend failures as StorageError('cannot <action> <uri>: <reason>')."""
    try:
        yield
    except StorageError:
        raise
    except _backend_errors() as exc:
        uri = os.fspath(uri)
        raise StorageError(f"cannot {action} {uri}: {_describe(exc, uri)}") from exc


def _is_partial(path: str) -> bool:
    name = posixpath.basename(path)
    return name.startswith(".") and name.endswith(PARTIAL_SUFFIX)


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _confine(path: str, roots: dict[str, str]) -> None:
    """Refuse a local write whose folder resolves outside the write root it lies under (:meth:`Storage.confine_writes`:
    a job's ``enhance.output`` / ``enhance.manifest``): a symbolic link to a folder elsewhere, placed inside the prefix, must
    not carry outputs out of it. Checked before any folder is created (the deepest existing ancestor) and again
    once the folder exists. Paths under no root, and jobs that set no roots, are not checked."""
    directory = os.path.dirname(path)
    for root, key in roots.items():
        if not _under(directory, root):
            continue
        real_root = os.path.realpath(root)
        existing = directory
        while not os.path.lexists(existing) and existing != os.path.dirname(existing):
            existing = os.path.dirname(existing)
        resolved = os.path.join(os.path.realpath(existing), os.path.relpath(directory, existing))
        if not _under(os.path.normpath(resolved), real_root):
            # the path is not named: below the prefix it mirrors an input key (names, accession numbers)
            raise StorageError(f"cannot write under {key} {root}: the output's folder resolves outside it (a symbolic "
                               f"link inside the prefix leads elsewhere); refused: writes stay under {key}")


def _create_local(directory: str, name: str, data: bytes, roots: dict[str, str]) -> str:
    """A complete, fsynced temp file ``.<name>.<random>.medsr-partial`` in ``directory`` with mode FILE_MODE."""
    _confine(os.path.join(directory, name), roots)
    os.makedirs(directory, exist_ok=True)
    _confine(os.path.join(directory, name), roots)  # a folder swapped for a link while it was created
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=PARTIAL_SUFFIX, dir=directory)
    try:
        os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return tmp


def _write_local_atomic(path: str, data: bytes, roots: dict[str, str] | None = None) -> None:
    """Write to a temp file in the target's folder, fsync, then os.replace: readers see old or new, never
    a partial file; on any failure the temp file is removed and the old content is untouched. The file has mode
    FILE_MODE; a link at ``path`` itself is replaced, never written through."""
    directory, name = os.path.split(path)
    tmp = _create_local(directory, name, data, roots or {})
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


class Storage:
    """Whole-file access to local paths, ``file://`` and ``s3://`` URIs.

    Every method takes a URI (str or os.PathLike) and raises :class:`StorageError` naming it when the
    storage refuses (missing file/key, missing bucket, permission, bad credentials, unsupported scheme).
    Picklable: only the config travels, filesystem clients are rebuilt lazily where they are used.
    """

    def __init__(self, config: StorageConfig | None = None):
        self.config = config if config is not None else StorageConfig()
        self._lock = threading.Lock()
        self._filesystems: dict[str, fsspec.AbstractFileSystem] = {}
        self._pid = os.getpid()

    # -- pickling: ship the config, not the clients (s3fs holds an event loop and connections) --------
    def __getstate__(self) -> dict[str, Any]:
        return {"config": self.config}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["config"])

    def __repr__(self) -> str:
        return f"Storage({self.config!r})"

    # -- filesystems ------------------------------------------------------------------------------------
    def _filesystem(self, backend: str) -> fsspec.AbstractFileSystem:
        with self._lock:
            if self._pid != os.getpid():  # a forked child must not reuse the parent's s3 event loop
                self._filesystems, self._pid = {}, os.getpid()
            if backend not in self._filesystems:
                self._filesystems[backend] = self._build(backend)
            return self._filesystems[backend]

    def _build(self, backend: str) -> fsspec.AbstractFileSystem:
        if backend == LOCAL:
            return LocalFileSystem(auto_mkdir=True)
        import s3fs

        cfg = self.config
        kwargs: dict[str, Any] = {
            "anon": cfg.anon,
            # Other processes (Ray workers) write under the same prefixes: never answer from a stale
            # listing cache, and never share a cached client with unrelated code in this process.
            "use_listings_cache": False,
            "skip_instance_cache": True,
        }
        if cfg.endpoint_url:
            kwargs["endpoint_url"] = cfg.endpoint_url
        if cfg.profile:
            kwargs["profile"] = cfg.profile
        if cfg.region:
            kwargs["client_kwargs"] = {"region_name": cfg.region}
        return s3fs.S3FileSystem(**kwargs)

    def fs(self, uri: PathLike) -> tuple[fsspec.AbstractFileSystem, str]:
        """The fsspec filesystem for ``uri`` and the path to give it (absolute local path, or ``bucket/key``)."""
        backend, path = split_uri(uri)
        return self._filesystem(backend), path

    def pyarrow_fs(self, uri: PathLike) -> tuple[pyarrow.fs.FileSystem, str]:
        """A pyarrow filesystem and path for ``uri``, e.g. for ``ray.data.read_parquet(path, filesystem=fs)``.

        Local: ``pyarrow.fs.LocalFileSystem``; s3: this Storage's s3fs client wrapped in
        ``PyFileSystem(FSSpecHandler(...))`` so endpoint/profile settings apply. Both pickle.
        """
        backend, path = split_uri(uri)
        if backend == LOCAL:
            return pyarrow.fs.LocalFileSystem(), path
        return pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(self._filesystem(backend))), path

    # -- write confinement ------------------------------------------------------------------------------
    def confine_writes(self, roots: dict[str, PathLike]) -> None:
        """Refuse from now on every local write below one of ``roots`` ({config key: prefix}, e.g.
        ``{"enhance.output": ...}``) whose folder's real path leaves that prefix (a symbolic link inside it pointing
        elsewhere): :class:`StorageError` naming the key. Object-store prefixes need nothing (no links). Travels
        with the Storage into Ray tasks (on its config, not a config key)."""
        local = {}
        for key, prefix in roots.items():
            with contextlib.suppress(StorageError):  # a DICOMweb endpoint: no local files either
                backend, path = split_uri(prefix) if prefix else ("", "")
                if backend == LOCAL:
                    local[path.rstrip("/") or "/"] = key
        self.config = self.config.model_copy()
        self.config._write_roots = {**self.write_roots, **local}

    @property
    def write_roots(self) -> dict[str, str]:
        """{local prefix: config key} that writes are confined to (see :meth:`confine_writes`)."""
        return dict(getattr(self.config, "_write_roots", None) or {})

    # -- paths ------------------------------------------------------------------------------------------
    join = staticmethod(join)

    # -- whole-file operations --------------------------------------------------------------------------
    def read_bytes(self, uri: PathLike) -> bytes:
        """The full content of a file or object."""
        fs, path = self.fs(uri)
        with _errors(uri, "read"):
            return fs.cat_file(path)

    def write_bytes(self, uri: PathLike, data: bytes | bytearray | memoryview) -> None:
        """Create or replace a file/object atomically: concurrent readers see the old content or the new,
        never a partial object; if the write fails, the old content is still there. Local parent folders
        are created."""
        backend, path = split_uri(uri)
        with _errors(uri, "write"):
            if backend == LOCAL:
                _write_local_atomic(path, data, self.write_roots)
            else:
                # S3 makes an object visible only once its upload completes: a single PUT (or, for
                # large payloads, s3fs's multipart upload, which appears on CompleteMultipartUpload) is
                # already atomic, so no temp key + copy is needed.
                self._filesystem(backend).pipe_file(path, bytes(data))

    def exists(self, uri: PathLike) -> bool:
        """Whether a file/object (or a local folder / non-empty s3 prefix) exists at ``uri``.
        A missing bucket counts as not existing."""
        fs, path = self.fs(uri)
        with _errors(uri, "check"):
            return fs.exists(path)

    def delete(self, uri: PathLike, missing_ok: bool = False) -> None:
        """Delete one file/object. Raises StorageError if it does not exist (unless ``missing_ok``) or is
        a folder."""
        fs, path = self.fs(uri)
        with _errors(uri, "delete"):
            if not fs.exists(path):
                if missing_ok:
                    return
                raise FileNotFoundError(path)
            if fs.isdir(path):
                raise IsADirectoryError(path)
            fs.rm_file(path)

    def makedirs(self, uri: PathLike) -> None:
        """Create a local folder and its parents (fine if it exists). A no-op on s3, which has no folders."""
        backend, path = split_uri(uri)
        if backend == LOCAL:
            with _errors(uri, "create folder"):
                _confine(os.path.join(path, "."), self.write_roots)
                os.makedirs(path, exist_ok=True)

    def size(self, uri: PathLike) -> int:
        """Size of a file/object in bytes."""
        fs, path = self.fs(uri)
        with _errors(uri, "stat"):
            info = fs.info(path)
            if info["type"] != "file":
                raise IsADirectoryError(path)
            return int(info["size"])

    def open(self, uri: PathLike, mode: str = "rb") -> IO:
        """A file object (use as a context manager). Writing through it is NOT atomic (use write_bytes
        for that); local parent folders are created for write modes."""
        fs, path = self.fs(uri)
        with _errors(uri, "open"):
            if isinstance(fs, LocalFileSystem) and set(mode) & set("wax+"):
                _confine(path, self.write_roots)
            return fs.open(path, mode)

    def list_files(
        self,
        prefix: PathLike,
        include: list[str] | None = None,
        exclude: list[str] | None = None,
    ) -> list[str]:
        """All files under ``prefix`` (recursively), sorted, as full URIs spelled like ``prefix``.

        ``include``/``exclude`` are glob patterns (see :func:`glob_match`) matched against each file's
        path relative to ``prefix``: a file is kept when it matches some include pattern (or none are
        given) and no exclude pattern. Folders, in-flight atomic-write temp files and local symbolic links are
        never returned (links are not followed; see :meth:`list_entries`). A missing prefix lists as empty; a missing bucket raises StorageError. If ``prefix`` is itself a
        file, the result is ``[prefix]`` (filtered by its basename).
        """
        return [entry.uri for entry in self.list_entries(prefix, include, exclude)]

    def list_entries(
        self,
        prefix: PathLike,
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        *,
        follow_symlinks: str = "never",
        with_refused: bool = False,
    ) -> list[FileEntry]:
        """:meth:`list_files` with each file's size and version (:class:`FileEntry`), from the listing itself:
        S3's ListObjectsV2 carries size and ETag, a local directory scan size and mtime — no per-file request.

        Local symbolic links below ``prefix`` are not followed by default (``follow_symlinks``: ``never``, or
        ``within_root``: those whose real path stays under the prefix's); a refused link is left out, or listed with
        its reason in ``FileEntry.refused`` when ``with_refused`` (the nightly job makes it an error row). A link
        loop never fails the listing."""
        backend, root = split_uri(prefix)
        root = root.rstrip("/") or "/"
        with _errors(prefix, "list"):
            found = _scan_local(root, follow_symlinks) if backend == LOCAL else {
                path: (int(info.get("size") or 0), "etag:" + str(info.get("ETag", "")).strip('"'), "")
                for path, info in self._filesystem(backend).find(root, withdirs=False, detail=True).items()
                if info.get("type") == "file" and not path.endswith("/")}
        prefix = os.fspath(prefix)
        results = []
        for path, (size, version, refused) in found.items():
            if _is_partial(path):
                continue
            if path == root:  # prefix is a single file
                relative, uri = posixpath.basename(path), prefix
            else:
                relative = path[len(root) :].lstrip("/")
                uri = self.join(prefix, relative)
            if include and not any(glob_match(relative, p) for p in include):
                continue
            if exclude and any(glob_match(relative, p) for p in exclude):
                continue
            if refused and not with_refused:
                continue
            results.append(FileEntry(uri, size, version, refused))
        return sorted(results, key=lambda e: e.uri)

    # -- exclusive objects (leases) ---------------------------------------------------------------------
    def create_exclusive(self, uri: PathLike, data: bytes) -> str | None:
        """Create a file/object with ``data`` only if nothing exists at ``uri``, atomically: of two concurrent
        callers exactly one succeeds. Returns the new object's version (see :meth:`version`), None if something
        was already there. S3: ``PutObject`` with ``If-None-Match: *``; local: a complete temp file hard-linked
        into place (``link`` fails when the name exists, like ``O_EXCL``, and readers never see a partial file)."""
        backend, path = split_uri(uri)
        with _errors(uri, "create"):
            if backend == LOCAL:
                tmp = _create_local(*os.path.split(path), data, self.write_roots)
                try:
                    try:
                        os.link(tmp, path)
                    except FileExistsError:
                        return None
                finally:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(tmp)
                return self.version(uri)
            return self._put_conditional(path, data, IfNoneMatch="*")

    def replace_if(self, uri: PathLike, data: bytes, version: str) -> str | None:
        """Replace the file/object at ``uri`` only if its version is still ``version``; returns the new version,
        or None when it changed (or vanished) meanwhile. S3: ``PutObject`` with ``If-Match: <ETag>``; local: the
        check and the atomic replace run under an exclusive ``flock`` of ``<uri>.lock`` (local disks only)."""
        backend, path = split_uri(uri)
        with _errors(uri, "replace"):
            if backend == LOCAL:
                with _local_lock(path, self.write_roots):
                    if self._local_version(path) != version:
                        return None
                    _write_local_atomic(path, data, self.write_roots)
                    return self._local_version(path)
            return self._put_conditional(path, data, IfMatch=version.removeprefix("etag:"))

    def delete_if(self, uri: PathLike, version: str) -> bool:
        """Delete ``uri`` only if its version is still ``version``; False when it changed or is gone. (S3: a
        HEAD then a DELETE, so a replace in the milliseconds between the two is not seen.)"""
        backend, path = split_uri(uri)
        with _errors(uri, "delete"):
            if backend == LOCAL:
                with _local_lock(path, self.write_roots):
                    if self._local_version(path) != version:
                        return False
                    os.unlink(path)
                    return True
            if self.version(uri) != version:
                return False
            self._filesystem(backend).rm_file(path)
            return True

    def version(self, uri: PathLike) -> str | None:
        """The version of one file/object (as :class:`FileEntry` has it), None if it does not exist."""
        backend, path = split_uri(uri)
        with _errors(uri, "stat"):
            if backend == LOCAL:
                return self._local_version(path)
            fs = self._filesystem(backend)
            try:
                info = fs.info(path, refresh=True)
            except FileNotFoundError:
                return None
            return "etag:" + str(info.get("ETag", "")).strip('"')

    @staticmethod
    def _local_version(path: str) -> str | None:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None
        return f"mtime_ns:{st.st_mtime_ns}:{st.st_ino}"

    def _put_conditional(self, path: str, data: bytes, **condition: str) -> str | None:
        fs = self._filesystem(S3)
        bucket, _, key = path.partition("/")
        try:
            response = fs.call_s3("put_object", Bucket=bucket, Key=key, Body=bytes(data), **condition)
        except FileExistsError:  # s3fs's translation of 412 PreconditionFailed
            return None
        except FileNotFoundError as exc:  # If-Match on a key that is gone (a missing bucket is an error)
            if "bucket" in str(exc).lower():
                raise
            return None
        except OSError as exc:  # 412 (If-Match) or 409 ConditionalRequestConflict (a concurrent write won)
            original = exc.__cause__ or exc.__context__
            code = str(getattr(original, "response", {}).get("Error", {}).get("Code", ""))
            text = str(exc).lower()
            if code in ("PreconditionFailed", "ConditionalRequestConflict") or "pre-condition" in text or "conflict" in text:
                return None
            raise
        return "etag:" + str(response.get("ETag", "")).strip('"')


def _scan_local(root: str, follow_symlinks: str = "never") -> dict[str, tuple[int, str, str]]:
    """{path: (size, "mtime_ns:<n>:<inode>", refused)} of every file below a local folder (or the file itself), one
    stat each (``os.scandir``). A missing root is empty; the root itself may be a link (the user named it).

    Symbolic links below the root (see FOLLOW_SYMLINKS): ``never`` lists each one refused, unread and unfollowed;
    ``within_root`` follows a link whose real path stays under the root's real path, a folder at most once (a link
    loop, or two links to one folder, lists its files once and never fails the listing), and refuses the others.
    A refused entry has size 0, version "" and its reason."""
    if follow_symlinks not in FOLLOW_SYMLINKS:
        raise ValueError(f"follow_symlinks must be one of {FOLLOW_SYMLINKS}, not {follow_symlinks!r}")
    try:
        top = os.stat(root)
    except FileNotFoundError:
        return {}
    if not os.path.isdir(root):
        return {root: (top.st_size, f"mtime_ns:{top.st_mtime_ns}:{top.st_ino}", "")}
    real_root = os.path.realpath(root)
    found: dict[str, tuple[int, str, str]] = {}
    seen = {(top.st_dev, top.st_ino)}
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except (FileNotFoundError, NotADirectoryError):  # removed while listing
            continue
        for entry in entries:
            try:
                if entry.is_symlink():
                    reason = _link_refusal(entry.path, real_root, follow_symlinks)
                    if reason:
                        found[entry.path] = (0, "", reason)
                        continue
                if entry.is_dir():  # (a followed link: its target's inode)
                    st = entry.stat()
                    if (st.st_dev, st.st_ino) not in seen:
                        seen.add((st.st_dev, st.st_ino))
                        stack.append(entry.path)
                elif entry.is_file():
                    st = entry.stat()
                    found[entry.path] = (st.st_size, f"mtime_ns:{st.st_mtime_ns}:{st.st_ino}", "")
            except FileNotFoundError:  # pragma: no cover - removed while listing
                continue
    return found


def _link_refusal(path: str, real_root: str, follow_symlinks: str) -> str:
    """Why the link at ``path`` is not followed ("" when it is)."""
    if follow_symlinks == "never":
        return ("a symbolic link; links are not followed (enhance.follow_symlinks: never; 'within_root' follows "
                "those that stay inside the input)")
    try:
        real = os.path.realpath(path, strict=True)
    except OSError:  # missing target, or a loop of links
        return "a symbolic link to nothing (missing target or a loop of links); not followed"
    if not _under(real, real_root):
        return ("a symbolic link leading outside the input; not followed (enhance.follow_symlinks: within_root "
                "follows only links that stay inside it)")
    return ""


@contextlib.contextmanager
def _local_lock(path: str, roots: dict[str, str] | None = None) -> Iterator[None]:
    """An exclusive ``flock`` on ``<path>.lock`` (created beside ``path``, mode FILE_MODE, never through a link)
    for a check-then-write."""
    _confine(path, roots or {})
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd = os.open(path + ".lock", os.O_CREAT | os.O_RDWR | os.O_NOFOLLOW, FILE_MODE)
    with contextlib.suppress(PermissionError):  # another user's lock file keeps its mode
        os.fchmod(fd, FILE_MODE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------------------------------------
# Leases: one writer per prefix
# ----------------------------------------------------------------------------------------------------------
class LeaseHeldError(StorageError):
    """Another live run holds the lease; the message names it and when the lease expires."""


class LeaseLostError(StorageError):
    """This run's lease was taken over (it was not refreshed in time) or removed."""


def _process_start(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (Linux /proc), which tells a live holder from a reused pid."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


class Lease:
    """An exclusive, expiring claim on a prefix held through one small object (e.g. ``_manifest/lease.json``).

    :meth:`acquire` creates the object atomically (:meth:`Storage.create_exclusive`). An existing lease is taken
    over (:meth:`Storage.replace_if`, so of two takers one wins) when it expired — not refreshed for ``ttl_s`` — or
    when its holder ran on this host and that process is gone (a killed run is not waited for). :meth:`refresh`
    (every ``ttl_s / 3`` by :meth:`keep_alive`'s thread) extends it; :meth:`release` deletes it if still ours.
    The object holds only run id, host, pid and times: nothing about the data.
    """

    def __init__(self, storage: Storage, uri: str, owner: str, ttl_s: float):
        self.storage, self.uri, self.owner, self.ttl_s = storage, uri, owner, float(ttl_s)
        self.version: str | None = None
        self.lost: str | None = None  # why the lease was lost, once it was
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _body(self) -> bytes:
        now = time.time()
        return json.dumps({"owner": self.owner, "host": socket.gethostname(), "pid": os.getpid(),
                           "pid_start": _process_start(os.getpid()), "refreshed_at": now,
                           "expires_at": now + self.ttl_s, "ttl_s": self.ttl_s}).encode()

    @staticmethod
    def _holder_gone(info: dict) -> bool:
        if info.get("host") != socket.gethostname() or not isinstance(info.get("pid"), int):
            return False
        start = _process_start(info["pid"])
        return start is None or (info.get("pid_start") is not None and start != info["pid_start"])

    @classmethod
    def acquire(cls, storage: Storage, uri: str, owner: str, ttl_s: float) -> Lease:
        """Take the lease at ``uri`` for ``owner`` (a run id).

        Raises:
            LeaseHeldError: a live holder has it (message: who, since when, until when).
        """
        lease = cls(storage, uri, owner, ttl_s)
        for _ in range(5):  # a lease released or replaced between our reads: look again
            lease.version = storage.create_exclusive(uri, lease._body())
            if lease.version is not None:
                return lease
            seen = storage.version(uri)
            if seen is None:
                continue
            try:
                info = json.loads(storage.read_bytes(uri))
            except (StorageError, ValueError):
                info = {}
            if storage.version(uri) != seen:
                continue
            expired = float(info.get("expires_at", 0)) < time.time()
            if not (expired or cls._holder_gone(info)):
                until = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(float(info.get("expires_at", 0))))
                raise LeaseHeldError(
                    f"{uri}: another run ({info.get('owner', '?')} on host {info.get('host', '?')}, pid "
                    f"{info.get('pid', '?')}) holds this prefix; its lease expires at {until} unless refreshed. "
                    f"Only one run per output prefix: this one exits and touches nothing")
            lease.version = storage.replace_if(uri, lease._body(), seen)
            if lease.version is not None:
                return lease
        raise LeaseHeldError(f"{uri}: the lease kept changing while this run tried to take it; another run is "
                             f"starting on this prefix")

    def refresh(self) -> None:
        """Extend the lease by ``ttl_s`` from now. Raises LeaseLostError if it is no longer ours."""
        if self.lost:
            raise LeaseLostError(self.lost)
        version = self.storage.replace_if(self.uri, self._body(), self.version or "")
        if version is None:
            self.lost = f"{self.uri}: this run's lease was taken over or removed (not refreshed within {self.ttl_s:g} s)"
            raise LeaseLostError(self.lost)
        self.version = version

    def keep_alive(self) -> None:
        """Refresh every ``ttl_s / 3`` in a daemon thread until :meth:`release`."""
        def loop() -> None:
            while not self._stop.wait(self.ttl_s / 3):
                try:
                    self.refresh()
                except LeaseLostError:
                    return
                except StorageError as exc:  # transient: the next tick tries again, well within the TTL
                    logging.getLogger(__name__).warning("lease refresh failed (%s); retrying", exc)

        self._thread = threading.Thread(target=loop, name="medsr-lease", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Stop refreshing and delete the lease if it is still ours (a taken-over lease is left alone)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self.version is not None and not self.lost:
            self.storage.delete_if(self.uri, self.version)
        self.version = None

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc) -> None:
        self.release()
