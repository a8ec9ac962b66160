"""Training-time augmentation: which symmetries each kind draws, seeding, use by the trainer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import write_cohort
from safetensors.torch import load_file

from voxplain.config import TrainConfig
from voxplain.run import RunFolder
from voxplain.train.augment import augment
from voxplain.steps.train import run_train


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
