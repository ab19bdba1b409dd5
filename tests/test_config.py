"""Config composition: groups, dotted overrides, SAE override blocks, and errors that say what is wrong."""

from __future__ import annotations

from pathlib import Path

import pytest

from ddr.config import ConfigError, StagesConfig, load_config, load_group


def test_defaults_match_the_original() -> None:
    config = load_config([])
    assert (config.num_inference_steps, config.guidance_scale) == (50, 7.5)
    assert config.target_layer_name == "up_blocks.1.attentions.1"
    analysis = config.stages.timestep_analysis
    assert (analysis.top_k, analysis.total_timesteps, analysis.peak_separation, analysis.top_peak_count) == (
        20,
        1000,
        100,
        3,
    )
    prior = config.stages.prior
    assert prior.seeds == [1024, 1111, 4359, 3248, 1026] and prior.steer_strength_scale == 50
    assert prior.for_kind("sae").steer_strength_scale == 500 and prior.for_kind("raw").steer_strength_scale == 50
    dream = config.stages.deep_dream
    assert dream.timesteps == [0, "activity_peaks"] and dream.num_steps == 100 and dream.learning_rate == 0.05
    assert (dream.jitter_max, dream.rotate_max, dream.scale_max) == (1, 5, 1.1)
    assert dream.for_kind("sae").total_variation_penalty_weight == 0.0
    assert config.stages.plots.frame_duration == 2


def test_stage_yaml_files_hold_every_field() -> None:
    import yaml

    for stage, field in StagesConfig.model_fields.items():
        data = yaml.safe_load((Path("configs/stages") / f"{stage}.yaml").read_text())
        assert set(data) == set(field.annotation.model_fields), stage


def test_dotted_overrides_and_group_choices() -> None:
    config = load_config(
        [
            "stages.capture.num_images_per_prompt=2",
            "model=sd14-random",
            "stages.prior.seeds=[1, 2]",
            "stages.prior.n_results=2",
            "robustness=level_3",
            "sae=null",
            "use_sae=false",
        ]
    )
    assert config.stages.capture.num_images_per_prompt == 2
    assert config.model.name == "sd14-random" and config.model.generator == "sd14-random"
    assert config.stages.prior.seeds == [1, 2]
    assert (config.stages.deep_dream.jitter_max, config.stages.deep_dream.scale_max) == (16, 1.8)
    assert config.sae is None and config.kinds == ["raw"]


def test_cli_override_wins_over_robustness_preset() -> None:
    config = load_config(["robustness=level_2", "stages.deep_dream.rotate_max=3"])
    assert (config.stages.deep_dream.jitter_max, config.stages.deep_dream.rotate_max) == (8, 3)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            ["stages.capture.num_images_per_prompt=0"],
            r"stages.capture.num_images_per_prompt: .*greater than 0 \(got 0\)",
        ),
        (["stages.capture.num_imags_per_prompt=2"], "did you mean num_images_per_prompt"),
        (["model=sd-v1.4"], r"model: unknown value 'sd-v1.4' \(did you mean sd-v1-4\?\); allowed:"),
        (["stages.prior.timesteps=peaks"], "stages.prior.timesteps: Input should be 'active_timesteps'"),
        (["stages.prior.sae.stear_strength_scale=1"], "unknown keys in the sae override block"),
        (["stages.prior.sae.steer_strength_scale=abc"], "steer_strength_scale"),
        (["stages.deep_dream.gradient_smoothing_kernel_size=4"], "must be odd"),
        (["stages.prior.start_channel=5", "stages.prior.end_channel=2"], r"end_channel \(2\) must be greater"),
        (["stages.prior.n_results=6"], r"n_results \(6\) needs at least that many seeds"),
        (["use_sae=true", "sae=null"], "use_sae is true but no sae"),
        (["experiment_name=a/b"], "experiment_name"),
        (["nokey"], "not of the form key=value"),
        (["stages.capture.batch_size.x=1"], "is a value"),
    ],
)
def test_bad_values_name_key_value_and_allowed(override: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(override)


def test_every_group_file_validates(monkeypatch: pytest.MonkeyPatch) -> None:
    from ddr.config import GROUP_FOLDERS, available

    for name in ("PLG_GROUPS_STORAGE", "PLG_GROUP_NAME", "PLG_USERNAME"):
        monkeypatch.setenv(name, "site")

    for group in ("model", "sae", "infrastructure", "robustness"):
        for name in available(group):
            load_config([f"{group}={name}", *(["use_sae=false"] if group == "sae" else [])])
    for name in available("dataset"):
        assert load_group("dataset", name)["name"] == name
    assert set(GROUP_FOLDERS) >= {"model", "sae", "dataset", "infrastructure", "robustness"}


def test_infrastructure_overrides_need_their_site_variables(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)  # no .env here
    for name in ("PLG_GROUPS_STORAGE", "PLG_GROUP_NAME", "PLG_USERNAME"):
        monkeypatch.setenv(name, "")  # so that teardown restores the original state, even after .env set them
        monkeypatch.delenv(name)
    with pytest.raises(ConfigError, match=r"infrastructure.overrides.data_root: environment variable\(s\) PLG_GROUPS"):
        load_config(["infrastructure=slurm-a100"])
    (tmp_path / ".env").write_text("PLG_GROUPS_STORAGE=/groups\nPLG_GROUP_NAME=g\nPLG_USERNAME=u\n")
    config = load_config(["infrastructure=slurm-a100"])
    assert str(config.data_root) == "/groups/g/u/ddr"
    assert config.stages.capture.num_images_per_prompt == 5
