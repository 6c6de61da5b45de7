"""The nightly job against a real PACS: `medsr enhance` with a DICOMweb input and output (tests/orthanc.py's Orthanc).

One Orthanc and one module fixture run the whole night story, every assertion through DICOMweb or Orthanc's REST API:

* inputs uploaded through Orthanc's REST API (three series in two studies, 12-bit radiographs with planted patient
  identifiers, and an RLE-compressed MR that must arrive as stored and be decoded locally);
* a `medsr enhance` subprocess (PACS in, PACS out through a slow proxy, manifest on a local path) SIGKILLed once a
  few derived instances are in the PACS; a rerun stores exactly the missing ones; a third run (since the watermark)
  stores nothing and reads no pixel data;
* PACS in, local files out, with the Orthanc stopped mid-run: error rows naming the request, the HTTP status and the
  PACS's reason, a run that ends normally, and a next run that completes exactly those items;
* `medsr status` of the DICOMweb run; `medsr enhance` exits 2 when the PACS cannot be queried.
"""
from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pydicom
import pydicom.data
import pytest
import yaml
from typer.testing import CliRunner

from conftest import write_tiny_model
from medsr_dist.cli import app
from medsr_dist.config import load_config
from medsr_dist.enhance.job import run_enhance_job
from medsr_dist.enhance.manifest import read_manifest
from medsr_dist.pacs.storage import PacsStorage
from medsr_dist.storage import Storage
from orthanc import PacsProxy, require_orthanc
from test_pacs_dicomweb import TEST_FILES, assert_no_identifiers, radiograph

REPO = Path(__file__).resolve().parent.parent
#: (study key, StudyDate, series key, modality, instances) of the radiographs uploaded.
SERIES = [("A", "20240101", "a1", "DX", 4), ("A", "20240101", "a2", "CR", 3), ("B", "20240202", "b1", "DX", 4)]
RLE_MR = "MR_small_RLE.dcm"  # pydicom's 64 x 64 16-bit MR, RLE Lossless: its own study (StudyDate 20040826)


def upload_inputs(server) -> dict[str, dict]:
    """Upload every input through Orthanc's REST API; {SOPInstanceUID: {study, series, rows, cols}}."""
    sources = {}
    objects = [radiograph(f"{study}{series}{i}", modality=modality, study_date=date, study_key=study,
                          series_key=series, number=i + 1, series_description=f"{series} view")
               for study, date, series, modality, n in SERIES for i in range(n)]
    objects.append((TEST_FILES / RLE_MR).read_bytes())
    for data in objects:
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
        sources[str(ds.SOPInstanceUID)] = {"study": str(ds.StudyInstanceUID), "series": str(ds.SeriesInstanceUID),
                                           "rows": int(ds.Rows), "cols": int(ds.Columns),
                                           "date": str(ds.get("StudyDate", ""))}
        assert server.upload(data)["Status"] == "Success"
    return sources


def dicomweb_client(server):
    """The test's own DICOMweb client (dicomweb-client on the harness's session), independent of medsr_dist.pacs."""
    from dicomweb_client import DICOMwebClient

    return DICOMwebClient(server.dicomweb_url, session=server.session)


def derived_instances(server, sources: dict[str, dict]) -> dict[str, list[pydicom.Dataset]]:
    """{source series UID: [derived datasets]} found through QIDO-RS + WADO-RS: every series of the sources' studies
    that is not a source series."""
    client = dicomweb_client(server)
    by_source_series: dict[str, list] = {}
    source_series = {s["series"] for s in sources.values()}
    for study in sorted({s["study"] for s in sources.values()}):
        for series in client.search_for_series(study):
            uid = series["0020000E"]["Value"][0]
            if uid in source_series:
                continue
            for inst in client.search_for_instances(study, uid):
                ds = client.retrieve_instance(study, uid, inst["00080018"]["Value"][0], media_types=(("application/dicom", "*"),))
                source = sources[str(ds.SourceImageSequence[0].ReferencedSOPInstanceUID)]
                by_source_series.setdefault(source["series"], []).append(ds)
    return by_source_series


