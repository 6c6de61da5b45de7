"""The DICOMweb client against a PACS that misbehaves (medsr_dist/pacs/transport.py, dicomweb.py): a small
``http.server`` in a thread answers malformed JSON and multipart, records of the wrong shape, a redirect to another
origin, a listing without end, a Retry-After of six hours, bodies over the size cap. Each becomes a PacsError naming
the endpoint and the request, never a raw decoding error, a hang or a request to another host. Credentials are
refused over plain http to another host, by the client and by preflight. (The real Orthanc's behaviour is held by
tests/test_pacs_dicomweb.py, unchanged.) No Ray.
"""
from __future__ import annotations

import io
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pydicom
import pydicom.data
import pytest

from medsr_dist.config import ConfigError, PacsConfig, load_config
from medsr_dist.pacs.dicomweb import DicomwebPacs, PacsAuthError, PacsError, PacsRefused
from medsr_dist.pacs.transport import CappedRetry, is_loopback, origin, plain_http_to_remote
from medsr_dist.preflight import check_pacs_transport
from medsr_dist.uris import InstanceRef

STUDY = {"0020000D": {"vr": "UI", "Value": ["1.2.3.4.5"]}, "00080020": {"vr": "DA", "Value": ["20240101"]}}
HANG = 60  # seconds: "does not hang" bound for every call here


class FakePacs:
    """A DICOMweb server at ``http://127.0.0.1:<port>/dicom-web`` whose answer to each GET is ``self.answer(handler,
    path, query)`` -> (status, headers, body bytes or None for "no Content-Length, close to end")."""

    def __init__(self, answer):
        self.answer, self.requests = answer, []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                parts = urlsplit(self.path)
                fake.requests.append(parts.path)
                status, headers, body = fake.answer(self, parts.path, parse_qs(parts.query))
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                if body is None:  # streamed without a length: the body ends when the connection closes
                    self.send_header("Connection", "close")
                    self.end_headers()
                    for _ in range(3):
                        self.wfile.write(b"\0" * (1 << 20))
                    self.close_connection = True
                    return
                if "Content-Length" not in headers:
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.uri = f"dicomweb+http://127.0.0.1:{self.port}/dicom-web"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def json_answer(payload, status=200, headers=None):
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return status, {"Content-Type": "application/dicom+json", **(headers or {})}, body


def pacs_for(fake, **cfg) -> DicomwebPacs:
    return DicomwebPacs(fake.uri, PacsConfig(**{"retries": 1, "backoff_s": 0.0, **cfg}))


def bounded(fn, *args):
    """fn(*args), failing the test if it takes longer than HANG seconds."""
    pool = ThreadPoolExecutor(1)
    try:
        return pool.submit(fn, *args).result(timeout=HANG)
    finally:
        pool.shutdown(wait=False)  # a hung call fails the test instead of blocking it


@pytest.fixture(autouse=True)
def no_credentials(monkeypatch):
    for name in ("MEDSR_PACS_TOKEN", "MEDSR_PACS_USERNAME", "MEDSR_PACS_PASSWORD"):
        monkeypatch.delenv(name, raising=False)


REF = InstanceRef("1.2.3.4.5", "1.2.3.4.6", "1.2.3.4.7", "20240101", "CT", 1)


# ------------------------------------------------------------------------------------------------------
# Malformed answers
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("body, expected", [
    (b'[{"0020000D": {"vr": "UI", "Val', "not valid JSON"),
    (b"<html>maintenance</html>", "not valid JSON"),
    ({"a": "record", "is": "not a list"}, "not DICOM JSON"),    # dicomweb-client wraps a lone object in a list
    ("just a string", "not DICOM JSON (a JSON str where a list of records belongs)"),
    ([["a list"]], "not DICOM JSON (a JSON list where a record belongs)"),
    ([{"0020000D": "1.2.3"}], "an attribute that is not"),
    ([{"0020000D": {"vr": "UI", "Value": "1.2.3"}}], "an attribute that is not"),
    ([{"not-a-tag": {"vr": "UI", "Value": ["1"]}}], "an attribute that is not"),
])
def test_malformed_qido_answer_is_a_refusal_naming_the_request(body, expected):
    with FakePacs(lambda h, path, q: json_answer(body)) as fake:
        with pytest.raises(PacsRefused, match="QIDO-RS study search") as info:
            bounded(pacs_for(fake).query)
    assert expected in str(info.value) and fake.uri in str(info.value)
    assert "maintenance" not in str(info.value), "the answer's text is not quoted"


