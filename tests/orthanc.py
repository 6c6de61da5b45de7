"""Test harness: a real Orthanc PACS (Debian ``orthanc`` + ``orthanc-dicomweb``) on 127.0.0.1.

Each :func:`local_orthanc` starts its own ``Orthanc`` process with a temporary JSON configuration and storage
folder: a free HTTP port, the DICOM (DIMSE) server off, remote access refused (loopback only), HTTP basic
authentication on with one random user/password, and the DICOMweb plugin loaded at ``/dicom-web/``. Nothing
of a system-wide Orthanc (``/etc/orthanc``, ``/var/lib/orthanc``) is read or touched.

Inputs are uploaded through Orthanc's own REST API (``POST /instances``), the way an archive would receive
them, not through the code under test. Optional Lua scripts go into ``LuaScripts`` (e.g. a
``ReceivedInstanceFilter`` that makes the PACS refuse some objects).

Under CI (environment variable ``CI`` set) a missing Orthanc or plugin fails the test; elsewhere it skips with
the reason (:func:`require_orthanc`).
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import requests

from ray_cluster import free_port

ORTHANC_CANDIDATES = ("/usr/sbin/Orthanc", "/usr/bin/Orthanc")
DICOMWEB_PLUGIN_CANDIDATES = ("/usr/share/orthanc/plugins/libOrthancDicomWeb.so",)


def find_orthanc() -> tuple[str | None, str | None, str]:
    """(Orthanc binary, DICOMweb plugin .so, why not) — the paths of the Debian packages, else ``PATH``."""
    binary = next((p for p in ORTHANC_CANDIDATES if os.access(p, os.X_OK)), None) or shutil.which("Orthanc")
    plugin = next((p for p in DICOMWEB_PLUGIN_CANDIDATES if os.path.exists(p)), None)
    if binary is None:
        return None, plugin, "Orthanc is not installed (Debian package 'orthanc'; .ci/run installs it)"
    if plugin is None:
        return binary, None, "the Orthanc DICOMweb plugin is not installed (Debian package 'orthanc-dicomweb')"
    return binary, plugin, ""


def require_orthanc() -> tuple[str, str]:
    """The binary and plugin paths; pytest.fail under CI when missing, pytest.skip (with the reason) elsewhere."""
    import pytest

    binary, plugin, why = find_orthanc()
    if why:
        if os.environ.get("CI"):
            pytest.fail(f"CI is set and {why}: the DICOMweb tests must run on CI")
        pytest.skip(why)
    return binary, plugin  # type: ignore[return-value]


@dataclass
class OrthancServer:
    """A running Orthanc. ``url``: ``http://127.0.0.1:<port>`` (REST API); ``dicomweb_url``: its DICOMweb root
    (``.../dicom-web``); ``uri``: the same as medsr-dist spells it (``dicomweb+http://...``)."""

    url: str
    username: str
    password: str
    root: Path
    config_path: Path
    log_path: Path
    binary: str
    process: subprocess.Popen | None = None
    session: requests.Session = field(default_factory=requests.Session)

    @property
    def dicomweb_url(self) -> str:
        return self.url + "/dicom-web"

    @property
    def uri(self) -> str:
        return "dicomweb+" + self.dicomweb_url

    @property
    def env(self) -> dict[str, str]:
        """Environment variables carrying the credentials the way medsr-dist reads them."""
        return {"MEDSR_PACS_USERNAME": self.username, "MEDSR_PACS_PASSWORD": self.password}

    # -- lifecycle ------------------------------------------------------------------------------------
    def start(self, timeout_s: float = 30.0) -> None:
        """Start (or restart, on the same port and storage) and wait until the REST API and DICOMweb answer."""
        if self.process is not None and self.process.poll() is None:
            return
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the process
        self.process = subprocess.Popen([self.binary, str(self.config_path)], stdout=log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True, cwd=self.root)
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self.process.returncode}:\n{self.log_tail()}")
            with contextlib.suppress(requests.RequestException):
                r = self.session.get(self.dicomweb_url + "/studies", timeout=2)
                if r.status_code == 200:
                    return
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"Orthanc not ready after {timeout_s:.0f}s:\n{self.log_tail()}")

    def stop(self, timeout_s: float = 20.0) -> None:
        """SIGTERM (Orthanc closes its database cleanly), then SIGKILL of its process group if it hangs."""
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, chars: int = 4000) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_bytes()[-chars:].decode(errors="replace")
        return ""

    # -- REST helpers (Orthanc's own API: setting up and inspecting, never the code under test) ---------
    def upload(self, data: bytes) -> dict:
        """Store one DICOM object through ``POST /instances``; returns Orthanc's answer (ID, Status...)."""
        r = self.session.post(self.url + "/instances", data=data, timeout=30,
                              headers={"Content-Type": "application/dicom"})
        r.raise_for_status()
        return r.json()

    def instance_count(self) -> int:
        r = self.session.get(self.url + "/statistics", timeout=10)
        r.raise_for_status()
        return int(r.json()["CountInstances"])

    def series_instances(self) -> dict[str, list[str]]:
        """{SeriesInstanceUID: [SOPInstanceUID, ...]} of everything stored (from Orthanc's REST API)."""
        found: dict[str, list[str]] = {}
        r = self.session.get(self.url + "/instances", params={"expand": ""}, timeout=30)
        r.raise_for_status()
        parents: dict[str, str] = {}
        for inst in r.json():
            sid = inst["ParentSeries"]
            if sid not in parents:
                s = self.session.get(f"{self.url}/series/{sid}", timeout=10).json()
                parents[sid] = s["MainDicomTags"]["SeriesInstanceUID"]
            found.setdefault(parents[sid], []).append(inst["MainDicomTags"]["SOPInstanceUID"])
        return found

    def clear(self) -> None:
        """Delete every patient (and so every study/series/instance)."""
        r = self.session.get(self.url + "/patients", timeout=10)
        r.raise_for_status()
        for pid in r.json():
            self.session.delete(f"{self.url}/patients/{pid}", timeout=30).raise_for_status()


