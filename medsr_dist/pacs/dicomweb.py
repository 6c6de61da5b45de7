"""A PACS as source and sink of the nightly job, over DICOMweb (QIDO-RS, WADO-RS, STOW-RS).

Endpoints are spelled ``dicomweb+http://host:port/<root>`` or ``dicomweb+https://...`` (``<root>`` is the
DICOMweb base path, e.g. ``/dicom-web`` for Orthanc); one instance is
``<endpoint>/studies/<StudyInstanceUID>/series/<SeriesInstanceUID>/instances/<SOPInstanceUID>``.
All requests go through ``dicomweb-client`` on a ``requests`` session that carries:

* **Credentials** from the environment or secret files (:class:`Credentials`), never from a config file or a URL
  (a URL with ``user:password@`` is refused): HTTP basic or a bearer token.
* **TLS verification** always on; ``pacs.ca_bundle`` names a private CA.
* **Retries with exponential backoff** (urllib3 ``Retry``) on connection errors, read timeouts and HTTP 408/429/5xx,
  for every method (STOW-RS of the same object is idempotent: the SOP Instance UID is its identity).
* **Bounded load**: at most ``pacs.concurrency`` requests in flight per :class:`DicomwebPacs` (and so per process).
* **Bounded trust** (:mod:`medsr_dist.pacs.transport`): redirects only within the endpoint's origin, answer bodies
  of at most ``pacs.max_response_mb``, Retry-After waits of at most ``pacs.max_retry_after_s``, QIDO-RS listings
  of at most ``pacs.max_pages`` pages, credentials never over plain http to another host; an answer that is not
  what DICOMweb specifies (malformed JSON or multipart, records of another shape) is a :class:`PacsRefused` naming
  the request, never a raw decoding error.

WADO-RS asks for transfer syntax ``*``: compressed objects (JPEG, JPEG-LS, JPEG 2000, RLE) arrive exactly as the
PACS stores them and are decoded locally by :mod:`medsr_dist.io`. STOW-RS first asks (QIDO-RS) whether the object is
there already and stores only what is missing; afterwards it checks that the PACS lists it (a PACS may answer
success and still drop an object that one of its filters refused).

Errors (:class:`PacsError` and subclasses) name the endpoint (scheme, host, port, root), the operation, the HTTP
status and the PACS's own reason (e.g. a STOW-RS FailureReason code) — never a patient identifier, nor study /
series / instance UIDs (logs and error rows name items by item id).
"""
from __future__ import annotations

import io
import logging
import os
import re
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pydicom
import requests
from pydicom.errors import InvalidDicomError
from pydicom.uid import generate_uid
from requests.adapters import HTTPAdapter

from medsr_dist.config import PacsConfig
from medsr_dist.io.dicom import PROVENANCE_MODEL, PROVENANCE_MODEL_SHA256, PROVENANCE_SCALE
from medsr_dist.io.phi import phi_values, sanitize_reason
from medsr_dist.pacs.transport import CappedRetry, CrossOriginRedirect, PacsSession, ResponseTooLarge, plain_http_to_remote
from medsr_dist.uris import Endpoint, InstanceRef

log = logging.getLogger(__name__)

#: HTTP statuses retried with backoff (then reported as :class:`PacsUnavailable`).
RETRY_STATUS = (408, 429, 500, 502, 503, 504)
#: WADO-RS Accept: any transfer syntax, i.e. the object as stored (no transcoding by the PACS).
AS_STORED = (("application/dicom", "*"),)
#: QIDO-RS page size; pages are requested until one is empty or adds nothing new.
PAGE = 1000
MAX_REASON_CHARS = 300
#: STOW-RS / C-STORE failure reasons (PS3.18 Table I.2-1 / PS3.4 Annex B) by code.
FAILURE_REASONS = {
    0x0110: "processing failure", 0x0122: "SOP class not supported", 0x0124: "refused: not authorized",
    0x0210: "duplicate invocation", 0x0211: "unrecognized operation", 0x0212: "mistyped argument",
    0xA700: "refused: out of resources", 0xA770: "refused: out of resources", 0xA900: "data set does not match SOP class",
    0xC000: "error: cannot understand", 0xC122: "referenced transfer syntax not supported",
    0xB000: "coercion of data elements", 0xB007: "data set does not match SOP class (warning)",
    0xB006: "elements discarded",
}


