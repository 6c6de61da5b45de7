"""Storage: the same whole-file behaviour on local paths, file:// URIs and s3:// (a real local S3 server)."""
from __future__ import annotations

import os
import pickle

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from medsr_dist.config import StorageConfig
from medsr_dist.storage import PARTIAL_SUFFIX, Storage, StorageError
from medsr_dist.uris import glob_match, is_remote, local_path


@pytest.fixture(params=["local", "file", "s3"])
def place(request, tmp_path) -> tuple[Storage, str]:
    """(storage, base URI of an empty folder/prefix) for each kind of location."""
    if request.param == "local":
        return Storage(), str(tmp_path / "store")
    if request.param == "file":
        return Storage(), f"file://{tmp_path / 'store'}"
    return request.getfixturevalue("storage_s3"), request.getfixturevalue("s3_bucket") + "/store"


# -- round trips ------------------------------------------------------------------------------------------
def test_written_bytes_read_back_identically(place):
    storage, base = place
    uri = storage.join(base, "patient-1", "series 2", "slice.bin")
    payload = bytes(range(256)) * 100

    storage.write_bytes(uri, payload)

    assert storage.exists(uri)
    assert storage.read_bytes(uri) == payload
    assert storage.size(uri) == len(payload)


def test_writing_again_replaces_the_content(place):
    storage, base = place
    uri = storage.join(base, "report.json")
    storage.write_bytes(uri, b'{"psnr": 1}')
    storage.write_bytes(uri, b'{"psnr": 2}')
    assert storage.read_bytes(uri) == b'{"psnr": 2}'


def test_open_streams_bytes_both_ways(place):
    storage, base = place
    uri = storage.join(base, "deep", "stream.raw")
    with storage.open(uri, "wb") as handle:
        handle.write(b"abc")
        handle.write(b"def")
    with storage.open(uri) as handle:
        assert handle.read() == b"abcdef"


def test_delete_removes_a_file_and_complains_when_it_is_missing(place):
    storage, base = place
    uri = storage.join(base, "old.png")
    storage.write_bytes(uri, b"x")

    storage.delete(uri)

    assert not storage.exists(uri)
    with pytest.raises(StorageError, match="old.png"):
        storage.delete(uri)
    storage.delete(uri, missing_ok=True)


def test_makedirs_creates_local_folders_and_is_harmless_on_s3(place):
    storage, base = place
    uri = storage.join(base, "a", "b")
    storage.makedirs(uri)
    storage.makedirs(uri)
    if not is_remote(uri):
        assert os.path.isdir(local_path(uri))


# -- listing ----------------------------------------------------------------------------------------------
TREE = ["a.dcm", "notes.txt", "sub/b.dcm", "sub/deep/c.png", "sub/deep/d.dcm", "other/e.png"]


@pytest.fixture
def tree(place) -> tuple[Storage, str]:
    storage, base = place
    for name in TREE:
        storage.write_bytes(storage.join(base, name), name.encode())
    return storage, base


def test_list_files_is_recursive_sorted_and_keeps_the_scheme(tree):
    storage, base = tree
    listed = storage.list_files(base)
    assert listed == sorted(storage.join(base, name) for name in TREE)
    assert all(uri.startswith(base + "/") for uri in listed)
    assert [storage.read_bytes(uri) for uri in listed] == [n.encode() for n in sorted(TREE)]


@pytest.mark.parametrize(
    ("include", "exclude", "expected"),
    [
        (["*.dcm"], None, ["a.dcm", "sub/b.dcm", "sub/deep/d.dcm"]),
        (["**/*.png"], None, ["other/e.png", "sub/deep/c.png"]),
        (["**/a.dcm"], None, ["a.dcm"]),
        (["sub/*"], None, ["sub/b.dcm", "sub/deep/c.png", "sub/deep/d.dcm"]),
        (["sub/deep/*.png", "notes.txt"], None, ["notes.txt", "sub/deep/c.png"]),
        (None, ["*.dcm"], ["notes.txt", "other/e.png", "sub/deep/c.png"]),
        (["*.dcm"], ["sub/deep/"], ["a.dcm", "sub/b.dcm"]),
        (["*.DCM"], None, []),
    ],
)
def test_list_files_filters_relative_paths_with_globs(tree, include, exclude, expected):
    storage, base = tree
    listed = storage.list_files(base, include=include, exclude=exclude)
    assert listed == [storage.join(base, name) for name in expected]


