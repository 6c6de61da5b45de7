"""Patient identifiers never reach what `medsr prepare` and `medsr eval` write: datasets, error files, logs, reports.

An archive of DICOM objects with planted identifiers (PatientName, PatientID, BirthDate, AccessionNumber,
OtherPatientIDs; one object with an invalid BirthDate, one with corrupt pixel data so its error row is written)
and a PNG whose text chunk names the patient goes through the real CLI on a real Ray head. Then every file the
stages wrote (Parquet shards read back value by value, errors.parquet, summary.json, report.html, results.*,
figures), the commands' console output and every Ray session log are searched for the identifiers.

The prepare run also shows the pseudonymous grouping (patient-level split by the HMAC of the PatientID) and the
seeded global row order that mixes sub-images of many images in every shard.
"""
from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from medsr_dist.data.prepare import GROUP_SECRET_ENV, INDEX_FILE, group_pseudonym, patient_pseudonym, shuffle_rank
from medsr_dist.data.synthetic import make_radiograph
from ray_cluster import local_ray_head

REPO = Path(__file__).resolve().parent.parent
SECRET = "phi-test site secret, 32 bytes long"
#: (PatientID, PatientName, BirthDate, AccessionNumber, OtherPatientIDs) of the planted patients.
PATIENTS = [
    ("PLANTPID-4711", "PLANTEDNAME^ALICEGIVEN", "19450317", "ACCPLANT9931", "PLANTOTHER-2718"),
    ("PLANTPID-5822", "PLANTEDNAME^BOBGIVEN", "19390704", "ACCPLANT8842", "PLANTOTHER-3829"),
    ("PLANTPID-6933", "PLANTEDNAME^CAROLGIVEN", "PLANTBD-X", "ACCPLANT7753", "PLANTOTHER-4930"),  # invalid DA value
    ("PLANTPID-7044", "PLANTEDNAME^DAVEGIVEN", "19511224", "ACCPLANT6664", "PLANTOTHER-5041"),
]
SIZE = 128


def identifiers() -> set[str]:
    """Each value, and the forms it could be logged in (name parts, ISO dates); all 8+ characters, so that none
    turns up by chance in compressed bytes."""
    found = {value for patient in PATIENTS for value in patient}
    found |= {part for p in PATIENTS for part in p[1].split("^")}
    found |= {f"{p[2][:4]}-{p[2][4:6]}-{p[2][6:]}" for p in PATIENTS if p[2].isdigit()}
    assert min(map(len, found)) >= 8
    return found


