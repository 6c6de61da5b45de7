"""Specification of the nightly archive enhancement (`medsr enhance`, jobs/enhance.py, `medsr status`).

The end-to-end part runs the job three times on one S3 archive (the suite's S3 server, a local Ray):
a run whose driver process is SIGKILLed mid-run, a run that finishes the rest, and a run that finds nothing to do.
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
import yaml
from rich.console import Console
from typer.testing import CliRunner

from conftest import write_tiny_model
from medsr_dist.config import load_config
from medsr_dist.data.synthetic import make_corrupt_files, make_radiograph, write_sample_archive
from medsr_dist.enhance.commit import EncodeCommit
from medsr_dist.enhance.identity import MANIFEST_DIR, item_id, output_id, output_key_for
from medsr_dist.enhance.manifest import read_manifest, remove_stale_partials
from medsr_dist.enhance.read import ReadDecode
from medsr_dist.enhance.replicas import EnhanceReplica
from medsr_dist.enhance.spec import JobSpec
from medsr_dist.infer.provenance import enhance_params
from medsr_dist.infer.rows import batch_rows as _rows
from medsr_dist.infer.model_file import read_model_file
from medsr_dist.infer.replica import PrecisionMismatch
from medsr_dist.io.image import decode_image
from medsr_dist.storage import PARTIAL_SUFFIX, Storage

REPO = Path(__file__).resolve().parent.parent
N_IMAGES = 20
SIZE = 64
CORRUPT = ("truncated.png", "notes.png", "corrupt.dcm")
DCIODVFY = shutil.which("dciodvfy")
NO_DCIODVFY = "dciodvfy not installed (Debian: apt-get install -y dicom3tools)"


# --------------------------------------------------------------------------------------------------------
# Identity of an output
# --------------------------------------------------------------------------------------------------------
def test_an_output_is_keyed_by_input_content_model_and_parameters():
    params = {"scale": 4, "outscale": 4, "tile": 256, "tile_overlap": 64, "tile_blend": 4, "backend": "torch",
              "precision": "fp32", "engine": 2}
    oid = output_id("in-sha", "model-sha", params)
    assert oid == output_id("in-sha", "model-sha", dict(reversed(params.items())))
    assert len({oid, output_id("other-in", "model-sha", params), output_id("in-sha", "other-model", params),
                output_id("in-sha", "model-sha", {**params, "tile": 128}),
                output_id("in-sha", "model-sha", {**params, "engine": 3})}) == 5
    # beside its source's relative folder, source stem kept (DICOM files are often named by UID), same extension
    assert output_key_for("s3://b/out", "ward/1.2.840.5.dcm", oid, ".dcm") == f"s3://b/out/ward/1.2.840.5.sr-{oid[:10]}.dcm"
    # the same content under two names is two inputs with two outputs
    assert item_id("a/x.png", oid) != item_id("b/x.png", oid)


def test_a_killed_runs_local_temp_files_are_removed_and_nothing_else(tmp_path):
    out = tmp_path / "out"
    (out / "ward").mkdir(parents=True)
    keep = [out / "ward" / "a.sr-1.png", out / "ward" / ".hidden.png"]
    stale = [out / "ward" / f".a.sr-2.png.x1y2{PARTIAL_SUFFIX}", out / f".record.json.z9{PARTIAL_SUFFIX}"]
    for path in keep + stale:
        path.write_bytes(b"x")
    assert sorted(remove_stale_partials(Storage(), str(out))) == sorted(map(str, stale))
    assert all(p.exists() for p in keep) and not any(p.exists() for p in stale)
    assert remove_stale_partials(Storage(), str(tmp_path / "missing")) == []


# --------------------------------------------------------------------------------------------------------
# The stages as plain callables (no Ray): what each row becomes
# --------------------------------------------------------------------------------------------------------
def run_stages_locally(cfg, keys: list[str]) -> list[dict]:
    """ReadDecode -> EnhanceReplica -> EncodeCommit in this process, as Ray Data would chain them."""
    e = cfg.enhance
    model = read_model_file(e.checkpoint, cfg.storage)
    spec = JobSpec(storage=Storage(cfg.storage), input=e.input, output=e.output, model=model,
                   params=enhance_params(e, model), run_id="local", threshold_db=e.consistency_threshold_db)
    decoded = ReadDecode(spec)({"key": np.array(keys)})
    commit = EncodeCommit(spec)
    return [commit.one(row) for batch in EnhanceReplica(model, cfg.storage, e)(decoded) for row in _rows(batch)]


def valid_dx_dataset(image: np.ndarray, bits: int, photometric: str, patient: str):
    from medsr_dist.io.dicom import build_radiograph_dataset

    return build_radiograph_dataset(image, bits_stored=bits, photometric=photometric, patient_id=patient,
                                    modality="DX", uid_key=f"valid/{bits}/{photometric}")


def dciodvfy_findings(path: str | Path) -> list[str]:
    result = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=60)
    return sorted(line for line in (result.stdout + result.stderr).splitlines() if line.startswith(("Error", "Warning")))


def test_stages_enhance_record_and_then_skip_each_item(tmp_path, tiny_model_dir, monkeypatch):
    from medsr_dist.io.dicom import dataset_to_bytes

    archive = tmp_path / "archive"
    archive.mkdir()
    valid = {"mono1-12.dcm": valid_dx_dataset(make_radiograph(1, 40), 12, "MONOCHROME1", "00000077"),
             "mono2-16.dcm": valid_dx_dataset(make_radiograph(2, 40), 16, "MONOCHROME2", "00000078")}
    for name, ds in valid.items():
        (archive / name).write_bytes(dataset_to_bytes(ds))
    (archive / "empty.png").write_bytes(b"")
    cfg = load_config(None, [f"run.root={tmp_path}", f"enhance.input={archive}", f"enhance.output={tmp_path / 'out'}",
                             f"enhance.checkpoint={tiny_model_dir}/model.pth", "enhance.tile=16", "enhance.tile_overlap=4",
                             "enhance.outscale=3"])
    keys = sorted(str(p) for p in archive.iterdir())
    rows = {Path(r["input_key"]).name: r for r in run_stages_locally(cfg, keys)}
    assert rows["empty.png"]["status"] == "error" and rows["empty.png"]["error"] == "empty file (0 bytes)"
    assert rows["empty.png"]["output_key"] == ""
    for name, ds in valid.items():
        row = rows[name]
        assert row["status"] == "done", row
        out = pydicom.dcmread(row["output_key"])
        assert (out.Rows, out.Columns) == (120, 120)  # outscale 3: Lanczos after the x4 model
        assert [float(v) for v in out.PixelSpacing] == pytest.approx([float(v) / 3 for v in ds.PixelSpacing])
        assert "Super-resolution x3 by model tiny-test@1" in out.DerivationDescription
        assert (tmp_path / "out" / MANIFEST_DIR / "items" / f"{row['item_id']}.json").is_file()
        if DCIODVFY:
            assert dciodvfy_findings(archive / name) == []
            assert dciodvfy_findings(row["output_key"]) == []  # a valid source gives a valid derived object
    again = {Path(r["input_key"]).name: r for r in run_stages_locally(cfg, keys)}
    assert {n: r["status"] for n, r in again.items()} == {"mono1-12.dcm": "skipped", "mono2-16.dcm": "skipped",
                                                            "empty.png": "error"}
    assert again["mono1-12.dcm"]["output_key"] == rows["mono1-12.dcm"]["output_key"]
    Path(rows["mono2-16.dcm"]["output_key"]).unlink()  # an output deleted since: made again, under the same key
    third = {Path(r["input_key"]).name: r for r in run_stages_locally(cfg, keys)}
    assert third["mono2-16.dcm"]["status"] == "done" and Path(rows["mono2-16.dcm"]["output_key"]).is_file()
    assert third["mono2-16.dcm"]["output_key"] == rows["mono2-16.dcm"]["output_key"]
    # an engine whose pixels differ (a new ENGINE_REVISION) makes its own outputs beside the older engine's
    from medsr_dist.infer import provenance

    monkeypatch.setattr(provenance, "ENGINE_REVISION", provenance.ENGINE_REVISION + 1)
    newer = {Path(r["input_key"]).name: r for r in run_stages_locally(cfg, keys)}
    for name in valid:
        assert newer[name]["status"] == "done" and newer[name]["output_key"] != rows[name]["output_key"]
        assert json.loads(newer[name]["params"])["engine"] == provenance.ENGINE_REVISION
        assert Path(rows[name]["output_key"]).is_file() and Path(newer[name]["output_key"]).is_file()


def test_the_onnxruntime_backend_gives_the_same_outputs_under_its_own_keys(tmp_path, tiny_model_dir):
    from medsr_dist.infer.export import export_model_file

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    export_model_file(read_model_file(str(model_dir / "model.pth")), Storage())  # medsr export --format onnx
    archive = tmp_path / "archive"
    write_sample_archive(lambda key, data: (archive / key).parent.mkdir(exist_ok=True) or (archive / key).write_bytes(data),
                         n_images=3, size=40, seed=5)
    keys = sorted(str(p) for p in archive.iterdir())
    outputs = {}
    for backend in ("torch", "onnxruntime"):
        cfg = load_config(None, [f"run.root={tmp_path}", f"enhance.input={archive}", f"enhance.output={tmp_path / 'out'}",
                                 f"enhance.checkpoint={model_dir}/model.pth", "enhance.tile=16", f"enhance.backend={backend}"])
        outputs[backend] = {r["input_key"]: r for r in run_stages_locally(cfg, keys)}
    for key in keys:
        torch_row, onnx_row = outputs["torch"][key], outputs["onnxruntime"][key]
        assert torch_row["status"] == onnx_row["status"] == "done"
        assert torch_row["output_key"] != onnx_row["output_key"]  # the backend is part of an output's identity
        a = decode_image(Path(torch_row["output_key"]).read_bytes(), "torch")
        b = decode_image(Path(onnx_row["output_key"]).read_bytes(), "onnx")
        assert float(np.abs(a.pixels - b.pixels).max()) <= 1.0 / a.meta.maxval + 1e-4  # at most one stored level


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a CPU replica")
def test_a_replica_that_would_run_another_precision_than_the_keys_record_refuses_to_start(
        tmp_path, tiny_model_dir, monkeypatch):
    from medsr_dist.infer import backends

    monkeypatch.setattr(backends, "cpu_has_native_bf16", lambda: False)  # a node without bf16 hardware
    cfg = load_config(None, [f"run.root={tmp_path}", f"enhance.checkpoint={tiny_model_dir}/model.pth",
                             "enhance.precision=bf16"])
    model = read_model_file(cfg.enhance.checkpoint, cfg.storage)
    with pytest.raises(PrecisionMismatch, match=r"enhance.precision: .* runs fp32, but its outputs are keyed and "
                                                r"labelled bf16"):
        EnhanceReplica(model, cfg.storage, cfg.enhance, "bf16")
    assert EnhanceReplica(model, cfg.storage, cfg.enhance, "fp32").backend.precision == "fp32"
    assert enhance_params(cfg.enhance, model, precision="fp32")["precision"] == "fp32"


def test_the_nightly_config_is_a_valid_production_example():
    cfg = load_config(REPO / "configs" / "enhance_nightly.yaml")
    e = cfg.enhance
    assert e.input.startswith("s3://") and e.output.startswith("s3://") and e.checkpoint.startswith("s3://")
    assert (e.tile, e.backend) == (256, "auto") and e.max_replicas > 1
    assert "CHANGE ME" in (REPO / "configs" / "enhance_nightly.yaml").read_text()


# --------------------------------------------------------------------------------------------------------
# End to end: an S3 archive, a killed run, its resumption, a run with nothing left to do
# --------------------------------------------------------------------------------------------------------
def s3_objects(client, url: str) -> dict[str, tuple[str, str]]:
    """{key: (ETag, LastModified)} of every object under an s3:// prefix."""
    bucket, _, prefix = url[len("s3://"):].partition("/")
    found = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/"):
        for item in page.get("Contents", []):
            found[f"s3://{bucket}/{item['Key']}"] = (item["ETag"], str(item["LastModified"]))
    return found


