"""The one model replica (medsr_dist/infer/replica.py): load -> backend -> engine, precision, per-image retry."""
from __future__ import annotations

import numpy as np
import pytest

from medsr_dist.config import EnhanceConfig
from medsr_dist.infer.backends import TorchBackend
from medsr_dist.infer.engine import TileSpec, enhance_many
from medsr_dist.infer.model_file import read_model_file
from medsr_dist.infer.replica import EngineSettings, ModelReplica, NonFiniteOutput, PrecisionMismatch
from medsr_dist.storage import Storage


class Poisoned:
    """Wraps a backend: a batch holding a tile whose first pixel is exactly 0.123 raises (or returns NaN)."""

    def __init__(self, inner, nan: bool = False):
        self.inner, self.nan = inner, nan
        self.scale, self.size_multiple, self.precision = inner.scale, inner.size_multiple, inner.precision
        self.calls = []

    def __call__(self, batch):
        self.calls.append(len(batch))
        out = self.inner(batch)
        poisoned = np.isclose(batch[:, 0, 0, 0], 0.123, atol=1e-6)
        if poisoned.any():
            if not self.nan:
                raise RuntimeError("poisoned tile")
            out[poisoned] = np.nan
        return out


@pytest.fixture(scope="module")
def replica(tiny_model_dir):
    model = read_model_file(f"{tiny_model_dir}/model.pth")
    return ModelReplica.load(model, Storage(), EngineSettings(tile=16, tile_overlap=4, batch_size=4))


def images(n: int, poison: int | None = None) -> list[np.ndarray]:
    rng = np.random.default_rng(3)
    out = [rng.random((20 + 3 * i, 18, 3), dtype=np.float32) for i in range(n)]
    if poison is not None:
        out[poison][0, 0, 0] = 0.123
    return out


def test_replica_output_is_the_engines_output(replica):
    imgs = images(3)
    want = list(enhance_many(replica.backend, imgs, TileSpec(tile=16, overlap=4, blend=4, batch_size=4)))
    got = list(replica.enhance_each(imgs))
    assert [i for i, _ in got] == [0, 1, 2]
    for (_, out), ref in zip(got, want):
        np.testing.assert_array_equal(out, ref)
    assert replica.describe()["model_sha256"] == replica.model.sha256 and replica.describe()["scale"] == 4


def test_a_failing_batch_is_retried_image_by_image_so_one_bad_image_fails_alone(replica):
    poisoned = ModelReplica(replica.model, Poisoned(replica.backend), replica.settings)
    results = dict(poisoned.enhance_each(images(4, poison=2)))
    assert sorted(results) == [0, 1, 2, 3]
    assert isinstance(results[2], RuntimeError) and "poisoned" in str(results[2])
    clean = dict(replica.enhance_each(images(4)))
    for i in (0, 1, 3):
        np.testing.assert_array_equal(results[i], clean[i])


def test_non_finite_output_is_that_images_error(replica):
    poisoned = ModelReplica(replica.model, Poisoned(replica.backend, nan=True), replica.settings)
    results = dict(poisoned.enhance_each(images(3, poison=1)))
    assert isinstance(results[1], NonFiniteOutput) and results[1].count > 0
    assert all(isinstance(results[i], np.ndarray) and np.isfinite(results[i]).all() for i in (0, 2))


def test_reraise_lets_fatal_errors_through_instead_of_retrying(replica):
    poisoned = ModelReplica(replica.model, Poisoned(replica.backend), replica.settings)
    with pytest.raises(RuntimeError, match="poisoned"):
        list(poisoned.enhance_each(images(2, poison=0), reraise=lambda exc: "poisoned" in str(exc)))


def test_a_backend_running_another_precision_than_the_label_is_refused(replica):
    with pytest.raises(PrecisionMismatch, match="runs fp32, but its outputs are keyed and labelled fp16"):
        ModelReplica(replica.model, replica.backend, EngineSettings(precision="fp16"))


def test_self_check_names_what_is_wrong(replica):
    replica.self_check()

    class Broken(Poisoned):
        def __call__(self, batch):
            return np.full((len(batch), 3, batch.shape[2] * 4, batch.shape[3] * 4), np.nan, np.float32)

    with pytest.raises(RuntimeError, match="non-finite"):
        ModelReplica(replica.model, Broken(replica.backend), replica.settings).self_check()

    class Raising(Poisoned):
        def __call__(self, batch):
            raise MemoryError("no memory for the engine")

    with pytest.raises(RuntimeError, match="self-check failed: MemoryError: no memory"):
        ModelReplica(replica.model, Raising(replica.backend), replica.settings).self_check()


def test_settings_are_read_from_a_config_section():
    e = EnhanceConfig(tile=128, tile_overlap=32, batch_size=2, outscale=2.0, backend="onnxruntime")
    s = EngineSettings.of(e)
    assert (s.backend, s.tile, s.tile_overlap, s.batch_size, s.outscale, s.precision) == (
        "onnxruntime", 128, 32, 2, 2.0, "fp32")
    assert EngineSettings.of(e, outscale=None).outscale is None


def test_batch_size_defaults_to_the_backends(replica):
    r = ModelReplica(replica.model, TorchBackend(replica.model.build(Storage()), scale=4, device="cpu"),
                     EngineSettings())
    assert r.spec.batch_size == 1  # CPU default (medsr_dist.infer.engine.AUTO_BATCH_SIZE)