def make_tls_certificate(root: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 made by ``openssl``: (certificate PEM — also the CA bundle a client
    must be given —, private key PEM)."""
    key, cert = root / "tls.key", root / "tls.crt"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    key.chmod(0o600)
    return cert, key


def _config(root: Path, port: int, user: str, password: str, plugin: str, lua: list[str]) -> dict:
    db = root / "db"
    db.mkdir(parents=True, exist_ok=True)
    return {
        "Name": "medsr-test", "StorageDirectory": str(db), "IndexDirectory": str(db),
        "HttpPort": port, "HttpServerEnabled": True,
        "RemoteAccessAllowed": False,  # loopback only
        "AuthenticationEnabled": True, "RegisteredUsers": {user: password},
        "DicomServerEnabled": False, "WebDavEnabled": False, "OrthancExplorerEnabled": True,
        "HttpDescribeErrors": True, "HttpThreadsCount": 8, "ConcurrentJobs": 1, "StableAge": 1,
        "OverwriteInstances": False,
        "Plugins": [plugin],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False, "Ssl": False,
                     "Host": f"127.0.0.1:{port}"},
        "LuaScripts": lua,
    }


@contextlib.contextmanager
def local_orthanc(lua_scripts: dict[str, str] | None = None, startup_timeout_s: float = 30.0) -> Iterator[OrthancServer]:
    """A fresh Orthanc for the ``with`` block; stopped and its folder removed afterwards (kept on failure).

    ``lua_scripts``: {file name: Lua source} loaded at start-up. (HTTPS: Debian 12's Orthanc 1.10.1 crashes with
    SIGSEGV on its first HTTPS request, so TLS is tested through :class:`PacsProxy` with ``tls_dir``.)"""
    binary, plugin, why = find_orthanc()
    if why:
        raise RuntimeError(why)
    root = Path(tempfile.mkdtemp(prefix="medsr-orthanc-"))
    lua = []
    for name, source in (lua_scripts or {}).items():
        (root / name).write_text(source)
        lua.append(str(root / name))
    user, password = "medsr-test", secrets.token_urlsafe(16)
    port = free_port()
    config_path = root / "orthanc.json"
    config_path.write_text(json.dumps(_config(root, port, user, password, plugin, lua), indent=1))
    config_path.chmod(0o600)  # holds the password
    server = OrthancServer(url=f"http://127.0.0.1:{port}", username=user, password=password, root=root,
                           config_path=config_path, log_path=root / "orthanc.log", binary=binary)
    server.session.auth = (user, password)
    server.session.trust_env = False  # a proxy from the environment must not see loopback traffic
    ok = False
    try:
        server.start(startup_timeout_s)
        yield server
        ok = True
    finally:
        server.stop()
        if ok:
            shutil.rmtree(root, ignore_errors=True)


class PacsProxy:
    """A small HTTP proxy in front of an Orthanc, for what Orthanc itself cannot do on demand: answer the next
    ``fail_next`` requests with ``fail_status`` (a PACS under load), delay every request by ``delay_s`` while
    counting requests (``requests``, ``posts``: STOW-RS) and how many are in flight (``max_in_flight``), and accept a bearer ``token`` (Orthanc alone only knows
    HTTP basic), forwarding with the Orthanc's basic credentials; ``mangle(method, path, status, body, content_type)``
    may rewrite an answer (a PACS that answers garbage). ``url``: ``http://127.0.0.1:<port>``."""

    def __init__(self, server: OrthancServer, token: str | None = None, tls_dir: Path | None = None):
        """``tls_dir``: serve HTTPS with a fresh self-signed certificate made there (``self.ca_bundle``)."""
        import http.server
        import ssl
        import threading

        self.server, self.token = server, token
        self.fail_next, self.fail_status, self.delay_s = 0, 503, 0.0
        self.mangle = None
        self.requests = self.posts = 0
        self.in_flight = self.max_in_flight = 0
        self._lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _handle(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                with proxy._lock:
                    proxy.requests += 1
                    proxy.posts += self.command == "POST"
                    proxy.in_flight += 1
                    proxy.max_in_flight = max(proxy.max_in_flight, proxy.in_flight)
                    fail = proxy.fail_next > 0
                    if fail:
                        proxy.fail_next -= 1
                try:
                    if proxy.delay_s:
                        time.sleep(proxy.delay_s)
                    if fail:
                        return self._answer(proxy.fail_status, b"busy", "text/plain")
                    if proxy.token is not None and self.headers.get("Authorization") != f"Bearer {proxy.token}":
                        return self._answer(401, b"", "text/plain")
                    headers = {k: v for k, v in self.headers.items()
                               if k.lower() in ("accept", "content-type")}
                    try:
                        r = proxy.server.session.request(self.command, proxy.server.url + self.path, data=body,
                                                         headers=headers, timeout=60,
                                                         auth=(proxy.server.username, proxy.server.password))
                    except requests.RequestException:  # the PACS behind is down: what a reverse proxy says
                        return self._answer(502, b"bad gateway", "text/plain")
                    answer = (r.status_code, r.content, r.headers.get("Content-Type", "application/octet-stream"))
                    if proxy.mangle is not None:
                        answer = proxy.mangle(self.command, self.path, *answer)
                    self._answer(*answer)
                finally:
                    with proxy._lock:
                        proxy.in_flight -= 1

            def _answer(self, status: int, content: bytes, content_type: str):
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(content)))
                self.end_headers()
                self.wfile.write(content)

            do_GET = do_POST = do_DELETE = _handle

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.httpd.daemon_threads = True
        self.ca_bundle: str | None = None
        if tls_dir is not None:
            cert, key = make_tls_certificate(Path(tls_dir))
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(str(cert), str(key))
            self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
            self.ca_bundle = str(cert)
        scheme = "https" if tls_dir is not None else "http"
        self.url = f"{scheme}://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="pacs-proxy", daemon=True)
        self._thread.start()

    @property
    def uri(self) -> str:
        return "dicomweb+" + self.url + "/dicom-web"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> PacsProxy:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
