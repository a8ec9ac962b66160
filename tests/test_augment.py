"""Training-time augmentation: which symmetries each kind draws, paper 2's affine transform
(Keras's ranges), TorchIO's MRI artefacts, seeding, the setting as a list, use by the trainer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from conftest import write_cohort
from safetensors.torch import load_file
from typer.testing import CliRunner

from voxplain.cli import app
from voxplain.cli.common import config_command
from voxplain.config import TrainConfig, to_toml
from voxplain.run import RunFolder, RunFolderError
from voxplain.steps.train import run_train
from voxplain.train import trainer
from voxplain.train.augment import AffineAugmentation, augment, random_affine

LIBRARY_KINDS = ["affine", "bias_field", "motion", "ghosting", "spike"]


def _drawn(image: np.ndarray, kind: str, draws: int = 400) -> list[np.ndarray]:
    """The distinct images that ``draws`` augmentations of ``image`` produced."""
    batch = torch.from_numpy(np.repeat(image[None, None], draws, axis=0))
    out = augment(batch, kind, np.random.default_rng(0))[:, 0].numpy()
    distinct: list[np.ndarray] = []
    for candidate in out:
        if not any(np.array_equal(candidate, seen) for seen in distinct):
            distinct.append(candidate)
    return distinct


def _same_sets(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(any(np.array_equal(x, y) for y in b) for x in a)


def test_dihedral_draws_the_8_symmetries_of_a_square_image():
    image = np.arange(25, dtype=np.float32).reshape(5, 5)  # no symmetry of its own
    d4 = [np.rot90(image, k) for k in range(4)] + [np.rot90(image.T, k) for k in range(4)]
    assert _same_sets(_drawn(image, "dihedral"), d4)


def test_dihedral_keeps_unequal_axes_in_place_and_flip_never_permutes():
    image = np.arange(24, dtype=np.float32).reshape(4, 6)
    flips = [image, image[::-1], image[:, ::-1], image[::-1, ::-1]]
    assert _same_sets(_drawn(image, "dihedral"), flips)
    assert _same_sets(_drawn(image, "flip"), flips)
    square = np.arange(16, dtype=np.float32).reshape(4, 4)
    assert _same_sets(_drawn(square, "flip"), [square, square[::-1], square[:, ::-1],
                                              square[::-1, ::-1]])


def test_flip_in_3d_mirrors_each_axis_independently():
    volume = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    expected = [volume[tuple(slice(None, None, -1) if (mask >> a) & 1 else slice(None)
                             for a in range(3))] for mask in range(8)]
    assert _same_sets(_drawn(volume, "flip"), expected)


def test_augmentation_is_per_image_seeded_and_none_is_the_identity():
    images = torch.rand(16, 2, 6, 6)
    assert augment(images, "none", np.random.default_rng(0)) is images
    a = augment(images, "dihedral", np.random.default_rng(3))
    b = augment(images, "dihedral", np.random.default_rng(3))
    assert torch.equal(a, b)
    # channels move together: each image's channel 1 undergoes the same symmetry as channel 0
    for original, moved in zip(images, a):
        match = [k for k in range(8) if torch.equal(_d4(original[0], k), moved[0])]
        assert match and torch.equal(_d4(original[1], match[0]), moved[1])
    assert len({tuple(m.flatten()[:3].tolist()) for m in a - images}) > 1  # not one draw for all


def _d4(image: torch.Tensor, k: int) -> torch.Tensor:
    return torch.rot90(image if k < 4 else image.T, k % 4)


def test_unknown_augmentation_is_refused():
    with pytest.raises(ValueError, match="unknown augmentation 'rotate'"):
        augment(torch.zeros(1, 1, 4, 4), "rotate", np.random.default_rng(0))
    with pytest.raises(ValueError):
        TrainConfig.model_validate({"cohort": "c.tsv", "out": "o", "augmentation": "rotate"})


def test_training_with_augmentation_is_reproducible_and_changes_the_model(tmp_path):
    cohort = write_cohort(tmp_path / "cohort", subjects=12)
    weights = {}
    for name, kind in (("a", "flip"), ("b", "flip"), ("none", "none")):
        config = TrainConfig.model_validate({
            "cohort": cohort, "out": tmp_path / name, "folds": 2, "epochs": 1, "batch_size": 4,
            "device": "cpu", "model": {"name": "cnn", "channels": [4, 8]}, "augmentation": kind})
        run_train(config)
        weights[name] = load_file(str(RunFolder(tmp_path / name).model_dir(0, 0)
                                      / "model.safetensors"))
    assert all(torch.equal(weights["a"][k], weights["b"][k]) for k in weights["a"])
    assert any(not torch.equal(weights["a"][k], weights["none"][k]) for k in weights["a"]
               if weights["a"][k].is_floating_point())


# --- library kinds: seeding, shapes, channels -------------------------------------------------

@pytest.mark.parametrize("kind", LIBRARY_KINDS)
def test_library_kinds_follow_the_callers_generator_and_leave_torch_random_state_alone(kind):
    images = torch.rand(3, 2, 16, 18)
    torch.manual_seed(5)
    state = torch.get_rng_state()
    first = augment(images, kind, np.random.default_rng(7))
    assert torch.equal(torch.get_rng_state(), state)  # the global stream is untouched
    torch.manual_seed(6)  # another global state: the same draws all the same
    assert torch.equal(augment(images, kind, np.random.default_rng(7)), first)
    assert not torch.equal(augment(images, kind, np.random.default_rng(8)), first)
    assert not torch.equal(first, images)


@pytest.mark.parametrize("kind", LIBRARY_KINDS)
@pytest.mark.parametrize("shape", [(2, 3, 14, 12), (2, 1, 9, 10, 8), (2, 2, 9, 10, 8)])
def test_library_kinds_keep_shape_and_dtype_and_move_channels_together(kind, shape):
    image = torch.rand(shape[2:])
    images = image.expand(*shape).contiguous()  # every image and channel alike
    out = augment(images, kind, np.random.default_rng(0))
    assert out.shape == images.shape and out.dtype == images.dtype
    assert all(torch.equal(moved[0], channel) for moved in out for channel in moved)
    assert not torch.equal(out[0], out[1])  # each image of the batch has its own draw


@pytest.mark.parametrize("kind", ["bias_field", "motion", "ghosting", "spike"])
def test_artefacts_keep_each_channel_in_the_range_it_had(kind):
    images = torch.rand(4, 2, 16, 16)
    images[:, 1] *= 0.5  # grey-matter probabilities in [0, 1]; a second channel in [0, 0.5]
    out = augment(images, kind, np.random.default_rng(0))
    low, high = images.amin((2, 3)), images.amax((2, 3))
    assert (out.amin((2, 3)) >= low).all() and (out.amax((2, 3)) <= high).all()


def test_kinds_apply_in_the_order_given():
    images = torch.rand(2, 1, 12, 12)
    both = augment(images, ["affine", "bias_field"], np.random.default_rng(3))
    rng = np.random.default_rng(3)
    by_hand = augment(augment(images, "affine", rng), "bias_field", rng)
    assert torch.equal(both, by_hand)
    assert not torch.equal(augment(images, ["bias_field", "affine"], np.random.default_rng(3)),
                           both)


# --- paper 2's affine transform: Keras's ranges ------------------------------------------------

#: Every range of the affine augmentation off (a test turns one on).
ONLY = {"rotation_degrees": 0.0, "shear_degrees": 0.0, "zoom": 0.0, "shift": 0.0,
        "flip_probability": 0.0}


def _moved(shape: tuple[int, ...], at: tuple[int, ...], draws: int = 300,
           **settings: float) -> np.ndarray:
    """Where ``draws`` random affine transforms of ``settings`` (the others off) take one bright
    pixel at ``at`` of an image of ``shape``: the intensity-weighted centroid ``(draws, dims)``
    (bilinear interpolation keeps the centroid of a pixel moved by a shift exact)."""
    images = torch.zeros(draws, 1, *shape)
    images[(slice(None), 0, *at)] = 1
    out = random_affine(images, np.random.default_rng(0),
                        AffineAugmentation(**{**ONLY, **settings}))[:, 0].double()
    axes = tuple(range(1, out.ndim))
    grids = torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in shape], indexing="ij")
    return torch.stack([(grid * out).sum(axes) / out.sum(axes) for grid in grids], 1).numpy()


def test_shift_moves_by_up_to_a_tenth_of_each_axis_in_pixels():
    moved = _moved((20, 30), (10, 15), shift=0.1) - (10, 15)
    assert (np.abs(moved) <= [2 + 1e-3, 3 + 1e-3]).all()  # 10 % of 20 and of 30 pixels
    assert (np.abs(moved).max(0) > [1.8, 2.7]).all()  # uniform over the whole range


def test_3d_affine_works_in_the_plane_of_the_first_two_axes():
    moved = _moved((20, 30, 10), (10, 15, 4), shift=0.1) - (10, 15, 4)
    assert (np.abs(moved[:, :2]).max(0) > [1.8, 2.7]).all()
    assert (np.abs(moved[:, :2]) <= [2 + 1e-3, 3 + 1e-3]).all()
    assert np.abs(moved[:, 2]).max() < 1e-6  # Z is neither shifted
    rotated = _moved((25, 25, 9), (12, 20, 4), rotation_degrees=30) - (12, 12, 4)
    assert np.abs(rotated[:, 2]).max() < 1e-6  # nor rotated out of the X-Y plane
    assert np.abs(np.degrees(np.arctan2(rotated[:, 0], rotated[:, 1]))).max() > 25


def test_rotation_turns_about_the_centre_by_up_to_30_degrees_either_way():
    moved = _moved((25, 25), (12, 20), rotation_degrees=30) - 12
    radius = np.hypot(moved[:, 0], moved[:, 1])
    angle = np.degrees(np.arctan2(moved[:, 0], moved[:, 1]))
    np.testing.assert_allclose(radius, 8, atol=0.2)
    assert np.abs(angle).max() <= 30.5 and angle.min() < -25 and angle.max() > 25


def test_zoom_scales_the_coordinates_by_a_factor_between_0_8_and_1_2_as_keras():
    # Keras (and MONAI) scale the map from output to input coordinates: a factor z shows z
    # times more of the image, so a pixel 8 away from the centre ends 8 / z away
    ratio = (_moved((25, 25), (20, 12), zoom=0.2)[:, 0] - 12) / 8
    assert ratio.min() >= 1 / 1.2 - 0.01 and ratio.max() <= 1 / 0.8 + 0.01
    assert ratio.max() > 1.21  # impossible if the content were scaled by z instead


def test_shear_moves_the_first_axis_in_proportion_to_the_second_as_keras():
    # Keras's shear matrix [[1, -sin a], [0, cos a]] on (row, column): the rows move
    across = _moved((25, 25), (12, 20), shear_degrees=45) - 12
    np.testing.assert_allclose(across[:, 1], 8, atol=1e-4)
    assert np.abs(across[:, 0]).max() <= 8 * np.sin(np.radians(45)) + 1e-3
    assert np.abs(across[:, 0]).max() > 5
    along = _moved((25, 25), (20, 12), shear_degrees=45) - 12
    np.testing.assert_allclose(along, np.tile([8, 0], (len(along), 1)), atol=1e-4)


@pytest.mark.parametrize("shape", [(6, 7), (5, 6, 4)])
def test_left_right_mirror_flips_the_first_axis_with_probability_one_half(shape):
    image = torch.arange(float(np.prod(shape))).reshape(1, *shape)
    images = image.expand(400, 1, *shape)
    out = random_affine(images, np.random.default_rng(0),
                        AffineAugmentation(**{**ONLY, "flip_probability": 0.5}))
    kept = [torch.allclose(moved, image, atol=1e-4) for moved in out]
    mirrored = [torch.allclose(moved, image.flip(1), atol=1e-4) for moved in out]
    assert all(k != m for k, m in zip(kept, mirrored))  # one or the other, never another axis
    assert 160 <= sum(mirrored) <= 240  # 1/2 of 400 draws: 200 +- 4 standard deviations


def test_paper_2_settings_are_the_keras_values_of_the_paper():
    settings = AffineAugmentation()
    assert (settings.rotation_degrees, settings.shear_degrees, settings.zoom, settings.shift,
            settings.flip_probability) == (30, 0.2, 0.2, 0.1, 0.5)


# --- the setting: a list, read from an earlier single kind and from the command line ----------

def test_augmentation_setting_is_a_list_and_a_single_kind_reads_as_one():
    base = {"cohort": "c.tsv", "out": "o"}
    assert TrainConfig.model_validate(base).augmentation == ["none"]
    assert TrainConfig.model_validate({**base, "augmentation": "flip"}).augmentation == ["flip"]
    assert TrainConfig.model_validate(
        {**base, "augmentation": ["affine", "bias_field"]}).augmentation == ["affine",
                                                                            "bias_field"]
    with pytest.raises(ValueError, match="at least 1 item"):
        TrainConfig.model_validate({**base, "augmentation": []})
    with pytest.raises(ValueError):
        TrainConfig.model_validate({**base, "augmentation": ["affine", "rotate"]})


def test_a_run_recorded_with_one_kind_as_text_resumes_and_other_kinds_are_refused(tmp_path):
    run = RunFolder(tmp_path)
    config = TrainConfig(cohort=Path("/c.tsv"), run=tmp_path, augmentation=["dihedral"])
    recorded = to_toml({"train": config}).replace('augmentation = ["dihedral"]',
                                                  'augmentation = "dihedral"')
    assert 'augmentation = "dihedral"' in recorded  # as an earlier version wrote it
    run.config_file.write_text(recorded)
    run.record_config("train", config)  # the same experiment: no error
    with pytest.raises(RunFolderError, match=r"augmentation: \['dihedral'\] -> "
                                             r"\['dihedral', 'spike'\]"):
        run.record_config("train", config.model_copy(update={
            "augmentation": ["dihedral", "spike"]}))


def test_command_line_takes_kinds_separated_by_commas(tmp_path):
    built = []
    demo = typer.Typer()

    @demo.command()
    @config_command(TrainConfig, "train", ["cohort", "run", "augmentation"])
    def train(settings: TrainConfig) -> None:
        built.append(settings)

    for flags, kinds in ((["--augmentation", "affine,bias_field"], ["affine", "bias_field"]),
                         (["--augmentation", "flip"], ["flip"]), ([], ["none"])):
        result = CliRunner().invoke(demo, ["--cohort", "c.tsv", "--run", "r", *flags])
        assert result.exit_code == 0, result.output
        assert built.pop().augmentation == kinds
    refused = CliRunner().invoke(app, ["train", "--cohort", "c.tsv", "--run", str(tmp_path),
                                       "--augmentation", "affine,rotate"])
    assert refused.exit_code == 2 and "augmentation.1" in refused.output
    help_text = " ".join(CliRunner().invoke(app, ["train", "--help"],
                                            env={"COLUMNS": "250"}).output.split())
    assert "bias_field, motion, ghosting, spike" in help_text and "(default: none)" in help_text


# --- training with paper 2's augmentation ------------------------------------------------------

class _Killed(Exception):
    """Stands for a kill after the first epoch's checkpoint."""