def write_archive(root: Path) -> dict[str, str]:
    """The archive; returns file name -> PatientID for the DICOM objects."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    from medsr_dist.io.dicom import build_radiograph_dataset, dataset_to_bytes
    from medsr_dist.io.image import ImageMeta, encode_image

    root.mkdir(parents=True)
    owners = {}
    for p, (pid, name, birth, accession, other) in enumerate(PATIENTS):
        for study in range(3):  # three objects per patient
            ds = build_radiograph_dataset(make_radiograph(10 * p + study, SIZE), bits_stored=12, patient_id=pid,
                                          patient_name=name, uid_key=f"phi/{p}/{study}")
            ds.PatientBirthDate, ds.AccessionNumber, ds.OtherPatientIDs = birth, accession, other
            item = Dataset()
            item.PatientID = other
            ds.OtherPatientIDsSequence = Sequence([item])
            file_name = f"obj{p}{study}.dcm"
            (root / file_name).write_bytes(dataset_to_bytes(ds))
            owners[file_name] = pid
    broken = dataset_to_bytes(build_radiograph_dataset(make_radiograph(99, SIZE), patient_id=PATIENTS[0][0],
                                                       patient_name=PATIENTS[0][1], uid_key="phi/broken"))
    (root / "broken.dcm").write_bytes(broken[: len(broken) - SIZE * SIZE])  # header intact, pixel data cut short
    meta = ImageMeta(format="png", dtype="uint8", bits_stored=8, channels=1, photometric="MONOCHROME2",
                     text={"Comment": f"patient {PATIENTS[1][1]} {PATIENTS[1][0]}"})
    (root / "scan_000.png").write_bytes(encode_image(make_radiograph(77, SIZE)[:, :, None], meta))
    return owners


def run_cli(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    medsr = str(Path(sys.executable).with_name("medsr"))
    return subprocess.run([medsr, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def phi_run(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("phi")
    owners = write_archive(tmp / "archive")
    with local_ray_head(tmp / "head", num_cpus=4) as head:
        env = {**head.env, GROUP_SECRET_ENV: SECRET, "PYTHONPATH": str(REPO)}
        common = [f"run.root={tmp}", "ray.progress=false", f"prepare.input={tmp / 'archive'}"]
        no_secret = {k: v for k, v in env.items() if k != GROUP_SECRET_ENV}
        refused = run_cli(["prepare", *common, f"prepare.output={tmp / 'refused'}"], no_secret, tmp)
        prepared = run_cli(["prepare", *common, f"prepare.output={tmp / 'dataset'}", "prepare.rows_per_shard=64",
                            "prepare.split={train: 0.5, val: 0.25, test: 0.25}",
                            "prepare.subimages={enabled: true, crop_size: 32, step: 32}"], env, tmp)
        evaluated = run_cli(["eval", *common, f"eval.dataset={tmp / 'dataset'}", "eval.split=test", "eval.protocol=bicubic-x4",
                             f"eval.output={tmp / 'eval'}", "eval.lpips.enabled=false", "eval.bootstrap.samples=100",
                             "eval.figures=2", "-m", f"tiny={tiny_model_dir}/model.pth"], env, tmp)
        logs = {str(p): p.read_bytes() for p in Path(head.temp_dir).rglob("*") if p.is_file() and "/logs/" in str(p)}
    return {"tmp": tmp, "owners": owners, "refused": refused, "prepared": prepared, "evaluated": evaluated, "logs": logs}


def source_keys(dataset: Path) -> dict[str, str]:
    """{pseudonym: source key} from the prepared dataset's index."""
    return {r["item"]: r["key"] for line in (dataset / INDEX_FILE).read_text().splitlines() for r in [json.loads(line)]}


def _leaks(text: str) -> list[str]:
    return sorted(v for v in identifiers() if v.lower() in text.lower())


@pytest.mark.slow
def test_without_a_site_secret_prepare_refuses_and_writes_nothing(phi_run):
    refused = phi_run["refused"]
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert GROUP_SECRET_ENV in refused.stderr and "prepare.group_secret_file" in refused.stderr
    assert not (phi_run["tmp"] / "refused").exists() or not any((phi_run["tmp"] / "refused").rglob("*.parquet"))
    assert _leaks(refused.stdout + refused.stderr) == []


@pytest.mark.slow
def test_identifiers_appear_in_nothing_prepare_and_eval_write(phi_run):
    tmp = phi_run["tmp"]
    for run in ("prepared", "evaluated"):
        assert phi_run[run].returncode == 0, phi_run[run].stdout[-3000:] + phi_run[run].stderr[-3000:]
        assert _leaks(phi_run[run].stdout + phi_run[run].stderr) == [], run
    written = [p for folder in ("dataset", "eval") for p in (tmp / folder).rglob("*") if p.is_file()]
    assert any(p.name == "report.html" for p in written) and any(p.name == "errors.parquet" for p in written)
    for path in written:
        assert _leaks(path.read_bytes().decode("latin-1")) == [], path  # raw bytes (uncompressed parts, HTML, JSON)
        if path.suffix == ".parquet":  # and every value, decompressed
            for row in pq.read_table(path).to_pylist():
                assert _leaks(" ".join(str(v) for k, v in row.items() if k not in ("image", "lq_image"))) == [], path
    assert phi_run["logs"], "no Ray session logs found"
    for path, data in phi_run["logs"].items():
        assert _leaks(data.decode("latin-1")) == [], path
    # the error row is there, naming the file, not the patient
    errors = pq.read_table(tmp / "dataset" / "errors.parquet").to_pylist()
    keys = source_keys(tmp / "dataset")
    assert [Path(keys[e["key"]]).name for e in errors] == ["broken.dcm"] and errors[0]["error"]