def kill_when(process: subprocess.Popen, ready, log_path: Path, timeout_s: float = 300.0) -> None:
    """SIGKILL ``process`` (a `medsr enhance` driver with its own local Ray) once ``ready()``; then its process group."""
    try:
        deadline = time.monotonic() + timeout_s
        while not ready():
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the run ended (or {timeout_s:.0f}s passed) before the kill point:\n"
                                     f"{log_path.read_text()[-4000:]}")
            time.sleep(0.1)
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)
        time.sleep(2)  # let the orphaned Ray processes notice; then stop whatever of that instance is left
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="module")
def night(orthanc_server, tmp_path_factory):
    """PACS in/out: killed subprocess run -> resumed run -> third run; then PACS in/files out with Orthanc stopped
    mid-run -> the run that completes it. Everything each step left behind."""
    import ray

    require_orthanc()
    server = orthanc_server
    server.start()
    server.clear()
    tmp = tmp_path_factory.mktemp("pacs-night")
    sources = upload_inputs(server)
    model_dir = tmp / "model"
    model_dir.mkdir()
    write_tiny_model(lambda name, data: (model_dir / name).write_bytes(data))
    proxy = PacsProxy(server)  # the output goes through it: it counts STOW-RS posts and slows the killed run down
    proxy.delay_s = 0.25
    config = {
        "run": {"name": "pacs-night", "root": str(tmp / "run")},
        "ray": {"num_cpus": 4, "progress": False},
        "enhance": {"input": server.uri, "output": proxy.uri, "manifest": str(tmp / "manifest"),
                    "checkpoint": str(model_dir / "model.pth"), "tile": 32, "tile_overlap": 4, "batch_size": 4,
                    "images_per_batch": 2},
        "pacs": {"concurrency": 1, "retries": 1, "backoff_s": 0.05, "timeout_s": 20,
                 "query": {"since_watermark": True}},
    }
    config_path = tmp / "enhance.yaml"
    config_path.write_text(yaml.safe_dump(config))
    out: dict = {"server": server, "sources": sources, "config_path": config_path, "tmp": tmp, "proxy": proxy}
    with pytest.MonkeyPatch.context() as env:
        env.delenv("MEDSR_PACS_TOKEN", raising=False)
        for name, value in server.env.items():  # credentials as medsr-dist reads them (Ray workers inherit them)
            env.setenv(name, value)
        n = len(sources)
        log_path = tmp / "killed-run.log"
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                [sys.executable, "jobs/enhance.py", "--config", str(config_path)], cwd=REPO, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True,
                env={k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")})
        kill_when(process, lambda: server.instance_count() >= n + 3, log_path)
        time.sleep(1.0)  # a STOW-RS in flight through the proxy at the kill may still land
        out["after_kill"] = server.instance_count() - n
        proxy.delay_s, posts_before = 0.0, proxy.posts

        cfg = load_config(config_path)
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
        try:
            out["resumed"] = run_enhance_job(cfg)
            out["resumed_posts"] = proxy.posts - posts_before
            out["after_resume"] = server.series_instances()
            posts_before, requests_before = proxy.posts, proxy.requests
            out["third"] = run_enhance_job(cfg)
            out["third_posts"], out["third_requests"] = proxy.posts - posts_before, proxy.requests - requests_before
            out["after_third"] = server.series_instances()
            out["derived"] = derived_instances(server, sources)
            out["status"] = CliRunner().invoke(app, ["status", proxy.uri, "-c", str(config_path)])

            # PACS in (through a slowed proxy), local files out; the Orthanc behind it stopped mid-run, once the
            # listing and 5 WADO-RS retrieves began (the listing's request count: the same query, made first)
            reader = PacsProxy(server)
            reader.delay_s = 0.3
            files_cfg = load_config(config_path, [f"enhance.input={reader.uri}", f"enhance.output={tmp / 'files'}",
                                                  "enhance.manifest=null", "pacs.query.since_watermark=false"])
            before = reader.requests
            PacsStorage(files_cfg.storage, files_cfg.pacs).query(reader.uri)
            trigger = reader.requests + (reader.requests - before) + 5
            finished = threading.Event()

            def stop_orthanc() -> None:
                while not finished.is_set():
                    if reader.requests >= trigger:
                        server.stop()
                        return
                    time.sleep(0.02)

            watcher = threading.Thread(target=stop_orthanc, daemon=True)
            watcher.start()
            try:
                try:
                    out["faulted"] = run_enhance_job(files_cfg)
                finally:
                    finished.set()
                    watcher.join(timeout=60)
                out["reader_max_in_flight"] = reader.max_in_flight
                server.start()
                reader.delay_s = 0.0
                out["completed"] = run_enhance_job(files_cfg)
                out["files_cfg"] = files_cfg

                # a PACS answering every other WADO-RS retrieve with a multipart body that holds no DICOM: those
                # items are error rows naming the request, the others are done (files out to a new place)
                garbled = {"n": 0}

                def garble(method, path, status, body, content_type):
                    if method == "GET" and "/instances/" in path and content_type.startswith("multipart/related"):
                        garbled["n"] += 1
                        if garbled["n"] % 2:
                            boundary = content_type.split("boundary=")[-1].strip('"').encode()
                            body = b"--" + boundary + b"\r\nContent-Type: application/dicom\r\n\r\nnot DICOM\r\n--" \
                                + boundary + b"--"
                    return status, body, content_type

                reader.mangle = garble
                garbled_cfg = load_config(config_path, [f"enhance.input={reader.uri}", f"enhance.output={tmp / 'files-2'}",
                                                        "enhance.manifest=null", "pacs.query.since_watermark=false"])
                out["garbled"] = run_enhance_job(garbled_cfg)
                reader.mangle = None
                server.stop()
                out["unreachable"] = CliRunner().invoke(app, ["enhance", "-c", str(config_path),
                                                              f"enhance.input={server.uri}"])
            finally:
                reader.close()
                server.start()
        finally:
            ray.shutdown()
            proxy.close()
        yield out


def test_rerun_after_a_kill_stores_only_what_is_missing_and_a_third_run_nothing(night):
    n = len(night["sources"])
    assert 3 <= night["after_kill"] < n, "the kill came after the run had stored everything (or before anything)"
    resumed = night["resumed"]
    assert resumed.counts.get("error", 0) == 0, [r["error"] for r in resumed.rows if r["error"]]
    assert resumed.counts.get("done", 0) + resumed.counts.get("skipped", 0) == n
    # exactly the missing ones were sent (an object stored at the kill but without its record is found, not re-sent)
    assert night["resumed_posts"] == n - night["after_kill"]
    # no duplicates: every SOP Instance UID once, one derived instance per source instance
    after = night["after_resume"]
    assert sum(len(v) for v in after.values()) == 2 * n
    assert all(len(sops) == len(set(sops)) for sops in after.values())
    third = night["third"]
    # since the watermark (the latest StudyDate of the resumed run): only the newest study is listed again
    newest = max(s["date"] for s in night["sources"].values())
    assert len(third.rows) == sum(s["date"] == newest for s in night["sources"].values()) > 0
    assert third.counts == {"skipped": len(third.rows)} and third.read_items == 0  # no WADO-RS, no STOW-RS
    assert night["third_posts"] == 0 and night["after_third"] == after


def test_one_derived_series_per_source_series_with_derived_tags_in_the_source_study(night):
    sources, derived = night["sources"], night["derived"]
    per_series: dict[str, int] = {}
    for s in sources.values():
        per_series[s["series"]] = per_series.get(s["series"], 0) + 1
    assert {k: len(v) for k, v in derived.items()} == per_series  # every source series got all its instances
    for source_series, datasets in derived.items():
        assert len({str(ds.SeriesInstanceUID) for ds in datasets}) == 1  # one derived series per source series
        for ds in datasets:
            source = sources[str(ds.SourceImageSequence[0].ReferencedSOPInstanceUID)]
            assert str(ds.StudyInstanceUID) == source["study"]  # study kept
            assert str(ds.SeriesInstanceUID) != source_series and str(ds.SOPInstanceUID) not in sources
            assert list(ds.ImageType)[:1] == ["DERIVED"]
            assert ds.pixel_array.shape == (4 * source["rows"], 4 * source["cols"])  # decodes, x4
    (mr_series,) = {s["series"] for s in sources.values() if s["rows"] == 64}
    assert derived[mr_series][0].Rows == 256  # the RLE input came as stored and was decoded locally


def test_status_of_a_dicomweb_run_reads_the_manifest_location(night):
    result = night["status"]
    assert result.exit_code == 0, result.output
    assert f"output endpoint: {night['proxy'].uri}" in result.output
    assert f"outputs: {len(night['sources'])}" in result.output
    assert "PACS watermark" in result.output and "20240202" in result.output
    assert_no_identifiers(result.output)


def test_pacs_stopped_mid_run_gives_error_rows_then_the_next_run_completes_them(night):
    faulted, completed, n = night["faulted"], night["completed"], len(night["sources"])
    errors = [r for r in faulted.rows if r["status"] == "error"]
    assert errors and faulted.counts.get("done", 0) >= 2  # items before the stop were written
    assert night["reader_max_in_flight"] == 1  # pacs.concurrency 1: one WADO-RS at a time, however many CPUs
    for row in errors:  # the request, the status / the PACS's reason; no identifiers, no UIDs
        assert "WADO-RS retrieve" in row["error"] or "QIDO-RS" in row["error"], row["error"]
        assert "HTTP 502" in row["error"] or "no answer" in row["error"], row["error"]
        assert_no_identifiers(row["error"], *night["sources"])
    assert completed.counts.get("error", 0) == 0
    assert completed.counts.get("done", 0) == len(errors) and len(completed.rows) == n
    cumulative = read_manifest(Storage(), completed.manifest)
    done = [r for r in cumulative if r["status"] == "done"]
    assert len(done) == n
    for r in done:  # files out: each a derived DICOM file that decodes at x4
        ds = pydicom.dcmread(r["output_key"])
        assert r["output_key"].startswith(str(night["tmp"] / "files" / "studies")) and ds.Rows == 4 * r["input_height"]


def test_malformed_wado_answers_are_error_rows_naming_the_request(night):
    rows, n = night["garbled"].rows, len(night["sources"])
    errors = [r for r in rows if r["status"] == "error"]
    assert len(rows) == n and errors and len(errors) < n, [r["status"] for r in rows]
    for row in errors:
        assert "WADO-RS retrieve: the answer is not what DICOMweb specifies" in row["error"], row["error"]
        assert_no_identifiers(row["error"], *night["sources"])
    assert night["garbled"].counts.get("done", 0) == n - len(errors)


def test_enhance_exits_2_when_the_pacs_cannot_be_queried(night):
    result = night["unreachable"]
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())  # the console wraps lines
    assert "QIDO-RS study search: no answer after 2 attempt(s)" in text, text
    assert_no_identifiers(text)


