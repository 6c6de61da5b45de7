"""Specification of pretrained weights: architecture sizes, the model zoo (download, sha256, cache), safe loading.

Downloads are exercised against a real HTTP server on 127.0.0.1 serving small checkpoints made here; nothing
reaches the internet.
"""
from __future__ import annotations

import hashlib
import http.server
import re
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import medsr_dist.compat  # noqa: F401  (must precede basicsr)
from basicsr.archs.rrdbnet_arch import RRDBNet
from medsr_dist.config import MedsrConfig
from medsr_dist.models import zoo
from medsr_dist.models.realesrgan import FAMILY, build_discriminator, build_generator
from medsr_dist.models.weights import load_state_dict_into, resolve_weights, save_basicsr_checkpoint
from medsr_dist.models.weights_error import WeightsError

SMALL_G = {"num_feat": 8, "num_block": 1, "num_grow_ch": 4}


def small_rrdbnet(seed: int = 0, scale: int = 4) -> RRDBNet:
    torch.manual_seed(seed)
    return RRDBNet(num_in_ch=3, num_out_ch=3, scale=scale, **SMALL_G)


def checkpoint_bytes(net: torch.nn.Module) -> bytes:
    return save_basicsr_checkpoint(net, "", ema=net)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class FileServer:
    """A tiny HTTP server on 127.0.0.1 serving ``files`` (url path -> bytes) and counting GET requests."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.requests: list[str] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server API
                server.requests.append(self.path)
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"


@pytest.fixture
def file_server() -> Iterator[FileServer]:
    server = FileServer()
    server.thread.start()
    try:
        yield server
    finally:
        server.httpd.shutdown()
        server.httpd.server_close()


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty weights cache, selected the way a user does it: ``$MEDSR_CACHE``."""
    path = tmp_path / "cache"
    monkeypatch.setenv("MEDSR_CACHE", str(path))
    return path


def serve_entry(server: FileServer, monkeypatch, name: str, data: bytes, sha: str | None, key="params_ema") -> zoo.ZooEntry:
    """Register zoo entry ``name`` whose URL is ``data`` on the local server."""
    server.files[f"/release/{name}.pth"] = data
    entry = zoo.ZooEntry(name, server.url(f"/release/{name}.pth"), sha, len(data), "generator", 4, key, "test entry")
    monkeypatch.setitem(zoo.ZOO, name, entry)
    return entry


# ---- architecture ----------------------------------------------------------------------------------------

def test_default_networks_have_the_official_real_esrgan_sizes():
    cfg = MedsrConfig()
    count = lambda net: sum(p.numel() for p in net.parameters())  # noqa: E731
    assert count(build_generator(cfg)) == 16_697_987  # RRDBNet 64 features, 23 blocks, grow 32, x4
    assert count(build_discriminator(cfg)) == 4_376_897  # UNetDiscriminatorSN 64 features, skip connections


# ---- the zoo's table -------------------------------------------------------------------------------------

def test_zoo_names_official_release_files():
    assert set(zoo.ZOO) >= {"RealESRGAN_x4plus", "RealESRGAN_x4plus_netD", "RealESRNet_x4plus", "RealESRGAN_x2plus"}
    releases = {name: e.url.split("/")[-2] for name, e in zoo.ZOO.items()}
    assert releases["RealESRGAN_x4plus"] == "v0.1.0"
    assert releases["RealESRGAN_x4plus_netD"] == "v0.2.2.3"
    for entry in zoo.ZOO.values():
        assert entry.url == f"https://github.com/xinntao/Real-ESRGAN/releases/download/{releases[entry.name]}/{entry.name}.pth"
        assert entry.sha256 is None or re.fullmatch(r"[0-9a-f]{64}", entry.sha256)
    assert zoo.ZOO["RealESRGAN_x4plus_netD"].key == "params" and zoo.ZOO["RealESRGAN_x4plus_netD"].net == "discriminator"
    assert zoo.ZOO["RealESRGAN_x2plus"].scale == 2