def test_list_files_of_a_missing_prefix_is_empty(place):
    storage, base = place
    assert storage.list_files(storage.join(base, "nothing-here")) == []


def test_list_files_of_a_single_file_lists_that_file(tree):
    storage, base = tree
    uri = storage.join(base, "sub", "b.dcm")
    assert storage.list_files(uri) == [uri]
    assert storage.list_files(uri, include=["*.png"]) == []


def test_list_files_does_not_mistake_a_sibling_with_the_same_stem_for_a_child(place):
    storage, base = place
    storage.write_bytes(storage.join(base, "run", "x.bin"), b"1")
    storage.write_bytes(storage.join(base, "run2", "y.bin"), b"2")
    assert storage.list_files(storage.join(base, "run")) == [storage.join(base, "run", "x.bin")]


def test_list_files_at_a_bucket_root_lists_the_whole_bucket(storage_s3, s3_bucket):
    for key in ("top.png", "a/b.png"):
        storage_s3.write_bytes(f"{s3_bucket}/{key}", b"1")
    expected = [f"{s3_bucket}/a/b.png", f"{s3_bucket}/top.png"]
    assert storage_s3.list_files(s3_bucket) == expected
    assert storage_s3.list_files(s3_bucket + "/") == expected


def test_list_files_never_returns_local_folders(tmp_path):
    storage = Storage()
    (tmp_path / "empty" / "nested").mkdir(parents=True)
    (tmp_path / "f.txt").write_bytes(b"1")
    assert storage.list_files(tmp_path) == [str(tmp_path / "f.txt")]


@pytest.mark.parametrize(
    ("path", "pattern", "matches"),
    [
        ("x.dcm", "*.dcm", True),
        ("a/b/x.dcm", "*.dcm", True),
        ("a/b/IM_0001", "IM_????", True),
        ("x.png", "**/*.png", True),
        ("a/x.png", "**/*.png", True),
        ("a/x.png", "a/**/x.png", True),
        ("a/b/c/x.png", "a/**/x.png", True),
        ("b/x.png", "a/**/x.png", False),
        ("sub/x", "sub/", True),
        ("subway/x", "sub/", False),
        ("x.dcm", "*.png", False),
    ],
)
def test_glob_patterns_behave_like_shell_globs_over_relative_paths(path, pattern, matches):
    assert glob_match(path, pattern) is matches


# -- atomic local writes ----------------------------------------------------------------------------------
def test_a_reader_during_a_local_write_sees_only_the_old_complete_file(tmp_path, monkeypatch):
    storage = Storage()
    uri = str(tmp_path / "model.pt")
    storage.write_bytes(uri, b"old weights")
    seen_during_write = {}
    real_replace = os.replace

    def replace_after_looking(src, dst):
        seen_during_write["listing"] = storage.list_files(tmp_path)
        seen_during_write["content"] = storage.read_bytes(uri)
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_after_looking)
    storage.write_bytes(uri, b"new weights")

    assert seen_during_write == {"listing": [uri], "content": b"old weights"}
    assert storage.read_bytes(uri) == b"new weights"
    assert os.listdir(tmp_path) == ["model.pt"]


def test_a_failed_local_write_keeps_the_old_content_and_leaves_no_temp_file(tmp_path, monkeypatch):
    storage = Storage()
    uri = str(tmp_path / "model.pt")
    storage.write_bytes(uri, b"old weights")

    def disk_full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(StorageError, match=r"cannot write .*model\.pt.*No space left"):
        storage.write_bytes(uri, b"new weights that never land")

    assert storage.read_bytes(uri) == b"old weights"
    assert os.listdir(tmp_path) == ["model.pt"]


