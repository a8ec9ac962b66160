"""Data augmentation of the training images, 2D and 3D: random symmetries, paper 2's random
affine transform and MRI artefacts.

``TrainConfig.augmentation`` lists kinds, applied one after the other to every image of every
training batch (``["affine", "bias_field"]``: a random affine transform, then a bias field):

- ``none``: images are used as they are (the default: brain volumes registered to a template
  are not symmetric under flips, and paper 1 trains without augmentation).
- ``flip``: every spatial axis of every image is mirrored with probability 1/2, independently.
- ``dihedral``: ``flip``, then the spatial axes of equal size are permuted at random (uniform over
  the permutations). For a square 2D image this draws uniformly from its 8 symmetries (the
  dihedral group D4: rotations by multiples of 90 degrees and reflections); it suits images with
  no preferred orientation, such as lesion patches (paper 3's LIDC nodules).
- ``affine``: paper 2's augmentation (Zhang et al. 2021, 2.1), Keras's ``ImageDataGenerator(
  rotation_range=30, shear_range=0.2, zoom_range=0.2, width_shift_range=0.1,
  height_shift_range=0.1, horizontal_flip=True)``, by MONAI's ``RandAffine`` and ``RandFlip``
  (TorchIO's ``RandomAffine`` has no shear). See :class:`AffineAugmentation` for the mapping.
- ``bias_field``, ``motion``, ``ghosting``, ``spike``: TorchIO's ``RandomBiasField``,
  ``RandomMotion``, ``RandomGhosting`` and ``RandomSpike`` with TorchIO's defaults, every
  channel of an image with the same draw.

Axes. A spatial transform moves all channels of an image together. ``affine`` works in the plane
of the first two spatial axes: 2D images whole, and 3D volumes ``(X, Y, Z)`` slice by slice
along ``Z``, every slice alike (paper 2's 2D transform of axial slices, applied to each axial
slice of a volume in RAS or LAS order; ``Z`` is neither rotated, sheared, zoomed nor shifted).
Its left-right mirror flips the *first* spatial axis: ``X`` of a volume in RAS or LAS order (as
MNI-space grey-matter maps are), and of the axial or coronal slices voxplain cuts from such
volumes (:mod:`voxplain.data.slicing` keeps the in-plane axes in the volume's order); it is the
horizontal axis of a slice as NIfTI viewers show it. Keras's ``horizontal_flip`` mirrors the
columns of the array it is given; for pictures read rows first (PNG, JPEG, DICOM: ``(H, W)``)
the first axis is the vertical one, so their mirror is upside down.

Seeding. Every draw comes from the generator the caller passes (the trainer seeds one per fold,
run and epoch), so training is reproducible and a resumed training redraws the same: ``flip``
and ``dihedral`` draw from it directly; the library kinds draw seeds from it (one per batch and
library transform) and run the library's transform on those seeds, MONAI's on its own
``RandomState`` and TorchIO's under :func:`torch.random.fork_rng`, so torch's global random
state is left as it was. The images of a batch get successive, independent draws.

Value range. Bilinear resampling (``affine``) stays within an image's range. The artefacts do
not (the default bias field multiplies by up to about 10, ghosts and spikes ring below the
background), so after one each channel of each image is clipped to the range it had before:
grey-matter probabilities stay in [0, 1], as every image the model meets outside training does;
bright regions under a strong bias field saturate at the image's maximum. Tensors carry no
voxel size: TorchIO takes voxels as 1 mm, so ``motion``'s default translations of up to 10 mm
move an image by up to 10 voxels whatever its real voxel size.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import permutations
from typing import Any, get_args

import numpy as np
import torch

from voxplain.config import Augmentation

AUGMENTATIONS: tuple[str, ...] = get_args(Augmentation)

#: TorchIO's transform of each MRI artefact kind.
MRI_ARTEFACTS: dict[str, str] = {"bias_field": "RandomBiasField", "motion": "RandomMotion",
                                 "ghosting": "RandomGhosting", "spike": "RandomSpike"}


def augment(images: torch.Tensor, kinds: Augmentation | Sequence[Augmentation],
            rng: np.random.Generator) -> torch.Tensor:
    """``images`` ``(N, C, *spatial)`` with each augmentation of ``kinds`` (one kind or a list,
    applied in order) drawn for each image from ``rng``; same shape and dtype.

    Raises:
        ValueError: a kind is not one of :data:`AUGMENTATIONS`.
    """
    kinds = [kinds] if isinstance(kinds, str) else list(kinds)
    for kind in kinds:
        if kind not in AUGMENTATIONS:
            raise ValueError(f"unknown augmentation {kind!r}; choose one of "
                             f"{', '.join(AUGMENTATIONS)}")
    for kind in kinds:
        images = _augmentation(kind)(images, rng)
    return images


def _augmentation(kind: str) -> Callable[[torch.Tensor, np.random.Generator], torch.Tensor]:
    if kind == "none":
        return lambda images, rng: images
    if kind in ("flip", "dihedral"):
        return lambda images, rng: random_symmetry(images, kind, rng)
    if kind == "affine":
        return random_affine
    return lambda images, rng: mri_artefact(images, kind, rng)


def random_symmetry(images: torch.Tensor, kind: str, rng: np.random.Generator) -> torch.Tensor:
    """``images`` ``(N, C, *spatial)`` with a random symmetry of ``kind`` (``flip`` or
    ``dihedral``) applied to each image."""
    spatial = tuple(range(1, images.ndim - 1))  # axes of one image (C, *spatial)
    orders = _axis_orders(images.shape[2:]) if kind == "dihedral" else [spatial]
    out = torch.empty_like(images)
    for index, image in enumerate(images):
        flipped = [axis for axis in spatial if rng.random() < 0.5]
        image = image.flip(flipped) if flipped else image
        out[index] = image.permute(0, *orders[rng.integers(len(orders))])
    return out


def _axis_orders(shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Every order of an image's spatial axes (numbered from 1, after the channel axis) that
    moves axes only among axes of equal size."""
    axes = range(1, 1 + len(shape))
    return [order for order in permutations(axes)
            if all(shape[a - 1] == shape[b - 1] for a, b in zip(order, axes))]


