"""The smoothness term of eq. 2 (paper 1): ``sum_u ||grad m(u)||_b2^b2`` as written (anisotropic,
``sum_i |d_i m(u)|^b2``), the isotropic ``||grad m(u)||_2^b2`` kept as an option, and run folders
recorded before the option existed."""

from __future__ import annotations

import math

import pytest
import torch
from typer.testing import CliRunner

from voxplain.cli import app
from voxplain.config import (
    GroupMaskConfig,
    GroupMaskStepConfig,
    MaskGridConfig,
    SessionMaskStepConfig,
    config_values,
    to_toml,
)
from voxplain.explain.masks import weights_of
from voxplain.explain.perturbation import (
    MaskWeights,
    mask_loss,
    power_of_root,
    smoothness_term,
    spatial_gradient,
)
from voxplain.run import RunFolder, RunFolderError

EPS = 1e-8
FORMS = ["anisotropic", "isotropic"]

# forward differences of this mask on its 2x2 interior, (d_row, d_col) per voxel
MASK_2D = torch.tensor([[0.0, 1.0, 1.0], [2.0, 4.0, 0.0], [1.0, 1.0, 1.0]],
                       dtype=torch.float64)[None, None]
# (d_row, d_col) of every voxel, 0 on the last row (d_row) and the last column (d_col)
PAIRS_2D = [(2.0, 1.0), (3.0, 0.0), (-1.0, 0.0), (-1.0, 2.0), (-3.0, -4.0), (1.0, 0.0),
            (0.0, 0.0), (0.0, 0.0), (0.0, 0.0)]


@pytest.mark.parametrize("b2", [0.5, 1.0, 2.0, 3.0])
def test_anisotropic_smoothness_is_the_mean_of_the_b2_powers_of_every_difference(b2):
    expected = sum(abs(a) ** b2 + abs(b) ** b2 for a, b in PAIRS_2D) / 9
    assert smoothness_term(MASK_2D, b2, EPS).item() == pytest.approx(expected, rel=1e-9)
    assert smoothness_term(MASK_2D, b2, EPS, "anisotropic").item() == pytest.approx(expected,
                                                                                  rel=1e-9)


def test_at_b2_1_anisotropic_is_the_sum_of_absolute_differences_isotropic_their_length():
    anisotropic = (3 + 3 + 1 + 3 + 7 + 1) / 9  # |dx| + |dy|
    isotropic = (math.sqrt(5) + 3 + 1 + math.sqrt(5) + 5 + 1) / 9  # sqrt(dx^2 + dy^2)
    assert smoothness_term(MASK_2D, 1.0, EPS, "anisotropic").item() == pytest.approx(anisotropic)
    assert smoothness_term(MASK_2D, 1.0, EPS, "isotropic").item() == pytest.approx(isotropic)


def test_in_3d_a_corner_voxel_costs_3_anisotropic_and_root_3_isotropic():
    mask = torch.ones(1, 1, 2, 2, 2, dtype=torch.float64)
    mask[0, 0, 0, 0, 0] = 0.0  # voxel u: d = (1, 1, 1); every other difference is 0; 8 voxels
    for b2, anisotropic, isotropic in [(1.0, 3 / 8, math.sqrt(3) / 8),
                                       (0.5, 3 / 8, 3 ** 0.25 / 8), (3.0, 3 / 8, 3 ** 1.5 / 8)]:
        assert smoothness_term(mask, b2, EPS, "anisotropic").item() == pytest.approx(anisotropic)
        assert smoothness_term(mask, b2, EPS, "isotropic").item() == pytest.approx(isotropic)


def test_in_1d_both_forms_are_the_mean_of_absolute_differences_to_the_b2():
    mask = torch.tensor([0.0, 0.5, 2.0, 1.0], dtype=torch.float64)[None, None]
    for b2 in (0.5, 1.0, 3.0):
        expected = (0.5 ** b2 + 1.5 ** b2 + 1.0) / 4  # 0 beyond the last voxel
        for form in FORMS:
            assert smoothness_term(mask, b2, EPS, form).item() == pytest.approx(expected)


def test_at_b2_2_both_forms_agree_in_value_and_gradient():
    mask = torch.rand(2, 1, 4, 5, 3, dtype=torch.float64, requires_grad=True)
    values = [smoothness_term(mask, 2.0, 1e-3, form) for form in FORMS]
    torch.testing.assert_close(values[0], values[1])
    gradients = [torch.autograd.grad(value.sum(), mask)[0] for value in values]
    torch.testing.assert_close(gradients[0], gradients[1])
    assert (values[0] - smoothness_term(mask, 1.0, 1e-3, "isotropic")).abs().min() > 1e-3


