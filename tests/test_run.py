"""The run folder's record of settings: resuming checks the settings are the same."""

from __future__ import annotations

import pytest

from voxplain.config import SessionMaskStepConfig, config_values, to_toml
from voxplain.run import RunFolder, RunFolderError


def _recorded_without(run: RunFolder, config: SessionMaskStepConfig, missing: str) -> None:
    """config.toml as a version of voxplain without the mask setting ``missing`` wrote it."""
    values = config_values(config)
    del values["mask"][missing]
    run.config_file.write_text(to_toml({"mask_session": values}))


def test_a_setting_added_later_resumes_at_its_default(tmp_path):
    run = RunFolder(tmp_path)
    config = SessionMaskStepConfig(run=tmp_path)
    _recorded_without(run, config, "qc_z")
    run.record_config("mask_session", config)  # the same experiment: no error
    assert "qc_z" not in run.read_config()["mask_session"]["mask"]  # the record is kept


def test_a_setting_added_later_at_another_value_is_refused(tmp_path):
    run = RunFolder(tmp_path)
    _recorded_without(run, SessionMaskStepConfig(run=tmp_path), "qc_z")
    with pytest.raises(RunFolderError, match=r"other \[mask_session\] settings.*qc_z.*2\.0"):
        run.record_config("mask_session", SessionMaskStepConfig(run=tmp_path,
                                                                mask={"qc_z": 2.0}))


def test_another_value_of_a_recorded_setting_is_refused(tmp_path):
    run = RunFolder(tmp_path)
    run.record_config("mask_session", SessionMaskStepConfig(run=tmp_path))
    with pytest.raises(RunFolderError, match=r"\(mask\.patience: 200 -> 7\)"):  # only what differs
        run.record_config("mask_session", SessionMaskStepConfig(run=tmp_path,
                                                                mask={"patience": 7}))


def test_a_moved_run_folder_resumes_but_other_settings_are_still_refused(tmp_path):
    old, new = RunFolder(tmp_path / "old"), RunFolder(tmp_path / "new")
    old.record_config("mask_session", SessionMaskStepConfig(run=old.root))
    new.root.mkdir()
    new.config_file.write_text(old.config_file.read_text())  # the folder copied elsewhere
    new.record_config("mask_session", SessionMaskStepConfig(run=new.root))
    with pytest.raises(RunFolderError, match=r"qc_z"):
        new.record_config("mask_session", SessionMaskStepConfig(
            run=new.root, mask={"qc_z": 2.0}))
