"""Quality check step 2 (paper 1, 2.3.1): an image that makes the group-mask loss jump is
removed and the group mask optimised again without it; the first mask is kept."""

from __future__ import annotations

import json
import re
import shutil

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from conftest import write_cohort
from voxplain.config import GroupMaskStepConfig, TrainConfig
from voxplain.run import RunFolderError
from voxplain.steps import masks as mask_steps
from voxplain.steps.masks import run_group_masks
from voxplain.steps.train import run_train

pytestmark = pytest.mark.slow

DEFECTIVE = ("sub-01", "ses-M00")
#: The planted defect: a block without grey matter beside the patients' atrophied cube
#: (conftest: voxels 7-12, 9-14, 7-12), where the model looks. A defect in a corner is no test:
#: the trained model ignores corners (a dark or bright 6-voxel corner cube left the image's
#: loss within 1e-4 of the others', never flagged), as paper 1's model would ignore one it
#: never reads.
DEFECT = (slice(13, 19), slice(9, 15), slice(7, 13))
#: A strong sparsity weight, so that the shared mask does not simply grow over the defect for
#: the one image that needs it (l1 = 10: it does, and the loss no longer jumps, excess 0.02);
#: at l1 = 20 the defective image keeps 0.05 more of its class probability than the others
#: (robust z 15), flagged with an absolute threshold of 0.02 (the default 0.1 is sized for the
#: demo's masks; a defect no mask can hide, a 14-voxel hole, is flagged with it: excess 0.99).
MASK = {"max_epochs": 20, "batch_size": 1, "l1": 20.0, "qc_min_excess": 0.02}


@pytest.fixture(scope="module")
def defect_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qc_step2")
    tsv = write_cohort(folder / "cohort", subjects=24)
    path = folder / "cohort" / f"{DEFECTIVE[0]}_{DEFECTIVE[1]}.nii.gz"
    image = nib.load(path)
    values = image.get_fdata().astype(np.float32)
    values[DEFECT] = 0.0
    nib.save(nib.Nifti1Image(values, image.affine), path)
    run_train(TrainConfig(cohort=tsv, out=folder / "run", folds=3, epochs=15, batch_size=4,
                          learning_rate=3e-3, device="cpu",
                          model={"name": "cnn", "channels": [4, 8, 8]}))
    return folder / "run"


def _copy(run, tmp_path):
    return shutil.copytree(run, tmp_path / "run")


def _folds(run) -> tuple[int, int]:
    """A fold whose training set holds the defective image, and the fold that validates it."""
    train = [fold for fold in range(3)
             if DEFECTIVE[0] in set(pd.read_csv(run / f"splits/fold-{fold}/train.tsv",
                                                sep="\t").participant_id)]
    return train[0], ({0, 1, 2} - set(train)).pop()


def test_step2_removes_the_defective_image_and_the_new_mask_leaves_its_defect(defect_run,
                                                                               tmp_path):
    run = _copy(defect_run, tmp_path)
    fold, _ = _folds(run)
    run_group_masks(GroupMaskStepConfig(run=run, folds=[fold], device="cpu", mask=MASK))
    folder = run / f"masks/group/fold-{fold}/run-0"
    flags = pd.read_csv(folder / "qc_flags.tsv", sep="\t")
    flagged = flags[flags.flagged]
    assert list(zip(flagged.participant_id, flagged.session_id)) == [DEFECTIVE]
    assert flags.removed.tolist() == flags.flagged.tolist()
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["removed"] == ["_".join(DEFECTIVE)]
    first = folder / "first"
    assert pd.read_csv(first / "qc_flags.tsv", sep="\t").flagged.sum() == 1
    assert "_".join(DEFECTIVE) in set(_names(pd.read_csv(first / "image_losses.tsv", sep="\t")))
    assert "_".join(DEFECTIVE) not in set(_names(pd.read_csv(folder / "image_losses.tsv",
                                                             sep="\t")))
    assert summary["n_train"] == len(flags) - 1
    hidden = {name: 1 - nib.load(path).get_fdata()[DEFECT].mean()
              for name, path in (("first", first / "mask.nii.gz"),
                                 ("final", folder / "mask.nii.gz"))}
    # measured: 0.166 (an earlier machine) and 0.099 (2026-12-02's: float32 kernels differ
    # between CPUs) of the defect hidden by the first mask, 0.000 by the final one
    assert hidden["first"] > 0.05 and hidden["final"] < 0.01, hidden
    assert not list(folder.rglob("checkpoint*")) and not list(first.rglob("checkpoint*"))