@pytest.mark.slow
def test_training_with_the_affine_augmentation_reproduces_and_resumes(tmp_path, monkeypatch):
    cohort = write_cohort(tmp_path / "cohort", subjects=8, sessions=1, shape=(16, 16))

    def train(name: str) -> dict[str, torch.Tensor]:
        run_train(TrainConfig.model_validate({
            "cohort": cohort, "out": tmp_path / name, "folds": 2, "epochs": 2, "batch_size": 4,
            "device": "cpu", "model": {"name": "cnn", "channels": [4, 8]},
            "augmentation": ["affine"]}))
        return load_file(str(RunFolder(tmp_path / name).model_dir(0, 0) / "model.safetensors"))

    first, again = train("a"), train("b")
    assert all(torch.equal(first[k], again[k]) for k in first)

    save = trainer.save_checkpoint

    def save_then_die(*args, **kwargs):
        save(*args, **kwargs)
        raise _Killed

    monkeypatch.setattr(trainer, "save_checkpoint", save_then_die)
    with pytest.raises(_Killed):
        train("resumed")
    assert (RunFolder(tmp_path / "resumed").model_dir(0, 0) / "checkpoint.safetensors").is_file()
    monkeypatch.setattr(trainer, "save_checkpoint", save)
    resumed = train("resumed")  # epoch 1 redraws the same augmentation
    assert all(torch.equal(first[k], resumed[k]) for k in first)