def test_config_of_a_pacs_run_needs_a_manifest_location_and_never_echoes_credentials():
    from medsr_dist.config import ConfigError

    with pytest.raises(ConfigError, match=r"enhance\.manifest: required when enhance.output is a DICOMweb endpoint"):
        load_config(None, ["enhance.output=dicomweb+http://pacs:8042/dicom-web"])
    with pytest.raises(ConfigError, match=r"enhance\.manifest: must be a local path or an object-store prefix"):
        load_config(None, ["enhance.output=dicomweb+http://pacs:8042/dicom-web",
                           "enhance.manifest=dicomweb+http://pacs:8042/dicom-web"])
    with pytest.raises(ConfigError, match=r"enhance\.input: name the DICOMweb endpoint") as exc:
        load_config(None, ["enhance.input=dicomweb+http://pacs:8042/dicom-web/studies/1.2/series/3.4/instances/5.6"])
    with pytest.raises(ConfigError, match=r"enhance\.input: .*credentials do not belong") as exc:
        load_config(None, ["enhance.input=dicomweb+https://medsr:s3cret-pw@pacs:443/dicom-web"])
    assert "s3cret-pw" not in str(exc.value)
    cfg = load_config(REPO / "configs" / "enhance_pacs.yaml")
    assert cfg.enhance.manifest and cfg.enhance.output.startswith("dicomweb+http://")