def _names(rows: pd.DataFrame) -> pd.Series:
    return rows.participant_id + "_" + rows.session_id


def test_an_interrupted_second_pass_resumes_without_redoing_the_first(defect_run, tmp_path,
                                                                    monkeypatch):
    run = _copy(defect_run, tmp_path)
    fold, _ = _folds(run)
    config = GroupMaskStepConfig(run=run, folds=[fold], device="cpu", mask=MASK)
    run_group_masks(config)
    folder = run / f"masks/group/fold-{fold}/run-0"
    first_mask = (folder / "first/mask.nii.gz").read_bytes()
    for name in ("summary.json", "mask.nii.gz", "loss.tsv", "qc_flags.tsv"):
        (folder / name).unlink()  # killed during the second pass
    calls = []
    optimise = mask_steps.optimise_group_mask

    def counted(model, images, *arguments, checkpoint=None, **options):
        calls.append((len(images), checkpoint))
        return optimise(model, images, *arguments, checkpoint=checkpoint, **options)

    monkeypatch.setattr(mask_steps, "optimise_group_mask", counted)
    run_group_masks(config)
    n_train = len(pd.read_csv(folder / "first/qc_flags.tsv", sep="\t"))
    assert calls == [(n_train - 1, folder)]  # the second pass only, in the fold's folder
    assert (folder / "first/mask.nii.gz").read_bytes() == first_mask
    assert json.loads((folder / "summary.json").read_text())["removed"] == ["_".join(DEFECTIVE)]


def test_a_fold_without_flagged_image_has_one_pass(defect_run, tmp_path):
    run = _copy(defect_run, tmp_path)
    _, clean = _folds(run)
    run_group_masks(GroupMaskStepConfig(run=run, folds=[clean], device="cpu", mask=MASK))
    folder = run / f"masks/group/fold-{clean}/run-0"
    assert not (folder / "first").exists()
    assert json.loads((folder / "summary.json").read_text())["removed"] == []
    assert not pd.read_csv(folder / "qc_flags.tsv", sep="\t").removed.any()


def test_a_run_folder_recorded_before_qc_step2_resumes_flagging_only(defect_run, tmp_path):
    """Its masks kept the flagged images: the folds it has left are optimised so too."""
    run = _copy(defect_run, tmp_path)
    fold, clean = _folds(run)
    run_group_masks(GroupMaskStepConfig(run=run, folds=[clean], device="cpu",
                                        mask={**MASK, "qc_step2": "flag"}))
    config_file = run / "config.toml"
    text = config_file.read_text()
    assert 'qc_step2 = "flag"' in text
    config_file.write_text(re.sub(r'qc_step2 = "flag"\n', "", text))  # an earlier version's
    run_group_masks(GroupMaskStepConfig(run=run, folds=[fold], device="cpu", mask=MASK))
    folder = run / f"masks/group/fold-{fold}/run-0"
    flags = pd.read_csv(folder / "qc_flags.tsv", sep="\t")
    assert flags.flagged.sum() == 1 and not flags.removed.any()
    assert not (folder / "first").exists()
    assert json.loads((folder / "summary.json").read_text())["removed"] == []
    with pytest.raises(RunFolderError, match=r"mask.qc_step2: 'flag' -> 'remove'"):
        run_group_masks(GroupMaskStepConfig(run=run, folds=[fold], device="cpu",
                                            mask={**MASK, "qc_step2": "remove"}))
