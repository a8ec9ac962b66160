"""Ground-truth localisation scores: ROC AUC, relevance mass, pointing game, top-k regions."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from voxplain.data.atlas import Atlas
from voxplain.data.grid import (
    SPM_AFFINE,
    SPM_SHAPE,
    Grid,
    downsample_affine,
    downsampled_shape,
)
from voxplain.data.classes import class_index, patient_class, resolve_target
from voxplain.evaluate.localisation import (
    atrophied_regions,
    chance_mass,
    localisation_auc,
    localisation_scores,
    pointing_game,
    relevance,
    relevance_mass_inside,
    roc_auc,
    top_region_hit_rate,
    truth_on_grid,
)


def test_roc_auc_agrees_with_scikit_learn_with_ties():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 6, size=500).astype(float)  # many ties
    labels = rng.random(500) < 0.3
    assert roc_auc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_roc_auc_hand_computed_case():
    # positives 3, 1; negatives 2, 0, 1: pairs (3>2, 3>0, 3>1, 1<2, 1>0, 1=1 half) -> 4.5 / 6
    assert roc_auc(np.array([3, 1, 2, 0, 1]), np.array([1, 1, 0, 0, 0], bool)) == 0.75


def test_roc_auc_of_a_single_class_is_nan():
    assert np.isnan(roc_auc(np.arange(4.0), np.ones(4, bool)))


def test_localisation_auc_only_counts_brain_voxels():
    values = np.array([[5.0, 1.0], [0.0, 9.0]])
    truth = np.array([[True, False], [False, False]])
    brain = np.array([[True, True], [True, False]])  # the 9 outside the brain is ignored
    assert localisation_auc(values, truth, brain) == 1.0
    assert localisation_auc(values, truth) == pytest.approx(roc_auc_score(truth.ravel(),
                                                                          values.ravel()))


def test_relevance_of_signed_maps_is_the_magnitude_and_of_unsigned_the_positive_part():
    values = np.array([-2.0, 0.5, 1.0])
    np.testing.assert_array_equal(relevance(values, signed=True), [2.0, 0.5, 1.0])
    np.testing.assert_array_equal(relevance(values, signed=False), [0.0, 0.5, 1.0])


def test_relevance_mass_hand_computed():
    values = np.array([[1.0, 3.0], [4.0, 2.0]])
    truth = np.array([[False, True], [True, False]])
    assert relevance_mass_inside(values, truth) == pytest.approx(7 / 10)
    brain = np.array([[True, True], [False, True]])
    assert relevance_mass_inside(values, truth, brain) == pytest.approx(3 / 6)
    assert chance_mass(truth, brain) == pytest.approx(1 / 3)


def test_relevance_mass_refuses_negative_maps_and_is_nan_without_mass():
    truth = np.array([True, False])
    with pytest.raises(ValueError, match="non-negative"):
        relevance_mass_inside(np.array([-1.0, 1.0]), truth)
    assert np.isnan(relevance_mass_inside(np.zeros(2), truth))


def test_a_uniform_map_puts_the_chance_share_of_its_mass_inside():
    truth = np.zeros((6, 7, 5), bool)
    truth[1:3, 2:5, 1:4] = True
    assert relevance_mass_inside(np.ones(truth.shape), truth) == pytest.approx(chance_mass(truth))


def test_pointing_game_hit_miss_and_tolerance():
    truth = np.zeros((9, 9), bool)
    truth[2, 2] = True
    values = np.zeros((9, 9))
    values[2, 2] = 1.0
    assert pointing_game(values, truth)
    values[2, 2], values[2, 5] = 0.0, 1.0  # 3 voxels away from the truth
    assert not pointing_game(values, truth)
    assert not pointing_game(values, truth, tolerance=2.9)
    assert pointing_game(values, truth, tolerance=3.0)


def test_pointing_game_needs_every_tied_maximum_inside_so_a_constant_map_misses():
    truth = np.zeros((4, 4), bool)
    truth[0, 0] = True
    assert not pointing_game(np.ones((4, 4)), truth)


def test_pointing_game_looks_for_the_maximum_inside_the_brain():
    truth = np.array([False, True, False])
    values = np.array([9.0, 5.0, 1.0])
    assert pointing_game(values, truth, brain=np.array([False, True, True]))
    assert not pointing_game(values, truth)


@pytest.fixture(scope="module")
def atlas():
    return Atlas.aal2(Grid(downsampled_shape(SPM_SHAPE, 4), downsample_affine(SPM_AFFINE, 4)))


def test_top_region_hit_rate_counts_true_regions_among_the_most_attributed(atlas):
    values = np.zeros(atlas.grid.shape)
    chosen = ["Hippocampus_L", "Amygdala_R", "Precuneus_L"]
    for rank, name in enumerate(chosen):
        values[atlas.region_mask([name])] = 10.0 - rank
    # top 3 = the chosen regions; 2 of them are among the true ones, out of min(3, 4) = 3
    regions = ["Hippocampus_L", "Hippocampus_R", "Amygdala_L", "Amygdala_R"]
    assert top_region_hit_rate(values, atlas, regions, k=3) == pytest.approx(2 / 3)
    # fewer true regions than k: the denominator is their number
    assert top_region_hit_rate(values, atlas, ["Hippocampus_L"], k=3) == 1.0


def test_top_region_hit_rate_refuses_unknown_region_names(atlas):
    with pytest.raises(ValueError, match="Hippocampus_L"):
        top_region_hit_rate(np.zeros(atlas.grid.shape), atlas, ["Hipocampus_L"])


def test_atrophied_regions_come_from_generator_json_or_from_the_truth(tmp_path, atlas):
    (tmp_path / "generator.json").write_text(json.dumps({"regions": ["Amygdala_L"]}))
    assert atrophied_regions(tmp_path / "ground_truth.nii.gz") == ["Amygdala_L"]
    truth = atlas.region_mask(["Precuneus_R"]).astype(float)
    other = tmp_path / "other" / "truth.nii.gz"
    assert atrophied_regions(other, truth, atlas) == ["Precuneus_R"]
    with pytest.raises(ValueError, match="generator.json"):
        atrophied_regions(other)


def test_scores_of_a_signed_map_pointing_at_the_truth_with_negative_values(atlas):
    truth = atlas.region_mask(["Hippocampus_L", "Hippocampus_R"]).astype(np.float32)
    attribution = -3.0 * truth + 0.001 * np.random.default_rng(1).random(truth.shape)
    scores = localisation_scores(attribution, truth, signed=True, atlas=atlas,
                                 regions=["Hippocampus_L", "Hippocampus_R"], k=2)
    assert scores["auc"] == 1.0 and scores["pointing_game"] == 1.0
    assert scores["top2_hit"] == 1.0
    assert scores["mass_inside"] > 0.5 > scores["chance_mass"]
    # read as unsigned, the same map's negative evidence is no relevance at all
    unsigned = localisation_scores(attribution, truth, signed=False)
    assert unsigned["auc"] < 0.5 and np.isnan(unsigned["top5_hit"])


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="differs from the ground truth"):
        localisation_auc(np.zeros((3, 3)), np.zeros((3, 4), bool))


def test_ground_truth_is_downsampled_like_the_run_images(tmp_path):
    affine = np.diag([-2.0, 2.0, 2.0, 1.0])
    truth = np.zeros((4, 4, 4), np.float32)
    truth[1:3, 1:3, 1:3] = 1.0  # one fine voxel in each 2x2x2 block
    path = tmp_path / "truth.nii.gz"
    nib.save(nib.Nifti1Image(truth, affine), path)
    coarse = Grid((2, 2, 2), downsample_affine(affine, 2))
    np.testing.assert_allclose(truth_on_grid(path, coarse, 2), np.full((2, 2, 2), 1 / 8))
    np.testing.assert_array_equal(truth_on_grid(path, Grid((4, 4, 4), affine), 1), truth)
    with pytest.raises(ValueError, match=r"truth.nii.gz: ground truth of shape \(4, 4, 4\) is on "
                                         r"another grid"):
        truth_on_grid(path, Grid((4, 4, 4), np.diag([-3.0, 3.0, 3.0, 1.0])), 1)


def test_patient_class_is_the_non_control_class_or_the_named_one():
    assert patient_class(["CN", "AD"]) == "AD"
    assert patient_class(["benign", "malignant"]) == "malignant"
    with pytest.raises(ValueError, match="cannot tell the patient class"):
        patient_class(["CN", "AD", "MCI"])
    assert patient_class(["CN", "AD", "MCI"], "MCI") == "MCI"
    # one rule for masks and localisation: neither class a control label -> class 1
    assert patient_class(["low", "high"]) == "high"
    with pytest.raises(ValueError, match="not a class"):
        patient_class(["CN", "AD"], "MCI")


def test_one_resolver_for_the_explained_class():
    classes = ["CN", "AD", "MCI"]
    assert resolve_target("true", classes, diagnosis="MCI") == 2
    assert resolve_target("predicted", classes, diagnosis="CN", predicted=1) == 1
    assert resolve_target("AD", classes, diagnosis="CN") == 1
    assert resolve_target(0, classes, diagnosis="AD") == 0
    with pytest.raises(ValueError, match="sub-01: diagnosis 'FTD' is not a class"):
        resolve_target("true", classes, diagnosis="FTD", where="sub-01")
    with pytest.raises(ValueError, match="needs the model's prediction"):
        resolve_target("predicted", classes, diagnosis="CN")
    with pytest.raises(ValueError, match="not an index"):
        class_index(3, classes)


def test_the_true_region_is_where_the_truth_reaches_half_its_maximum():
    from voxplain.evaluate.localisation import true_region

    truth = np.array([0.0, 1e-4, 0.1, 0.49, 0.5, 1.0])
    assert true_region(truth).tolist() == [False] * 4 + [True] * 2
    # a session's own atrophy peaks at its severity: the same region at any scale
    assert true_region(0.3 * truth).tolist() == true_region(truth).tolist()
    assert true_region(truth, fraction=0).tolist() == [False] + [True] * 5  # every touched voxel
    assert not true_region(np.zeros(4)).any()  # a control: no true region
    mask = np.array([0, 1, 1, 0])  # a binary lesion mask is its own true region
    assert true_region(mask).tolist() == [False, True, True, False]


def test_voxels_without_a_value_are_not_scored():
    from voxplain.evaluate.localisation import localisation_scores

    truth = np.zeros((4, 4, 4))
    truth[1, 1, 1] = 1.0
    values = np.zeros((4, 4, 4))
    values[1, 1, 1] = 1.0
    values[3, 3, 3] = 5.0  # a larger value, but in a slice that was never read
    with_nan = values.copy()
    with_nan[:, :, 3] = np.nan
    scores = localisation_scores(with_nan, truth, signed=False)
    assert scores["pointing_game"] == 1.0 and scores["auc"] == 1.0
    assert scores["chance_mass"] == pytest.approx(1 / 48)  # 48 voxels have a value
    assert localisation_scores(values, truth, signed=False)["pointing_game"] == 0.0


def test_resolution_ceiling_hand_computed_cases():
    from voxplain.evaluate.localisation import resolution_ceiling

    truth = np.array([[0.0, 1.0, 0.0, 0.0]])  # one true pixel, the second
    # layer 1x2: cells [0.5, 0]; linear upsampling (align_corners=False) back to 4 pixels:
    # 0.5, 0.375, 0.125, 0 -> the true pixel (0.375) beats 2 of the 3 others
    assert resolution_ceiling(truth, (1, 2)) == pytest.approx(2 / 3)
    assert resolution_ceiling(truth, (1, 1)) == pytest.approx(0.5)  # one cell: all tied
    assert resolution_ceiling(truth, (1, 4)) == pytest.approx(1.0)  # the input's own grid
    volume = np.zeros((4, 4, 4))
    volume[:2] = 1.0
    assert resolution_ceiling(volume, (2, 2, 2)) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="dimensions"):
        resolution_ceiling(volume, (2, 2))


def test_brain_outside_at_layer_hand_computed():
    from voxplain.evaluate.localisation import brain_outside_at_layer, seen_at_layer

    brain = np.zeros((4, 1, 1), dtype=bool)
    brain[:2] = True  # the first half of a 4-voxel line
    # layer 2x1x1: cells [1, 0]; linear upsampling (align_corners=False) back to 4 voxels samples
    # the cells at -0.25, 0.25, 0.75, 1.25 (clamped): 1, 0.75, 0.25, 0
    assert seen_at_layer(brain, (2, 1, 1))[:, 0, 0] == pytest.approx([1.0, 0.75, 0.25, 0.0])
    assert brain_outside_at_layer(brain, (2, 1, 1)) == pytest.approx(0.25 / 2.0)
    assert brain_outside_at_layer(brain, (4, 1, 1)) == pytest.approx(0.0)  # the input's grid
    assert brain_outside_at_layer(brain, (1, 1, 1)) == pytest.approx(0.5)  # uniform: 2 of 4
    with pytest.raises(ValueError, match="dimensions"):
        seen_at_layer(brain, (2, 1))
