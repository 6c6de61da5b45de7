"""The DICOMweb layer (medsr_dist/pacs/dicomweb.py) against a real Orthanc with its DICOMweb plugin.

QIDO-RS filters, WADO-RS of compressed objects as stored, STOW-RS once (a re-STOW stores nothing), refusals with the
PACS's reason and no identifiers, authentication failures, retries with backoff, bounded concurrency. No Ray.
"""
from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import numpy as np
import pydicom
import pydicom.data
import pytest

from medsr_dist.config import PacsConfig
from medsr_dist.io.dicom import build_radiograph_dataset, dataset_to_bytes
from medsr_dist.io.image import decode_image, encode_image
from medsr_dist.pacs.dicomweb import (
    Credentials,
    DicomwebPacs,
    PacsAuthError,
    PacsError,
    PacsRefused,
    PacsUnavailable,
    derived_uids,
    watermark,
)
from medsr_dist.uris import Endpoint, InstanceRef, is_dicomweb, parse_instance_uri
from orthanc import PacsProxy, local_orthanc, require_orthanc

TEST_FILES = Path(os.path.dirname(pydicom.data.__file__)) / "test_files"
PATIENT_NAME, PATIENT_ID = "PLANTED^IDENTIFIER", "PID-93xq71"


def radiograph(key: str, *, modality: str = "DX", study_date: str = "20240101", study_key: str = "s1",
               series_key: str = "r1", number: int = 1, series_description: str = "CHEST PA") -> bytes:
    """A small 12-bit radiograph with planted identifiers; instances sharing study/series keys share those UIDs."""
    from pydicom.uid import generate_uid

    rng = np.random.default_rng(abs(hash(key)) % 2**32)
    ds = build_radiograph_dataset(rng.random((24, 20)), modality=modality, patient_id=PATIENT_ID,
                                  patient_name=PATIENT_NAME, uid_key=key,
                                  study_uid=generate_uid(entropy_srcs=["study", study_key]),
                                  series_uid=generate_uid(entropy_srcs=["series", study_key, series_key]),
                                  instance_number=number, series_description=series_description)
    ds.StudyDate = study_date
    return dataset_to_bytes(ds)


def pacs_for(server, **cfg) -> DicomwebPacs:
    return DicomwebPacs(server.uri, PacsConfig(**{"backoff_s": 0.01, **cfg}))


@pytest.fixture
def pacs_env(orthanc, monkeypatch):
    """The session's Orthanc (empty), with its credentials in the environment as medsr-dist reads them."""
    for name in ("MEDSR_PACS_TOKEN",):
        monkeypatch.delenv(name, raising=False)
    for name, value in orthanc.env.items():
        monkeypatch.setenv(name, value)
    return orthanc


def assert_no_identifiers(text: str, *uids: str) -> None:
    for secret in (PATIENT_NAME, "PLANTED", "IDENTIFIER", PATIENT_ID, *uids):
        assert secret not in text, f"{secret!r} in {text!r}"


# ------------------------------------------------------------------------------------------------------
# Addresses and credentials (no PACS needed)
# ------------------------------------------------------------------------------------------------------
def test_endpoint_uris_are_parsed_and_credentials_in_them_refused():
    endpoint, ref = Endpoint.parse("dicomweb+https://pacs.example:8443/dicom-web/")
    assert (endpoint.url, ref) == ("https://pacs.example:8443/dicom-web", None)
    assert is_dicomweb(endpoint.uri) and not is_dicomweb("s3://bucket/x") and not is_dicomweb("/data/x")
    endpoint, ref = parse_instance_uri("dicomweb+http://h:8042/dicom-web/studies/1.2/series/1.3/instances/1.4")
    assert ref == InstanceRef("1.2", "1.3", "1.4") and ref.uri(endpoint).endswith("/dicom-web/" + ref.path)
    with pytest.raises(ValueError, match="credentials do not belong") as info:
        Endpoint.parse("dicomweb+http://alice:s3cret@h:8042/dicom-web")
    assert "s3cret" not in str(info.value)
    with pytest.raises(ValueError, match="no query"):
        Endpoint.parse("dicomweb+http://h:8042/dicom-web?Modality=CT")
    with pytest.raises(ValueError, match="studies/<study>/series"):
        Endpoint.parse("dicomweb+http://h:8042/dicom-web/studies/1.2/series")
    with pytest.raises(ValueError, match="dicomweb\\+http"):
        Endpoint.parse("http://h:8042/dicom-web")