def test_a_failed_rename_keeps_the_old_content_and_leaves_no_temp_file(tmp_path, monkeypatch):
    storage = Storage()
    uri = str(tmp_path / "out" / "x.png")
    storage.write_bytes(uri, b"old")

    def refuse(src, dst):
        assert src.endswith(PARTIAL_SUFFIX)
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(StorageError, match="permission denied"):
        storage.write_bytes(uri, b"new")

    assert storage.read_bytes(uri) == b"old"
    assert os.listdir(tmp_path / "out") == ["x.png"]


@pytest.mark.parametrize("umask", [0o000, 0o022, 0o077])
def test_local_files_are_created_0640_whatever_the_umask(tmp_path, umask):
    """Outputs, manifests, records, leases and their lock files: group may read, others nothing (0644 before)."""
    storage, old = Storage(), os.umask(umask)
    try:
        storage.write_bytes(tmp_path / "out.png", b"x")
        lease = storage.create_exclusive(str(tmp_path / "lease.json"), b"{}")
        storage.replace_if(str(tmp_path / "lease.json"), b"{}", lease)
    finally:
        os.umask(old)
    for name in ("out.png", "lease.json", "lease.json.lock"):
        assert oct(os.stat(tmp_path / name).st_mode & 0o777) == oct(0o640), name


def test_a_listing_does_not_follow_links_and_reports_them_when_asked(tmp_path):
    root, elsewhere = tmp_path / "in", tmp_path / "elsewhere"
    (root / "a").mkdir(parents=True)
    elsewhere.mkdir()
    (root / "a" / "good.png").write_bytes(b"g")
    (elsewhere / "secret.png").write_bytes(b"s")
    (root / "a" / "out-link.png").symlink_to(elsewhere / "secret.png")
    (root / "in-link.png").symlink_to(root / "a" / "good.png")
    (root / "dir-out").symlink_to(elsewhere, target_is_directory=True)
    (root / "a" / "loop").symlink_to(root, target_is_directory=True)  # a directory loop
    (root / "dangling.png").symlink_to(tmp_path / "gone.png")
    storage = Storage()
    assert storage.list_files(root) == [f"{root}/a/good.png"]
    never = {e.uri.removeprefix(f"{root}/"): e.refused for e in storage.list_entries(root, with_refused=True)}
    assert never.pop("a/good.png") == ""
    assert set(never) == {"a/out-link.png", "in-link.png", "dir-out", "a/loop", "dangling.png"}
    assert all("symbolic link" in r and "enhance.follow_symlinks" in r for r in never.values())
    within = {e.uri.removeprefix(f"{root}/"): e.refused
              for e in storage.list_entries(root, follow_symlinks="within_root", with_refused=True)}
    # followed: the link that stays inside (and the loop, once: its folder is the root, already listed)
    assert within.pop("a/good.png") == within.pop("in-link.png") == ""
    assert "leading outside the input" in within.pop("a/out-link.png")
    assert "leading outside the input" in within.pop("dir-out")
    assert "to nothing" in within.pop("dangling.png")
    assert within == {}
    with pytest.raises(ValueError, match="follow_symlinks"):
        storage.list_entries(root, follow_symlinks="always")