def test_each_axis_is_smoothed_on_its_own_below_epsilon():
    """``|d|^b`` becomes ``eps^(b-2) d^2`` below ``eps``: per difference (anisotropic), per
    gradient norm (isotropic). A step of 0.8 eps on two axes: each below eps, the norm above."""
    epsilon, b2, step = 1e-3, 0.5, 0.8e-3
    mask = torch.ones(1, 1, 2, 2, dtype=torch.float64)
    mask[0, 0, 0, 0] = 1 - step  # d = (step, step) at voxel (0, 0), 0 at the 3 others
    anisotropic = 2 * epsilon ** (b2 - 2) * step**2 / 4
    isotropic = (2 * step**2) ** (b2 / 2) / 4
    assert smoothness_term(mask, b2, epsilon, "anisotropic").item() == pytest.approx(anisotropic)
    assert smoothness_term(mask, b2, epsilon, "isotropic").item() == pytest.approx(isotropic)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("b2", [0.5, 1.0])
def test_a_mask_at_its_start_has_a_zero_finite_gradient(form, b2):
    mask = torch.ones(2, 1, 4, 4, 4, dtype=torch.float64, requires_grad=True)
    value = smoothness_term(mask, b2, 1e-3, form)
    gradient, = torch.autograd.grad(value.sum(), mask)
    assert value.abs().max() == 0 and gradient.abs().max() == 0


def _tiny_mask(shape, seed):
    """Random values with a flat block (differences exactly 0, the smoothed branch) and a
    column at 1 (the masks' start)."""
    generator = torch.Generator().manual_seed(seed)
    mask = torch.rand(shape, generator=generator, dtype=torch.float64)
    mask[..., :2, :2] = 0.5
    mask[..., -1] = 1.0
    return mask


@pytest.mark.parametrize("shape", [(2, 1, 4, 5), (2, 1, 3, 4, 3)])
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("b2", [0.5, 1.0, 2.0, 3.0])
def test_the_closed_form_backward_passes_gradcheck(shape, form, b2):
    mask = _tiny_mask(shape, seed=len(shape)).requires_grad_(True)
    weights = torch.tensor([0.7, -1.3], dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda m: (smoothness_term(m, b2, 1e-3, form) * weights).sum(), (mask,),
        eps=1e-7, atol=1e-5)


@pytest.mark.parametrize("b2", [0.5, 1.0, 3.0])
def test_anisotropic_closed_form_equals_autograd_of_the_smoothed_powers(b2):
    epsilon = 1e-2
    mask = _tiny_mask((3, 1, 5, 4, 4), seed=7).requires_grad_(True)
    mask.data[0] = 1.0
    reference = power_of_root(spatial_gradient(mask).square(), b2, epsilon).sum(1)
    reference = reference.flatten(1).mean(1)
    ours = smoothness_term(mask, b2, epsilon, "anisotropic")
    torch.testing.assert_close(ours, reference)
    expected, = torch.autograd.grad(reference.sum(), mask, retain_graph=True)
    actual, = torch.autograd.grad(ours.sum(), mask)
    torch.testing.assert_close(actual, expected)


def test_an_unknown_form_is_refused():
    with pytest.raises(ValueError, match="'euclidean'"):
        smoothness_term(MASK_2D, 1.0, EPS, "euclidean")


def test_the_configured_form_reaches_the_loss():
    assert GroupMaskConfig().smoothness == "anisotropic"  # eq. 2 as written is the default
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(9, 2)).double()
    images = torch.rand(1, 1, 3, 3, dtype=torch.float64)
    for form in FORMS:
        weights = weights_of(GroupMaskConfig(smoothness=form))
        assert weights.smoothness == form
        _, terms = mask_loss(model, images, MASK_2D, torch.ones(()), torch.tensor([0]), weights)
        torch.testing.assert_close(terms["smoothness"],
                                   smoothness_term(MASK_2D, 1.0, weights.epsilon, form))
    default = MaskWeights(l1=0.0, l2=1.0, b1=1.0, b2=1.0, epsilon=EPS)
    assert default.smoothness == "anisotropic"


