"""One way to read and write files whether they live on local disk or in S3-compatible object storage.

Every path in medsr-dist may be a local path (``data/scans``, ``/mnt/x``), a ``file://`` URI or an
``s3://bucket/prefix`` URI. :class:`Storage` hides the difference behind a handful of whole-file operations
(read, atomic write, list, delete) built on fsspec/s3fs, and hands out pyarrow filesystems for Ray Data.

S3 credentials are never passed in code: s3fs/botocore find them in the standard places (``AWS_ACCESS_KEY_ID``
and friends, ``~/.aws/credentials``, ``~/.aws/config``, instance roles). :class:`~medsr_dist.config.StorageConfig`
only says *where* storage is (endpoint, region) and *how* to pick credentials (profile, anonymous).

A :class:`Storage` is cheap to pickle: it ships only its config to Ray tasks and actors and builds its
filesystem clients lazily in each process.
"""
from __future__ import annotations

import contextlib
import fnmatch
import functools
import os
import posixpath
import tempfile
import threading
from collections.abc import Iterator
from typing import IO, TYPE_CHECKING, Any

from medsr_dist.config import StorageConfig

if TYPE_CHECKING:
    import fsspec
    import pyarrow.fs

PathLike = str | os.PathLike

_LOCAL = "local"
_S3 = "s3"

# Local atomic writes go to ``.<name>.<random><suffix>`` beside the target and are renamed into place;
# list_files recognises and skips these in-flight files by this suffix.
PARTIAL_SUFFIX = ".medsr-partial"

# The process umask, read once at import (os.umask can only be read by setting it). mkstemp creates files
# 0600; atomically written files get the permissions an ordinary open() would have given them.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


class StorageError(RuntimeError):
    """A storage operation failed; the message names the URI and what went wrong."""


def is_remote(uri: PathLike) -> bool:
    """True when ``uri`` names object storage (it has a scheme other than ``file://``)."""
    scheme, sep, _ = os.fspath(uri).partition("://")
    return bool(sep) and scheme.lower() != "file"


def local_path(uri: PathLike) -> str | None:
    """The local filesystem path of a local path or ``file://`` URI (as given, not made absolute);
    None for remote URIs."""
    uri = os.fspath(uri)
    if is_remote(uri):
        return None
    scheme, sep, rest = uri.partition("://")
    return rest if sep else uri


def _split(uri: PathLike) -> tuple[str, str]:
    """(backend, path without scheme); local paths are made absolute, s3 paths are ``bucket/key``."""
    text = os.fspath(uri)
    scheme, sep, rest = text.partition("://")
    if not sep:
        return _LOCAL, os.path.abspath(text)
    scheme = scheme.lower()
    if scheme == "file":
        return _LOCAL, os.path.abspath(rest)
    if scheme == _S3:
        path = rest.strip("/")
        if not path:
            raise StorageError(f"{text}: an s3 URI needs a bucket name (s3://bucket/key)")
        return _S3, path
    raise StorageError(f"{text}: unsupported scheme {scheme!r}; use a local path, file:// or s3://")


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
            bucket = _split(uri)[1].split("/", 1)[0] if is_remote(uri) else "?"
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


def _expand_globstar(pattern: str) -> list[str]:
    """Each ``**/`` may also match nothing: ``a/**/b`` -> [``a/**/b``, ``a/b``]."""
    head, star, tail = pattern.partition("**/")
    if not star:
        return [pattern]
    rests = _expand_globstar(tail)
    return [head + "**/" + rest for rest in rests] + [head + rest for rest in rests]


def glob_match(relative_path: str, pattern: str) -> bool:
    """Whether a ``/``-separated path relative to a listing root matches a glob pattern.

    fnmatch semantics, case-sensitive, where ``*`` also crosses ``/``, plus what users expect from
    shell/gitignore globs: a pattern without ``/`` also matches the file's basename at any depth
    (``*.dcm``, ``IM_????``), a ``**/`` may match no folder (``**/*.png`` matches ``a.png``), and a
    pattern ending in ``/`` names everything under that folder (``sub/`` == ``sub/*``).
    """
    pattern = pattern.lstrip("/")
    if pattern.endswith("/"):
        pattern += "*"
    basename = posixpath.basename(relative_path)
    for candidate in _expand_globstar(pattern):
        if fnmatch.fnmatchcase(relative_path, candidate):
            return True
        if "/" not in candidate and fnmatch.fnmatchcase(basename, candidate):
            return True
    return False


def _is_partial(path: str) -> bool:
    name = posixpath.basename(path)
    return name.startswith(".") and name.endswith(PARTIAL_SUFFIX)


def _write_local_atomic(path: str, data: bytes) -> None:
    """Write to a temp file in the target's folder, fsync, then os.replace: readers see old or new, never
    a partial file; on any failure the temp file is removed and the old content is untouched."""
    directory, name = os.path.split(path)
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=PARTIAL_SUFFIX, dir=directory)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)
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
        if backend == _LOCAL:
            from fsspec.implementations.local import LocalFileSystem

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
        backend, path = _split(uri)
        return self._filesystem(backend), path

    def pyarrow_fs(self, uri: PathLike) -> tuple[pyarrow.fs.FileSystem, str]:
        """A pyarrow filesystem and path for ``uri``, e.g. for ``ray.data.read_parquet(path, filesystem=fs)``.

        Local: ``pyarrow.fs.LocalFileSystem``; s3: this Storage's s3fs client wrapped in
        ``PyFileSystem(FSSpecHandler(...))`` so endpoint/profile settings apply. Both pickle.
        """
        import pyarrow.fs

        backend, path = _split(uri)
        if backend == _LOCAL:
            return pyarrow.fs.LocalFileSystem(), path
        return pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(self._filesystem(backend))), path

    # -- paths ------------------------------------------------------------------------------------------
    @staticmethod
    def join(base: PathLike, *parts: PathLike) -> str:
        """``base`` extended by ``parts``, keeping its scheme: ``join("s3://b/x", "y/z.png")`` ->
        ``"s3://b/x/y/z.png"``. Parts are always relative (leading/trailing ``/`` are dropped, empty
        parts skipped), so a part can never replace the base the way ``os.path.join`` lets ``"/abs"`` do."""
        base = os.fspath(base)
        clean = [p for p in (os.fspath(part).strip("/") for part in parts) if p]
        scheme, sep, rest = base.partition("://")
        if sep:
            return f"{scheme}://{posixpath.join(rest, *clean)}" if clean else base
        return os.path.join(base, *clean)

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
        backend, path = _split(uri)
        with _errors(uri, "write"):
            if backend == _LOCAL:
                _write_local_atomic(path, data)
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
        backend, path = _split(uri)
        if backend == _LOCAL:
            with _errors(uri, "create folder"):
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
        given) and no exclude pattern. Folders and in-flight atomic-write temp files are never returned.
        A missing prefix lists as empty; a missing bucket raises StorageError. If ``prefix`` is itself a
        file, the result is ``[prefix]`` (filtered by its basename).
        """
        fs, root = self.fs(prefix)
        root = root.rstrip("/") or "/"
        with _errors(prefix, "list"):
            found = fs.find(root, withdirs=False, detail=True)
        prefix = os.fspath(prefix)
        results = []
        for path, info in found.items():
            if info.get("type") != "file" or path.endswith("/") or _is_partial(path):
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
            results.append(uri)
        return sorted(results)