@dataclass(frozen=True)
class AffineAugmentation:
    """A random affine transform and left-right mirror in the plane of the first two spatial
    axes, with Keras's ``ImageDataGenerator`` meaning of each range (keras-preprocessing 1.x,
    i.e. Keras >= 2.2 and ``tf.keras``; the defaults are paper 2's settings):

    - ``rotation_degrees`` r (Keras ``rotation_range``): angle ~ U(-r, r) degrees; MONAI
      ``rotate_range`` (radians; in 3D the rotation about ``Z``).
    - ``shear_degrees`` a (Keras ``shear_range``): Keras >= 2.2 reads it as an angle in degrees,
      phi ~ U(-a, a), matrix ``[[1, -sin phi], [0, cos phi]]`` on (axis 0, axis 1); MONAI's
      shear factor ``s`` at (0, 1) ~ U(-sin a, sin a) (``cos phi`` >= 0.99999 is left out).
      Paper 2's 0.2 degrees displace a pixel 128 pixels from the centre by 0.45 pixel at most:
      all but no shear. (Keras 2.0-2.1 read radians: 0.2 would have been 11.5 degrees; the
      paper names no version.)
    - ``zoom`` z (Keras ``zoom_range``): a factor per axis ~ U(1 - z, 1 + z), independent, scaling
      the map from output to input coordinates (above 1 shows more of the image, whose content
      shrinks); MONAI ``scale_range`` (1 + U(-z, z), the same convention).
    - ``shift`` f (Keras ``width_shift_range`` and ``height_shift_range``, equal in paper 2):
      ~ U(-f, f) times the axis's size, in pixels; MONAI ``translate_range``.
    - ``flip_probability`` (Keras ``horizontal_flip``: 1/2): the mirror of the first spatial
      axis (the module docstring says why that one), after the affine transform as in Keras;
      MONAI ``RandFlip``.

    Bilinear interpolation and edge values repeated outside the image, as Keras's defaults
    (``interpolation_order=1``, ``fill_mode="nearest"``): MONAI ``mode="bilinear"``,
    ``padding_mode="border"``. Both rotate, shear and zoom about the image's centre; Keras
    composes rotation, shift, shear, zoom and MONAI rotation, shear, shift, zoom, which moves a
    pixel by the shear factor times the shift: under 0.1 pixel at paper 2's settings.
    """

    rotation_degrees: float = 30.0
    shear_degrees: float = 0.2
    zoom: float = 0.2
    shift: float = 0.1
    flip_probability: float = 0.5

    def transforms(self, spatial_shape: Sequence[int]) -> tuple[Any, Any]:
        """MONAI's ``RandAffine`` and ``RandFlip`` of images ``(C, *spatial_shape)``, 2D or 3D."""
        # MONAI takes seconds to import: only when an affine augmentation is asked for
        from monai.transforms import RandAffine, RandFlip

        spatial_dims = len(spatial_shape)
        if spatial_dims not in (2, 3):
            raise ValueError(f"affine augmentation: expected 2D or 3D images, got spatial shape "
                             f"{tuple(spatial_shape)}")
        out_of_plane = [0.0] * (spatial_dims - 2)
        angle = math.radians(self.rotation_degrees)
        shear = math.sin(math.radians(self.shear_degrees))
        affine = RandAffine(
            prob=1.0,
            rotate_range=(angle,) if spatial_dims == 2 else (0.0, 0.0, angle),
            shear_range=(shear, 0.0) if spatial_dims == 2 else (shear, 0.0, 0.0, 0.0, 0.0, 0.0),
            translate_range=[self.shift * size for size in spatial_shape[:2]] + out_of_plane,
            scale_range=[self.zoom, self.zoom] + out_of_plane,
            spatial_size=tuple(spatial_shape), cache_grid=True,
            mode="bilinear", padding_mode="border")
        return affine, RandFlip(prob=self.flip_probability, spatial_axis=0)


