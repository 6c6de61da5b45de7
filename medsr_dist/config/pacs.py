"""``pacs``: DICOMweb query filters, credentials (by reference only), TLS and request limits."""
from __future__ import annotations

import datetime
from typing import Any

from pydantic import Field, field_validator

from medsr_dist.config.base import Section


class PacsConfig(Section):
    """DICOMweb endpoints: ``enhance.input`` / ``enhance.output`` spelled ``dicomweb+http(s)://host:port/<root>``
    (``medsr_dist/pacs``). Credentials are never part of a config: HTTP basic (user and password) or a bearer token
    are read from the environment variables named here, or from secret files (mode 0600 advised); they are sent
    over ``dicomweb+https://`` only, or plain http to a loopback host (preflight refuses others, naming the key)."""

    class Query(Section):
        """QIDO-RS filters selecting the instances to enhance (all given filters must match)."""

        modality: list[str] = Field(default_factory=list, description="Series Modality codes (CT, MR, CR, DX...); empty: any")
        study_date_from: str | None = Field(None, description="First StudyDate, YYYYMMDD (inclusive)")
        study_date_to: str | None = Field(None, description="Last StudyDate, YYYYMMDD (inclusive)")
        since_watermark: bool = Field(False, description="Only studies whose StudyDate is on or after the latest "
                                      "StudyDate the previous run saw (inclusive; late arrivals with older dates "
                                      "need a run without it)")
        study_uids: list[str] = Field(default_factory=list, description="Only these StudyInstanceUIDs")
        series_uids: list[str] = Field(default_factory=list, description="Only these SeriesInstanceUIDs")
        limit: int | None = Field(None, ge=1, description="At most this many instances per run (oldest StudyDate first)")

        @field_validator("study_date_from", "study_date_to", mode="before")
        @classmethod
        def _date(cls, v: Any) -> str | None:
            if v is None:
                return v
            v = str(v)
            try:
                datetime.datetime.strptime(v, "%Y%m%d")
            except ValueError:
                raise ValueError(f"a DICOM date YYYYMMDD, got {v!r}") from None
            return v

        @field_validator("modality")
        @classmethod
        def _modality(cls, v: list[str]) -> list[str]:
            bad = [m for m in v if not (1 <= len(m) <= 16 and m.replace("_", "").isalnum() and m.isupper())]
            if bad:
                raise ValueError(f"Modality codes are upper-case DICOM CS values (CT, MR, DX...), got {bad}")
            return v

        @field_validator("study_uids", "series_uids")
        @classmethod
        def _uids(cls, v: list[str]) -> list[str]:
            bad = [u for u in v if not (0 < len(u) <= 64 and all(c.isdigit() or c == "." for c in u))]
            if bad:
                raise ValueError(f"UIDs are digits and dots, at most 64 characters; got {len(bad)} that are not")
            return v

    query: Query = Field(default_factory=Query)
    username_env: str = Field("MEDSR_PACS_USERNAME", description="Environment variable holding the HTTP basic user")
    password_env: str = Field("MEDSR_PACS_PASSWORD", description="Environment variable holding the HTTP basic password")
    password_file: str | None = Field(None, description="File holding the password (instead of password_env)")
    token_env: str = Field("MEDSR_PACS_TOKEN", description="Environment variable holding a bearer token")
    token_file: str | None = Field(None, description="File holding a bearer token (instead of token_env)")
    ca_bundle: str | None = Field(None, description="PEM CA bundle for https endpoints (default: the system's); "
                                  "TLS certificates are always verified")
    timeout_s: float = Field(60.0, gt=0, description="Read timeout of one request (connect: at most 10 s)")
    retries: int = Field(4, ge=0, description="Retries of a request on connection errors, timeouts and HTTP 429/5xx")
    backoff_s: float = Field(0.5, ge=0, description="Exponential backoff base between retries (0.5, 1, 2, ... s)")
    max_retry_after_s: float = Field(60.0, ge=0, description="Longest wait a PACS's Retry-After (HTTP 429/503) may "
                                     "impose before a retry; a longer one is cut to this (a busy PACS asking for "
                                     "hours would stall the night's run)")
    max_pages: int = Field(1000, ge=1, description="QIDO-RS pages (of 1000 results) one search may take; a server "
                           "still sending new results after that is refused (an endless listing never ends a run)")
    max_response_mb: int = Field(2048, ge=1, description="Largest answer body read from the PACS, in MiB (a WADO-RS "
                                 "instance, a QIDO-RS page); a larger one is refused while it streams in, before "
                                 "it fills memory")
    concurrency: int = Field(2, ge=1, le=64, description="Concurrent WADO-RS / STOW-RS requests per process; "
                             "the nightly job runs at most this many read tasks and this many write tasks, so the "
                             "PACS sees at most this many retrieves and this many stores at once, however large "
                             "the cluster (a nightly run must never flood a clinical system)")