# --- run folders recorded before the option ----------------------------------------------------

STEPS = [("mask_group", GroupMaskStepConfig), ("mask_session", SessionMaskStepConfig),
         ("mask_grid", MaskGridConfig)]


def _recorded_before_the_option(run: RunFolder, section: str, config) -> None:
    """config.toml as voxplain wrote it before ``smoothness`` existed (isotropic masks)."""
    values = config_values(config)
    del values["mask"]["smoothness"]
    run.config_file.write_text(to_toml({section: values}))


@pytest.mark.parametrize("section, schema", STEPS)
def test_a_mask_section_without_smoothness_was_isotropic_and_does_not_resume_anisotropic(
        tmp_path, section, schema):
    run = RunFolder(tmp_path)
    _recorded_before_the_option(run, section, schema(run=tmp_path))
    with pytest.raises(RunFolderError,
                       match=r"mask\.smoothness: 'isotropic' -> 'anisotropic'"):
        run.record_config(section, schema(run=tmp_path))
    run.record_config(section, schema(run=tmp_path, mask={"smoothness": "isotropic"}))
    assert "smoothness" not in run.read_config()[section]["mask"]  # the record is kept


@pytest.mark.parametrize("form", FORMS)
def test_a_mask_section_recorded_with_smoothness_resumes_with_the_same_form_only(tmp_path, form):
    run = RunFolder(tmp_path)
    run.record_config("mask_group", GroupMaskStepConfig(run=tmp_path, mask={"smoothness": form}))
    run.record_config("mask_group", GroupMaskStepConfig(run=tmp_path, mask={"smoothness": form}))
    other = FORMS[1 - FORMS.index(form)]
    with pytest.raises(RunFolderError, match="mask.smoothness"):
        run.record_config("mask_group", GroupMaskStepConfig(run=tmp_path,
                                                            mask={"smoothness": other}))


@pytest.mark.parametrize("verb", ["group", "session", "grid"])
def test_every_mask_verb_takes_the_smoothness_form(verb):
    result = CliRunner().invoke(app, ["mask", verb, "--help"], env={"COLUMNS": "250"})
    assert result.exit_code == 0
    assert "--smoothness" in result.output and "anisotropic" in result.output


@pytest.mark.parametrize("form", FORMS)
def test_a_dip_on_the_last_face_costs_what_it_costs_on_the_first(form):
    """Every voxel's gradient is penalised: cropping the differences to the voxels where all of
    them were defined left the variation within the last faces free, and masks collected there
    (the demo's group masks put 20-35 % of their mass on the last slice of an axis)."""
    costs = []
    for row in (0, 4):
        mask = torch.ones(1, 1, 5, 5, dtype=torch.float64)
        mask[0, 0, row, 2] = 0.0
        costs.append(smoothness_term(mask, 1.0, EPS, form).item())
    # last face: |d_row| at (3, 2), |d_col| at (4, 1) and (4, 2), one voxel each (the cropped
    # version charged only the first, over 16 voxels: 1/16)
    assert costs[1] == pytest.approx(3 / 25)
    if form == "anisotropic":  # forward differences in the isotropic norm are not symmetric
        assert costs[0] == pytest.approx(costs[1])


@pytest.mark.parametrize("section, schema", STEPS)
def test_a_mask_step_resumes_an_old_record_with_the_settings_it_was_made_with(tmp_path, section,
                                                                               schema):
    from voxplain.steps.masks import as_recorded

    run = RunFolder(tmp_path)
    old = schema(run=tmp_path)
    values = config_values(old)
    del values["mask"]["smoothness"]
    values["mask"].pop("qc_step2", None)
    run.config_file.write_text(to_toml({section: values}))
    resumed = as_recorded(schema(run=tmp_path), section)
    assert resumed.mask.smoothness == "isotropic"
    if section != "mask_session":
        assert resumed.mask.qc_step2 == "flag"
    run.record_config(section, resumed)  # accepted: the same settings as recorded
    given = as_recorded(schema(run=tmp_path, mask={"smoothness": "anisotropic"}), section)
    assert given.mask.smoothness == "anisotropic"  # explicit: kept, and then refused
    with pytest.raises(RunFolderError, match=r"mask\.smoothness"):
        run.record_config(section, given)
    fresh = as_recorded(schema(run=tmp_path / "new"), section)  # nothing recorded: defaults
    assert fresh.mask.smoothness == "anisotropic"