# ----------------------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------------------
class PacsError(RuntimeError):
    """A DICOMweb request failed. ``status``: the HTTP status (None without an answer); ``reason``: the PACS's
    reason. The message names the endpoint and operation and carries no patient identifier or UID."""

    def __init__(self, message: str, status: int | None = None, reason: str = ""):
        super().__init__(message)
        self.status, self.reason = status, reason

    def __reduce__(self):  # picklable across Ray workers
        return type(self), (str(self), self.status, self.reason)


class PacsAuthError(PacsError):
    """HTTP 401/403, or credentials that cannot be read; says which credential source was used (never its value)."""


class PacsUnavailable(PacsError):
    """No usable answer after every retry: connection refused/reset, timeouts, HTTP 408/429/5xx."""


class PacsRefused(PacsError):
    """The PACS answered and refused (any other 4xx, a STOW-RS failure, an object it did not keep)."""


# ----------------------------------------------------------------------------------------------------------
# Credentials
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True, repr=False)
class Credentials:
    """How requests authenticate: ``kind`` "basic", "bearer" or "none"; ``source`` says where the secret came
    from (variable or file names, never values). ``repr`` shows only the source."""

    kind: str
    source: str
    _user: str = ""
    _secret: str = ""

    def __repr__(self) -> str:
        return f"Credentials({self.kind}, {self.source})"

    def apply(self, session) -> None:
        if self.kind == "basic":
            session.auth = (self._user, self._secret)
        elif self.kind == "bearer":
            session.headers["Authorization"] = f"Bearer {self._secret}"

    @classmethod
    def resolve(cls, cfg: PacsConfig, environ: dict[str, str] | None = None) -> Credentials:
        """Read the secrets named by ``cfg``: a bearer token (``token_file``, else ``$<token_env>``) or HTTP basic
        (user ``$<username_env>``, password ``password_file``, else ``$<password_env>``); none when nothing is set.

        Raises:
            PacsAuthError: both a token and basic credentials are set; a user without a password (or the reverse);
                a secret file that cannot be read or is empty.
        """
        env = os.environ if environ is None else environ
        token, token_src = _secret(cfg.token_file, "pacs.token_file", env, cfg.token_env)
        user = env.get(cfg.username_env, "")
        password, password_src = _secret(cfg.password_file, "pacs.password_file", env, cfg.password_env)
        if token and (user or password):
            raise PacsAuthError(f"both a bearer token ({token_src}) and HTTP basic credentials (${cfg.username_env}, "
                                f"{password_src or '$' + cfg.password_env}) are set; set one of them")
        if token:
            return cls("bearer", f"bearer token from {token_src}", _secret=token)
        if user and not password:
            raise PacsAuthError(f"${cfg.username_env} is set but no password: set ${cfg.password_env} or pacs.password_file")
        if password and not user:
            raise PacsAuthError(f"a password is set ({password_src}) but no user: set ${cfg.username_env}")
        if user:
            return cls("basic", f"HTTP basic, user from ${cfg.username_env}, password from {password_src}", user, password)
        return cls("none", f"no credentials (none of ${cfg.token_env}, ${cfg.username_env}/${cfg.password_env}, "
                           f"pacs.token_file, pacs.password_file is set)")


def _secret(path: str | None, key: str, env, var: str) -> tuple[str, str]:
    if path:
        try:
            with open(os.path.expanduser(path), encoding="utf-8") as handle:
                value = handle.read().strip()
        except OSError as exc:
            raise PacsAuthError(f"{key} {path}: cannot read ({type(exc).__name__}: {exc.strerror})") from None
        if not value:
            raise PacsAuthError(f"{key} {path} is empty")
        return value, f"{key} {path}"
    value = env.get(var, "")
    return value, (f"${var}" if value else "")