def kill_mid_run(config_path: Path, storage: Storage, items_dir: str, log_path: Path, timeout_s: float = 300.0) -> int:
    """Start `python jobs/enhance.py --config ...`, SIGKILL its driver once the first item record exists.

    Returns how many item records existed at the kill. The driver started its own local Ray; once the driver is
    dead the rest of its process group (that Ray instance) is killed too, as a lost driver node would take it."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
    with open(log_path, "wb") as log:
        process = subprocess.Popen([sys.executable, "jobs/enhance.py", "--config", str(config_path)], cwd=REPO, env=env,
                                   stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            records = storage.list_files(items_dir) if storage.exists(items_dir) else []
            if records:
                break
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"no item record before the run ended or {timeout_s:.0f}s passed:\n"
                                     f"{log_path.read_text()[-4000:]}")
            time.sleep(0.2)
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
        return len(records)
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
def nightly(s3_server, tmp_path_factory, _s3_admin):
    """Archive on S3 -> killed run (subprocess) -> resumed run -> run with nothing left; what each left behind."""
    import ray

    tmp = tmp_path_factory.mktemp("nightly")
    bucket = f"medsr-nightly-{os.getpid()}"
    _s3_admin.create_bucket(Bucket=bucket)
    storage = Storage(load_config(None, [f"storage.endpoint_url={s3_server}"]).storage)
    archive, output, models = f"s3://{bucket}/archive", f"s3://{bucket}/enhanced", f"s3://{bucket}/models/tiny"
    written = write_sample_archive(lambda key, data: storage.write_bytes(f"{archive}/{key}", data),
                                   n_images=N_IMAGES, size=SIZE, seed=3)
    for name, data in make_corrupt_files(SIZE).items():
        if name in CORRUPT:
            storage.write_bytes(f"{archive}/incoming/{name}", data)
    first_png = next(w["key"] for w in written if w["format"] == "png")
    storage.write_bytes(f"{archive}/sub/copy_of_first.png", storage.read_bytes(f"{archive}/{first_png}"))
    storage.write_bytes(f"{archive}/README.txt", b"not an image, excluded by enhance.exclude")
    write_tiny_model(lambda name, data: storage.write_bytes(f"{models}/{name}", data))
    valid = sorted([f"{archive}/{w['key']}" for w in written] + [f"{archive}/sub/copy_of_first.png"])
    corrupt = sorted(f"{archive}/incoming/{name}" for name in CORRUPT)

    config = {
        "run": {"name": "nightly-test", "root": str(tmp / "run")},
        "storage": {"endpoint_url": s3_server},
        "ray": {"num_cpus": 4, "progress": False},
        "enhance": {"input": archive, "output": output, "checkpoint": f"{models}/model.pth", "exclude": ["*.txt"],
                    "tile": 32, "tile_overlap": 4, "batch_size": 4, "images_per_batch": 2,
                    "precision": "fp16"},  # as configs/enhance_nightly.yaml asks; CPU replicas run fp32 and say so
    }
    config_path = tmp / "enhance.yaml"
    config_path.write_text(yaml.safe_dump(config))
    items_dir = f"{output}/{MANIFEST_DIR}/items"

    at_kill = kill_mid_run(config_path, storage, items_dir, tmp / "killed-run.log")
    after_kill = len(storage.list_files(items_dir))

    from medsr_dist.pipeline import run_enhance

    cfg = load_config(config_path)
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        text = io.StringIO()
        resumed = run_enhance(cfg, Console(file=text, width=250))
        before_third = s3_objects(_s3_admin, output)
        third = run_enhance(cfg, Console(file=io.StringIO(), width=250))
        after_third = s3_objects(_s3_admin, output)
        # min_replicas this 4-CPU cluster cannot hold (2 replicas of 3 CPUs), to another prefix; last: its replica
        # may hold its CPUs until the session ends
        from medsr_dist.enhance.job import run_enhance_job

        starved = load_config(config_path, [f"enhance.output={output}-starved", "enhance.min_replicas=2",
                                            "enhance.max_replicas=2", "enhance.cpus_per_replica=3",
                                            "enhance.replica_start_timeout_s=3"])
        started = time.monotonic()
        try:
            run_enhance_job(starved)
            starved_error = None
        except Exception as err:  # noqa: BLE001 - the test names what it must be
            starved_error = err
        starved_s = time.monotonic() - started
        starved_objects = s3_objects(_s3_admin, f"{output}-starved")
    finally:
        ray.shutdown()
    yield {"storage": storage, "config_path": config_path, "archive": archive, "output": output, "valid": valid,
           "corrupt": corrupt, "at_kill": at_kill, "after_kill": after_kill, "resumed": resumed,
           "resumed_console": text.getvalue(), "third": third, "before_third": before_third, "after_third": after_third,
           "starved_error": starved_error, "starved_s": starved_s, "starved_objects": starved_objects}
    for page in _s3_admin.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for item in page.get("Contents", []):
            _s3_admin.delete_object(Bucket=bucket, Key=item["Key"])
    _s3_admin.delete_bucket(Bucket=bucket)


@pytest.mark.slow
def test_the_run_manifest_records_the_replica_sizing_the_cluster_gave(nightly):
    import pyarrow.parquet as pq

    storage, runs = nightly["storage"], f"{nightly['output']}/{MANIFEST_DIR}/runs"
    sizings, backends = [], []
    for uri in storage.list_files(runs, include=["*.parquet"]):
        with storage.open(uri) as f:
            meta = pq.read_schema(f).metadata or {}
        if b"medsr.sizing" in meta:
            sizings.append(json.loads(meta[b"medsr.sizing"]))
            backends.append(json.loads(meta[b"medsr.backend"]))
    assert sizings, "no run manifest records its sizing"
    # enhance.backend auto (the default) and no ONNX export beside the model: torch, and the run says why
    assert {b["name"] for b in backends} == {"torch"} and all("no ONNX export at" in b["reason"] for b in backends)
    # enhance's defaults (auto) on the fixture's 4-CPU local Ray: four single-threaded replicas sharing 4 - 0.5 CPUs
    assert {(s["max_replicas"], s["cpus_per_replica"], s["threads_per_replica"]) for s in sizings} == {(4, 0.87, 1)}
    assert all(s["sizing"].startswith("auto:") for s in sizings)


@pytest.mark.slow
def test_a_cluster_that_cannot_start_min_replicas_fails_the_run_naming_the_key_before_reading_any_item(nightly):
    from medsr_dist.enhance.job import ReplicasNotStartedError

    err = nightly["starved_error"]
    assert isinstance(err, ReplicasNotStartedError), repr(err)
    assert "enhance.min_replicas 2 model replica(s) (3 CPU each)" in str(err), str(err)
    assert "enhance.replica_start_timeout_s 3 s" in str(err)
    assert nightly["starved_s"] < 60  # bounded by the timeout, not by Ray Data running on one replica
    assert not [k for k in nightly["starved_objects"] if f"/{MANIFEST_DIR}/" not in k or "/items/" in k], \
        nightly["starved_objects"]  # no output, no item record


@pytest.mark.slow
def test_a_killed_run_started_again_completes_exactly_once(nightly):
    valid, resumed = nightly["valid"], nightly["resumed"]
    assert 0 < nightly["at_kill"] < len(valid), "the kill must land mid-run"
    rows = {r["input_key"]: r for r in resumed.rows}
    assert sorted(rows) == sorted(valid + nightly["corrupt"])  # README.txt is excluded, nothing else is missing
    assert resumed.counts["done"] + resumed.counts.get("skipped", 0) == len(valid)
    assert resumed.counts.get("skipped", 0) >= nightly["at_kill"]  # what the killed run finished is not redone
    if nightly["after_kill"] < len(valid):
        assert resumed.counts["done"] >= len(valid) - nightly["after_kill"]

    # exactly one output per valid input, and nothing else visible under the output prefix but the manifests
    output_keys = [rows[k]["output_key"] for k in valid]
    assert len(set(output_keys)) == len(valid) and all(output_keys)
    objects = set(nightly["before_third"])
    manifests = {k for k in objects if f"/{MANIFEST_DIR}/" in k}
    assert objects - manifests == set(output_keys)
    assert all(k.endswith((".json", ".parquet")) for k in manifests)

    cumulative = read_manifest(nightly["storage"], resumed.manifest)
    assert sorted(r["input_key"] for r in cumulative) == valid  # the killed run's items included
    assert len({r["item_id"] for r in cumulative}) == len(valid)
    assert all(r["status"] == "done" and r["output_key"] == rows[r["input_key"]]["output_key"] for r in cumulative)
    run_rows = read_manifest(nightly["storage"], resumed.run_manifest)
    assert sorted(r["input_key"] for r in run_rows) == sorted(rows)


@pytest.mark.slow
def test_corrupt_files_get_error_rows_with_reasons_and_do_not_stop_the_run(nightly):
    rows = {r["input_key"]: r for r in nightly["resumed"].rows}
    reasons = {Path(k).name: rows[k]["error"] for k in nightly["corrupt"]}
    assert all(rows[k]["status"] == "error" and rows[k]["output_key"] == "" for k in nightly["corrupt"])
    assert reasons["truncated.png"].startswith("truncated PNG")
    assert reasons["notes.png"].startswith("not a recognised image format")
    assert "corrupt DICOM" in reasons["corrupt.dcm"] or "pixel" in reasons["corrupt.dcm"]
    assert nightly["resumed"].n_errors == len(nightly["corrupt"])


@pytest.mark.slow
def test_every_output_keeps_its_inputs_form_and_carries_provenance(nightly):
    storage, resumed = nightly["storage"], nightly["resumed"]
    manifest = {r["input_key"]: r for r in read_manifest(storage, resumed.manifest)}
    forms = set()
    for key in nightly["valid"]:
        row = manifest[key]
        src = decode_image(storage.read_bytes(key), key)
        data = storage.read_bytes(row["output_key"])
        out = decode_image(data, row["output_key"])
        assert out.pixels.shape == (SIZE * 4, SIZE * 4, src.pixels.shape[2])
        assert (out.meta.format, out.meta.dtype, out.meta.bits_stored, out.meta.channels, out.meta.photometric) == (
            src.meta.format, src.meta.dtype, src.meta.bits_stored, src.meta.channels, src.meta.photometric)
        forms.add((src.meta.format, src.meta.bits_stored, src.meta.photometric))
        assert (row["input_height"], row["output_height"], row["output_bytes"]) == (SIZE, SIZE * 4, len(data))
        assert np.isfinite(row["consistency_psnr_db"]) and row["flagged"] == (row["consistency_psnr_db"] < 30.0)
        assert row["fp32_fallbacks"] == 0  # fp32 here: nothing recomputed (tests/test_compiled_backend.py: the count)
        provenance = json.loads(row["provenance"])  # every manifest row repeats what the file carries
        # the item id, not the key (keys hold names and accession numbers; enhance.provenance_source: key for those)
        assert provenance["medsr:source"] == row["item_id"] and provenance["medsr:source_sha256"] == row["input_sha256"]
        assert provenance["medsr:model_sha256"] == row["model_sha256"] and provenance["medsr:scale"] == "4"
        # the precision that ran, not the one asked for (fp16 has no CPU path)
        assert json.loads(provenance["medsr:params"])["precision"] == json.loads(row["params"])["precision"] == (
            "fp16" if torch.cuda.is_available() else "fp32")
        if out.meta.format != "dicom":
            assert {k: out.meta.text[k] for k in provenance} == provenance
    assert {("png", 8, "MONOCHROME2"), ("png", 16, "MONOCHROME2"), ("tiff", 16, "MONOCHROME2"),
            ("dicom", 12, "MONOCHROME2"), ("dicom", 16, "MONOCHROME1"), ("dicom", 16, "MONOCHROME2")} <= forms


@pytest.mark.slow
def test_dicom_outputs_are_derived_objects_of_the_same_study(nightly, tmp_path):
    storage = nightly["storage"]
    manifest = {r["input_key"]: r for r in read_manifest(storage, nightly["resumed"].manifest)}
    dicoms = [k for k in nightly["valid"] if k.endswith(".dcm")]
    assert len(dicoms) >= 6
    for key in dicoms:
        row = manifest[key]
        src = pydicom.dcmread(io.BytesIO(storage.read_bytes(key)))
        out_bytes = storage.read_bytes(row["output_key"])
        out = pydicom.dcmread(io.BytesIO(out_bytes))
        assert out.SOPInstanceUID != src.SOPInstanceUID and out.SeriesInstanceUID != src.SeriesInstanceUID
        assert out.file_meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID
        assert (out.StudyInstanceUID, out.PatientID, out.PatientName, out.SOPClassUID) == (
            src.StudyInstanceUID, src.PatientID, src.PatientName, src.SOPClassUID)
        assert list(out.ImageType)[:2] == ["DERIVED", "SECONDARY"]
        assert f"x4 by model {row['model_name']}" in out.DerivationDescription
        assert row["model_sha256"] in out.DerivationDescription
        assert (out.Rows, out.Columns) == (src.Rows * 4, src.Columns * 4)
        for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
            assert [float(v) for v in out[keyword].value] == pytest.approx([float(v) / 4 for v in src[keyword].value])
        assert (out.PhotometricInterpretation, out.BitsStored, out.BitsAllocated, out.HighBit) == (
            src.PhotometricInterpretation, src.BitsStored, src.BitsAllocated, src.HighBit)
        assert (out.WindowCenter, out.WindowWidth) == (src.WindowCenter, src.WindowWidth)  # same VOI
        assert (out.RescaleSlope, out.RescaleIntercept) == (src.RescaleSlope, src.RescaleIntercept)
        assert out.pixel_array.shape == (src.Rows * 4, src.Columns * 4)
        if DCIODVFY:  # the sample archive's objects are valid DX/CR, and so must their derived objects be
            (tmp_path / "src.dcm").write_bytes(storage.read_bytes(key))
            (tmp_path / "out.dcm").write_bytes(out_bytes)
            assert dciodvfy_findings(tmp_path / "src.dcm") == []
            assert dciodvfy_findings(tmp_path / "out.dcm") == [], row["output_key"]


def test_dciodvfy_is_available_for_the_dicom_checks():
    """The derived-DICOM checks above use dciodvfy where it is installed. Locally a missing dicom3tools shows up
    among the skips (the checks then only use pydicom); on CI (``CI`` set, where .ci/run installs it) it fails."""
    if DCIODVFY is None:
        if os.environ.get("CI"):
            pytest.fail(f"dciodvfy is missing on CI, so the derived-DICOM validity checks did not run: {NO_DCIODVFY}")
        pytest.skip(NO_DCIODVFY)
    assert subprocess.run([DCIODVFY], capture_output=True, text=True, timeout=60).returncode is not None


@pytest.mark.slow
def test_a_run_with_nothing_left_skips_everything_and_rewrites_nothing(nightly):
    third, valid = nightly["third"], nightly["valid"]
    assert third.counts == {"skipped": len(valid), "error": len(nightly["corrupt"])}
    before, after = nightly["before_third"], nightly["after_third"]
    unchanged = {k: v for k, v in before.items() if "/_manifest/runs/" not in k and not k.endswith("manifest.parquet")}
    assert {k: after[k] for k in unchanged} == unchanged  # outputs and item records: same ETag, same LastModified
    new = set(after) - set(before)
    assert len(new) == 1 and f"/{MANIFEST_DIR}/runs/" in new.pop()  # only this run's manifest was added
    assert sorted(r["input_key"] for r in read_manifest(nightly["storage"], third.manifest)) == valid


@pytest.mark.slow
def test_progress_shows_items_and_throughput_and_the_last_line_names_the_manifest(nightly):
    lines = [line.strip() for line in nightly["resumed_console"].splitlines() if line.strip()]
    total = len(nightly["valid"]) + len(nightly["corrupt"])
    progress = [line for line in lines if line.startswith("enhance: ")]
    assert progress and progress[-1].startswith(f"enhance: {total}/{total} items (100%)")
    assert all("items/s" in line and "input Mpx/s" in line for line in progress)
    assert lines[-1] == f"manifest: {nightly['resumed'].manifest}"


@pytest.mark.slow
def test_status_summarises_the_manifests_of_an_output_prefix(nightly):
    from medsr_dist.cli import app

    result = CliRunner().invoke(app, ["status", nightly["output"], "--config", str(nightly["config_path"])])
    assert result.exit_code == 0, result.output
    text = result.output
    assert f"outputs: {len(nightly['valid'])} " in text and "inputs ignored (not images): 0, quarantined: 0" in text
    assert f"skipped {len(nightly['valid'])}, ignored 0, error {len(nightly['corrupt'])}" in text  # the latest run
    assert not any(Path(k).name in text for k in nightly["corrupt"])  # items by id: keys may embed identifiers
    assert text.count("  error item ") + text.count("  error key-") == len(nightly["corrupt"])
    assert text.strip().splitlines()[-1] == f"manifest: {nightly['third'].manifest}"
    with_keys = CliRunner().invoke(app, ["status", nightly["output"], "--config", str(nightly["config_path"]),
                                         "--log-keys"])
    assert all(Path(k).name in with_keys.output for k in nightly["corrupt"])


# --------------------------------------------------------------------------------------------------------
# Hostile input (issue 12): limits from headers, NaN outputs, poison items, paths, one run per prefix, PHI
# --------------------------------------------------------------------------------------------------------
from medsr_dist.enhance import plan as enhance_plan  # noqa: E402
from medsr_dist.infer import rows as infer_rows  # noqa: E402
from medsr_dist.infer.registry import BACKENDS, register_backend  # noqa: E402
from medsr_dist.infer.model_file import build_model_backend  # noqa: E402
from medsr_dist.io.image import ImageMeta, encode_image  # noqa: E402

POISON_SHAPE = (24, 40)  # the one input of this (height, width) kills its replica


class _WrappedTorch:
    """A real Backend: the tiny model's TorchBackend, with a twist subclasses add in ``__call__``."""

    def __init__(self, inner):
        self.inner, self.scale, self.size_multiple = inner, inner.scale, inner.size_multiple
        self.precision = getattr(inner, "precision", "fp32")

    @classmethod
    def from_model_file(cls, model, storage, *, device=None, precision="fp32"):
        return cls(build_model_backend(model, "torch", storage, device=device, precision=precision))


