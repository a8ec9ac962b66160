"""Figures of the report: brain maps over the MNI template, curves, heatmaps and box plots.

Everything draws on :class:`matplotlib.figure.Figure` objects, rendered by the Agg canvas when
saved (nilearn's glass brain included, given ``figure=``): no pyplot state, no backend switch, so
building a report never opens a window, never changes a notebook's backend, and two reports
never share a figure. Brain maps are
shown like paper 1 (figs. 5-6): one column per fold or run, the same cut for every column, the
MNI grey-matter template underneath; signed maps use a diverging colormap centred on 0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.figure import Figure

from voxplain.io import atomic_path

#: Rows of :func:`orthogonal_slices`: name and the canonical (RAS) axis each view cuts across.
VIEWS = (("sagittal", 0), ("coronal", 1), ("axial", 2))
PANEL_INCHES = 1.9


@dataclass(frozen=True)
class MapStyle:
    """How a family of maps is coloured: one style for all columns of a figure."""

    cmap: str
    vmin: float
    vmax: float
    threshold: float  # |value| at or below it is transparent
    label: str

    @property
    def signed(self) -> bool:
        return self.vmin < 0


def map_style(maps: Sequence[np.ndarray], label: str, signed: bool | None = None,
              threshold_fraction: float = 0.1) -> MapStyle:
    """A shared colour scale: ``[-m, m]`` (diverging) for signed maps, ``[0, m]`` otherwise.

    ``m`` is the largest finite ``|value|`` over ``maps``; values with ``|value|`` at or below
    ``threshold_fraction * m`` are left transparent so the anatomy shows through.
    """
    values = np.concatenate([np.asarray(m, np.float64).ravel() for m in maps])
    values = values[np.isfinite(values)]
    if signed is None:
        signed = bool(values.size and values.min() < 0)
    vmax = float(np.abs(values).max()) if values.size else 1.0
    vmax = vmax if vmax > 0 else 1.0
    return MapStyle("RdBu_r" if signed else "hot", -vmax if signed else 0.0, vmax,
                    threshold_fraction * vmax, label)


def canonical(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, tuple[float, ...]]:
    """``array`` reoriented to RAS+ (x: left->right, y: back->front, z: down->up), voxel sizes."""
    image = nib.as_closest_canonical(nib.Nifti1Image(np.asarray(array, np.float32), affine))
    return np.asarray(image.dataobj), tuple(float(z) for z in image.header.get_zooms()[:3])


def _cut(volume: np.ndarray, axis: int, index: int) -> np.ndarray:
    """The 2D slice across ``axis`` at ``index``, transposed for ``imshow(origin="lower")``."""
    return np.take(volume, index, axis=axis).T


def _aspect(zooms: tuple[float, ...], axis: int) -> float:
    shown = [a for a in range(3) if a != axis]
    return zooms[shown[1]] / zooms[shown[0]]


def _overlay(ax, background: np.ndarray | None, values: np.ndarray, style: MapStyle,
             aspect: float = 1.0):
    if background is not None:
        ax.imshow(background, cmap="gray", origin="lower", aspect=aspect, vmin=0,
                  vmax=max(float(background.max()), 1e-6), interpolation="nearest")
    shown = np.ma.masked_where(~(np.abs(values) > style.threshold), values)
    image = ax.imshow(shown, cmap=style.cmap, vmin=style.vmin, vmax=style.vmax, origin="lower",
                      aspect=aspect, interpolation="nearest",
                      alpha=0.85 if background is not None else 1.0)
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)
    return image


def peak_cut(maps: Sequence[np.ndarray]) -> tuple[int, ...]:
    """Voxel of the largest mean ``|value|`` over ``maps`` (a shared cut for every column)."""
    mean = np.mean([np.abs(np.nan_to_num(m)) for m in maps], axis=0)
    if not mean.any():
        return tuple(s // 2 for s in mean.shape)
    return tuple(int(i) for i in np.unravel_index(np.argmax(mean), mean.shape))


def orthogonal_slices(maps: Mapping[str, np.ndarray], affine: np.ndarray,
                      template: np.ndarray | None, style: MapStyle,
                      title: str = "") -> Figure:
    """Sagittal, coronal and axial slices (rows) of each map (columns) through one shared cut.

    Args:
        maps: column title -> 3D map on the run grid (all the same shape).
        affine: voxel-to-world affine of that grid.
        template: background (e.g. the MNI GM template on the grid) or None.
    """
    oriented = {name: canonical(values, affine) for name, values in maps.items()}
    zooms = next(iter(oriented.values()))[1]
    background = canonical(template, affine)[0] if template is not None else None
    cut = peak_cut([values for values, _ in oriented.values()])
    world = nib.affines.apply_affine(nib.as_closest_canonical(nib.Nifti1Image(
        np.zeros(next(iter(oriented.values()))[0].shape, np.float32), affine)).affine, cut)
    figure = Figure(figsize=(PANEL_INCHES * len(maps) + 0.9, PANEL_INCHES * 3 + 0.5))
    axes = figure.subplots(3, len(maps), squeeze=False)
    image = None
    for column, (name, (values, _)) in enumerate(oriented.items()):
        axes[0, column].set_title(name, fontsize=9)
        for row, (view, axis) in enumerate(VIEWS):
            ax = axes[row, column]
            image = _overlay(ax, None if background is None else _cut(background, axis, cut[axis]),
                             _cut(values, axis, cut[axis]), style, _aspect(zooms, axis))
            if column == 0:
                ax.set_ylabel(f"{view}\n{'xyz'[axis]} = {world[axis]:.0f} mm", fontsize=8)
    _colorbar(figure, image, axes, style)
    if title:
        figure.suptitle(title, fontsize=10)
    return figure


def coronal_montage(maps: Mapping[str, np.ndarray], affine: np.ndarray,
                    template: np.ndarray | None, style: MapStyle, n_slices: int = 6,
                    title: str = "") -> Figure:
    """``n_slices`` coronal slices (rows, back to front) of each map (columns).

    The slices are spread evenly over the extent of the template (or of the maps without one).
    """
    oriented = {name: canonical(values, affine)[0] for name, values in maps.items()}
    shape = next(iter(oriented.values())).shape
    zooms = canonical(np.zeros(shape, np.float32), affine)[1]
    background = canonical(template, affine)[0] if template is not None else None
    support = (background > 0.1) if background is not None else np.any(
        [np.abs(v) > 0 for v in oriented.values()], axis=0)
    rows = np.flatnonzero(support.any(axis=(0, 2)))
    lo, hi = (rows.min(), rows.max()) if rows.size else (0, shape[1] - 1)
    slices = np.unique(np.linspace(lo, hi, n_slices + 2).round().astype(int)[1:-1])
    figure = Figure(figsize=(PANEL_INCHES * len(maps) + 0.9, PANEL_INCHES * len(slices) + 0.5))
    axes = figure.subplots(len(slices), len(maps), squeeze=False)
    image = None
    for column, (name, values) in enumerate(oriented.items()):
        axes[0, column].set_title(name, fontsize=9)
        for row, index in enumerate(slices):
            ax = axes[row, column]
            image = _overlay(ax, None if background is None else _cut(background, 1, index),
                             _cut(values, 1, index), style, _aspect(zooms, 1))
            if column == 0:
                ax.set_ylabel(f"slice {index}", fontsize=8)
    _colorbar(figure, image, axes, style)
    if title:
        figure.suptitle(title, fontsize=10)
    return figure


def one_cut(maps: Mapping[str, np.ndarray], affine: np.ndarray, template: np.ndarray | None,
            style: MapStyle, view: str = "coronal", columns: int = 6, title: str = "") -> Figure:
    """One panel per map, all cut by the same ``view`` plane through the peak of their mean
    (paper 1, figs. 3-4: one panel per hyperparameter setting), ``columns`` panels a row."""
    axis = dict(VIEWS)[view]
    oriented = {name: canonical(values, affine) for name, values in maps.items()}
    zooms = next(iter(oriented.values()))[1]
    background = canonical(template, affine)[0] if template is not None else None
    index = peak_cut([values for values, _ in oriented.values()])[axis]
    columns = min(columns, len(maps))
    rows = -(-len(maps) // columns)
    figure = Figure(figsize=(PANEL_INCHES * columns + 0.9, (PANEL_INCHES + 0.3) * rows + 0.5))
    axes = figure.subplots(rows, columns, squeeze=False)
    image = None
    for ax, (name, (values, _)) in zip(axes.ravel(), oriented.items()):
        image = _overlay(ax, None if background is None else _cut(background, axis, index),
                         _cut(values, axis, index), style, _aspect(zooms, axis))
        ax.set_title(name, fontsize=7)
    for ax in axes.ravel()[len(maps):]:
        ax.set_visible(False)
    _colorbar(figure, image, axes, style)
    figure.suptitle(title or f"{view} slice {index}", fontsize=10)
    return figure


def _colorbar(figure: Figure, image, axes: np.ndarray, style: MapStyle) -> None:
    if image is not None:
        bar = figure.colorbar(image, ax=axes.ravel().tolist(), shrink=0.6, fraction=0.05)
        bar.set_label(style.label, fontsize=8)
        bar.ax.tick_params(labelsize=7)


def glass_brain(values: np.ndarray, affine: np.ndarray, style: MapStyle, title: str = "") -> Figure:
    """nilearn's glass brain (maximum intensity projections on the MNI outline)."""
    from nilearn import plotting

    figure = Figure(figsize=(7.0, 2.6))
    plotting.plot_glass_brain(
        nib.Nifti1Image(np.nan_to_num(np.asarray(values, np.float32)), affine), figure=figure,
        cmap=style.cmap, plot_abs=not style.signed, colorbar=True, vmin=style.vmin if style.signed
        else None, vmax=style.vmax, threshold=style.threshold, title=title or None,
        symmetric_cbar=style.signed)
    return figure