# ----------------------------------------------------------------------------------------------------------
# The client
# ----------------------------------------------------------------------------------------------------------
class DicomwebPacs:
    """QIDO-RS / WADO-RS / STOW-RS against one endpoint, with :class:`PacsConfig`'s credentials, TLS, retries and
    concurrency bound. Picklable (ships endpoint and config; the HTTP session is built lazily per process, and the
    credentials are read there, from that process's environment)."""

    def __init__(self, uri: str, cfg: PacsConfig | None = None):
        self.endpoint, _ = Endpoint.parse(uri)
        self.cfg = cfg if cfg is not None else PacsConfig()
        self._init_local()

    def _init_local(self) -> None:
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(self.cfg.concurrency)
        self._built: tuple[Any, Credentials] | None = None
        self._pid = os.getpid()

    def __getstate__(self) -> dict:
        return {"uri": self.endpoint.uri, "cfg": self.cfg}

    def __setstate__(self, state: dict) -> None:
        self.endpoint, _ = Endpoint.parse(state["uri"])
        self.cfg = state["cfg"]
        self._init_local()

    def __repr__(self) -> str:
        return f"DicomwebPacs({self.endpoint})"

    # -- session ----------------------------------------------------------------------------------------
    def _client(self):
        with self._lock:
            if self._built is None or self._pid != os.getpid():
                self._built, self._pid = self._build(), os.getpid()
            return self._built[0]

    @property
    def credentials(self) -> Credentials:
        self._client()
        return self._built[1]  # type: ignore[index]

    def _build(self):
        from dicomweb_client import DICOMwebClient

        cfg = self.cfg
        creds = Credentials.resolve(cfg)
        if cfg.ca_bundle and not os.path.isfile(cfg.ca_bundle):
            raise PacsError(f"pacs.ca_bundle {cfg.ca_bundle}: no such file")
        refuse_plain_http(self.endpoint, creds)
        session = PacsSession(self.endpoint.url, cfg.max_response_mb << 20)
        retry = CappedRetry(total=cfg.retries, connect=cfg.retries, read=cfg.retries, status=cfg.retries, other=0,
                            backoff_factor=cfg.backoff_s, status_forcelist=RETRY_STATUS, allowed_methods=None,
                            raise_on_status=False, respect_retry_after_header=True,
                            max_retry_after=cfg.max_retry_after_s)
        adapter = HTTPAdapter(max_retries=retry, pool_connections=1, pool_maxsize=cfg.concurrency)
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        session.verify = cfg.ca_bundle or True
        creds.apply(session)
        client = DICOMwebClient(self.endpoint.url, session=session, timeout=(min(10.0, cfg.timeout_s), cfg.timeout_s),
                                chunk_size=1 << 30)  # one body per request: a retry can send it again
        client.set_http_retry_params(retry=False)  # urllib3 retries (errors and statuses), not twice
        return client, creds

    def _call(self, action: str, fn: Callable, *, sent: bytes | None = None):
        """``fn(client)`` under the concurrency bound, with its failures as :class:`PacsError`."""
        try:
            client = self._client()
        except PacsError as exc:
            raise type(exc)(f"{self.endpoint}: {action}: {exc}", exc.status, exc.reason) from None
        with self._slots:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)  # dicomweb-client's notes on non-multipart answers
                    return fn(client)
            except requests.HTTPError as exc:
                raise self._http_error(action, exc.response, sent) from None
            except (CrossOriginRedirect, ResponseTooLarge, requests.TooManyRedirects) as exc:
                raise PacsRefused(f"{self.endpoint}: {action}: {exc}" if not isinstance(exc, requests.TooManyRedirects)
                                  else f"{self.endpoint}: {action}: more than {PacsSession.max_redirects} redirects",
                                  None, type(exc).__name__) from None
            except requests.exceptions.InvalidJSONError:
                raise PacsRefused(f"{self.endpoint}: {action}: the answer is not valid JSON (DICOM JSON expected)",
                                  None, "malformed JSON") from None
            except requests.exceptions.SSLError as exc:
                raise PacsError(f"{self.endpoint}: {action}: TLS verification failed ({_ssl_reason(exc)}); if the "
                                f"PACS has a private CA, name its PEM bundle in pacs.ca_bundle") from None
            except (requests.ConnectionError, requests.Timeout, requests.exceptions.RetryError) as exc:
                raise PacsUnavailable(f"{self.endpoint}: {action}: no answer after {1 + self.cfg.retries} attempt(s) "
                                      f"({type(exc).__name__}: the PACS is down, unreachable or too slow for "
                                      f"pacs.timeout_s {self.cfg.timeout_s:g})") from None
            except (ValueError, TypeError, KeyError, IndexError, AttributeError, InvalidDicomError) as exc:
                # dicomweb-client parsing an answer that is not what DICOMweb specifies: a multipart body without
                # its boundary or parts, no Content-Type, no instance, a body pydicom cannot read. Only the error's
                # type is kept: its text may quote the answer.
                raise PacsRefused(f"{self.endpoint}: {action}: the answer is not what DICOMweb specifies "
                                  f"({type(exc).__name__} while decoding it)", None, "malformed answer") from None

    def _http_error(self, action: str, response, sent: bytes | None) -> PacsError:
        status = int(response.status_code)
        reason = _pacs_reason(response, sent)
        text = f"{self.endpoint}: {action}: HTTP {status}" + (f" ({reason})" if reason else "")
        if status in (401, 403):
            return PacsAuthError(f"{text}: the PACS refused the credentials ({self.credentials.source})", status, reason)
        if status in RETRY_STATUS:
            return PacsUnavailable(f"{text}, still after {1 + self.cfg.retries} attempt(s)", status, reason)
        return PacsRefused(text, status, reason)

    # -- QIDO-RS ----------------------------------------------------------------------------------------
    def _search(self, action: str, fn: Callable[..., list], key: str) -> list[dict]:
        """Every page of a QIDO-RS search (``fn(client, limit, offset)``), de-duplicated by attribute ``key``."""
        seen: dict[str, dict] = {}
        offset = 0
        for _ in range(self.cfg.max_pages):
            page = self._records(action, self._call(action, lambda c: fn(c, PAGE, offset)))
            fresh = [r for r in page if _value(r, key) and _value(r, key) not in seen]
            for r in fresh:
                seen[_value(r, key)] = r
            if not page or not fresh:  # the end (or a server ignoring offset: nothing new)
                return list(seen.values())
            offset += len(page)
        raise PacsRefused(f"{self.endpoint}: {action}: still new results after {self.cfg.max_pages} pages of {PAGE} "
                          f"(pacs.max_pages): refused as a listing without end; narrow pacs.query or raise "
                          f"pacs.max_pages", None, "too many pages")

    def _records(self, action: str, answer: Any) -> list[dict]:
        """A QIDO-RS answer checked to be DICOM JSON: a list of records mapping 8-hex-digit tags to attributes
        (objects whose ``Value``, when present, is a list). Raises :class:`PacsRefused` naming the request."""
        def bad(what: str) -> PacsRefused:
            return PacsRefused(f"{self.endpoint}: {action}: the answer is not DICOM JSON ({what})", None, "unexpected shape")

        if not isinstance(answer, list):
            raise bad(f"a JSON {type(answer).__name__} where a list of records belongs")
        for record in answer:
            if not isinstance(record, dict):
                raise bad(f"a JSON {type(record).__name__} where a record belongs")
            for tag, attribute in record.items():
                if not (isinstance(attribute, dict) and _TAG.match(str(tag))
                        and isinstance(attribute.get("Value", []), list)):
                    raise bad("an attribute that is not {\"vr\": ..., \"Value\": [...]} under an 8-hex-digit tag")
        return answer

    def query(self, q: PacsConfig.Query | None = None, *, watermark: str | None = None,
              include_derived: bool = False) -> list[InstanceRef]:
        """Instances matching ``q`` (study level: StudyDate range, ModalitiesInStudy, StudyInstanceUID; series
        level: Modality, SeriesInstanceUID), oldest StudyDate first (then by UIDs and InstanceNumber), at most
        ``q.limit``. ``watermark`` (YYYYMMDD) raises the first StudyDate when ``q.since_watermark``. Series that
        medsr-dist derived (:func:`is_derived_series`) are left out unless ``include_derived``: with the same PACS
        as input and output, last night's outputs are not tonight's inputs."""
        q = q if q is not None else PacsConfig.Query()
        first = q.study_date_from or ""
        if q.since_watermark and watermark:
            first = max(first, watermark)
        last = q.study_date_to or ""
        if first and last and first > last:
            return []
        base: dict[str, str] = {}
        if first or last:
            base["StudyDate"] = f"{first}-{last}"
        studies: dict[str, str] = {}
        for uid in q.study_uids or [None]:
            for modality in q.modality or [None]:
                filters = dict(base)
                if uid:
                    filters["StudyInstanceUID"] = uid
                if modality:
                    filters["ModalitiesInStudy"] = modality
                for r in self._search("QIDO-RS study search", lambda c, lim, off, f=filters: c.search_for_studies(
                        search_filters=f, fields=["StudyDate"], limit=lim, offset=off), "0020000D"):
                    studies[_value(r, "0020000D")] = _value(r, "00080020")
        refs: list[InstanceRef] = []
        for study, date in sorted(studies.items(), key=lambda kv: (kv[1], kv[0])):
            series: dict[str, str] = {}
            for uid in q.series_uids or [None]:
                for modality in q.modality or [None]:
                    filters = {}
                    if uid:
                        filters["SeriesInstanceUID"] = uid
                    if modality:
                        filters["Modality"] = modality
                    for r in self._search("QIDO-RS series search", lambda c, lim, off, f=filters, s=study:
                                          c.search_for_series(s, search_filters=f, fields=["SeriesDescription"],
                                                              limit=lim, offset=off), "0020000E"):
                        if include_derived or not is_derived_series(_value(r, "0008103E")):
                            series[_value(r, "0020000E")] = _value(r, "00080060")
            for sid, modality in sorted(series.items()):
                found = self._search("QIDO-RS instance search", lambda c, lim, off, s=study, r=sid: c.search_for_instances(
                    s, r, fields=["InstanceNumber"], limit=lim, offset=off), "00080018")
                refs.extend(sorted((InstanceRef(study, sid, _value(r, "00080018"), date, modality,
                                                _int(_value(r, "00200013"))) for r in found),
                                   key=lambda ref: (ref.number, ref.sop)))
                if q.limit is not None and len(refs) >= q.limit:
                    return refs[: q.limit]
        return refs

    def instances_in_series(self, study: str, series: str) -> set[str]:
        """SOP Instance UIDs the PACS lists under one series (empty when it has none)."""
        return {_value(r, "00080018") for r in self._search(
            "QIDO-RS instance search", lambda c, lim, off: c.search_for_instances(
                study, series, fields=["00080018"], limit=lim, offset=off), "00080018")}

    def has_instance(self, study: str, series: str, sop: str) -> bool:
        found = self._records("QIDO-RS instance search", self._call("QIDO-RS instance search", lambda c: c.search_for_instances(
            study, series, search_filters={"SOPInstanceUID": sop}, fields=["00080018"])))
        return any(_value(r, "00080018") == sop for r in found)

    # -- WADO-RS ----------------------------------------------------------------------------------------
    def retrieve(self, ref: InstanceRef) -> bytes:
        """The instance as the PACS stores it (its transfer syntax, compressed or not), as Part 10 bytes."""
        ds = self._call("WADO-RS retrieve", lambda c: c.retrieve_instance(
            ref.study, ref.series, ref.sop, media_types=AS_STORED))
        if str(ds.get("SOPInstanceUID", "")) != ref.sop:
            raise PacsRefused(f"{self.endpoint}: WADO-RS retrieve: the PACS answered with another instance than "
                              f"the one asked for")
        buf = io.BytesIO()
        pydicom.dcmwrite(buf, ds)  # the parsed object written back as read: same transfer syntax and pixel data
        return buf.getvalue()

    def retrieve_many(self, refs: Iterable[InstanceRef]) -> Iterator[tuple[InstanceRef, bytes | PacsError]]:
        """(ref, bytes or the error) for each ref, in order, ``pacs.concurrency`` at a time."""
        refs = list(refs)
        with ThreadPoolExecutor(max_workers=self.cfg.concurrency) as pool:
            for ref, result in zip(refs, pool.map(self._retrieve_or_error, refs)):
                yield ref, result

    def _retrieve_or_error(self, ref: InstanceRef) -> bytes | PacsError:
        try:
            return self.retrieve(ref)
        except PacsError as exc:
            return exc

    # -- STOW-RS ----------------------------------------------------------------------------------------
    def store(self, data: bytes, *, study: str | None = None) -> str:
        """Store one Part 10 object in ``study`` (default: its own StudyInstanceUID) unless the PACS has it.

        Returns "present" (nothing sent) or "stored" (sent, and listed by the PACS afterwards).

        Raises:
            PacsRefused: HTTP 4xx or a FailedSOPSequence (message: status and the PACS's failure reason), or a
                success answer after which the PACS does not list the object (filtered out).
            PacsUnavailable / PacsAuthError: see :class:`DicomwebPacs`.
            ValueError: ``data`` is not a DICOM object with Study/Series/SOP Instance UIDs.
        """
        try:
            ds = pydicom.dcmread(io.BytesIO(bytes(data)))
            uids = str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)
        except Exception as exc:  # noqa: BLE001
            raise ValueError(f"STOW-RS: not a DICOM object with study, series and instance UIDs "
                             f"({type(exc).__name__})") from None
        target = study or uids[0]
        if self.has_instance(target, uids[1], uids[2]):
            return "present"
        answer = self._call("STOW-RS store", lambda c: c.store_instances([ds], study_instance_uid=target), sent=data)
        failed = _failures(answer.to_json_dict() if hasattr(answer, "to_json_dict") else {})
        if failed:
            raise PacsRefused(f"{self.endpoint}: STOW-RS store: the PACS refused the object ({failed})", 200, failed)
        if not self.has_instance(target, uids[1], uids[2]):
            raise PacsRefused(f"{self.endpoint}: STOW-RS store: the PACS answered success but does not list the "
                              f"object afterwards (dropped, e.g. by a filter or routing rule of the PACS)", 200,
                              "not kept")
        return "stored"

    def store_many(self, objects: Iterable[bytes]) -> list[str | PacsError]:
        """:meth:`store` of each object, ``pacs.concurrency`` at a time; the outcome or the error of each, in order."""
        def one(data: bytes) -> str | PacsError:
            try:
                return self.store(data)
            except PacsError as exc:
                return exc

        with ThreadPoolExecutor(max_workers=self.cfg.concurrency) as pool:
            return list(pool.map(one, list(objects)))