class NaNBackend(_WrappedTorch):
    """Returns NaN where the model would return its output, for images whose side is 40 pixels."""

    def __call__(self, batch):
        out = self.inner(batch)
        if 40 in batch.shape[2:]:
            out[:, :, :3, :3] = np.nan
        return out


class SegfaultBackend(_WrappedTorch):
    """Segfaults its process (a real SIGSEGV, as a broken runtime would) on a POISON_SHAPE batch."""

    def __call__(self, batch):
        if tuple(batch.shape[2:]) == POISON_SHAPE:
            import ctypes

            ctypes.string_at(0)  # reads address 0: SIGSEGV
        return self.inner(batch)


class RaisingBackend(_WrappedTorch):
    """Raises for tiles of images whose side is 48 pixels (a runtime that cannot run one input)."""

    def __call__(self, batch):
        if 48 in batch.shape[2:]:
            raise RuntimeError("cannot run this tile")
        return self.inner(batch)


class CudaFaultBackend(_WrappedTorch):
    """Raises what torch raises after an illegal memory access on the GPU."""

    def __call__(self, batch):
        raise RuntimeError("CUDA error: an illegal memory access was encountered\nCUDA kernel errors might be "
                           "asynchronously reported at some other API call")


def register_test_backends() -> None:
    """Register the test backends (also Ray's worker_process_setup_hook, so replicas in workers find them)."""
    for name, factory in (("nan-test", NaNBackend), ("raise-test", RaisingBackend), ("segfault-test", SegfaultBackend),
                          ("cuda-fault-test", CudaFaultBackend)):
        if name not in BACKENDS:
            register_backend(name)(factory)