def test_cache_directory_defaults_to_home_cache_and_follows_medsr_cache(monkeypatch, tmp_path):
    monkeypatch.delenv("MEDSR_CACHE", raising=False)
    assert zoo.cache_dir() == Path("~/.cache/medsr-dist/weights").expanduser()
    monkeypatch.setenv("MEDSR_CACHE", str(tmp_path))
    assert zoo.cached_path("RealESRGAN_x4plus") == tmp_path / "RealESRGAN_x4plus.pth"


# ---- download, verification, cache -----------------------------------------------------------------------

def test_first_use_downloads_verifies_and_caches_then_reuses_the_cache(file_server, cache, monkeypatch):
    data = checkpoint_bytes(small_rrdbnet())
    serve_entry(file_server, monkeypatch, "Tiny_x4", data, sha256(data))
    progress = []

    path = zoo.fetch("Tiny_x4", progress=lambda done, total: progress.append((done, total)))
    assert path == cache / "Tiny_x4.pth" and path.read_bytes() == data
    assert progress[-1] == (len(data), len(data))
    assert sorted(p.name for p in cache.iterdir()) == ["Tiny_x4.pth"]  # no partial files left behind
    assert len(file_server.requests) == 1

    assert zoo.fetch("Tiny_x4") == path  # cache hit: no second request
    assert len(file_server.requests) == 1
    assert zoo.cache_state("Tiny_x4") == "cached"


def test_wrong_checksum_fails_and_leaves_nothing_in_the_cache(file_server, cache, monkeypatch):
    data = checkpoint_bytes(small_rrdbnet())
    serve_entry(file_server, monkeypatch, "Tiny_x4", data, "0" * 64)
    with pytest.raises(zoo.ChecksumMismatch, match="sha256 .* does not match"):
        zoo.fetch("Tiny_x4")
    assert not cache.exists() or list(cache.iterdir()) == []


def test_a_corrupted_cached_file_is_downloaded_again(file_server, cache, monkeypatch):
    data = checkpoint_bytes(small_rrdbnet())
    serve_entry(file_server, monkeypatch, "Tiny_x4", data, sha256(data))
    cache.mkdir()
    (cache / "Tiny_x4.pth").write_bytes(data[:100])
    assert zoo.cache_state("Tiny_x4") == "corrupt"
    assert zoo.fetch("Tiny_x4").read_bytes() == data
    assert len(file_server.requests) == 1


def test_http_errors_are_reported_with_the_url(file_server, cache, monkeypatch):
    entry = zoo.ZooEntry("Gone", file_server.url("/missing.pth"), "0" * 64, None, "generator", 4, "params_ema", "")
    monkeypatch.setitem(zoo.ZOO, "Gone", entry)
    with pytest.raises(zoo.DownloadError, match="missing.pth.*404"):
        zoo.fetch("Gone")
    assert not cache.exists() or list(cache.iterdir()) == []


def test_unverified_entries_are_refused_unless_explicitly_allowed(file_server, cache, monkeypatch):
    data = checkpoint_bytes(small_rrdbnet())
    serve_entry(file_server, monkeypatch, "NoDigest", data, None)
    with pytest.raises(zoo.UnverifiedWeights, match="--allow-unverified"):
        zoo.fetch("NoDigest")
    assert file_server.requests == []  # refused before any download

    path = zoo.fetch("NoDigest", allow_unverified=True)
    assert path.read_bytes() == data
    pin = cache / "NoDigest.pth.sha256"
    assert pin.read_text().split()[0] == sha256(data)  # the accepted digest is recorded ...
    assert zoo.fetch("NoDigest") == path  # ... and later uses are checked against it
    assert zoo.cache_state("NoDigest") == "cached (accepted unverified)"

    path.write_bytes(b"tampered")
    file_server.files["/release/NoDigest.pth"] = b"changed upstream"
    with pytest.raises(zoo.ChecksumMismatch):
        zoo.fetch("NoDigest")


