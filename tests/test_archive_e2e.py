"""Done when (issue 12): an archive holding every class of file a hospital archive holds runs through the nightly
job end to end, in ONE Ray run, and nothing is lost, altered or leaked.

The archive: every image and non-image object pydicom ships (copied; their bytes are checked unchanged), the
classes built in tests/test_dicom_archive.py (dual-personality DICOM/TIFF, a bare implicit-VR dataset, palette
colour, a Legacy Converted Enhanced CT of three frames), TIFFs compressed with LZW/Deflate/JPEG, PNG and JPEG,
a structured report, broken files of every kind, a 20000 x 20000 PNG pixel bomb, and identifiers (PatientName,
PatientID, AccessionNumber, PatientBirthDate) planted in several objects, plus an accession number in one key.

Then: one manifest row per file; every image object ``done`` with a derived object that dciodvfy finds no new
error in (valid sources: no error at all; on CI a missing dciodvfy fails); every non-image ``ignored`` with its
SOP class; every broken file ``error`` with its reason; the job's peak memory <= 4 GB with the bomb present (the
driver and every Ray process together, summed PSS; and no single process's RSS above it); the
planted identifiers in no log (driver, console, Ray worker logs), no manifest column and no output's provenance.
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pydicom
import pytest
import tifffile
from pydicom.data import get_testdata_file
from rich.console import Console

from conftest import write_tiny_model
from medsr_dist.config import load_config
from medsr_dist.data.synthetic import make_corrupt_files, make_radiograph
from medsr_dist.io.dicom import build_radiograph_dataset, dataset_to_bytes
from medsr_dist.io.image import ImageMeta, decode_image, encode_image
from test_dicom_archive import (
    DCIODVFY,
    NON_IMAGE,
    PYDICOM_IMAGES,
    _dual_personality,
    _legacy_enhanced_ct,
    _palette_dataset,
    dciodvfy_errors,
    source_errors,
)
from test_enhance_job import non_image_dicom, zero_png

PLANTED = {"PatientName": "PLANTEDFAMILY^PLANTEDGIVEN", "PatientID": "PID-PLANTED-4711",
           "AccessionNumber": "ACCPLANTED0815", "PatientBirthDate": "19230405"}
SECRETS = ("PLANTEDFAMILY", "PLANTEDGIVEN", "PID-PLANTED-4711", "ACCPLANTED0815", "19230405")
KEY_ACCESSION = "ACCKEY55501"  # embedded in a key, as PACS exports do: manifests keep it, logs must not
RSS_LIMIT = 4 << 30


def planted(ds: pydicom.Dataset) -> pydicom.Dataset:
    for keyword, value in PLANTED.items():
        setattr(ds, keyword, value)
    return ds


def tiff(image: np.ndarray, compression: str) -> bytes:
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, image, compression=compression, photometric="minisblack")
    return buffer.getvalue()


def build_archive(root: Path) -> dict[str, tuple[str, str]]:
    """Write the archive; returns {relative key: (class, detail)} with class image / non-image / broken."""
    expected: dict[str, tuple[str, str]] = {}

    def put(key: str, data: bytes, kind: str, detail: str = "") -> None:
        path = root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        expected[key] = (kind, detail)

    for name in sorted(PYDICOM_IMAGES):
        put(f"pydicom/{name}", Path(get_testdata_file(name)).read_bytes(), "image", PYDICOM_IMAGES[name])
    for name in sorted(NON_IMAGE):
        put(f"pydicom/{name}", Path(get_testdata_file(name)).read_bytes(), "non-image", NON_IMAGE[name])

    dx = planted(build_radiograph_dataset(make_radiograph(1, 48), bits_stored=12, patient_id=PLANTED["PatientID"],
                                          modality="DX", uid_key="e2e/dx"))
    put("own/dx-planted.dcm", dataset_to_bytes(dx), "image", "valid DX with planted identifiers")
    dual = planted(build_radiograph_dataset(make_radiograph(2, 40), bits_stored=12, uid_key="e2e/dual"))
    put("own/dual-personality.dcm", _dual_personality(dual), "image", "TIFF header in the DICOM preamble")
    ct = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    put("own/bare-implicit.dcm", dataset_to_bytes(planted(ct), preamble=False, implicit_vr=True), "image",
        "bare implicit VR dataset, no preamble or meta")
    put("own/palette.dcm", dataset_to_bytes(_palette_dataset()), "image", "PALETTE COLOR")
    put("own/enhanced-ct.dcm", _legacy_enhanced_ct(False), "image", "3-frame Legacy Converted Enhanced CT")
    put("own/report-planted.dcm", non_image_dicom(PLANTED["PatientName"], PLANTED["PatientID"]), "non-image",
        "Basic Text SR")
    grey16 = np.rint(make_radiograph(3, 48) * 65535).astype(np.uint16)
    put("own/scan-lzw.tif", tiff(grey16, "lzw"), "image", "TIFF LZW")
    put("own/scan-deflate.tif", tiff(grey16, "zlib"), "image", "TIFF Deflate")
    put("own/scan-jpeg.tif", tiff((grey16 >> 8).astype(np.uint8), "jpeg"), "image", "TIFF JPEG")
    mono8 = ImageMeta(format="png", dtype="uint8", bits_stored=8, channels=1, photometric="MONOCHROME2")
    put(f"own/{KEY_ACCESSION}_chest.png", encode_image(make_radiograph(4, 40)[:, :, None], mono8), "image", "PNG")
    put("own/photo.jpg", encode_image(make_radiograph(5, 40)[:, :, None], ImageMeta(
        format="jpeg", dtype="uint8", bits_stored=8, channels=1, photometric="MONOCHROME2")), "image", "JPEG")

    for name, data in make_corrupt_files(48).items():
        put(f"broken/{name}", data, "broken", name)
    put("broken/bomb.png", zero_png(20000, 20000), "broken", "exceeds enhance.max_input_pixels")
    cut = dataset_to_bytes(planted(build_radiograph_dataset(make_radiograph(6, 48), bits_stored=12, uid_key="e2e/cut")))
    put("broken/truncated-planted.dcm", cut[: len(cut) - 2000], "broken", "truncated DICOM with identifiers")
    no_pixels = planted(build_radiograph_dataset(make_radiograph(7, 48), bits_stored=12, uid_key="e2e/nopix"))
    del no_pixels.PixelData
    put("broken/no-pixel-data.dcm", dataset_to_bytes(no_pixels), "broken", "image object without pixel data")
    return expected


class PeakRss:
    """Samples the memory of this process and all its descendants (the local Ray: raylet, workers) every 0.2 s.

    ``total``: the peak of their summed PSS (proportional set size: a page shared by n processes counts 1/n in
    each, so the sum is the tree's real footprint; summed RSS would count the torch libraries every worker maps
    once per worker); ``largest``: the peak RSS of any one process."""

    def __init__(self):
        import psutil

        self.psutil, self.total, self.largest = psutil, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = self.psutil.Process()
        while not self._stop.wait(0.2):
            pss, rss = [], []
            for p in [me, *me.children(recursive=True)]:
                try:
                    info = p.memory_full_info()
                except self.psutil.Error:
                    continue
                pss.append(info.pss)
                rss.append(info.rss)
            self.total, self.largest = max(self.total, sum(pss)), max(self.largest, max(rss, default=0))

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def sha256s(paths) -> dict[str, str]:
    return {str(p): hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in paths}


@pytest.fixture(scope="module")
def archive_run(tmp_path_factory):
    import ray

    from medsr_dist.pipeline import run_enhance

    tmp = tmp_path_factory.mktemp("archive-e2e")
    archive, models = tmp / "archive", tmp / "model"
    models.mkdir()
    write_tiny_model(lambda name, data: (models / name).write_bytes(data), scale=2)  # x2: small outputs, fast
    expected = build_archive(archive)
    originals = [get_testdata_file(k.split("/", 1)[1]) for k in expected if k.startswith("pydicom/")]
    before = {**sha256s(originals), **sha256s(p for p in archive.rglob("*") if p.is_file())}
    cfg = load_config(None, [f"run.root={tmp / 'run'}", f"enhance.input={archive}", f"enhance.output={tmp / 'out'}",
                             f"enhance.checkpoint={models}/model.pth", "enhance.tile=64", "enhance.tile_overlap=8",
                             "enhance.images_per_batch=4", "ray.num_cpus=2", "ray.progress=false"])
    ray_tmp = tempfile.mkdtemp(prefix="rae2e-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    log_file = tmp / "driver.log"
    handler = logging.FileHandler(log_file)
    handler.setLevel(logging.DEBUG)
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    console = io.StringIO()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=True, _temp_dir=ray_tmp)
    try:
        with PeakRss() as rss:
            result = run_enhance(cfg, Console(file=console, width=250))
        time.sleep(1.0)  # let the workers' last lines reach their log files
    finally:
        ray.shutdown()
        root.removeHandler(handler)
        root.setLevel(old_level)
        handler.close()
    # every file Ray wrote under its session's logs/ (workers' .out/.err, raylet, Ray Data's own log)
    ray_logs = "\n".join(p.read_text(errors="replace") for p in Path(ray_tmp).rglob("*")
                         if p.is_file() and "logs" in p.parts)
    yield {"tmp": tmp, "archive": archive, "expected": expected, "result": result, "before": before,
           "originals": originals, "rss": rss, "console": console.getvalue(), "driver_log": log_file.read_text(),
           "ray_logs": ray_logs, "ray_tmp": ray_tmp, "cfg": cfg}
    shutil.rmtree(ray_tmp, ignore_errors=True)


def rows_by_rel(run) -> dict[str, dict]:
    prefix = str(run["archive"]) + "/"
    return {r["input_key"][len(prefix):]: r for r in run["result"].rows}


@pytest.mark.slow
def test_every_file_has_exactly_one_row_and_no_input_changed(archive_run):
    rows = [r["input_key"] for r in archive_run["result"].rows]
    assert len(rows) == len(set(rows)) == len(archive_run["expected"])
    assert sorted(rows_by_rel(archive_run)) == sorted(archive_run["expected"])
    after = {**sha256s(archive_run["originals"]),
             **sha256s(p for p in archive_run["archive"].rglob("*") if p.is_file())}
    assert after == archive_run["before"]  # pydicom's files and every archive file byte for byte
    run_manifest = pq.read_table(archive_run["result"].run_manifest).to_pylist()
    assert sorted(r["input_key"] for r in run_manifest) == sorted(rows)


@pytest.mark.slow
def test_every_image_object_is_done_with_a_valid_derived_object(archive_run, tmp_path):
    if DCIODVFY is None and os.environ.get("CI"):
        pytest.fail("dciodvfy (dicom3tools) is missing on CI: .ci/run installs it")
    rows = rows_by_rel(archive_run)
    images = [k for k, (kind, _) in archive_run["expected"].items() if kind == "image"]
    not_done = {k: (rows[k]["status"], rows[k]["error"]) for k in images if rows[k]["status"] != "done"}
    assert not not_done, not_done
    for key in images:
        row = rows[key]
        data = Path(row["output_key"]).read_bytes()
        out = decode_image(data, row["output_key"])
        frames = max(row["frames"], 1)
        assert (out.meta.frames, out.pixels.shape[-3:-1]) == (frames, (row["output_height"], row["output_width"]))
        assert (row["output_height"], row["output_width"]) == (row["input_height"] * 2, row["input_width"] * 2)
        assert np.isfinite(row["consistency_psnr_db"]), key  # over every frame
        if out.meta.format != "dicom" or DCIODVFY is None:
            continue
        source = (archive_run["archive"] / key).read_bytes()
        if key.startswith("own/"):  # built valid: the derived object must be entirely clean
            assert dciodvfy_errors(source, tmp_path, "src") == set(), key
            assert dciodvfy_errors(data, tmp_path, "out") == set(), key
        else:  # pydicom's files are not all valid themselves: the derived object adds no error
            new = dciodvfy_errors(data, tmp_path, "out") - source_errors(source, tmp_path)
            assert not new, (key, sorted(new))
    enhanced_ct = rows["own/enhanced-ct.dcm"]
    assert enhanced_ct["frames"] == 3 and pydicom.dcmread(enhanced_ct["output_key"]).NumberOfFrames == 3


@pytest.mark.slow
def test_non_images_are_ignored_naming_their_sop_class_and_broken_files_are_errors_with_reasons(archive_run):
    rows = rows_by_rel(archive_run)
    for key, (kind, detail) in archive_run["expected"].items():
        row = rows[key]
        if kind == "non-image":
            assert row["status"] == "ignored" and detail in row["error"], (key, row["error"])
            assert row["output_key"] == ""
        elif kind == "broken":
            assert row["status"] == "error" and row["error"] and row["output_key"] == "", (key, row["status"])
    assert rows["broken/bomb.png"]["error"].startswith("20000 x 20000 = 400,000,000 pixels exceeds "
                                                       "enhance.max_input_pixels")
    counts = archive_run["result"].counts
    assert counts.get("error") == sum(kind == "broken" for kind, _ in archive_run["expected"].values())
    assert counts.get("ignored") == sum(kind == "non-image" for kind, _ in archive_run["expected"].values())


@pytest.mark.slow
def test_the_jobs_peak_rss_stays_under_4_gb_with_the_pixel_bomb_present(archive_run):
    rss = archive_run["rss"]
    assert 0 < rss.largest <= RSS_LIMIT and 0 < rss.total <= RSS_LIMIT, (rss.largest / 2**30, rss.total / 2**30)


@pytest.mark.slow
def test_planted_identifiers_appear_in_no_log_manifest_or_provenance(archive_run):
    result = archive_run["result"]
    logs = {"console": archive_run["console"], "driver log": archive_run["driver_log"],
            "Ray worker logs": archive_run["ray_logs"]}
    assert archive_run["ray_logs"] and "truncated PNG" in archive_run["driver_log"]  # the job's own lines were caught
    for where, text in logs.items():
        for secret in (*SECRETS, KEY_ACCESSION):
            assert secret not in text, f"{secret} in the {where}"
    out = archive_run["tmp"] / "out"
    manifests = [result.run_manifest, result.manifest]
    for uri in manifests:
        for row in pq.read_table(uri).to_pylist():
            for column, value in row.items():
                if column in ("input_key", "output_key"):
                    continue  # keys: the manifest sits beside the archive, under its access control
                if column == "provenance" and value:  # names the source key, and nothing else of the input
                    value = value.replace(row["input_key"], "<key>")
                for secret in SECRETS:
                    assert secret not in str(value), (uri, column, secret)
    for record in (out / "_manifest" / "items").glob("*.json"):
        text = record.read_text()
        assert not any(s in text for s in SECRETS), record
    for row in result.rows:
        if row["status"] == "done" and not row["output_key"].endswith(".dcm"):
            text = decode_image(Path(row["output_key"]).read_bytes(), "out").meta.text
            assert not any(s in v for s in SECRETS for v in text.values()), row["output_key"]
        if row["status"] == "done" and row["output_key"].endswith(".dcm"):
            derived = pydicom.dcmread(row["output_key"])
            provenance = " ".join(str(derived.get(k, "")) for k in ("DerivationDescription", "ImageComments"))
            assert not any(s in provenance for s in SECRETS), row["output_key"]