def with_backend(cfg, name: str):
    """The config with a registered test backend (enhance.backend's choices name only the shipped ones)."""
    register_test_backends()
    return cfg.model_copy(update={"enhance": cfg.enhance.model_copy(update={"backend": name})})


def png8(image: np.ndarray) -> bytes:
    return encode_image(image[:, :, None], ImageMeta(format="png", dtype="uint8", bits_stored=8, channels=1,
                                                     photometric="MONOCHROME2"))


def zero_png(height: int, width: int) -> bytes:
    """A valid 8-bit grey PNG of zeros, written row by row: 20000 x 20000 is ~400 kB on disk, 400 MB decoded."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    compressor, row, parts = zlib.compressobj(9), b"\x00" * (width + 1), []
    for _ in range(height):
        parts.append(compressor.compress(row))
    parts.append(compressor.flush())
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b""))


def job_config(tmp_path, tiny_model_dir, archive, *extra: str):
    return load_config(None, [f"run.root={tmp_path}", f"enhance.input={archive}", f"enhance.output={tmp_path / 'out'}",
                              f"enhance.checkpoint={tiny_model_dir}/model.pth", "enhance.tile=0", *extra])


def job_spec(cfg, run_id: str = "local") -> JobSpec:
    e = cfg.enhance
    model = read_model_file(e.checkpoint, cfg.storage)
    return JobSpec(storage=Storage(cfg.storage), input=e.input, output=e.output, model=model,
                   params=enhance_params(e, model), run_id=run_id, threshold_db=e.consistency_threshold_db,
                   max_input_pixels=e.max_input_pixels, max_output_pixels=e.max_output_pixels)


def test_a_pixel_bomb_is_refused_from_its_header_with_the_numbers_and_never_decoded(tmp_path, tiny_model_dir):
    import resource
    import tracemalloc

    archive = tmp_path / "archive"
    archive.mkdir()
    (archive / "bomb.png").write_bytes(zero_png(20000, 20000))
    (archive / "wide.png").write_bytes(png8(make_radiograph(3, 64)[:40]))  # 40 x 64: fine in, too large out
    assert (archive / "bomb.png").stat().st_size < 1_000_000
    cfg = job_config(tmp_path, tiny_model_dir, archive, "enhance.max_output_pixels=40000")
    stage = ReadDecode(job_spec(cfg))
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    tracemalloc.start()
    bomb = stage.one(str(archive / "bomb.png"))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    rss_growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before
    assert bomb["status"] == "error" and bomb["pixels"].size == 0
    assert bomb["error"] == ("20000 x 20000 = 400,000,000 pixels exceeds enhance.max_input_pixels 100,000,000; "
                             "not decoded")
    assert peak < 16 << 20 and rss_growth < 128 << 20  # decoding would take 400 MB (uint8) + 1.6 GB (float32)
    wide = stage.one(str(archive / "wide.png"))
    assert wide["status"] == "error"
    assert wide["error"] == ("output at x4 would be 160 x 256 = 40,960 pixels, over enhance.max_output_pixels "
                             "40,000; not decoded")
    # the defaults hold a 4k x 5k mammogram at x4
    e = load_config(None, []).enhance
    assert e.max_input_pixels >= 4096 * 5120 and e.max_output_pixels >= 4096 * 5120 * 16


def test_a_model_output_with_nan_is_an_error_and_writes_nothing(tmp_path, tiny_model_dir):
    archive = tmp_path / "archive"
    archive.mkdir()
    (archive / "nan.png").write_bytes(png8(make_radiograph(1, 40)))  # 40 x 40: the NaN backend spoils it
    (archive / "fine.png").write_bytes(png8(make_radiograph(2, 32)))
    cfg = with_backend(job_config(tmp_path, tiny_model_dir, archive), "nan-test")
    rows = {Path(r["input_key"]).name: r for r in run_stages_locally(cfg, sorted(str(p) for p in archive.iterdir()))}
    assert rows["nan.png"]["status"] == "error" and rows["nan.png"]["output_key"] == ""
    # 3 x 3 NaN pixels; grey images go through the model as RGB and are averaged back to one channel
    assert rows["nan.png"]["error"] == "the model output 9 non-finite values (NaN/Inf); nothing written"
    assert rows["fine.png"]["status"] == "done"
    written = [p.name for p in (tmp_path / "out").iterdir() if p.is_file()]
    assert written == [Path(rows["fine.png"]["output_key"]).name]  # no output, no record for the NaN image
    assert infer_rows.non_finite(np.array([0.5, np.inf, -np.inf, np.nan], np.float32)) == 3


def test_a_failing_batch_is_retried_so_one_bad_image_fails_alone_and_the_rest_are_unchanged(tmp_path, tiny_model_dir):
    archive = tmp_path / "archive"
    archive.mkdir()
    for name, seed, side in (("a.png", 1, 48), ("b.png", 2, 32), ("c.png", 3, 40)):  # a: the backend refuses it
        (archive / name).write_bytes(png8(make_radiograph(seed, side)))
    cfg = job_config(tmp_path, tiny_model_dir, archive, "enhance.batch_size=4")
    decoded = ReadDecode(job_spec(cfg))({"key": np.array(sorted(str(p) for p in archive.iterdir()))})

    def replica_rows(cfg) -> dict:
        model = read_model_file(cfg.enhance.checkpoint, cfg.storage)
        return {Path(r["key"]).name: r for b in EnhanceReplica(model, cfg.storage, cfg.enhance)(decoded)
                for r in _rows(b)}

    clean, failing = replica_rows(cfg), replica_rows(with_backend(cfg, "raise-test"))
    assert failing["a.png"]["status"] == "error" and failing["a.png"]["output"].size == 0
    assert failing["a.png"]["error"] == "inference failed: RuntimeError: cannot run this tile"
    for name in ("b.png", "c.png"):
        assert failing[name]["status"] == "todo" and failing[name]["output"].dtype == np.uint16
        np.testing.assert_array_equal(failing[name]["output"], clean[name]["output"])
    assert clean["a.png"]["output"].shape == (1, 192, 192, 1)


@pytest.mark.parametrize(("exc", "fatal"), [
    (RuntimeError("CUDA error: an illegal memory access was encountered"), True),
    (RuntimeError("CUDA error: device-side assert triggered"), True),
    (RuntimeError("cuDNN error: CUDNN_STATUS_EXECUTION_FAILED"), True),
    (RuntimeError("CUBLAS_STATUS_EXECUTION_FAILED when calling `cublasSgemm( handle, opa, opb, m, n, k, ...)`"), True),
    (RuntimeError("NCCL error in: ProcessGroupNCCL.cpp:1275, unhandled cuda error"), True),
    (RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : CUDA failure 700: an illegal memory access"), True),
    (type("AcceleratorError", (RuntimeError,), {})("unspecified"), True),
    (type("OutOfMemoryError", (RuntimeError,), {})("CUDA out of memory. Tried to allocate 2.00 GiB"), False),
    (RuntimeError("CUDA error: out of memory"), False),
    (ValueError("expected a (B, 3, h, w) batch, got shape (1, 4, 8, 8)"), False),
    (MemoryError(), False),
])
def test_fatal_device_errors_are_told_apart_from_per_image_failures(exc, fatal):
    assert infer_rows.is_fatal_device_error(exc) is fatal


def test_a_fatal_device_error_restarts_the_replica_instead_of_failing_the_image(tmp_path, tiny_model_dir, monkeypatch):
    class Restarted(Exception):
        pass

    def restart(self):
        raise Restarted

    monkeypatch.setattr(EnhanceReplica, "_restart", restart)  # in a Ray actor: os._exit, and Ray starts a new one
    archive = tmp_path / "archive"
    archive.mkdir()
    (archive / "a.png").write_bytes(png8(make_radiograph(1, 32)))
    cfg = with_backend(job_config(tmp_path, tiny_model_dir, archive), "cuda-fault-test")
    with pytest.raises(Restarted):
        run_stages_locally(cfg, [str(archive / "a.png")])


def test_keys_that_climb_out_or_are_absolute_are_refused_and_outputs_stay_under_the_prefix(tmp_path, tiny_model_dir):
    archive = tmp_path / "archive"
    archive.mkdir()
    spec = job_spec(job_config(tmp_path, tiny_model_dir, archive))
    for key, reason in ((f"{archive}/a/../../x.png", "'..' segment"), (f"{archive}//abs/x.png", "absolute")):
        row = ReadDecode(spec).one(key)
        assert row["status"] == "error" and reason in row["error"] and row["input_bytes"] == 0  # nothing read
    (archive / "a").mkdir()
    (archive / "a" / "x.png").write_bytes(png8(make_radiograph(1, 32)[:16, :16]))
    row = ReadDecode(spec).one(f"{archive}/./a//x.png")
    assert row["status"] == "todo" and row["output_key"].startswith(f"{tmp_path / 'out'}/a/x.sr-")


@pytest.mark.parametrize("spelling", ["{out}", "{out}/", "file://{out}", "file://{out}/", "{archive}/./enhanced",
                                      "{archive}/sub/../enhanced/"])
def test_the_output_prefix_is_never_listed_as_input_however_it_is_spelled(tmp_path, spelling):
    from medsr_dist.enhance.plan import list_inputs

    archive = tmp_path / "archive"
    (archive / "enhanced" / "_manifest").mkdir(parents=True)
    (archive / "in.png").write_bytes(b"x")
    (archive / "enhanced" / "in.sr-0123456789.png").write_bytes(b"y")
    (archive / "enhanced" / "_manifest" / "manifest.parquet").write_bytes(b"z")
    out = spelling.format(out=archive / "enhanced", archive=archive)
    e = load_config(None, [f"run.root={tmp_path}", f"enhance.input={archive}", f"enhance.output={out}"]).enhance
    assert [f.uri for f in list_inputs(Storage(), e)] == [f"{archive}/in.png"]
    inside = load_config(None, [f"run.root={tmp_path}", f"enhance.input={archive}/enhanced/",
                                f"enhance.output=file://{archive}"]).enhance
    with pytest.raises(ValueError, match="lies inside enhance.output"):
        list_inputs(Storage(), inside)


def non_image_dicom(patient_name: str = "", patient_id: str = "") -> bytes:
    """A Basic Text SR object (no pixel data), as a PACS holds next to images."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.Modality, ds.PatientName, ds.PatientID = "SR", patient_name, patient_id
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.ValueType, ds.ContentSequence = "CONTAINER", pydicom.Sequence()
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def test_a_non_image_object_is_ignored_with_its_sop_class_named(tmp_path, tiny_model_dir):
    archive = tmp_path / "archive"
    archive.mkdir()
    (archive / "report.dcm").write_bytes(non_image_dicom("DOE^JANE", "PID-4711"))
    row = ReadDecode(job_spec(job_config(tmp_path, tiny_model_dir, archive))).one(str(archive / "report.dcm"))
    assert row["status"] == "ignored" and "Basic Text SR" in row["error"] and "1.2.840.10008.5.1.4.1.1.88.11" in row["error"]
    assert "DOE" not in row["error"] and "PID-4711" not in row["error"]