def panels_2d(maps: Mapping[str, np.ndarray], style: MapStyle, title: str = "") -> Figure:
    """2D maps side by side (one column per fold/run) on one shared colour scale."""
    figure = Figure(figsize=(PANEL_INCHES * len(maps) + 0.9, PANEL_INCHES + 0.6))
    axes = figure.subplots(1, len(maps), squeeze=False)
    image = None
    for ax, (name, values) in zip(axes[0], maps.items()):
        image = _overlay(ax, None, np.asarray(values)[::-1], style)
        ax.set_title(name, fontsize=9)
    _colorbar(figure, image, axes, style)
    if title:
        figure.suptitle(title, fontsize=10)
    return figure


def overlays_2d(rows: Sequence[tuple[str, np.ndarray, Mapping[str, np.ndarray]]]) -> Figure:
    """2D explanations like paper 3 (fig. 6): the image, then each method's map over it.

    Args:
        rows: ``(session label, image (H, W), {method: map (H, W)})``; each map is scaled by its
            own largest ``|value|`` (methods have different units), signed maps diverging.
    """
    methods = list(dict.fromkeys(name for _, _, maps in rows for name in maps))
    columns = ["image", *methods]
    figure = Figure(figsize=(PANEL_INCHES * len(columns), PANEL_INCHES * len(rows) + 0.4))
    axes = figure.subplots(len(rows), len(columns), squeeze=False)
    for row, (label, image, maps) in enumerate(rows):
        axes[row, 0].imshow(image, cmap="gray", interpolation="nearest")
        axes[row, 0].set_ylabel(label, fontsize=7)
        for column, name in enumerate(columns):
            ax = axes[row, column]
            if row == 0:
                ax.set_title(name, fontsize=9)
            if column == 0:
                ax.set_xticks([])
                ax.set_yticks([])
                continue
            if name not in maps:
                ax.axis("off")
                continue
            style = map_style([maps[name]], name, threshold_fraction=0.05)
            ax.imshow(image, cmap="gray", interpolation="nearest")
            shown = np.ma.masked_where(~(np.abs(maps[name]) > style.threshold), maps[name])
            ax.imshow(shown, cmap=style.cmap, vmin=style.vmin, vmax=style.vmax, alpha=0.6,
                      interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
    return figure


def slice_strip(images: Sequence[np.ndarray], maps: Mapping[str, Sequence[np.ndarray]],
                labels: Sequence[str], wrong: Sequence[bool], title: str = "") -> Figure:
    """Slices of one session (columns) like paper 2 (figs. 5-6): the image, then each method's
    map over it (rows); a misclassified slice's column is framed in red and its label names the
    class it went to.

    Args:
        images: ``(H, W)`` per slice; maps: per method, ``(H, W)`` per slice (NaN: no map);
        labels: a caption per slice (e.g. ``"45: RRMS 0.81"``); wrong: per slice.
    """
    rows = ["image", *maps]
    styles = {name: map_style(list(slices), name, threshold_fraction=0.05)
              for name, slices in maps.items()}  # one scale per method over the session
    figure = Figure(figsize=(1.3 * len(images) + 0.8, 1.35 * len(rows) + 0.5))
    axes = figure.subplots(len(rows), len(images), squeeze=False)
    for column, (image, label, bad) in enumerate(zip(images, labels, wrong)):
        for row, name in enumerate(rows):
            ax = axes[row, column]
            ax.imshow(image.T[::-1], cmap="gray", interpolation="nearest")
            if name != "image":
                values, style = np.asarray(maps[name][column], dtype=float), styles[name]
                shown = np.ma.masked_where(~(np.abs(np.nan_to_num(values)) > style.threshold),
                                           values)
                ax.imshow(shown.T[::-1], cmap=style.cmap, vmin=style.vmin, vmax=style.vmax,
                          alpha=0.6, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if column == 0:
                ax.set_ylabel(name, fontsize=7)
            if row == 0:
                ax.set_title(label, fontsize=6, color="red" if bad else "black")
            for spine in ax.spines.values():
                spine.set_edgecolor("red" if bad else "black")
                spine.set_linewidth(2.0 if bad else 0.5)
    if title:
        figure.suptitle(title, fontsize=9)
    return figure


def curves(tables: Mapping[str, pd.DataFrame], panels: Sequence[tuple[str, Sequence[str]]],
           x: str = "epoch") -> Figure:
    """One panel per ``(title, columns)``: each column of each table against ``x``.

    Used for training histories (loss, balanced accuracy) and mask losses; a column missing from
    a table is skipped, so older or newer run folders still plot what they have.
    """
    figure = Figure(figsize=(4.2 * len(panels), 3.2))
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    colours = {name: f"C{i % 10}" for i, name in enumerate(tables)}
    styles = ["-", "--", ":", "-."]
    for ax, (title, columns) in zip(axes, panels):
        for name, table in tables.items():
            for k, column in enumerate(columns):
                if column in table and x in table:
                    ax.plot(table[x], table[column], styles[k % 4], color=colours[name],
                            label=f"{name} {column}", linewidth=1.2)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(x)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=6, loc="best")
    figure.tight_layout()
    return figure


def heatmap(matrix: pd.DataFrame, title: str = "") -> Figure:
    """A labelled matrix with its values written in the cells (paper 1, tables 2-3)."""
    values = matrix.to_numpy(dtype=float)
    size = max(3.0, 0.45 * max(values.shape) + 1.8)
    figure = Figure(figsize=(size + 1.0, size))
    ax = figure.subplots()
    image = ax.imshow(values, cmap="viridis", interpolation="nearest")
    ax.set_xticks(range(values.shape[1]), [str(c) for c in matrix.columns], rotation=45,
                  ha="right", fontsize=7)
    ax.set_yticks(range(values.shape[0]), [str(i) for i in matrix.index], fontsize=7)
    if values.size <= 144:  # 12 x 12: beyond, the numbers are unreadable and slow to lay out
        finite = values[np.isfinite(values)]
        middle = (finite.min() + finite.max()) / 2 if finite.size else 0.0
        for (i, j), value in np.ndenumerate(values):
            if np.isfinite(value):
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=6,
                        color="black" if value > middle else "white")
    figure.colorbar(image, ax=ax, shrink=0.8)
    if title:
        ax.set_title(title, fontsize=10)
    figure.tight_layout()
    return figure