def test_writes_never_follow_a_linked_folder_out_of_a_confined_prefix(tmp_path):
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    (out / "sub").symlink_to(elsewhere, target_is_directory=True)
    storage = Storage()
    storage.confine_writes({"enhance.output": str(out)})
    for write in (lambda p: storage.write_bytes(p, b"x"), lambda p: storage.create_exclusive(p, b"x"),
                  lambda p: storage.open(p, "wb")):
        for target in (out / "sub" / "x.png", out / "sub" / "deeper" / "x.png"):
            with pytest.raises(StorageError, match="cannot write under enhance.output .*resolves outside it"):
                write(str(target))
    assert list(elsewhere.iterdir()) == []  # nothing written, no folder created there
    storage.write_bytes(out / "real" / "x.png", b"x")  # inside: fine, folders created
    shipped = pickle.loads(pickle.dumps(storage))  # the confinement travels into Ray tasks
    with pytest.raises(StorageError, match="enhance.output"):
        shipped.write_bytes(out / "sub" / "y.png", b"x")
    # an output prefix that is itself a link (a mount) is the user's choice: writes under it are fine
    (tmp_path / "mount").symlink_to(out, target_is_directory=True)
    linked = Storage()
    linked.confine_writes({"enhance.output": str(tmp_path / "mount")})
    linked.write_bytes(tmp_path / "mount" / "y.png", b"y")
    assert (out / "y.png").read_bytes() == b"y"
    Storage().write_bytes(out / "sub" / "unconfined.png", b"u")  # a Storage without roots does not check


# -- paths ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("base", "parts", "joined"),
    [
        ("s3://bucket/runs", ("exp1", "ckpt.pt"), "s3://bucket/runs/exp1/ckpt.pt"),
        ("s3://bucket/runs/", ("/exp1/", "a/b.png"), "s3://bucket/runs/exp1/a/b.png"),
        ("s3://bucket", ("x",), "s3://bucket/x"),
        ("file:///data", ("x", "y"), "file:///data/x/y"),
        ("file:///", ("x",), "file:///x"),
        ("/data", ("/abs", "y"), "/data/abs/y"),
        ("relative/dir", ("y",), "relative/dir/y"),
        ("s3://bucket/runs", (), "s3://bucket/runs"),
    ],
)
def test_join_appends_relative_parts_and_keeps_the_scheme(base, parts, joined):
    assert Storage.join(base, *parts) == joined


def test_remote_and_local_uris_are_told_apart():
    assert is_remote("s3://bucket/key")
    assert not is_remote("/data/x") and not is_remote("file:///data/x") and not is_remote("rel/x")
    assert local_path("file:///data/x") == "/data/x"
    assert local_path("rel/x") == "rel/x"
    assert local_path("s3://bucket/key") is None


# -- shipping a Storage to Ray workers --------------------------------------------------------------------
def test_an_unpickled_storage_keeps_its_config_and_works(storage_s3, s3_bucket):
    uri = f"{s3_bucket}/shipped.bin"
    storage_s3.write_bytes(uri, b"payload")  # the s3 client now exists in the original

    clone = pickle.loads(pickle.dumps(storage_s3))

    assert clone.config == storage_s3.config
    assert clone.read_bytes(uri) == b"payload"
    clone.write_bytes(f"{s3_bucket}/from-clone.bin", b"back")
    assert storage_s3.read_bytes(f"{s3_bucket}/from-clone.bin") == b"back"


def test_pickling_ships_only_the_config():
    storage = Storage(StorageConfig(endpoint_url="http://minio:9000", region="eu-west-1"))
    storage.fs("/tmp")  # build a client; it must not travel
    assert pickle.loads(pickle.dumps(storage)).__getstate__() == {"config": storage.config}


# -- pyarrow filesystems for Ray Data ---------------------------------------------------------------------
def test_pyarrow_fs_writes_and_reads_parquet(place):
    storage, base = place
    table = pa.table({"path": ["a.dcm", "b.dcm"], "height": [512, 256]})
    fs, path = storage.pyarrow_fs(storage.join(base, "manifest", "part-0.parquet"))
    if not is_remote(base):
        os.makedirs(os.path.dirname(path), exist_ok=True)

    pq.write_table(table, path, filesystem=fs)
    shipped_fs = pickle.loads(pickle.dumps(fs))  # Ray Data pickles the filesystem into its tasks

    assert pq.read_table(path, filesystem=shipped_fs).equals(table)
    assert storage.list_files(storage.join(base, "manifest")) == [storage.join(base, "manifest", "part-0.parquet")]


