"""The config tree: one schema, validated before any Ray work, errors naming the file and the key."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from medsr_dist.cli import app
from medsr_dist.config import ConfigError, load_config
from medsr_dist.preflight import check_local_inputs

REPO = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, tree: dict) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


#: Ray Serve config files (``serve deploy``), not medsr configs: checked against Ray's own schema.
SERVE_CONFIGS = ("serve_app.yaml",)


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs").glob("*.yaml") if p.name not in SERVE_CONFIGS))
def test_every_shipped_config_is_valid(name):
    cfg = load_config(REPO / "configs" / name)
    assert cfg.source.endswith(name)


@pytest.mark.parametrize("name", SERVE_CONFIGS)
def test_the_serve_deploy_config_is_valid_for_ray_and_builds_from_a_shipped_medsr_config(name):
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(yaml.safe_load((REPO / "configs" / name).read_text()))
    for application in schema.applications:
        assert application.import_path == "medsr_dist.serve.app:app_builder"
        load_config(REPO / application.args["config"], application.args.get("overrides") or [])


def test_stage_paths_default_under_run_root():
    cfg = load_config(None, ["run.root=s3://bucket/medsr"])
    assert cfg.sample.archive == "s3://bucket/medsr/archive"
    assert cfg.prepare.input == cfg.sample.archive
    assert cfg.train.dataset == cfg.prepare.output == "s3://bucket/medsr/dataset"
    assert cfg.enhance.checkpoint == "s3://bucket/medsr/train/export/model.pth"


def test_explicit_paths_are_kept():
    cfg = load_config(None, ["prepare.input=/data/cxr", "train.dataset=/data/ds"])
    assert cfg.prepare.input == "/data/cxr" and cfg.train.dataset == "/data/ds"


def test_overrides_are_parsed_as_yaml():
    cfg = load_config(None, ["train.iterations=7", "train.betas=[0.5, 0.9]", "enhance.outscale=3.5",
                             "train.use_gpu=true", "prepare.exclude=['*.txt']"])
    assert cfg.train.iterations == 7 and cfg.train.betas == (0.5, 0.9)
    assert cfg.enhance.outscale == 3.5 and cfg.train.use_gpu is True and cfg.prepare.exclude == ["*.txt"]


def test_unknown_key_names_file_and_key(tmp_path):
    path = write(tmp_path, {"train": {"iteratons": 10}})
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(path) in str(err.value) and "train.iteratons: unknown key" in str(err.value)


def test_wrong_type_names_key_and_value(tmp_path):
    path = write(tmp_path, {"train": {"batch_size": "many"}})
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "train.batch_size" in str(err.value) and "'many'" in str(err.value) and str(path) in str(err.value)


@pytest.mark.parametrize("scale", [3, 8])
def test_unsupported_scale_for_architecture(tmp_path, scale):
    path = write(tmp_path, {"model": {"family": "realesrgan", "scale": scale}})
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert f"model.scale: scale {scale} is not supported by the realesrgan architecture" in str(err.value)


def test_unknown_family(tmp_path):
    with pytest.raises(ConfigError, match="model.family: unknown model family 'srflow'"):
        load_config(write(tmp_path, {"model": {"family": "srflow"}}))


def test_cross_field_rules():
    with pytest.raises(ConfigError, match="prepare.split: train \\+ val \\+ test must be 1"):
        load_config(None, ["prepare.split.train=0.9"])
    with pytest.raises(ConfigError, match="degradation.kernel_prob"):
        load_config(None, ["degradation.kernel_prob=[0.5, 0.6]"])
    with pytest.raises(ConfigError, match="degradation.blur_kernel_size: kernel size must be odd"):
        load_config(None, ["degradation.blur_kernel_size=20"])
    with pytest.raises(ConfigError, match="min_replicas \\(3\\) exceeds max_replicas \\(1\\)"):
        load_config(None, ["enhance.min_replicas=3", "enhance.max_replicas=1"])


def test_missing_config_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(None, ["train.iterations"])


def test_missing_local_input_names_key_and_path(tmp_path):
    cfg = load_config(None, [f"prepare.input={tmp_path}/absent"])
    with pytest.raises(ConfigError, match=f"prepare.input: path {tmp_path}/absent does not exist"):
        check_local_inputs(cfg, "prepare")
    check_local_inputs(load_config(None, ["prepare.input=s3://bucket/x"]), "prepare")  # remote: checked by the stage


def test_cli_rejects_bad_config_before_starting_ray(tmp_path):
    result = CliRunner().invoke(app, ["train", "--config", str(write(tmp_path, {"train": {"num_workers": 0}}))])
    assert result.exit_code == 2
    assert "train.num_workers" in result.output
    import ray

    assert not ray.is_initialized()


def test_cli_help_documents_every_command():
    result = CliRunner().invoke(app, ["--help"])
    for command in ("prepare", "train", "enhance", "demo", "config"):
        assert command in result.output
    result = CliRunner().invoke(app, ["enhance", "--help"])
    assert "--config" in result.output and "--fail-on-error" in result.output and "key=value" in result.output


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs").glob("*.yaml") if p.name not in SERVE_CONFIGS))
def test_config_survives_the_trip_to_ray_workers(name):
    """Workers rebuild the config from its JSON dump: the round trip must give the same config."""
    from medsr_dist.config import MedsrConfig

    cfg = load_config(REPO / "configs" / name)
    assert MedsrConfig.model_validate(cfg.model_dump(mode="json")).model_dump() == cfg.model_dump()


def test_medsr_enhance_exits_2_with_the_reason_when_min_replicas_never_start(monkeypatch, tmp_path, tiny_model_dir):
    import medsr_dist.pipeline
    from medsr_dist.enhance.job import ReplicasNotStartedError

    def starved(cfg, console):
        raise ReplicasNotStartedError("enhance.min_replicas 2 model replica(s) (1 CPU each) did not all start")

    monkeypatch.setattr(medsr_dist.pipeline, "run_enhance", starved)
    (tmp_path / "in").mkdir()
    result = CliRunner().invoke(app, ["enhance", f"enhance.input={tmp_path / 'in'}",
                                      f"enhance.checkpoint={tiny_model_dir}/model.pth"])
    assert result.exit_code == 2, result.output
    assert "enhance.min_replicas 2 model replica(s)" in result.output and "Traceback" not in result.output