#: Paper 2's augmentation (Zhang et al. 2021, 2.1).
PAPER_2_AFFINE = AffineAugmentation()


def random_affine(images: torch.Tensor, rng: np.random.Generator,
                  settings: AffineAugmentation = PAPER_2_AFFINE) -> torch.Tensor:
    """``images`` ``(N, C, *spatial)`` (2D or 3D) each moved by its own random affine transform
    of ``settings`` (all channels of an image alike), MONAI's draws seeded from ``rng``."""
    from monai.utils import convert_to_tensor

    affine, flip = settings.transforms(images.shape[2:])
    affine_seed, flip_seed = (int(seed) for seed in rng.integers(2**31, size=2))
    affine.set_random_state(seed=affine_seed)
    flip.set_random_state(seed=flip_seed)
    out = torch.empty_like(images)
    for index, image in enumerate(images):
        moved = flip(affine(image))
        out[index] = convert_to_tensor(moved, track_meta=False)  # a plain tensor, not MONAI's
    return out


def mri_artefact(images: torch.Tensor, kind: str, rng: np.random.Generator) -> torch.Tensor:
    """``images`` ``(N, C, *spatial)`` (2D or 3D) each with its own random MRI artefact of
    ``kind`` (a key of :data:`MRI_ARTEFACTS`; all channels of an image alike), clipped to the
    image's range per channel; TorchIO's draws seeded from ``rng``.

    Raises:
        ValueError: ``kind`` is not one of :data:`MRI_ARTEFACTS`.
    """
    if kind not in MRI_ARTEFACTS:
        raise ValueError(f"unknown MRI artefact {kind!r}; choose one of {', '.join(MRI_ARTEFACTS)}")
    import torchio  # takes seconds to import: only when an artefact is asked for

    transform = getattr(torchio, MRI_ARTEFACTS[kind])()
    spatial = tuple(range(1, images.ndim - 1))
    seed = int(rng.integers(2**31))
    out = torch.empty_like(images)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for index, image in enumerate(images):
            # TorchIO reads (C, X, Y, Z); a 2D image is one whose last axis has size 1
            changed = transform(image if len(spatial) == 3 else image.unsqueeze(-1))
            out[index] = changed.reshape(image.shape).clamp(image.amin(spatial, keepdim=True),
                                                            image.amax(spatial, keepdim=True))
    return out