# -- errors -----------------------------------------------------------------------------------------------
def test_reading_a_missing_key_names_the_uri(place):
    storage, base = place
    uri = storage.join(base, "missing.png")
    with pytest.raises(StorageError, match=r"cannot read .*missing\.png: no such file"):
        storage.read_bytes(uri)
    with pytest.raises(StorageError, match=r"missing\.png"):
        storage.size(uri)
    with pytest.raises(StorageError, match=r"missing\.png"):
        storage.open(uri)
    assert not storage.exists(uri)


def test_a_missing_bucket_is_reported_as_such(storage_s3):
    uri = "s3://no-such-bucket-medsr/x.png"
    for action in (storage_s3.read_bytes, storage_s3.list_files, lambda u: storage_s3.write_bytes(u, b"1")):
        with pytest.raises(StorageError, match=r"s3://no-such-bucket-medsr.*no such bucket 'no-such-bucket-medsr'"):
            action(uri)
    assert not storage_s3.exists(uri)


def test_a_folder_is_not_a_file(tmp_path):
    storage = Storage()
    with pytest.raises(StorageError, match="is a directory"):
        storage.read_bytes(tmp_path)
    with pytest.raises(StorageError, match="is a directory"):
        storage.size(tmp_path)
    with pytest.raises(StorageError, match="is a directory"):
        storage.delete(tmp_path)


@pytest.mark.parametrize("uri", ["gs://bucket/x", "s3://", "s3:///"])
def test_unsupported_or_incomplete_uris_are_rejected(uri):
    with pytest.raises(StorageError, match="s3://|scheme"):
        Storage().read_bytes(uri)


# -- listing with sizes and versions (incremental runs) -----------------------------------------------------
def test_list_entries_carries_size_and_a_version_that_changes_with_the_content(place):
    from medsr_dist.storage import FileEntry

    storage, base = place
    uri = storage.join(base, "sub", "a.png")
    storage.write_bytes(uri, b"12345")
    storage.write_bytes(storage.join(base, "b.png"), b"1")
    entries = storage.list_entries(base, include=["*.png"])
    assert [e.uri for e in entries] == storage.list_files(base, include=["*.png"])
    first = {e.uri: e for e in entries}[uri]
    assert isinstance(first, FileEntry) and first.size == 5
    assert first.version.startswith("etag:" if base.startswith("s3://") else "mtime_ns:")
    assert storage.list_entries(base)[-1].version == storage.list_entries(base)[-1].version  # stable when unchanged
    assert {e.uri: e for e in storage.list_entries(base)}[uri] == first
    storage.write_bytes(uri, b"54321")  # same size, new content
    assert {e.uri: e for e in storage.list_entries(base)}[uri].version != first.version
    assert storage.list_entries(uri) == [FileEntry(uri, 5, storage.list_entries(uri)[0].version)]


@pytest.mark.parametrize(("a", "b"), [
    ("/data/out", "/data/out/"), ("/data/out", "file:///data/out"), ("/data/./out", "/data//out/"),
    ("/data/x/../out", "file:///data/out/"), ("s3://b/out", "s3://b/out/"), ("s3://b//out/./", "s3://b/out"),
])
def test_one_location_normalises_to_one_spelling(a, b):
    from medsr_dist.uris import is_under, normalize_uri

    assert normalize_uri(a) == normalize_uri(b)
    assert is_under(a + "/x.png", b) and is_under(b, a)
    assert not is_under("/data/outside/x.png", a) and not is_under("/data/out2/x.png", a)