_DERIVED_DESCRIPTION = re.compile(r"\[SR (x[0-9.]+|std)\]$")


def is_derived_series(series_description: str) -> bool:
    """Whether a SeriesDescription is one medsr-dist wrote: an enhanced series (:func:`medsr_dist.io.dicom.encode_dicom`,
    ``... [SR x<scale>]``) or an uncertainty map's (:func:`medsr_dist.infer.diffusion_backend.uncertainty_dicom`,
    ``... [SR std]``): a PACS that is both input and output must not feed them back in."""
    return bool(_DERIVED_DESCRIPTION.search(series_description.strip()))


def watermark(refs: Iterable[InstanceRef]) -> str | None:
    """The latest StudyDate among ``refs`` (YYYYMMDD), the next run's ``since_watermark`` start; None if none."""
    dates = [r.study_date for r in refs if r.study_date]
    return max(dates) if dates else None


def derived_uids(source: pydicom.Dataset, provenance: dict[str, str]) -> tuple[str, str, str]:
    """(StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID) that :func:`medsr_dist.io.dicom.encode_dicom` gives the
    derived object of ``source`` (a header is enough) with ``provenance`` (``medsr:model_sha256``, ``medsr:scale``,
    ``medsr:params``): known before any pixel is enhanced, so a rerun can ask the PACS whether it has it.
    (The tests hold this against ``encode_dicom`` itself.)"""
    if PROVENANCE_SCALE not in provenance:
        raise ValueError(f"provenance without {PROVENANCE_SCALE}: the derived SOP Instance UID depends on it")
    model = provenance.get(PROVENANCE_MODEL, "unknown model")
    model_hash = provenance.get(PROVENANCE_MODEL_SHA256, "")
    scale_text = provenance[PROVENANCE_SCALE]
    params = provenance.get("medsr:params", "")
    source_sop = source.get("SOPInstanceUID")
    source_series = source.get("SeriesInstanceUID") or source_sop or ""
    series = generate_uid(entropy_srcs=[str(source_series), model_hash or model])
    sop = generate_uid(entropy_srcs=[str(source_sop or source_series), model_hash or model, scale_text, params])
    study = source.get("StudyInstanceUID") or generate_uid(entropy_srcs=[str(source_series), "study"])
    return str(study), str(series), str(sop)