def test_reasons_never_carry_identifiers_from_the_header_or_the_key(tmp_path, tiny_model_dir, monkeypatch):
    from medsr_dist.enhance import read as image_io
    from medsr_dist.io.dicom import build_radiograph_dataset, dataset_to_bytes

    ds = build_radiograph_dataset(make_radiograph(1, 32)[:16, :16], bits_stored=12, patient_id="ACC-PID-31337")
    ds.PatientName, ds.AccessionNumber, ds.PatientBirthDate = "SMITH^ALICE", "ACC998877", "19610203"
    archive = tmp_path / "archive"
    archive.mkdir()
    key = archive / "ACC998877_chest.dcm"
    key.write_bytes(dataset_to_bytes(ds))

    def leaky_decoder(data, name, **limits):  # what third-party decoders do now and then: quote a header value
        raise ValueError(f"cannot decode {name}: bad value 'SMITH^ALICE' (PatientID ACC-PID-31337, born 19610203, "
                         f"accession ACC998877) in {key}")

    monkeypatch.setattr(image_io, "decode_image", leaky_decoder)
    row = ReadDecode(job_spec(job_config(tmp_path, tiny_model_dir, archive))).one(str(key))
    assert row["status"] == "error" and row["error"].startswith("ValueError: cannot decode input: bad value")
    for secret in ("SMITH", "ALICE", "ACC-PID-31337", "19610203", "ACC998877"):
        assert secret not in row["error"], row["error"]


