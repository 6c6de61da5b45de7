"""Every rule about how a location is spelled, in one place: pure string logic, no I/O and no clients.

A location in medsr-dist is a local path (``data/scans``, ``/mnt/x``), a ``file://`` URI, an ``s3://bucket/prefix``
URI (:mod:`medsr_dist.storage` reads and writes those) or a DICOMweb endpoint ``dicomweb+http(s)://host:port/<root>``
(:mod:`medsr_dist.pacs`), one instance of which is
``<endpoint>/studies/<StudyInstanceUID>/series/<SeriesInstanceUID>/instances/<SOPInstanceUID>``.
"""
from __future__ import annotations

import fnmatch
import os
import posixpath
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

PathLike = str | os.PathLike

LOCAL = "local"
S3 = "s3"
#: DICOMweb schemes and the HTTP scheme each stands for.
SCHEMES = {"dicomweb+http": "http", "dicomweb+https": "https"}


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


def normalize_uri(uri: PathLike) -> str:
    """One spelling per location, for comparing prefixes: local paths and ``file://`` URIs become absolute,
    normalised paths (``./``, ``//``, ``..``, a trailing ``/`` resolved lexically, symlinks not followed);
    ``s3://bucket/key`` URIs lose empty and ``.`` segments and trailing slashes (``..`` is kept: on S3 it is part
    of a key's name, see :func:`relative_key`)."""
    backend, path = split_uri(uri)
    if backend == LOCAL:
        return os.path.normpath(path)
    return "s3://" + "/".join(p for p in path.split("/") if p not in ("", "."))


def is_under(uri: PathLike, prefix: PathLike) -> bool:
    """Whether ``uri`` is ``prefix`` or lies below it, however either is spelled (see :func:`normalize_uri`)."""
    u, p = normalize_uri(uri), normalize_uri(prefix)
    return u == p or u.startswith(p.rstrip("/") + "/")


def relative_key(uri: PathLike, prefix: PathLike) -> str:
    """The ``/``-separated path of ``uri`` below ``prefix``, normalised (empty and ``.`` segments dropped).

    Raises:
        ValueError: ``uri`` is not below ``prefix``, or its relative part is absolute (``prefix//x``) or has a
            ``..`` segment (legal in an S3 key; written under an output prefix it would climb out of it).
    """
    text, base = os.fspath(uri), os.fspath(prefix).rstrip("/")
    if not text.startswith(base + "/"):
        raise ValueError(f"{text} is not below {base}")
    rest = text[len(base) + 1:]
    if rest.startswith("/"):
        raise ValueError(f"{text}: its key below {base} is absolute ({rest!r})")
    parts = rest.split("/")
    if ".." in parts:
        raise ValueError(f"{text}: its key below {base} has a '..' segment")
    clean = [p for p in parts if p not in ("", ".")]
    if not clean:
        raise ValueError(f"{text}: no file name below {base}")
    return "/".join(clean)


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


def split_uri(uri: PathLike) -> tuple[str, str]:
    """(backend, path without scheme); local paths are made absolute, s3 paths are ``bucket/key``."""
    text = os.fspath(uri)
    scheme, sep, rest = text.partition("://")
    if not sep:
        return LOCAL, os.path.abspath(text)
    scheme = scheme.lower()
    if scheme == "file":
        return LOCAL, os.path.abspath(rest)
    if scheme == S3:
        path = rest.strip("/")
        if not path:
            raise StorageError(f"{text}: an s3 URI needs a bucket name (s3://bucket/key)")
        return S3, path
    raise StorageError(f"{text}: unsupported scheme {scheme!r}; use a local path, file:// or s3://")


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


def is_dicomweb(uri: Any) -> bool:
    """Whether ``uri`` names a DICOMweb endpoint (``dicomweb+http://`` / ``dicomweb+https://``)."""
    scheme, sep, _ = os.fspath(uri).partition("://") if isinstance(uri, (str, os.PathLike)) else ("", "", "")
    return bool(sep) and scheme.lower() in SCHEMES