# ---- loading ---------------------------------------------------------------------------------------------

def test_pretrained_g_may_be_a_zoo_name(file_server, cache, monkeypatch):
    source = small_rrdbnet(seed=1)
    data = checkpoint_bytes(source)
    serve_entry(file_server, monkeypatch, "Tiny_x4", data, sha256(data))
    cfg = MedsrConfig.model_validate({"model": {"generator": SMALL_G, "discriminator": {"num_feat": 4},
                                                "pretrained_g": "Tiny_x4"}})
    net_g = FAMILY.build_networks(cfg)["net_g"]
    for name, tensor in source.state_dict().items():
        assert torch.equal(net_g.state_dict()[name], tensor), name


def test_paths_and_file_uris_load_as_before(tmp_path):
    source = small_rrdbnet(seed=2)
    path = tmp_path / "model.pth"
    save_basicsr_checkpoint(source, str(path), ema=source)
    for ref in (str(path), f"file://{path}"):
        net = small_rrdbnet(seed=3)
        load_state_dict_into(net, ref)
        assert torch.equal(net.conv_last.weight, source.conv_last.weight)


def test_missing_source_names_the_zoo(tmp_path):
    with pytest.raises(WeightsError, match=r"no such file.*RealESRGAN_x4plus"):
        resolve_weights(str(tmp_path / "nope.pth"))


def test_strict_loading_lists_missing_and_unexpected_keys(tmp_path):
    path = tmp_path / "x2.pth"
    x2 = small_rrdbnet(scale=2)  # conv_first takes 12 channels (pixel-unshuffle)
    torch.save({"params_ema": {**x2.state_dict(), "extra.weight": torch.zeros(1)}}, path)
    net = small_rrdbnet()
    del net.conv_hr  # so the checkpoint has a key the network lacks
    with pytest.raises(WeightsError) as err:
        load_state_dict_into(net, str(path))
    text = str(err.value)
    assert "unexpected keys ['conv_hr.bias', 'conv_hr.weight', 'extra.weight']" in text
    assert "conv_first.weight: checkpoint (8, 12, 3, 3) vs network (8, 3, 3, 3)" in text

    torch.save({"params": {k: v for k, v in small_rrdbnet().state_dict().items() if k != "conv_last.bias"}}, path)
    with pytest.raises(WeightsError, match=r"missing keys \['conv_last.bias'\]"):
        load_state_dict_into(small_rrdbnet(), str(path))


# ---- CLI -------------------------------------------------------------------------------------------------

def test_cli_fetch_then_list_shows_the_cached_file(file_server, cache, monkeypatch):
    from medsr_dist.cli import app

    data = checkpoint_bytes(small_rrdbnet())
    serve_entry(file_server, monkeypatch, "Tiny_x4", data, sha256(data))
    runner = CliRunner()
    fetched = runner.invoke(app, ["weights", "fetch", "Tiny_x4"])
    assert fetched.exit_code == 0, fetched.output
    assert str(cache / "Tiny_x4.pth") in fetched.output
    listed = runner.invoke(app, ["weights", "list"])
    assert listed.exit_code == 0, listed.output
    row = next(line for line in listed.output.splitlines() if "Tiny_x4" in line)
    assert "cached" in row
    assert "RealESRGAN_x4plus_netD" in listed.output and "UNKNOWN" in listed.output

    refused = runner.invoke(app, ["weights", "fetch", "RealESRGAN_x4plus_netD"])
    assert refused.exit_code == 1 and "allow-unverified" in refused.output


def test_pretrained_weights_may_live_in_object_storage(s3_bucket, storage_s3):
    source = small_rrdbnet(seed=4)
    uri = f"{s3_bucket}/weights/g.pth"
    storage_s3.write_bytes(uri, checkpoint_bytes(source))
    net = small_rrdbnet(seed=5)
    load_state_dict_into(net, uri, storage_cfg=storage_s3.config)
    assert torch.equal(net.conv_first.weight, source.conv_first.weight)