def test_logs_and_status_name_items_by_id_and_keys_only_when_asked():
    from medsr_dist.enhance.status import format_summary
    from medsr_dist.io.phi import item_label, key_ref

    row = {"input_key": "s3://pacs/ACC123/img.dcm", "item_id": "0123456789abcdef0123"}
    assert item_label(row) == "item 0123456789abcdef0123" and item_label(row, log_keys=True) == row["input_key"]
    assert item_label({"input_key": row["input_key"], "item_id": ""}) == key_ref(row["input_key"])
    assert "ACC123" not in key_ref(row["input_key"])
    summary = {"output": "s3://o", "manifest": "s3://o/_manifest/manifest.parquet", "outputs": 1, "ignored": 2,
               "quarantined": 1, "flagged": 1, "input_bytes": 0, "output_bytes": 0, "consistency_psnr_db": None,
               "models": {}, "runs": 1, "latest_run": "r", "latest_run_manifest": "m", "latest_counts": {"error": 1},
               "latest_errors": [(row["item_id"], row["input_key"], "truncated PNG")],
               "quarantined_items": [("", "s3://pacs/ACC777/x.dcm", "quarantined: ...")],
               "flagged_outputs": [(row["item_id"], row["input_key"], "s3://o/ACC123/img.sr-1.dcm",
                                    "consistency 20.0 dB < enhance.consistency_threshold_db 30")]}
    text = format_summary(summary)
    assert "ACC" not in text and "inputs ignored (not images): 2, quarantined: 1" in text
    assert "ignored 0" in text and "quarantined 0" in text  # the latest run's counts name every status
    assert "ACC123/img.dcm" in format_summary(summary, log_keys=True)


def test_status_says_why_each_output_was_flagged_consistency_or_uncertainty(tmp_path):
    from medsr_dist.enhance.manifest import manifest_row as _manifest_row, manifest_uri, write_manifest
    from medsr_dist.enhance.status import format_summary, manifest_summary

    def done(name: str, score: float, p99: float | None = None) -> dict:
        std = {"uncertainty_p99": p99, "uncertainty_key": f"{tmp_path}/o/{name}.std.png"} if p99 is not None else {}
        return _manifest_row({"input_key": f"{tmp_path}/in/{name}.png", "item_id": f"id-{name}", "status": "done",
                              "output_key": f"{tmp_path}/o/{name}.sr.png", "model_name": "m@1", "model_sha256": "ab" * 32,
                              "consistency_psnr_db": score, "flagged": True, **std})

    rows = [done("sharp", 41.0, p99=0.08), done("blurry", 21.5), done("both", 22.0, p99=0.2)]
    write_manifest(Storage(), manifest_uri(f"{tmp_path}/o"), rows)
    summary = manifest_summary(Storage(), f"{tmp_path}/o", threshold_db=30.0, uncertainty_threshold=0.05)
    lines = {ln.split(":", 1)[0].strip(): ln.split(":", 1)[1].strip()
             for ln in format_summary(summary, log_keys=True).splitlines() if ln.strip().startswith("flagged ")}
    out = f"{tmp_path}/o"
    assert lines[f"flagged {out}/sharp.sr.png"] == "uncertainty p99 0.0800 > enhance.uncertainty_threshold 0.05"
    assert lines[f"flagged {out}/blurry.sr.png"] == "consistency 21.5 dB < enhance.consistency_threshold_db 30"
    assert lines[f"flagged {out}/both.sr.png"] == ("uncertainty p99 0.2000 > enhance.uncertainty_threshold 0.05; "
                                                  "consistency 22.0 dB < enhance.consistency_threshold_db 30")
    # thresholds raised since the run: the row's values, not a reason that no longer holds
    later = manifest_summary(Storage(), out, threshold_db=10.0, uncertainty_threshold=0.5)
    assert dict((o, why) for _, _, o, why in later["flagged_outputs"])[f"{out}/sharp.sr.png"] == \
        "consistency 41.0 dB, uncertainty p99 0.0800 (flagged under the thresholds of its run)"


def test_a_second_run_on_a_leased_prefix_exits_clearly_and_touches_nothing(tmp_path, tiny_model_dir):
    from medsr_dist.enhance.identity import LEASE_FILE
    from medsr_dist.enhance.job import run_enhance_job
    from medsr_dist.storage import Lease, LeaseHeldError

    archive = tmp_path / "archive"
    archive.mkdir()
    (archive / "a.png").write_bytes(png8(make_radiograph(1, 32)[:16, :16]))
    cfg = job_config(tmp_path, tiny_model_dir, archive)
    out = tmp_path / "out"
    first = Lease.acquire(Storage(), str(out / MANIFEST_DIR / LEASE_FILE), "first-run", ttl_s=600)
    in_flight = out / f".a.sr-x.png.q1w2{PARTIAL_SUFFIX}"  # the first run's temp file, mid-write
    in_flight.write_bytes(b"half")
    with pytest.raises(LeaseHeldError, match=r"another run \(first-run on host"):
        run_enhance_job(cfg)  # refused before Ray is needed, and before the stale-temp-file sweep
    assert in_flight.read_bytes() == b"half"
    assert sorted(p.name for p in out.rglob("*") if p.is_file() and not p.name.endswith(".lock")) == [
        in_flight.name, LEASE_FILE]
    first.release()