def test_credentials_come_from_environment_or_secret_files_and_never_show(tmp_path):
    cfg = PacsConfig()
    creds = Credentials.resolve(cfg, {"MEDSR_PACS_USERNAME": "u", "MEDSR_PACS_PASSWORD": "pw-123"})
    assert creds.kind == "basic" and "pw-123" not in repr(creds) + creds.source and "$MEDSR_PACS_PASSWORD" in creds.source
    secret = tmp_path / "token"
    secret.write_text("tok-456\n")
    creds = Credentials.resolve(PacsConfig(token_file=str(secret)), {})
    assert creds.kind == "bearer" and creds._secret == "tok-456" and "tok-456" not in repr(creds)
    assert Credentials.resolve(cfg, {}).kind == "none"
    with pytest.raises(PacsAuthError, match="MEDSR_PACS_PASSWORD"):
        Credentials.resolve(cfg, {"MEDSR_PACS_USERNAME": "u"})
    with pytest.raises(PacsAuthError, match="set one of them"):
        Credentials.resolve(cfg, {"MEDSR_PACS_USERNAME": "u", "MEDSR_PACS_PASSWORD": "p", "MEDSR_PACS_TOKEN": "t"})
    with pytest.raises(PacsAuthError, match="cannot read"):
        Credentials.resolve(PacsConfig(password_file=str(tmp_path / "missing")), {"MEDSR_PACS_USERNAME": "u"})


def test_config_refuses_bad_query_values():
    from medsr_dist.config import MedsrConfig

    with pytest.raises(ValueError, match="YYYYMMDD"):
        MedsrConfig.model_validate({"pacs": {"query": {"study_date_from": "2024-01-01"}}})
    with pytest.raises(ValueError, match="upper-case"):
        MedsrConfig.model_validate({"pacs": {"query": {"modality": ["ct"]}}})
    with pytest.raises(ValueError, match="digits and dots"):
        MedsrConfig.model_validate({"pacs": {"query": {"study_uids": ["1.2.x"]}}})


# ------------------------------------------------------------------------------------------------------
# QIDO-RS
# ------------------------------------------------------------------------------------------------------
def test_qido_filters_select_by_modality_date_uids_watermark_and_limit(pacs_env):
    server = pacs_env
    uploads = {
        "dx1": radiograph("dx1", study_date="20240101", study_key="a", number=1),
        "dx2": radiograph("dx2", study_date="20240101", study_key="a", number=2),
        "cr1": radiograph("cr1", modality="CR", study_date="20240305", study_key="b"),
        "cr2": radiograph("cr2", modality="CR", study_date="20240610", study_key="c"),
    }
    for data in uploads.values():
        server.upload(data)
    ct = (TEST_FILES / "CT_small.dcm").read_bytes()
    server.upload(ct)
    uids = {k: pydicom.dcmread(io.BytesIO(v), stop_before_pixels=True) for k, v in {**uploads, "ct": ct}.items()}
    pacs = pacs_for(server)

    def sops(**query) -> list[str]:
        wm = query.pop("watermark", None)
        return [r.sop for r in pacs.query(PacsConfig.Query(**query), watermark=wm)]

    def sop(k: str) -> str:
        return str(uids[k].SOPInstanceUID)

    everything = pacs.query()
    assert [r.sop for r in everything] == [sop(k) for k in ("ct", "dx1", "dx2", "cr1", "cr2")]  # oldest first
    assert everything[1].modality == "DX" and everything[1].study_date == "20240101" and everything[2].number == 2
    assert sops(modality=["DX"]) == [sop("dx1"), sop("dx2")]
    assert sorted(sops(modality=["CR", "CT"])) == sorted([sop("ct"), sop("cr1"), sop("cr2")])
    assert sops(study_date_from="20240101", study_date_to="20240331") == [sop(k) for k in ("dx1", "dx2", "cr1")]
    assert sops(study_date_from="20240601") == [sop("cr2")]
    assert sops(study_uids=[str(uids["cr1"].StudyInstanceUID)]) == [sop("cr1")]
    assert sops(series_uids=[str(uids["dx2"].SeriesInstanceUID)]) == [sop("dx1"), sop("dx2")]
    assert sops(limit=2) == [sop("ct"), sop("dx1")]
    assert watermark(everything) == "20240610"
    # since the last run's watermark (inclusive: the watermark's own day is asked again)
    assert sops(since_watermark=True, watermark="20240305") == [sop("cr1"), sop("cr2")]
    assert sops(since_watermark=False, watermark="20240305") == [r.sop for r in everything]
    assert sops(study_date_from="20240601", study_date_to="20240101") == []


# ------------------------------------------------------------------------------------------------------
# WADO-RS
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_RLE.dcm"])
def test_wado_returns_compressed_objects_as_stored_and_they_decode_locally(pacs_env, name):
    server = pacs_env
    local = (TEST_FILES / name).read_bytes()
    server.upload(local)
    pacs = pacs_for(server)
    (ref,) = pacs.query()
    data = pacs.retrieve(ref)
    got, want = pydicom.dcmread(io.BytesIO(data)), pydicom.dcmread(io.BytesIO(local))
    assert got.file_meta.TransferSyntaxUID == want.file_meta.TransferSyntaxUID
    assert got.file_meta.TransferSyntaxUID.is_compressed
    assert got.PixelData == want.PixelData  # the same codestream, not transcoded
    np.testing.assert_array_equal(decode_image(data, "pacs").pixels, decode_image(local, "local").pixels)
    assert hashlib.sha256(pacs.retrieve(ref)).hexdigest() == hashlib.sha256(data).hexdigest()  # a stable content hash


