"""The HTTP layer under :mod:`medsr_dist.pacs.dicomweb`: a ``requests`` session and urllib3 retry policy that
bound what a PACS (or whoever answers in its name) can make the client do.

* :class:`PacsSession` follows a redirect only within the endpoint's origin (scheme, host and port): a PACS that
  sends the client elsewhere is refused before anything is read from there (``requests`` alone would follow it,
  drop the credentials, and hand back the other host's data as the PACS's answer).
* It reads at most ``pacs.max_response_mb`` of an answer body, streaming, and refuses a larger one before it fills
  memory (``Content-Length`` is checked first when the server sends one).
* :class:`CappedRetry` waits at most ``pacs.max_retry_after_s`` for a Retry-After (urllib3 honours any value: a
  PACS asking for six hours per retry stalls a run for a day).
* :func:`plain_http_to_remote` tells whether credentials would cross a network in clear text.

Failures raise subclasses of :class:`requests.RequestException` (:class:`CrossOriginRedirect`,
:class:`ResponseTooLarge`), which the client turns into ``PacsError`` rows naming the request.
"""
from __future__ import annotations

import ipaddress
from urllib.parse import urljoin, urlsplit

import requests
from urllib3.util.retry import Retry

DEFAULT_PORTS = {"http": 80, "https": 443}
READ_CHUNK = 1 << 20
LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost"}


class CrossOriginRedirect(requests.RequestException):
    """The PACS answered with a redirect to another scheme, host or port."""


class ResponseTooLarge(requests.RequestException):
    """An answer body over ``pacs.max_response_mb``."""


def origin(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) of a URL, the port made explicit; the host lower-cased."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    return scheme, (parts.hostname or "").lower(), parts.port or DEFAULT_PORTS.get(scheme, 0)


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address) is this machine: ``localhost`` or a loopback address."""
    host = host.strip("[]").lower()
    if host in LOOPBACK_NAMES or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def plain_http_to_remote(url: str) -> bool:
    """Whether requests to ``url`` go over plain http to a host that is not this machine."""
    scheme, host, _ = origin(url)
    return scheme == "http" and not is_loopback(host)


class PacsSession(requests.Session):
    """A session bound to one endpoint's origin, with a cap on answer bodies.

    Also makes ``verify`` (``pacs.ca_bundle``) win over ``REQUESTS_CA_BUNDLE`` / ``CURL_CA_BUNDLE``: plain requests
    lets those variables replace a session's CA bundle (psf/requests#3829)."""

    max_redirects = 5

    def __init__(self, base_url: str, max_response_bytes: int):
        super().__init__()
        self.origin = origin(base_url)
        self.max_response_bytes = max_response_bytes

    def merge_environment_settings(self, url, proxies, stream, verify, cert):
        settings = super().merge_environment_settings(url, proxies, stream, verify, cert)
        if isinstance(self.verify, str) and verify is None:
            settings["verify"] = self.verify
        return settings

    def get_redirect_target(self, resp):
        target = super().get_redirect_target(resp)
        if target is not None:
            there = origin(urljoin(resp.url, target))
            if there != self.origin:
                resp.close()
                raise CrossOriginRedirect(f"HTTP {resp.status_code} redirect to another origin "
                                          f"({there[0]}://{there[1]}:{there[2]}); only "
                                          f"{self.origin[0]}://{self.origin[1]}:{self.origin[2]} is followed")
        return target

    def send(self, request, **kwargs):
        streamed = kwargs.get("stream", False)
        kwargs["stream"] = True
        response = super().send(request, **kwargs)
        if not streamed and not response._content_consumed:
            self._read_bounded(response)
        return response

    def _read_bounded(self, response) -> None:
        cap = self.max_response_bytes
        declared = response.headers.get("Content-Length", "")
        too_large = f"an answer of more than {cap >> 20} MiB (pacs.max_response_mb)"
        if declared.isdigit() and int(declared) > cap:
            response.close()
            raise ResponseTooLarge(f"{too_large}: Content-Length {int(declared) >> 20} MiB", response=response)
        body = bytearray()
        try:
            for chunk in response.iter_content(READ_CHUNK):
                body += chunk
                if len(body) > cap:
                    raise ResponseTooLarge(too_large, response=response)
        finally:
            response.close()
        response._content = bytes(body)
        response._content_consumed = True


class CappedRetry(Retry):
    """urllib3's Retry with every Retry-After wait cut to ``max_retry_after`` seconds."""

    def __init__(self, *args, max_retry_after: float = 60.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.max_retry_after = max_retry_after

    def new(self, **kw):
        retry = super().new(**kw)
        retry.max_retry_after = self.max_retry_after
        return retry

    def get_retry_after(self, response):
        seconds = super().get_retry_after(response)
        return None if seconds is None else min(seconds, self.max_retry_after)


__all__ = ["CappedRetry", "CrossOriginRedirect", "PacsSession", "ResponseTooLarge", "is_loopback", "origin",
           "plain_http_to_remote"]