def box_plot(groups: Mapping[str, np.ndarray], ylabel: str, title: str = "") -> Figure:
    """Box plots with the individual values on top (e.g. intra- vs inter-subject similarity)."""
    figure = Figure(figsize=(1.4 * len(groups) + 2.0, 3.2))
    ax = figure.subplots()
    data = [np.asarray(v, float)[np.isfinite(np.asarray(v, float))] for v in groups.values()]
    ax.boxplot(data, showfliers=False)
    ax.set_xticks(range(1, len(groups) + 1), list(groups), fontsize=8)
    rng = np.random.default_rng(0)  # fixed jitter: the same figure for the same data
    for position, values in enumerate(data, start=1):
        ax.plot(position + rng.uniform(-0.12, 0.12, len(values)), values, "o", markersize=3,
                alpha=0.6, color="C0")
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    figure.tight_layout()
    return figure


def parallel_coordinates(table: pd.DataFrame, axes: Sequence[str], value: str,
                         log_axes: Sequence[str] = ()) -> Figure:
    """One line per row of ``table`` across the ``axes`` columns, each scaled to its own range
    (``log_axes`` on a log scale; text columns as their sorted categories), coloured by the
    ``value`` column, which is the last axis (e.g. a search's trials against their objective).
    """
    scaled, labels = [], []
    for column in [*axes, value]:
        raw = table[column]
        if pd.api.types.is_numeric_dtype(raw):
            values = np.log10(raw.to_numpy(float)) if column in log_axes else raw.to_numpy(float)
            low, high = np.nanmin(values), np.nanmax(values)
            shown = (raw.min(), raw.max())
            labels.append((f"{shown[0]:.3g}", f"{shown[1]:.3g}"))
        else:
            categories = sorted(raw.dropna().astype(str).unique())
            values = raw.astype(str).map({c: i for i, c in enumerate(categories)}).to_numpy(float)
            low, high = 0.0, max(len(categories) - 1, 1)
            labels.append((categories[0], categories[-1]) if categories else ("", ""))
        scaled.append((values - low) / (high - low) if high > low else np.full(len(raw), 0.5))
    lines = np.stack(scaled, axis=1)
    figure = Figure(figsize=(max(5.0, 0.9 * lines.shape[1] + 1.5), 3.4))
    ax = figure.subplots()
    colour = table[value].to_numpy(float)
    finite = colour[np.isfinite(colour)]
    norm = (colour - finite.min()) / (np.ptp(finite) or 1.0) if finite.size else colour
    palette = colormaps["viridis"]
    for row, shade in zip(lines, norm):
        ax.plot(range(lines.shape[1]), row, color=palette(shade if np.isfinite(shade) else 0.0),
                alpha=0.8, linewidth=1.2)
    names = [*axes, value]
    ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=7)
    for i, (bottom, top) in enumerate(labels):
        ax.axvline(i, color="grey", linewidth=0.6)
        ax.text(i, -0.06, bottom, ha="center", va="top", fontsize=6)
        ax.text(i, 1.04, top, ha="center", va="bottom", fontsize=6)
    ax.set_yticks([])
    ax.set_ylim(-0.15, 1.12)
    figure.tight_layout()
    return figure


def save_figure(figure: Figure, folder: Path, name: str, formats: Sequence[str] = ("png",),
                dpi: int = 110) -> Path:
    """Write ``folder/NAME.png`` (and the other ``formats``) atomically; return the PNG path."""
    for suffix in dict.fromkeys(["png", *formats]):
        with atomic_path(folder / f"{name}.{suffix}") as temporary:
            figure.savefig(temporary, format=suffix, dpi=dpi, bbox_inches="tight",
                           metadata={"Software": None} if suffix == "png" else None)
    return folder / f"{name}.png"