@pytest.mark.slow
def test_groups_are_site_keyed_pseudonyms_and_the_split_stays_patient_level(phi_run):
    tmp, owners = phi_run["tmp"], phi_run["owners"]
    split_of_group: dict[str, set[str]] = {}
    rows = []
    keys = source_keys(tmp / "dataset")  # the dataset names rows by pseudonym; the index beside it maps them back
    for split in ("train", "val", "test"):
        for row in pq.read_table(tmp / "dataset" / split).to_pylist():
            row["rel_key"] = keys[row["rel_key"]]
            rows.append(row)
            split_of_group.setdefault(row["group"], set()).add(split)
            name = Path(row["rel_key"]).name
            if name in owners:
                assert row["group"] == patient_pseudonym(owners[name], SECRET.encode())
            assert "patient_id" not in row and '"patient_id": null' in row["meta"] and '"text": {}' in row["meta"]
    assert all(len(s) == 1 for s in split_of_group.values())  # no patient in two splits
    # no PatientID: grouped by the file-name pattern (<patient>_<followup>.png), as before, written as a pseudonym
    assert {r["group"] for r in rows if r["rel_key"].endswith(".png")} == {group_pseudonym("scan", SECRET.encode())}
    assert {r["group"] for r in rows if ".dcm" in r["rel_key"]} == {patient_pseudonym(p[0], SECRET.encode()) for p in PATIENTS}


@pytest.mark.slow
def test_rows_are_shuffled_globally_so_shards_mix_images(phi_run):
    """Sub-images (16 per 128-pixel image at crop 32) are not written side by side: in the train shards, windows
    of 4 consecutive rows (a batch) hold sub-images of several images, as a seeded shuffle predicts."""
    train = sorted((phi_run["tmp"] / "dataset" / "train").glob("*.parquet"))
    order = [r["key"] for path in train for r in pq.read_table(path, columns=["key"]).to_pylist()]
    sources = [k.split("#")[0] for k in order]
    per_image = Counter(sources)
    assert len(per_image) >= 4 and min(per_image.values()) == 16
    windows = [len(set(sources[i:i + 4])) for i in range(0, len(sources) - 3, 4)]
    assert np.mean(windows) >= 2.5, windows  # written side by side this is 1.0
    # the order is the seeded rank of the key, whatever order Ray produced the rows in
    assert order == sorted(order, key=lambda k: shuffle_rank(0, k))


def test_shuffle_rank_depends_on_seed_and_key_only():
    keys = [f"a{i}.png#c{j}" for i in range(20) for j in range(8)]
    assert sorted(keys, key=lambda k: shuffle_rank(3, k)) == sorted(reversed(keys), key=lambda k: shuffle_rank(3, k))
    assert sorted(keys, key=lambda k: shuffle_rank(3, k)) != sorted(keys, key=lambda k: shuffle_rank(4, k))


def test_group_secret_comes_from_file_or_env_and_must_be_long_enough(tmp_path, monkeypatch):
    from medsr_dist.config import PrepareConfig
    from medsr_dist.data.prepare import GroupSecretError, read_group_secret

    monkeypatch.delenv(GROUP_SECRET_ENV, raising=False)
    assert read_group_secret(PrepareConfig()) is None
    monkeypatch.setenv(GROUP_SECRET_ENV, "short")
    with pytest.raises(GroupSecretError, match="at least 16 bytes"):
        read_group_secret(PrepareConfig())
    (tmp_path / "secret").write_text("  a file secret of enough length\n")
    assert read_group_secret(PrepareConfig(group_secret_file=str(tmp_path / "secret"))) == b"a file secret of enough length"
    with pytest.raises(GroupSecretError, match="does not exist"):
        read_group_secret(PrepareConfig(group_secret_file=str(tmp_path / "missing")))
    a, b = patient_pseudonym("PID", b"k" * 16), patient_pseudonym("PID", b"j" * 16)
    assert a != b and a.startswith("pid-") and len(a) == 36 and "PID" not in a[4:]

