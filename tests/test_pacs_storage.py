"""PacsStorage (medsr_dist/pacs/storage.py): the job's listing / reading / output commit over DICOMweb, on a real
Orthanc. Enhancement is stood in for by a 2x pixel repeat; the job's own stages are not involved (no Ray)."""
from __future__ import annotations

import hashlib
import io
import pickle

import numpy as np
import pydicom
import pytest

from medsr_dist.config import PacsConfig, StorageConfig
from medsr_dist.io.image import decode_image, encode_image
from medsr_dist.uris import InstanceRef
from medsr_dist.pacs.storage import (
    PacsStorage,
    derived_instance_uri,
    next_watermark,
    read_watermark,
    watermark_of_rows,
    write_watermark,
)
from medsr_dist.storage import StorageError
from test_pacs_dicomweb import pacs_env, radiograph  # noqa: F401  (fixture)

PROVENANCE = {"medsr:model": "tiny", "medsr:model_sha256": "cd" * 32, "medsr:scale": "2",
              "medsr:params": '{"outscale": 2}', "medsr:note": "test"}


def enhance_and_commit(storage: PacsStorage, output: str, uri: str) -> str:
    """What the job does per item: read, hash, know the output URI from the header, encode, commit."""
    data = storage.read_bytes(uri)
    out_uri = derived_instance_uri(output, data, PROVENANCE)
    if not storage.exists(out_uri):
        img = decode_image(data, "item")
        pixels = np.repeat(np.repeat(img.pixels, 2, axis=0), 2, axis=1)
        storage.write_bytes(out_uri, encode_image(pixels, img.meta, img.header, scale=2.0, provenance=PROVENANCE))
    return out_uri


def test_pacs_in_pacs_out_commits_each_derived_object_once(pacs_env, tmp_path):  # noqa: F811
    server = pacs_env
    for i in range(3):
        server.upload(radiograph(f"a{i}", study_key="A", series_key="r1", number=i + 1))
    server.upload(radiograph("b0", study_key="B", series_key="r2", study_date="20240202"))
    storage = pickle.loads(pickle.dumps(PacsStorage(StorageConfig(), PacsConfig(backoff_s=0.01))))
    entries = storage.list_entries(server.uri)
    assert len(entries) == 4 and all(e.version.startswith("dicomweb:2024") for e in entries)
    assert all(e.uri.startswith(server.uri + "/studies/") for e in entries)
    # a glob on studies/<S>/series/<R>/instances/<I> works as for files
    series_b = pydicom.dcmread(io.BytesIO(radiograph("b0", study_key="B", series_key="r2"))).SeriesInstanceUID
    assert len(storage.list_entries(server.uri, exclude=[f"*/series/{series_b}/*"])) == 3

    outputs = [enhance_and_commit(storage, server.uri, e.uri) for e in entries[:2]]  # then "killed"
    assert server.instance_count() == 6
    assert storage.existing(outputs + [e.uri.replace("/instances/", "/instances/9") for e in entries]) == set(outputs)
    again = [enhance_and_commit(storage, server.uri, e.uri) for e in entries]  # the rerun
    assert again[:2] == outputs and server.instance_count() == 8  # only the two missing ones were stored
    assert [enhance_and_commit(storage, server.uri, e.uri) for e in entries] == again  # third run
    assert server.instance_count() == 8
    by_series = server.series_instances()
    assert len(by_series) == 4  # two source series, one derived series per source series
    derived_series = {uri.split("/series/")[1].split("/")[0] for uri in again}
    assert sorted(len(by_series[s]) for s in derived_series) == [1, 3]
    for uri in again:  # same study, DERIVED, decodes, twice the size
        ds = pydicom.dcmread(io.BytesIO(storage.read_bytes(uri)))
        assert list(ds.ImageType)[:2] == ["DERIVED", "SECONDARY"] and ds.Rows == 48 and ds.pixel_array.shape == (48, 40)
        assert uri.split("/studies/")[1].split("/")[0] == str(ds.StudyInstanceUID)


def test_pacs_in_files_out_and_refusals(pacs_env, tmp_path):  # noqa: F811
    server = pacs_env
    server.upload(radiograph("x"))
    storage = PacsStorage(StorageConfig(), PacsConfig(backoff_s=0.01))
    (entry,) = storage.list_entries(server.uri)
    data = storage.read_bytes(entry.uri)
    storage.write_bytes(str(tmp_path / "out.dcm"), data)  # files keep working through the same object
    assert hashlib.sha256((tmp_path / "out.dcm").read_bytes()).digest() == hashlib.sha256(data).digest()
    with pytest.raises(StorageError, match="never deletes from a PACS"):
        storage.delete(entry.uri)
    wrong = derived_instance_uri(server.uri, data, {**PROVENANCE, "medsr:scale": "4"})  # another SOP UID
    img = decode_image(data, "x")
    encoded = encode_image(img.pixels, img.meta, img.header, scale=1.0, provenance=PROVENANCE)
    with pytest.raises(StorageError, match="not those its output URI was derived with"):
        storage.write_bytes(wrong, encoded)
    with pytest.raises(StorageError, match="not an instance"):
        storage.read_bytes(server.uri)
    assert server.instance_count() == 1


def test_watermark_waits_for_unfinished_items(tmp_path):
    refs = [InstanceRef("1", "2", "a", "20240101"), InstanceRef("1", "3", "b", "20240105"),
            InstanceRef("4", "5", "c", "20240110")]
    assert next_watermark(refs) == "20240110"
    assert next_watermark(refs, unfinished=["b"]) == "20240105"
    assert next_watermark([InstanceRef("1", "2", "a")]) is None
    rows = [{"input_version": "dicomweb:20240101:a", "status": "done"},
            {"input_version": "dicomweb:20240105:b", "status": "error"},
            {"input_version": "dicomweb:20240110:c", "status": "skipped"}, {"input_version": "mtime_ns:1:2"}]
    assert watermark_of_rows(rows) == "20240105"
    assert watermark_of_rows(rows[:1] + rows[2:]) == "20240110"
    storage = PacsStorage()
    uri = str(tmp_path / "_manifest" / "watermark.json")
    assert read_watermark(storage, uri) is None
    write_watermark(storage, uri, "20240105", "run-1")
    assert read_watermark(storage, uri) == "20240105"