@pytest.mark.parametrize("headers, body", [
    ({"Content-Type": "multipart/related; type=\"application/dicom\"; boundary=b0undary"}, b"no parts at all"),
    ({"Content-Type": "multipart/related; boundary=b0undary"}, b"--b0undary\r\nno header end--b0undary\r\n--b0undary--"),
    ({"Content-Type": "text/html"}, b"<html>login</html>"),
    ({}, b"no content type"),
    ({"Content-Type": "application/dicom"}, b"DICM? not really"),
])
def test_malformed_wado_answer_is_an_error_row(headers, body):
    with FakePacs(lambda h, path, q: (200, headers, body)) as fake:
        pacs = pacs_for(fake)
        with pytest.raises(PacsRefused, match=r"WADO-RS retrieve: the answer is not what DICOMweb specifies"):
            bounded(pacs.retrieve, REF)
        # retrieve_many (the nightly job's read path) turns it into the item's error, not an exception
        [(ref, result)] = bounded(lambda: list(pacs.retrieve_many([REF])))
    assert ref == REF and isinstance(result, PacsError) and "WADO-RS retrieve" in str(result)


def test_a_wellformed_answer_still_works():
    """The fake serves real DICOM: the checks refuse only what is malformed."""
    data = open(pydicom.data.get_testdata_file("CT_small.dcm"), "rb").read()
    ds = pydicom.dcmread(io.BytesIO(data))
    ref = InstanceRef(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID), "", "CT", 1)
    body = b"--b0\r\nContent-Type: application/dicom\r\n\r\n" + data + b"\r\n--b0--"
    with FakePacs(lambda h, path, q: (200, {"Content-Type": "multipart/related; type=\"application/dicom\"; boundary=b0"},
                                      body)) as fake:
        assert pydicom.dcmread(io.BytesIO(bounded(pacs_for(fake).retrieve, ref))).SOPInstanceUID == ref.sop


# ------------------------------------------------------------------------------------------------------
# Redirects
# ------------------------------------------------------------------------------------------------------
def test_redirect_to_another_origin_is_refused_and_never_followed():
    with FakePacs(lambda h, path, q: json_answer([STUDY])) as elsewhere:
        target = f"http://127.0.0.1:{elsewhere.port}/dicom-web/studies"
        with FakePacs(lambda h, path, q: (302, {"Location": target, "Content-Type": "text/plain"}, b"")) as fake:
            with pytest.raises(PacsRefused, match=r"QIDO-RS study search: HTTP 302 redirect to another origin") as info:
                bounded(pacs_for(fake).query)
    assert elsewhere.requests == [], "nothing was asked of the other origin"
    assert f":{elsewhere.port}" in str(info.value)


def test_redirect_within_the_origin_is_followed():
    def answer(h, path, q):
        if path == "/dicom-web/studies":
            return 307, {"Location": "/moved/dicom-web/studies?limit=1000&offset=0"}, b""
        if path == "/moved/dicom-web/studies" and q["offset"] == ["0"]:
            return json_answer([STUDY])
        return json_answer([])

    with FakePacs(answer) as fake:
        refs = bounded(pacs_for(fake).query)
    assert refs == [] and "/moved/dicom-web/studies" in fake.requests  # the study has no series here


def test_redirect_loops_end():
    with FakePacs(lambda h, path, q: (302, {"Location": "/dicom-web/studies?again=1"}, b"")) as fake:
        with pytest.raises(PacsRefused, match="more than 5 redirects"):
            bounded(pacs_for(fake).query)


# ------------------------------------------------------------------------------------------------------
# Paging, Retry-After, size
# ------------------------------------------------------------------------------------------------------
def test_endless_qido_listing_is_refused_after_max_pages():
    def answer(h, path, q):  # every page one new study, for ever
        offset = int(q["offset"][0])
        return json_answer([{"0020000D": {"vr": "UI", "Value": [f"1.2.3.{offset}"]}}])

    with FakePacs(answer) as fake:
        with pytest.raises(PacsRefused, match=r"still new results after 3 pages of 1000 \(pacs.max_pages\)"):
            bounded(pacs_for(fake, max_pages=3).query)
    assert len(fake.requests) == 3
    assert PacsConfig().max_pages == 1000