def test_retrieve_many_keeps_order_and_bounds_concurrency(pacs_env):
    server = pacs_env
    for i in range(6):
        server.upload(radiograph(f"c{i}", study_key="conc", number=i + 1))
    with PacsProxy(server) as proxy:
        proxy.delay_s = 0.15
        pacs = DicomwebPacs(proxy.uri, PacsConfig(concurrency=2, backoff_s=0.01))
        refs = pacs.query()
        proxy.max_in_flight = 0
        results = list(pacs.retrieve_many(refs))
    assert [r.sop for r, _ in results] == [r.sop for r in refs]
    assert all(pydicom.dcmread(io.BytesIO(d)).SOPInstanceUID == r.sop for r, d in results)
    assert proxy.max_in_flight == 2  # concurrent, but never more than pacs.concurrency


# ------------------------------------------------------------------------------------------------------
# STOW-RS
# ------------------------------------------------------------------------------------------------------
def derived_object(source: bytes, model_sha: str = "ab" * 32) -> tuple[bytes, dict]:
    img = decode_image(source, "src")
    out = np.repeat(np.repeat(img.pixels, 2, axis=0), 2, axis=1)
    provenance = {"medsr:model": "tiny", "medsr:model_sha256": model_sha, "medsr:scale": "2",
                  "medsr:params": '{"scale": 2}', "medsr:note": "test"}
    return encode_image(out, img.meta, img.header, scale=2.0, provenance=provenance), provenance