def is_below(uri: str, prefix: str) -> bool:
    """:func:`is_under`, also for DICOMweb URIs (an instance below its endpoint)."""
    if is_dicomweb(uri) or is_dicomweb(prefix):
        return is_dicomweb(uri) and is_dicomweb(prefix) and (
            uri.rstrip("/") == prefix.rstrip("/") or uri.startswith(prefix.rstrip("/") + "/"))
    return is_under(uri, prefix)


@dataclass(frozen=True)
class Endpoint:
    """A DICOMweb service: ``scheme`` (http/https), ``netloc`` (host[:port]) and ``root`` (base path, no
    trailing ``/``)."""

    scheme: str
    netloc: str
    root: str

    @property
    def url(self) -> str:
        """The HTTP(S) URL of the service root, as dicomweb-client takes it."""
        return f"{self.scheme}://{self.netloc}{self.root}"

    @property
    def uri(self) -> str:
        return f"dicomweb+{self.url}"

    def __str__(self) -> str:
        return self.uri

    @classmethod
    def parse(cls, uri: str) -> tuple[Endpoint, InstanceRef | None]:
        """(endpoint, the instance the URI names or None).

        Raises:
            ValueError: not a ``dicomweb+http(s)://`` URI; credentials, a query or a fragment in it; a path below
                ``studies/`` that is not a whole instance address.
        """
        text = os.fspath(uri)
        scheme, sep, _ = text.partition("://")
        if not sep or scheme.lower() not in SCHEMES:
            raise ValueError(f"{text}: a DICOMweb endpoint is spelled dicomweb+http://host:port/<root> or "
                             f"dicomweb+https://...")
        parts = urlsplit(text)
        if parts.username is not None or parts.password is not None or "@" in parts.netloc:
            raise ValueError(f"{parts.scheme}://{parts.hostname}...: credentials do not belong in an endpoint URI (it "
                             f"ends up in configs, manifests and logs); put them in the environment or a secret "
                             f"file (pacs.username_env / pacs.password_env / pacs.token_env)")
        if parts.query or parts.fragment:
            raise ValueError(f"{text}: a DICOMweb endpoint has no query or fragment (QIDO-RS filters go into pacs.query)")
        if not parts.hostname:
            raise ValueError(f"{text}: no host")
        path = parts.path.rstrip("/")
        root, found, rest = path.partition("/studies/")
        if not found and path.endswith("/studies"):
            root, rest = path[: -len("/studies")], ""
        ref = None
        if rest:
            segs = rest.split("/")
            if len(segs) != 5 or segs[1] != "series" or segs[3] != "instances" or not all(segs[::2]):
                raise ValueError(f"{cls(SCHEMES[scheme.lower()], parts.netloc, root)}: a path below studies/ must be "
                                 f"studies/<study>/series/<series>/instances/<instance>")
            ref = InstanceRef(study=segs[0], series=segs[2], sop=segs[4])
        return cls(SCHEMES[scheme.lower()], parts.netloc, root), ref


@dataclass(frozen=True)
class InstanceRef:
    """One instance in a PACS, by its UIDs; ``study_date`` (YYYYMMDD or ""), ``modality`` and ``number``
    (InstanceNumber, 0 when absent) as QIDO-RS reported them."""

    study: str
    series: str
    sop: str
    study_date: str = ""
    modality: str = ""
    number: int = 0

    @property
    def path(self) -> str:
        """``studies/<study>/series/<series>/instances/<sop>`` (relative to the endpoint root)."""
        return f"studies/{self.study}/series/{self.series}/instances/{self.sop}"

    def uri(self, endpoint: Endpoint) -> str:
        return f"{endpoint.uri}/{self.path}"


def parse_instance_uri(uri: str) -> tuple[Endpoint, InstanceRef]:
    """The endpoint and instance of ``<endpoint>/studies/S/series/R/instances/I``; ValueError otherwise."""
    endpoint, ref = Endpoint.parse(uri)
    if ref is None:
        raise ValueError(f"{endpoint}: the URI names the endpoint, not an instance")
    return endpoint, ref