@pytest.mark.slow
def test_a_poison_input_fails_alone_and_is_quarantined_after_max_attempts(tmp_path, tiny_model_dir):
    """A real Ray run, twice (then a third time without Ray work): an input that segfaults its replica."""
    import ray

    from medsr_dist.enhance.job import run_enhance_job
    from medsr_dist.enhance.status import manifest_summary

    archive = tmp_path / "archive"
    archive.mkdir()
    for i in range(5):
        (archive / f"ok{i}.png").write_bytes(png8(make_radiograph(i, 32)))
    (archive / "ok2x.png").write_bytes(png8(make_radiograph(9, 32)[: POISON_SHAPE[0], :]))  # 24 x 32: not poison
    (archive / "poison.png").write_bytes(png8(make_radiograph(7, 40)[: POISON_SHAPE[0], : POISON_SHAPE[1]]))
    cfg = with_backend(job_config(tmp_path, tiny_model_dir, archive, "enhance.images_per_batch=7", "enhance.replica_start_timeout_s=120",
                                  "enhance.max_attempts=2"), "segfault-test")
    # the replicas run in Ray workers: they register the test backends on start (this module, found on PYTHONPATH)
    tests_dir = str(Path(__file__).resolve().parent)
    # 4 logical CPUs, as the other job tests: after the segfault Ray restarts the dead replica while Ray Data may
    # already start its replacement; on 2 logical CPUs the two replicas then hold every CPU and the decode/encode
    # tasks never get scheduled (seen as a hang in a CI rehearsal)
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([tests_dir, str(REPO)])},
                          "worker_process_setup_hook": "test_enhance_job.register_test_backends"})
    try:
        first = run_enhance_job(cfg)
        # the replica Ray restarted after the crash does not outlive the run (enhance/pass_owner.py): every CPU of
        # the node comes back (before, it held 3.5 CPUs for good and the next pass never started its replica)
        deadline = time.monotonic() + 30
        while ray.available_resources().get("CPU", 0) < 4 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert ray.available_resources().get("CPU", 0) == 4
        second = run_enhance_job(cfg)
        third = run_enhance_job(cfg)  # nothing to run: decided from the manifest, no input read
    finally:
        ray.shutdown()
    innocent = sorted(str(p) for p in archive.iterdir() if p.name != "poison.png")
    poison = str(archive / "poison.png")
    rows = [{r["input_key"]: r for r in run.rows} for run in (first, second, third)]
    assert all(rows[0][k]["status"] == "done" for k in innocent), [rows[0][k]["error"] for k in innocent]
    assert rows[0][poison]["status"] == "error" and rows[0][poison]["attempts"] == 1
    assert rows[0][poison]["error"].startswith("the model replica died with this item in its batch, and again")
    assert all(rows[1][k]["status"] == "skipped" for k in innocent)
    assert rows[1][poison]["status"] == "quarantined" and rows[1][poison]["attempts"] == 2
    assert "killed its model replica in 2 runs" in rows[1][poison]["error"]
    same = ("status", "error", "attempts", "input_bytes", "input_version")  # not tried again: the same count
    assert {k: rows[2][poison][k] for k in same} == {k: rows[1][poison][k] for k in same}
    assert third.counts == {"skipped": len(innocent), "quarantined": 1}
    summary = manifest_summary(Storage(), cfg.enhance.output)
    assert (summary["outputs"], summary["quarantined"], summary["ignored"]) == (len(innocent), 1, 0)
    (archive / "poison.png").write_bytes(png8(make_radiograph(7, 32)))  # replaced by a readable image
    plan = enhance_plan.plan_run(Storage(), job_spec(cfg, "after"), enhance_plan.list_inputs(Storage(), cfg.enhance))
    assert [i["key"] for i in plan.todo] == [poison] and not plan.alone  # changed content: tried afresh


def test_an_unchanged_input_is_skipped_from_the_manifest_without_being_read(tmp_path, tiny_model_dir):
    from medsr_dist.enhance.manifest import manifest_uri, merge_cumulative, write_manifest
    from medsr_dist.enhance.plan import list_inputs, plan_run

    class CountingStorage(Storage):
        """Counts bytes read from input keys (the manifest and listings are not input data)."""

        def __init__(self, config=None):
            super().__init__(config)
            self.input_bytes_read = 0

        def read_bytes(self, uri):
            data = super().read_bytes(uri)
            if str(uri).startswith(str(archive)):
                self.input_bytes_read += len(data)
            return data

    archive = tmp_path / "archive"
    archive.mkdir()
    for i in range(3):
        (archive / f"{i}.png").write_bytes(png8(make_radiograph(i, 32)))
    (archive / "report.dcm").write_bytes(non_image_dicom())
    cfg = job_config(tmp_path, tiny_model_dir, archive)
    storage = CountingStorage()
    spec = job_spec(cfg)
    entries = list_inputs(storage, cfg.enhance)
    batch = {"key": np.array([f.uri for f in entries]), "size": np.array([f.size for f in entries]),
             "version": np.array([f.version for f in entries])}
    commit = EncodeCommit(spec)
    first = [commit.one(r) for b in EnhanceReplica(spec.model, cfg.storage, cfg.enhance)(ReadDecode(spec)(batch))
             for r in _rows(b)]
    assert sorted(r["status"] for r in first) == ["done", "done", "done", "ignored"]
    write_manifest(storage, manifest_uri(spec.output), merge_cumulative(storage, spec.output, first))
    storage.input_bytes_read = 0

    plan = plan_run(storage, spec, list_inputs(storage, cfg.enhance))
    assert storage.input_bytes_read == 0 and not plan.todo and not plan.alone
    assert sorted(r["status"] for r in plan.rows) == ["ignored", "skipped", "skipped", "skipped"]
    (archive / "1.png").write_bytes(png8(make_radiograph(11, 32)))  # changed: read and hashed again
    Path(next(r["output_key"] for r in first if r["input_key"].endswith("/2.png"))).unlink()  # output gone: redone
    plan = plan_run(storage, spec, list_inputs(storage, cfg.enhance))
    assert sorted(Path(i["key"]).name for i in plan.todo) == ["1.png", "2.png"]
    other = job_spec(load_config(None, [f"run.root={tmp_path}", f"enhance.input={archive}",
                                        f"enhance.output={tmp_path / 'out'}", f"enhance.checkpoint={tiny_model_dir}/model.pth",
                                        "enhance.tile=16"]))
    assert len(plan_run(storage, other, list_inputs(storage, cfg.enhance)).todo) == 3  # other parameters: other outputs


def test_a_second_run_on_a_leased_s3_prefix_exits_and_leaves_the_first_runs_lease(s3_server, s3_bucket, tiny_model_dir,
                                                                                   tmp_path):
    from medsr_dist.enhance.identity import LEASE_FILE
    from medsr_dist.enhance.job import run_enhance_job
    from medsr_dist.storage import Lease, LeaseHeldError

    storage = Storage(load_config(None, [f"storage.endpoint_url={s3_server}"]).storage)
    storage.write_bytes(f"{s3_bucket}/archive/a.png", png8(make_radiograph(1, 32)))
    cfg = load_config(None, [f"run.root={tmp_path}", f"storage.endpoint_url={s3_server}",
                             f"enhance.input={s3_bucket}/archive", f"enhance.output={s3_bucket}/out/",
                             f"enhance.checkpoint={tiny_model_dir}/model.pth"])
    lease_uri = f"{s3_bucket}/out/{MANIFEST_DIR}/{LEASE_FILE}"
    first = Lease.acquire(storage, lease_uri, "first-run", ttl_s=600)
    held = storage.read_bytes(lease_uri)
    with pytest.raises(LeaseHeldError, match=r"another run \(first-run on host .*Only one run per output prefix"):
        run_enhance_job(cfg, storage)
    assert storage.read_bytes(lease_uri) == held and storage.list_files(f"{s3_bucket}/out") == [lease_uri]
    first.release()
    assert storage.list_files(f"{s3_bucket}/out") == []


def test_an_input_over_max_input_bytes_is_refused_from_its_listing_size_unread(tmp_path, tiny_model_dir):
    archive = tmp_path / "archive"
    archive.mkdir()
    (archive / "big.png").write_bytes(png8(make_radiograph(3, 64)))
    size = (archive / "big.png").stat().st_size
    cfg = job_config(tmp_path, tiny_model_dir, archive, f"enhance.max_input_bytes={size - 1}")
    spec = dataclasses.replace(job_spec(cfg), max_input_bytes=cfg.enhance.max_input_bytes)
    stage = ReadDecode(spec)
    # listed size over the limit: refused before reading (a key that does not exist proves nothing was read)
    listed = stage.one(str(archive / "gone.png"), size=size)
    assert listed["status"] == "error" and listed["pixels"].size == 0
    assert listed["error"] == f"{size:,} bytes exceeds enhance.max_input_bytes {size - 1:,}; not read"
    # no size in the listing (PACS): the bytes read are held against it
    unlisted = stage.one(str(archive / "big.png"))
    assert unlisted["status"] == "error" and "enhance.max_input_bytes" in unlisted["error"]
    assert ReadDecode(dataclasses.replace(spec, max_input_bytes=size)).one(str(archive / "big.png"))["status"] == "todo"
    assert load_config(None, []).enhance.max_input_bytes == 1 << 30