def test_stow_stores_a_derived_object_once_in_the_source_study(pacs_env):
    server = pacs_env
    source = radiograph("stow", study_key="stow")
    server.upload(source)
    derived, provenance = derived_object(source)
    src, ds = (pydicom.dcmread(io.BytesIO(b)) for b in (source, derived))
    # the derived UIDs are known from the source header alone, before any pixel is enhanced
    assert derived_uids(src, provenance) == (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    pacs = pacs_for(server)
    assert not pacs.has_instance(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    assert pacs.store(derived) == "stored"
    assert server.instance_count() == 2
    assert pacs.store(derived) == "present"  # a rerun finds it and sends nothing
    assert pacs.store_many([derived, derived]) == ["present", "present"]
    assert server.instance_count() == 2
    assert pacs.instances_in_series(ds.StudyInstanceUID, ds.SeriesInstanceUID) == {ds.SOPInstanceUID}
    assert [r.sop for r in pacs.query()] == [src.SOPInstanceUID]  # derived series are not inputs
    stored = [r for r in pacs.query(include_derived=True) if r.series == ds.SeriesInstanceUID]
    assert len(stored) == 1 and stored[0].study == src.StudyInstanceUID
    back = pydicom.dcmread(io.BytesIO(pacs.retrieve(stored[0])))
    assert list(back.ImageType)[:2] == ["DERIVED", "SECONDARY"] and back.Rows == 2 * src.Rows
    assert back.SourceImageSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID


def test_stow_refused_by_the_pacs_names_status_and_reason_without_identifiers(pacs_env):
    server = pacs_env
    source = radiograph("refuse", study_key="r")
    derived, _ = derived_object(source)
    ds = pydicom.dcmread(io.BytesIO(derived))
    other_study = "1.2.826.0.1.3680043.8.498.1"
    with pytest.raises(PacsRefused) as info:  # Orthanc refuses an object posted to another study: HTTP 409
        pacs_for(server).store(derived, study=other_study)
    text = str(info.value)
    assert info.value.status == 409 and "HTTP 409" in text and "0x0110 (processing failure)" in text
    assert server.uri in text
    assert_no_identifiers(text, str(ds.SOPInstanceUID), str(ds.StudyInstanceUID))
    assert server.instance_count() == 0


def test_stow_dropped_by_a_pacs_filter_is_an_error_not_a_success(monkeypatch):
    # a PACS routing rule that drops derived objects, yet STOW-RS answers success (Orthanc 1.10 + DICOMweb 1.7)
    require_orthanc()
    lua = ('function ReceivedInstanceFilter(dicom, origin, info)\n'
           '  return not string.find(dicom.ImageType or "", "DERIVED")\nend\n')
    with local_orthanc(lua_scripts={"filter.lua": lua}) as server:
        source = radiograph("filtered", study_key="f")
        server.upload(source)
        derived, _ = derived_object(source)
        for name, value in server.env.items():
            monkeypatch.setenv(name, value)
        with pytest.raises(PacsRefused, match="does not list the object afterwards") as info:
            pacs_for(server).store(derived)
        assert_no_identifiers(str(info.value))
        assert server.instance_count() == 1


# ------------------------------------------------------------------------------------------------------
# Authentication, retries, an unreachable PACS
# ------------------------------------------------------------------------------------------------------
def test_auth_failures_name_the_credential_source_never_its_value(pacs_env, monkeypatch):
    server = pacs_env
    monkeypatch.setenv("MEDSR_PACS_PASSWORD", "wrong-password-77")
    with pytest.raises(PacsAuthError) as info:
        pacs_for(server).query()
    text = str(info.value)
    assert "HTTP 401" in text and "$MEDSR_PACS_PASSWORD" in text and "wrong-password-77" not in text
    monkeypatch.delenv("MEDSR_PACS_PASSWORD")
    monkeypatch.delenv("MEDSR_PACS_USERNAME")
    with pytest.raises(PacsAuthError, match="HTTP 401.*no credentials"):
        pacs_for(server).query()
    monkeypatch.setenv("MEDSR_PACS_USERNAME", "someone")
    with pytest.raises(PacsAuthError, match="no password"):  # refused before any request
        pacs_for(server).query()


def test_bearer_token_is_sent(pacs_env, monkeypatch):
    server = pacs_env
    server.upload(radiograph("bearer"))
    for name in server.env:
        monkeypatch.delenv(name)
    with PacsProxy(server, token="tok-abc") as proxy:
        monkeypatch.setenv("MEDSR_PACS_TOKEN", "tok-abc")
        assert len(DicomwebPacs(proxy.uri).query()) == 1
        monkeypatch.setenv("MEDSR_PACS_TOKEN", "tok-other")
        with pytest.raises(PacsAuthError, match=r"HTTP 401.*bearer token from \$MEDSR_PACS_TOKEN") as info:
            DicomwebPacs(proxy.uri).query()
        assert "tok-other" not in str(info.value)


def test_busy_pacs_is_retried_with_backoff_then_reported(pacs_env):
    server = pacs_env
    server.upload(radiograph("retry"))
    with PacsProxy(server) as proxy:
        pacs = DicomwebPacs(proxy.uri, PacsConfig(retries=3, backoff_s=0.01))
        proxy.fail_next, proxy.fail_status = 2, 503
        refs = pacs.query()  # two 503s, then the answer
        assert len(refs) == 1 and proxy.fail_next == 0
        proxy.fail_next, proxy.fail_status = 2, 500
        assert pydicom.dcmread(io.BytesIO(pacs.retrieve(refs[0]))).SOPInstanceUID == refs[0].sop
        proxy.requests, proxy.fail_next, proxy.fail_status = 0, 100, 503
        with pytest.raises(PacsUnavailable, match=r"HTTP 503.*after 4 attempt") as info:
            pacs.retrieve(refs[0])
        assert proxy.requests == 4 and info.value.status == 503
        assert_no_identifiers(str(info.value), refs[0].sop, refs[0].study)


def test_stopped_pacs_is_unavailable_after_retries(pacs_env):
    server = pacs_env
    server.upload(radiograph("down"))
    pacs = pacs_for(server, retries=2)
    (ref,) = pacs.query()
    server.stop()
    try:
        with pytest.raises(PacsUnavailable, match=r"no answer after 3 attempt\(s\)"):
            pacs.retrieve(ref)
    finally:
        server.start()
    assert pacs.retrieve(ref)  # the same client recovers once the PACS is back


def test_client_pickles_without_its_session_or_secrets(pacs_env):
    import pickle

    pacs = pacs_for(pacs_env)
    pacs.query()
    blob = pickle.dumps(pacs)
    assert pacs_env.password.encode() not in blob
    assert pickle.loads(blob).query() == []


def test_https_pacs_is_verified_against_the_configured_ca_bundle(pacs_env, tmp_path):
    server = pacs_env
    server.upload(radiograph("tls"))
    with PacsProxy(server, tls_dir=tmp_path) as proxy:  # TLS with a self-signed certificate in front of Orthanc
        assert proxy.uri.startswith("dicomweb+https://127.0.0.1:")
        assert len(DicomwebPacs(proxy.uri, PacsConfig(ca_bundle=proxy.ca_bundle)).query()) == 1
        with pytest.raises(PacsError, match="TLS verification failed.*pacs.ca_bundle"):  # not trusted by default
            DicomwebPacs(proxy.uri, PacsConfig(retries=0)).query()
        with pytest.raises(PacsError, match="pacs.ca_bundle .*no such file"):
            DicomwebPacs(proxy.uri, PacsConfig(ca_bundle=str(tmp_path / "missing.pem"))).query()