# ----------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------
_TAG = re.compile(r"^[0-9A-Fa-f]{8}$")


def _value(record: dict, tag: str) -> str:
    """The first value of attribute ``tag`` (8 hex digits) in a DICOM JSON record, as text ("" when absent or
    null; records are checked by :meth:`DicomwebPacs._records` first)."""
    values = (record.get(tag) or {}).get("Value") or []
    if not values or values[0] is None:
        return ""
    v = values[0]
    return str(v.get("Alphabetic", "")) if isinstance(v, dict) else str(v)


def refuse_plain_http(endpoint: Endpoint, creds: Credentials) -> None:
    """Raise :class:`PacsAuthError` when ``creds`` would go in clear text over ``dicomweb+http://`` to a host
    that is not this machine (the client's message is prefixed with the endpoint and request)."""
    if creds.kind != "none" and plain_http_to_remote(endpoint.url):
        raise PacsAuthError(f"credentials ({creds.source}) are sent over https only (or plain http to a loopback "
                            f"host); use dicomweb+https://")


def _int(text: str) -> int:
    try:
        return int(float(text))
    except ValueError:
        return 0


def _failures(answer: dict) -> str:
    """The failure reasons of a STOW-RS answer (DICOM JSON) as text, e.g. "failure reason 0x0110 (processing
    failure)"; "" when nothing failed."""
    items = (answer.get("00081198") or {}).get("Value") or []
    reasons = []
    for item in items:
        codes = (item.get("00081197") or {}).get("Value") or []
        code = int(codes[0]) if codes else None
        reasons.append("failure reason unknown" if code is None else
                       f"failure reason 0x{code:04X} ({FAILURE_REASONS.get(code, 'unlisted code')})")
    return "; ".join(dict.fromkeys(reasons))


