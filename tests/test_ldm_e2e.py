"""The latent diffusion family end to end on a local Ray, through the CLI a user runs, at tiny sizes:

``medsr prepare`` -> ``medsr train`` (configs/ldm_cxr_x4_vae.yaml, then configs/ldm_cxr_x4.yaml) -> ``medsr export
--format onnx`` -> ``medsr enhance`` (the nightly job, K samples: mean + uncertainty map) -> ``medsr eval -c
configs/eval_cxr14-ldm.yaml`` (each sampler against bicubic and a GAN-family export).

One module-scoped Ray (4 logical CPUs); tiny VAE (8/16 channels) and U-Net (16 channels), 64-px crops, a few
iterations: the numbers are not the point, every stage running on what the previous one wrote is.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import write_tiny_model

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
TINY_VAE = ["model.vae_arch.block_out_channels=[8,16,16,16]", "model.vae_arch.norm_num_groups=8"]
TINY_UNET = ["model.unet.block_out_channels=[16,16]", "model.unet.down_block_types=[DownBlock2D,AttnDownBlock2D]"]
SMALL = ["ray.num_cpus=4", "ray.progress=false", "degradation.gt_size=64", "degradation.num_actors=1",
         "train.num_workers=1", "train.batch_size=2", "train.checkpoint_every=3", "train.val_every=3",
         "train.log_every=3", "train.cpus_per_worker=1"]


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _cli(*args: str):
    from medsr_dist.cli import app

    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, f"medsr {' '.join(args[:3])} ...:\n{result.output}\n{result.exception!r}"
    return result


def _write_png16(path: Path, image: np.ndarray) -> None:
    import cv2

    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), np.round(image * 65535).astype(np.uint16))


@pytest.fixture(scope="module")
def pipeline(ray_local, tmp_path_factory):
    """Run every stage once; the tests below read what it wrote."""
    import cv2

    from medsr_dist.data.synthetic import make_radiograph

    root = tmp_path_factory.mktemp("ldm-e2e")
    for i in range(8):  # NIH-style names: patient p<i>, one image each
        _write_png16(root / "archive" / f"p{i}_000.png", make_radiograph(100 + i, 96))
    for i in range(3):  # low-resolution hold-out inputs for the nightly job (24 x 24 -> 96 x 96)
        hr = make_radiograph(900 + i, 96)
        _write_png16(root / "lr" / f"h{i}.png", cv2.resize(hr, (24, 24), interpolation=cv2.INTER_AREA))
    common = [f"run.root={root}", *SMALL, *TINY_VAE, "prepare.split.group_by=filename",
              "prepare.split={train: 0.5, val: 0.25, test: 0.25, group_by: filename}"]
    _cli("prepare", "-c", str(REPO / "configs/ldm_cxr_x4_vae.yaml"), *common)
    vae_out = root / "train-vae"
    _cli("train", "-c", str(REPO / "configs/ldm_cxr_x4_vae.yaml"), *common, f"train.output={vae_out}",
         "train.iterations=6", "model.scale_factor_iterations=3", "model.losses.perceptual_weight=0")
    ldm_out = root / "train-ldm"
    ldm = [*common, *TINY_UNET, f"model.vae={vae_out}/export/model.pth", f"train.output={ldm_out}",
           "train.iterations=6", "model.sampling.steps=5", "model.sampling.samples=3",
           "enhance.tile=16", "enhance.tile_overlap=4", "enhance.tile_blend=2", f"enhance.input={root / 'lr'}",
           f"enhance.output={root / 'enhanced'}", "enhance.batch_size=4", "enhance.cpus_per_replica=1"]
    _cli("train", "-c", str(REPO / "configs/ldm_cxr_x4.yaml"), *ldm)
    exported = _cli("export", "-c", str(REPO / "configs/ldm_cxr_x4.yaml"), *ldm, "--format", "onnx")
    _cli("enhance", "-c", str(REPO / "configs/ldm_cxr_x4.yaml"), *ldm)
    # the same night asking another sampler: new outputs beside the first ones, none of them taken as done
    _cli("enhance", "-c", str(REPO / "configs/ldm_cxr_x4.yaml"), *ldm, "enhance.sampling.sampler=ddpm",
         "enhance.sampling.steps=8")
    gan = root / "gan"  # a GAN-family (realesrgan) export, untrained: the comparison is what is tested here
    gan.mkdir()
    write_tiny_model(lambda name, data: (gan / name).write_bytes(data))
    model = str(ldm_out / "export" / "model.pth")
    models = [{"name": "bicubic", "source": "bicubic", "baseline": True},
              {"name": "ldm-ddpm300", "source": model, "sampling": {"sampler": "ddpm", "steps": 300, "samples": 1}},
              {"name": "ldm-ddim50", "source": model, "sampling": {"sampler": "ddim", "steps": 50, "samples": 1}},
              {"name": "ldm-dpm++20", "source": model, "sampling": {"sampler": "dpmsolver++", "steps": 20, "samples": 1}},
              {"name": "gan", "source": str(gan / "model.pth")}]
    evaluated = _cli("eval", "-c", str(REPO / "configs/eval_cxr14-ldm.yaml"), f"run.root={root}", "ray.num_cpus=4",
                     "ray.progress=false", f"eval.dataset={root / 'dataset'}", "eval.params.source_size=96",
                     "eval.params.hr_size=64", f"eval.models={json.dumps(models)}", "eval.figures=1",
                     f"eval.lpips.backbone={root / 'absent-alexnet.pth'}", "eval.bootstrap.samples=200",
                     "eval.cpus_per_replica=1")
    return {"root": root, "vae": vae_out / "export", "ldm": ldm_out / "export", "ldm_args": ldm,
            "export_output": exported.output, "eval_output": evaluated.output}


def test_both_training_stages_export_what_the_next_stage_reads(pipeline):
    vae_meta = json.loads((pipeline["vae"] / "meta.json").read_text())
    assert vae_meta["family"] == "vae" and vae_meta["scale"] == 1
    assert vae_meta["latent_scale_factor"] > 0 and vae_meta["latent_stats"]["values"] > 0
    meta = json.loads((pipeline["ldm"] / "meta.json").read_text())
    assert meta["family"] == "ldm" and meta["scale"] == 4
    assert meta["generator"]["sampling"]["samples"] == 3 and meta["vae_source"].endswith("train-vae/export/model.pth")
    # the frozen VAE inside the ldm export is the vae stage's, bit for bit
    import torch

    vae_state = torch.load(pipeline["vae"] / "model.pth", weights_only=True)["params"]
    ldm_state = torch.load(pipeline["ldm"] / "model.pth", weights_only=True)["params_ema"]
    for k, v in vae_state.items():
        assert torch.equal(ldm_state["vae." + k], v), k


def test_onnx_export_writes_the_three_networks(pipeline):
    for part in ("unet", "vae_encoder", "vae_decoder"):
        assert (pipeline["ldm"] / f"model.{part}.onnx").stat().st_size > 0
    assert "max abs difference" in pipeline["export_output"]


def _manifests(out: Path):
    from medsr_dist.enhance.manifest import read_manifest
    from medsr_dist.storage import Storage

    runs = sorted((out / "_manifest" / "runs").glob("*.parquet"))
    return (read_manifest(Storage(), str(out / "_manifest" / "manifest.parquet")),
            [read_manifest(Storage(), str(r)) for r in runs])


def test_nightly_job_enhances_every_input_and_keys_outputs_by_sampler(pipeline):
    from medsr_dist.io.image import decode_image

    cumulative, (first, second) = _manifests(pipeline["root"] / "enhanced")
    for run, sampler, steps in ((first, "ddim", 5), (second, "ddpm", 8)):
        assert sorted(Path(r["input_key"]).name for r in run) == ["h0.png", "h1.png", "h2.png"]
        assert [r["status"] for r in run] == ["done"] * 3, [r["error"] for r in run]  # the ddpm run skipped nothing
        for r in run:
            params = json.loads(r["params"])
            assert params["sampling"]["sampler"] == sampler and params["sampling"]["steps"] == steps
            assert params["sampling"]["samples"] == 3 and params["schedule"]["zero_terminal_snr"] is False
            assert json.loads(json.loads(r["provenance"])["medsr:params"]) == params  # written into the file too
            img = decode_image(Path(r["output_key"]).read_bytes(), r["output_key"])
            assert img.pixels.shape[:2] == (96, 96) and img.meta.dtype == "uint16"
            # K = 3 samples: the mean is the output, the std map lies beside it, its p99 in the manifest
            std = decode_image(Path(r["uncertainty_key"]).read_bytes(), r["uncertainty_key"])
            assert r["uncertainty_key"] == r["output_key"][: -len(".png")] + ".std.png"
            assert std.pixels.shape[:2] == (96, 96) and 0 < r["uncertainty_p99"] < 0.25
            assert r["flagged"] == (r["uncertainty_p99"] > 0.05 or r["consistency_psnr_db"] < 30.0)
    assert not {r["output_key"] for r in first} & {r["output_key"] for r in second}
    assert len([r for r in cumulative if r["status"] == "done"]) == 6
    status = _cli("status", str(pipeline["root"] / "enhanced")).output
    assert "uncertainty p99 (std, fraction of the range) of 6 outputs with a std map" in status


def test_nightly_outputs_are_bit_reproducible_outside_the_job(pipeline):
    """The job's output (a Ray replica, tiles batched across the three images) equals, bit for bit, the same image
    enhanced alone in this process with the same backend and tiling: the noise is seeded from the tile's content,
    sample index and run seed, and every batch is padded to the same size."""
    from medsr_dist.infer.diffusion_backend import DiffusionBackend
    from medsr_dist.infer.engine import TileSpec, enhance_array
    from medsr_dist.infer.rows import quantize
    from medsr_dist.infer.model_file import read_model_file
    from medsr_dist.io.image import decode_image
    from medsr_dist.storage import Storage

    import torch

    _, (first, _) = _manifests(pipeline["root"] / "enhanced")
    # enhance.backend auto (the default) after `medsr export --format onnx` on CPU: the job ran onnxruntime
    ran = {json.loads(r["params"])["backend"] for r in first}
    assert ran == {"onnxruntime"}, ran
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the replica (Ray sets OMP_NUM_THREADS to its one CPU)
    backend = DiffusionBackend.from_model_file(read_model_file(str(pipeline["ldm"] / "model.pth")), Storage(),
                                               backend="onnxruntime")
    spec = TileSpec(tile=16, overlap=4, blend=2, batch_size=4)
    backend.prepare(spec)
    for r in first:
        source = decode_image(Path(r["input_key"]).read_bytes(), r["input_key"]).pixels
        mine = quantize(enhance_array(backend, source, spec), 65535)
        job = decode_image(Path(r["output_key"]).read_bytes(), r["output_key"]).pixels
        job = np.rint(job * 65535).astype(np.uint16).reshape(mine.shape)
        assert np.array_equal(mine, job), f"{int((mine != job).sum())} of {mine.size} values differ"
    torch.set_num_threads(threads)


def test_eval_scores_each_sampler_against_bicubic_and_a_gan_family(pipeline):
    out = pipeline["root"] / "eval" / "cxr14-ldm"
    data = json.loads((out / "results.json").read_text())
    names = ["bicubic", "ldm-ddpm300", "ldm-ddim50", "ldm-dpm++20", "gan"]
    assert [m["name"] for m in data["models"]] == names
    sampling = {m["name"]: m.get("sampling") for m in data["models"]}
    assert sampling["ldm-ddpm300"]["sampler"] == "ddpm" and sampling["ldm-ddpm300"]["steps"] == 300
    assert sampling["ldm-dpm++20"]["sampler"] == "dpmsolver++" and sampling["gan"] is None
    summary = data["summary"]
    for name in names:
        s = summary[name]
        assert s["errors"] == 0 and s["psnr"]["n"] == 2, (name, s)
        assert np.isfinite(s["psnr"]["mean"]) and np.isfinite(s["ssim"]["mean"])
        assert np.isfinite(s["consistency_psnr_db"]["mean"])
        assert s["lpips"] == "unavailable"  # no ImageNet AlexNet here: stated, never a number
    # same weights, different samplers: different outputs
    assert len({round(summary[n]["psnr"]["mean"], 6) for n in names[1:4]}) == 3
    assert data["lpips"]["available"] is False and "absent-alexnet.pth" in data["lpips"]["reason"]
    assert "ldm-ddim50: PSNR" in pipeline["eval_output"]
