"""The command line: flags from the config models, TOML + overrides, one-line errors."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import typer
from typer.testing import CliRunner

from voxplain.cli import app, build_config
from voxplain.cli.common import config_command
from voxplain.config import GroupMaskStepConfig, TrainConfig, read_toml, to_toml

runner = CliRunner()


def test_help_shows_defaults_from_the_config_models():
    result = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "250"})
    assert result.exit_code == 0
    default_folds = TrainConfig.model_fields["n_folds"].default
    assert f"(a count; every other step's --folds selects folds). (default: {default_folds})" \
        in " ".join(result.output.split())


def test_toml_values_are_overridden_by_flags(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('[train]\ncohort = "a.tsv"\nout = "run"\nfolds = 4\nepochs = 7\n'
                    '[train.model]\nname = "vgg_gap"\ndropout = 0.2\n')
    config = build_config(TrainConfig, "train", toml, epochs=3, model={"dropout": 0.1})
    assert (config.n_folds, config.epochs) == (4, 3)  # "folds" is read as n_folds
    assert (config.model.name, config.model.dropout) == ("vgg_gap", 0.1)


def test_config_command_turns_fields_into_flags_and_flags_into_settings(tmp_path):
    built = []
    demo = typer.Typer()

    @demo.command()
    @config_command(GroupMaskStepConfig, "mask_group", ["run", "folds", "mask.l1"],
                    flags={"folds": ("--folds", "--fold")})
    def group(settings: GroupMaskStepConfig) -> None:
        built.append(settings)

    toml = tmp_path / "run.toml"
    toml.write_text('[mask_group.mask]\nl1 = 0.5\npatience = 9\n')
    result = runner.invoke(demo, ["--run", "r", "--fold", "0,2", "--l1", "0.25",
                                  "--config", str(toml)])
    assert result.exit_code == 0, result.output
    [settings] = built
    assert settings.run == Path("r").resolve() and settings.folds == [0, 2]
    assert (settings.mask.l1, settings.mask.patience) == (0.25, 9)  # flag over file, nested
    help_text = " ".join(runner.invoke(demo, ["--help"], env={"COLUMNS": "250"}).output.split())
    assert "--folds,--fold" in help_text and "(default: 0.0001)" in help_text


def test_config_command_refuses_a_field_the_model_lacks():
    with pytest.raises(ValueError, match="no field 'l3'"):
        config_command(GroupMaskStepConfig, "mask_group", ["mask.l3"])


def test_a_run_folder_config_round_trips_through_toml(tmp_path):
    config = TrainConfig(cohort=Path("/data/cohort.tsv"), out=Path("/runs/a"), classes=["CN", "AD"],
                         model={"name": "cnn", "channels": [4, 8]})
    (tmp_path / "config.toml").write_text(to_toml({"train": config}))
    assert TrainConfig.model_validate(read_toml(tmp_path / "config.toml")["train"]) == config


def test_turning_the_quality_check_off_survives_the_run_folder_toml(tmp_path):
    config = build_config(TrainConfig, "train", None, cohort="a.tsv", out="run",
                          qc_threshold="none")
    assert config.qc_threshold is None
    (tmp_path / "config.toml").write_text(to_toml({"train": config}))
    assert 'qc_threshold = "none"' in (tmp_path / "config.toml").read_text()
    assert TrainConfig.model_validate(read_toml(tmp_path / "config.toml")["train"]) == config


def test_unknown_toml_keys_are_errors(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('cohort = "a.tsv"\nout = "run"\nfoldz = 4\n')
    result = runner.invoke(app, ["train", "--config", str(toml)])
    assert result.exit_code == 2
    assert "foldz" in result.output


def test_bad_cohort_exits_2_with_one_line_naming_the_file(tmp_path):
    tsv = tmp_path / "cohort.tsv"
    pd.DataFrame({"participant_id": ["sub-01"], "session_id": ["ses-M00"], "diagnosis": ["AD"],
                  "path": ["missing.nii.gz"]}).to_csv(tsv, sep="\t", index=False)
    result = runner.invoke(app, ["train", "--cohort", str(tsv), "--out", str(tmp_path / "run")],
                           env={"COLUMNS": "400"})
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert "error:" in lines[0] and "missing.nii.gz: file not found" in lines[0]


@pytest.mark.slow
def test_2d_lesions_train_through_the_same_path(tmp_path):
    generated = runner.invoke(app, ["generate", "lesions", "--out", str(tmp_path / "lesions"),
                                    "--subjects", "24", "--size", "32", "--seed", "1"])
    assert generated.exit_code == 0, generated.output
    cohort = tmp_path / "lesions" / "cohort.tsv"
    result = runner.invoke(app, ["train", "--cohort", str(cohort), "--out", str(tmp_path / "run"),
                                 "--folds", "2", "--epochs", "2", "--model", "convnet",
                                 "--channels", "4,8,8,8", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    model = (tmp_path / "run/models/fold-1/run-0/model.json").read_text()
    assert '"input_shape": [\n      32,\n      32\n    ]' in model
    assert '"classes": [\n    "benign",\n    "malignant"\n  ]' in model