def test_every_hostile_class_is_one_error_row_beside_an_honest_file_that_decodes(tmp_path, tiny_model_dir):
    """The nightly read stage over issue #24's crafted files (small forms): each is an error row naming what is
    wrong, in bounded time, no raw value quoted; the honest file beside them decodes."""
    from medsr_dist.data import hostile

    archive = tmp_path / "archive"
    archive.mkdir()
    files = {"loop.tif": hostile.tiff_ifd_loop(), "j2k.dcm": hostile.dicom_j2k_lie(3000),
             "jpeg.dcm": hostile.dicom_jpeg_lie(3000), "jls.dcm": hostile.dicom_jpeg_ls_lie(3000),
             "rle.dcm": hostile.dicom_rle_lie(), "strip.tif": hostile.tiff_jpeg_strip_lie(3000),
             "deflate.dcm": hostile.dicom_deflate_bomb(64 * 1024), "flood.dcm": hostile.dicom_sequence_flood(60_000)}
    for name, data in files.items():
        (archive / name).write_bytes(data)
    (archive / "honest.png").write_bytes(png8(make_radiograph(3, 64)))
    stage = ReadDecode(job_spec(job_config(tmp_path, tiny_model_dir, archive)))
    expected = {"loop.tif": "loop in the IFD chain", "j2k.dcm": "Columns, Rows disagree",
                "jpeg.dcm": "Columns, Rows disagree", "jls.dcm": "Columns, Rows disagree",
                "rle.dcm": "SamplesPerPixel/BitsAllocated", "strip.tif": "ImageWidth",
                "deflate.dcm": "inflates past", "flood.dcm": "sequence items"}
    for name, reason in expected.items():
        t0 = time.perf_counter()
        row = stage.one(str(archive / name), size=len(files[name]))
        assert row["status"] == "error" and reason in row["error"], (name, row["error"])
        assert row["pixels"].size == 0 and time.perf_counter() - t0 < 30
    honest = stage.one(str(archive / "honest.png"))
    assert honest["status"] == "todo" and honest["pixels"].shape == (1, 64, 64, 1)


def test_a_decode_past_its_memory_cap_is_stopped_in_a_child_and_quarantined_after_max_attempts(tmp_path, tiny_model_dir):
    """The last line of defence: a decode whose header is honest but which needs more than decode_memory_bytes
    (here a 1024 x 1024 16-bit PNG under a 4 MiB cap) is stopped in its child process — the read task lives on —,
    an error row counting the attempt, quarantined at max_attempts; under a sufficient cap it decodes as in-process."""
    import cv2

    archive = tmp_path / "archive"
    archive.mkdir()
    big = (np.arange(1024 * 1024, dtype=np.uint32).reshape(1024, 1024) * 2654435761 % 65536).astype(np.uint16)
    (archive / "big.png").write_bytes(cv2.imencode(".png", big)[1].tobytes())
    cfg = job_config(tmp_path, tiny_model_dir, archive, "enhance.max_output_pixels=400000000")
    spec = dataclasses.replace(job_spec(cfg), decode_timeout_s=60.0, decode_memory_bytes=4 << 20, max_attempts=2)
    stage = ReadDecode(spec)
    first = stage.one(str(archive / "big.png"))
    assert first["status"] == "error" and first["attempts"] == 1 and first["pixels"].size == 0
    assert "stopped" in first["error"] and "run 1 of enhance.max_attempts 2" in first["error"]
    second = stage.one(str(archive / "big.png"), attempts=1)
    assert second["status"] == "quarantined" and second["attempts"] == 2
    roomy = ReadDecode(dataclasses.replace(spec, decode_memory_bytes=2 << 30)).one(str(archive / "big.png"))
    assert roomy["status"] == "todo"
    np.testing.assert_array_equal(roomy["pixels"][0], ReadDecode(job_spec(cfg)).one(str(archive / "big.png"))["pixels"][0])


@pytest.mark.slow
def test_links_in_the_input_and_output_are_error_rows_and_good_files_beside_them_are_done(tmp_path, tiny_model_dir):
    """A real Ray run: symbolic links in the archive are not followed (one error row each, a directory loop
    included), a linked folder inside the output prefix is not written through, outputs and records are 0640."""
    import ray

    from medsr_dist.enhance.job import run_enhance_job

    archive, elsewhere, out = tmp_path / "archive", tmp_path / "elsewhere", tmp_path / "out"
    (archive / "sub").mkdir(parents=True)
    (archive / "linked").mkdir()
    (elsewhere / "dir").mkdir(parents=True)
    (elsewhere / "dir" / "outside.png").write_bytes(png8(make_radiograph(5, 32)))
    (archive / "good.png").write_bytes(png8(make_radiograph(1, 32)))
    (archive / "sub" / "good2.png").write_bytes(png8(make_radiograph(2, 32)))
    (archive / "linked" / "x.png").write_bytes(png8(make_radiograph(3, 32)))  # its output folder is a link
    (archive / "to-outside.png").symlink_to(elsewhere / "dir" / "outside.png")
    (archive / "sub" / "to-good.png").symlink_to(archive / "good.png")
    (archive / "dir-out").symlink_to(elsewhere / "dir", target_is_directory=True)
    (archive / "sub" / "loop").symlink_to(archive, target_is_directory=True)
    (archive / "dangling.png").symlink_to(tmp_path / "gone.png")
    out.mkdir()
    (out / "linked").symlink_to(elsewhere, target_is_directory=True)
    cfg = job_config(tmp_path, tiny_model_dir, archive, "enhance.tile=0")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        first = run_enhance_job(cfg)
        within = run_enhance_job(load_config(None, [f"run.root={tmp_path}", f"enhance.input={archive}",
                                                    f"enhance.output={tmp_path / 'out2'}", "enhance.tile=0",
                                                    f"enhance.checkpoint={tiny_model_dir}/model.pth",
                                                    "enhance.follow_symlinks=within_root"]))
    finally:
        ray.shutdown()
    rows = {r["input_key"].removeprefix(f"{archive}/"): r for r in first.rows}
    assert sorted(rows) == ["dangling.png", "dir-out", "good.png", "linked/x.png", "sub/good2.png", "sub/loop",
                            "sub/to-good.png", "to-outside.png"]  # one row per link, the loop included
    for name in ("good.png", "sub/good2.png"):
        assert rows[name]["status"] == "done", rows[name]["error"]
        assert oct(os.stat(rows[name]["output_key"]).st_mode & 0o777) == oct(0o640)
        assert json.loads(rows[name]["provenance"])["medsr:source"] == rows[name]["item_id"]
    for name in ("dangling.png", "dir-out", "sub/loop", "sub/to-good.png", "to-outside.png"):
        assert rows[name]["status"] == "error" and rows[name]["input_bytes"] == 0, rows[name]
        assert "symbolic link" in rows[name]["error"] and "enhance.follow_symlinks" in rows[name]["error"]
    assert rows["linked/x.png"]["status"] == "error" and rows["linked/x.png"]["output_key"] == ""
    assert f"cannot write under enhance.output {out}: the output's folder resolves outside it" in rows["linked/x.png"]["error"]
    assert sorted(p.name for p in elsewhere.iterdir()) == ["dir"]  # nothing written through the link
    assert str(tmp_path) not in rows["linked/x.png"]["error"].replace(str(out), "")  # no real path of the target
    assert "linked/" not in rows["linked/x.png"]["error"]  # nor the output path, which mirrors the input key
    for path in (out / MANIFEST_DIR).rglob("*"):
        if path.is_file():
            assert oct(path.stat().st_mode & 0o777) == oct(0o640), path
    # within_root: the link inside the archive is followed; the ones leading out, dangling or looping are not
    rows = {r["input_key"].removeprefix(f"{archive}/"): r for r in within.rows}
    assert rows["sub/to-good.png"]["status"] == "done"
    assert rows["linked/x.png"]["status"] == "done"  # out2 has no link
    assert "leading outside the input" in rows["to-outside.png"]["error"]
    assert "leading outside the input" in rows["dir-out"]["error"]
    assert "to nothing" in rows["dangling.png"]["error"]
    assert "sub/loop" not in rows  # a folder already listed: followed once, never a failure


def test_outputs_name_their_input_by_item_id_unless_provenance_source_is_key(tmp_path, tiny_model_dir):
    archive = tmp_path / "archive"
    (archive / "DOE^JANE-12345678").mkdir(parents=True)  # keys often hold names and MRNs
    key = archive / "DOE^JANE-12345678" / "a.png"
    key.write_bytes(png8(make_radiograph(1, 32)))
    for source in ("item_id", "key"):
        cfg = job_config(tmp_path, tiny_model_dir, archive, f"enhance.output={tmp_path / source}",
                         f"enhance.provenance_source={source}")
        spec = JobSpec(**{**job_spec(cfg).__dict__, "provenance_source": cfg.enhance.provenance_source})
        decoded = ReadDecode(spec)({"key": np.array([str(key)])})
        [row] = [EncodeCommit(spec).one(r) for batch in EnhanceReplica(spec.model, cfg.storage, cfg.enhance)(decoded)
                 for r in _rows(batch)]
        assert row["status"] == "done", row["error"]
        text = decode_image(Path(row["output_key"]).read_bytes(), "out").meta.text
        assert text["medsr:source"] == json.loads(row["provenance"])["medsr:source"]
        if source == "item_id":
            assert text["medsr:source"] == row["item_id"]
            assert "DOE^JANE" not in Path(row["output_key"]).read_bytes().decode("latin-1").split("IDAT")[0]
        else:
            assert text["medsr:source"] == str(key)