def test_huge_retry_after_is_capped():
    state = {"n": 0}

    def answer(h, path, q):
        state["n"] += 1
        if state["n"] == 1:
            return json_answer({"Message": "busy"}, status=503, headers={"Retry-After": "21600"})  # six hours
        return json_answer([])

    with FakePacs(answer) as fake:
        assert bounded(pacs_for(fake, max_retry_after_s=0.2).query) == []  # waited 0.2 s, not 6 h
    assert state["n"] == 2


def test_retry_after_cap_survives_urllib3_copies():
    retry = CappedRetry(total=3, max_retry_after=60.0, respect_retry_after_header=True)
    copy = retry.new(total=2)

    class Response:
        headers = {"Retry-After": "21600"}

    assert copy.max_retry_after == 60.0 and copy.get_retry_after(Response()) == 60.0
    Response.headers = {"Retry-After": "7"}
    assert copy.get_retry_after(Response()) == 7.0
    assert PacsConfig().max_retry_after_s == 60.0


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "streamed"])
def test_answer_over_the_size_cap_is_refused(declared):
    size = 3 << 20

    def answer(h, path, q):
        headers = {"Content-Type": "multipart/related; boundary=b0"}
        return (200, {**headers, "Content-Length": str(size)}, b"\0" * size) if declared else (200, headers, None)

    with FakePacs(answer) as fake:
        with pytest.raises(PacsRefused, match=r"WADO-RS retrieve: an answer of more than 1 MiB \(pacs.max_response_mb\)"):
            bounded(pacs_for(fake, max_response_mb=1).retrieve, REF)


# ------------------------------------------------------------------------------------------------------
# Credentials and plain http
# ------------------------------------------------------------------------------------------------------
def test_origin_and_loopback():
    assert origin("HTTP://Pacs.Example.org/dicom-web") == ("http", "pacs.example.org", 80)
    assert origin("https://pacs:8443/x") == ("https", "pacs", 8443)
    assert all(is_loopback(h) for h in ("localhost", "127.0.0.1", "127.9.9.9", "[::1]", "::1", "a.localhost"))
    assert not any(is_loopback(h) for h in ("pacs.example.org", "10.0.0.5", "localhost.example.org"))
    assert plain_http_to_remote("http://pacs:8042/dicom-web") and not plain_http_to_remote("https://pacs/dicom-web")
    assert not plain_http_to_remote("http://127.0.0.1:8042/dicom-web")


def test_credentials_refused_over_plain_http_to_another_host(monkeypatch):
    monkeypatch.setenv("MEDSR_PACS_TOKEN", "s3cr3t-token")
    pacs = DicomwebPacs("dicomweb+http://pacs.example.org:8042/dicom-web", PacsConfig(retries=0))
    with pytest.raises(PacsAuthError, match=r"credentials \(bearer token from \$MEDSR_PACS_TOKEN\) are sent over https "
                                            r"only") as info:
        pacs.query()
    assert "s3cr3t" not in str(info.value)
    # loopback over http is fine (a PACS on this machine, a port-forward); no credentials over http is fine too
    with FakePacs(lambda h, path, q: json_answer([])) as fake:
        assert bounded(pacs_for(fake).query) == []
        monkeypatch.delenv("MEDSR_PACS_TOKEN")
        assert DicomwebPacs("dicomweb+http://pacs.example.org/dicom-web").credentials.kind == "none"


def test_preflight_names_the_key(monkeypatch, tmp_path):
    monkeypatch.setenv("MEDSR_PACS_USERNAME", "medsr")
    monkeypatch.setenv("MEDSR_PACS_PASSWORD", "hunter2")
    out = tmp_path / "out"
    cfg = load_config(None, ["enhance.input=dicomweb+http://pacs.example.org:8042/dicom-web", f"enhance.output={out}"])
    with pytest.raises(ConfigError, match=r"enhance.input: dicomweb\+http://pacs.example.org:8042/dicom-web: PACS "
                                          r"credentials \(HTTP basic") as info:
        check_pacs_transport(cfg)
    assert "hunter2" not in str(info.value)
    cfg = load_config(None, [f"enhance.input={tmp_path}", "enhance.output=dicomweb+http://10.1.2.3/dicom-web",
                             f"enhance.manifest={tmp_path}/manifest"])
    with pytest.raises(ConfigError, match=r"enhance.output: dicomweb\+http://10.1.2.3"):
        check_pacs_transport(cfg)
    for uri in ("dicomweb+https://pacs.example.org/dicom-web", "dicomweb+http://localhost:8042/dicom-web"):
        check_pacs_transport(load_config(None, [f"enhance.input={uri}", f"enhance.output={out}"]))