def _pacs_reason(response, sent: bytes | None) -> str:
    """What the PACS said about a failed request: STOW-RS failure reasons, an error ``Message`` (Orthanc's JSON),
    else the HTTP reason phrase — with identifier values of the object sent, and UIDs, removed."""
    reason = ""
    try:
        body = response.json()
    except (ValueError, AttributeError):
        body = None
    if isinstance(body, dict):
        reason = _failures(body) or str(body.get("Message") or body.get("Details") or "")
    if not reason:
        reason = str(getattr(response, "reason", "") or "")
    return _clean(reason, sent)


def _clean(text: str, sent: bytes | None) -> str:
    text = re.sub(r"\b\d+(?:\.\d+){3,}\b", "<uid>", text)  # study/series/instance UIDs stay out of reasons
    text = sanitize_reason(text, secrets=phi_values(sent))
    return text if len(text) <= MAX_REASON_CHARS else text[: MAX_REASON_CHARS - 1] + "…"


def _ssl_reason(exc: BaseException) -> str:
    text = str(exc)
    for marker in ("CERTIFICATE_VERIFY_FAILED", "certificate verify failed", "hostname mismatch", "WRONG_VERSION_NUMBER"):
        if marker in text:
            return marker.lower().replace("_", " ")
    return type(exc).__name__


def describe_failure(exc: BaseException) -> str:
    """A one-line reason for an error row: the PacsError's message, else the exception's type and text."""
    if isinstance(exc, PacsError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


__all__ = ["AS_STORED", "Credentials", "DicomwebPacs", "PacsAuthError", "PacsError", "PacsRefused", "PacsSession",
           "PacsUnavailable", "derived_uids", "refuse_plain_http", "watermark"]