def test_relative_keys_are_normalised_and_climbing_or_absolute_ones_refused():
    from medsr_dist.uris import relative_key

    assert relative_key("s3://b/in/a/./b//c.dcm", "s3://b/in/") == "a/b/c.dcm"
    with pytest.raises(ValueError, match=r"'\.\.' segment"):
        relative_key("s3://b/in/a/../../escape.png", "s3://b/in")
    with pytest.raises(ValueError, match="absolute"):
        relative_key("s3://b/in//etc/x.png", "s3://b/in")
    with pytest.raises(ValueError, match="not below"):
        relative_key("s3://b/other/x.png", "s3://b/in")


# -- exclusive creation and leases ----------------------------------------------------------------------------
def test_exclusive_create_and_conditional_replace_let_exactly_one_writer_win(place):
    storage, base = place
    uri = storage.join(base, "_manifest", "lease.json")
    v1 = storage.create_exclusive(uri, b"first")
    assert v1 and storage.read_bytes(uri) == b"first"
    assert storage.create_exclusive(uri, b"second") is None and storage.read_bytes(uri) == b"first"
    v2 = storage.replace_if(uri, b"taken", v1)
    assert v2 and v2 != v1 and storage.read_bytes(uri) == b"taken"
    assert storage.replace_if(uri, b"late", v1) is None and storage.read_bytes(uri) == b"taken"  # stale version
    assert not storage.delete_if(uri, v1) and storage.exists(uri)
    assert storage.delete_if(uri, v2) and not storage.exists(uri)


def test_a_lease_is_exclusive_until_released_or_expired(place):
    import json as _json
    import time as _time

    from medsr_dist.storage import Lease, LeaseHeldError, LeaseLostError

    storage, base = place
    uri = storage.join(base, "_manifest", "lease.json")
    first = Lease.acquire(storage, uri, "run-1", ttl_s=60)
    with pytest.raises(LeaseHeldError, match=r"another run \(run-1 on host .*pid .*\) holds this prefix"):
        Lease.acquire(storage, uri, "run-2", ttl_s=60)
    assert _json.loads(storage.read_bytes(uri))["owner"] == "run-1"  # the refused run changed nothing
    first.refresh()
    first.release()
    assert not storage.exists(uri)
    second = Lease.acquire(storage, uri, "run-2", ttl_s=0.5)  # free again
    _time.sleep(0.7)
    third = Lease.acquire(storage, uri, "run-3", ttl_s=60)  # run-2 let it expire: taken over
    assert _json.loads(storage.read_bytes(uri))["owner"] == "run-3"
    with pytest.raises(LeaseLostError, match="taken over"):
        second.refresh()
    second.release()  # a lost lease is not deleted: run-3 keeps it
    assert _json.loads(storage.read_bytes(uri))["owner"] == "run-3"
    third.release()


def test_a_lease_whose_holder_died_on_this_host_is_taken_over_at_once(tmp_path):
    import json as _json
    import socket
    import subprocess
    import sys

    from medsr_dist.storage import Lease

    storage, uri = Storage(), str(tmp_path / "lease.json")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    storage.write_bytes(uri, _json.dumps({"owner": "killed", "host": socket.gethostname(), "pid": int(dead.stdout),
                                          "pid_start": "1", "expires_at": 4e9}).encode())
    lease = Lease.acquire(storage, uri, "next", ttl_s=60)
    assert _json.loads(storage.read_bytes(uri))["owner"] == "next"
    lease.release()


def test_a_refused_link_in_a_series_folder_stays_its_own_entry():
    """enhance.volumes.series_folders: a link among a series' slices is not merged into the volume item, so the
    nightly job gives it its own error row."""
    from medsr_dist.enhance.volumes import group_series
    from medsr_dist.storage import FileEntry

    entries = [FileEntry("/in/series/a/1.dcm", 10, "v1"), FileEntry("/in/series/a/2.dcm", 10, "v2"),
               FileEntry("/in/series/a/3.dcm", 0, "", "a symbolic link; links are not followed")]
    grouped = group_series(entries, "/in", ["series/*"])
    assert [e.uri for e in grouped] == ["/in/series/a/", "/in/series/a/3.dcm"]
    assert grouped[0].size == 20 and grouped[1].refused
