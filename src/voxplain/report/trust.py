"""Can these results be trusted? The checks the report opens with, read from a run folder.

Every finding names what it is about, a verdict (``ok`` or ``warning``) and the evidence, so a
reader learns before any figure which maps cannot be trusted and why. The rules, stated once:

- a **classifier** is at chance when its validation balanced accuracy has a permutation
  p-value above the training step's ``chance_alpha`` (``at_chance`` in ``metrics.tsv``): its
  maps and masks explain a model that did not learn the task;
- an **explanation** is *near chance* against a ground truth when its mean group-map AUC is
  below :data:`NEAR_CHANCE_AUC` or the share of its mass inside the true region does not exceed
  that region's share of the brain (``chance_mass``);
- its **layer** is *coarse* when an axis of the feature maps it reads has fewer voxels than the
  explanation step's ``min_layer_size`` (``layer_coarse`` in ``index.tsv``): the map is then a
  few blobs stretched over the image;
- its group maps point *outside the brain* when more than :data:`OUTSIDE_BRAIN_SHARE` of their
  relevance lies outside the MNI brain mask (stated beside a uniform map's share and, for a CAM,
  the share its layer's resolution alone puts there);
- it is *no more faithful than a random ranking* when, on the same sessions, its mean deletion
  area is not below the random ranking's and its mean insertion area not above it
  (``evaluate faithfulness``; better in one of the two is stated, not warned about);
- its maps are *nearly identical across subjects* when their mean inter-subject rank
  correlation (``evaluate robustness``) is at least :data:`IDENTICAL_RANK_CORRELATION`: a map
  that does not change with the subject explains the model or the layer, not the subject;
- a **mask** is flagged by the mask steps (group masks: far denser than the run's others, or
  not halving the masked class's probability; session masks: not converged; images: quality
  check step 2).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from voxplain.io import read_tsv
from voxplain.run import RunFolder, fold_run_files
from voxplain.run.maps import group_maps, read_map_on_grid

#: A group map whose mean AUC against the ground truth is below this is near chance (0.5).
NEAR_CHANCE_AUC = 0.6
#: Session maps whose mean inter-subject rank correlation reaches this are nearly identical.
IDENTICAL_RANK_CORRELATION = 0.95
#: Group maps with more than this share of their relevance outside the brain are flagged.
OUTSIDE_BRAIN_SHARE = 0.5


@dataclass(frozen=True)
class Finding:
    """One check: what it is about, ``ok`` or ``warning``, and the evidence."""

    about: str
    verdict: str
    text: str


def run_findings(run: RunFolder) -> list[Finding]:
    """Every finding of the run folder: classifiers, explanation methods, masks; warnings
    first."""
    findings = classifier_findings(run)
    for key in explanation_keys(run):
        findings += method_findings(run, key)
    findings += mask_findings(run)
    return sorted(findings, key=lambda f: f.verdict != "warning")


def explanation_keys(run: RunFolder) -> list[str]:
    root = run.explanations_dir
    return sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


def classifier_findings(run: RunFolder) -> list[Finding]:
    """One warning per fold/run whose classifier ended at chance, else one ``ok`` line."""
    rows = [read_tsv(folder / "metrics.tsv") for _, _, folder in run.model_dirs()]
    if not rows:
        return []
    table = pd.concat(rows, ignore_index=True)
    table = table[table.subset == "validation"]
    if "at_chance" not in table:
        return []
    at_chance = table[table.at_chance.astype(bool)]
    findings = [Finding(f"classifier fold {row.fold} run {row.run}", "warning",
                        f"validation balanced accuracy {row.balanced_accuracy:.2f} is at chance "
                        f"(permutation p = {row.chance_p:.2g}): its maps and masks explain a "
                        "model that did not learn the task")
                for row in at_chance.itertuples()]
    if not findings:
        accuracy = table.balanced_accuracy
        findings.append(Finding("classifiers", "ok", f"validation balanced accuracy "
                                f"{accuracy.min():.2f}-{accuracy.max():.2f} (mean "
                                f"{accuracy.mean():.2f}), every fold above chance"))
    return findings


def method_findings(run: RunFolder, key: str) -> list[Finding]:
    """Localisation against the ground truth (group and session maps), the layer read, and the
    similarity of the maps across subjects, for the explanations under ``explanations/KEY``."""
    return [*_localisation(run, key), *_session_localisation(run, key), *_faithfulness(run, key),
            *_layer(run, key), *_outside_brain(run, key), *_identical(run, key)]


def _localisation(run: RunFolder, key: str) -> list[Finding]:
    table = _table(run.evaluation_file("localisation.tsv"))
    if table is None or "key" not in table:
        return []
    rows = table[table.key == key]
    if rows.empty:
        return []
    auc, mass, chance = rows.auc.mean(), rows.mass_inside.mean(), rows.chance_mass.mean()
    near_chance = auc < NEAR_CHANCE_AUC or mass <= chance
    text = (f"group maps of {', '.join(sorted(rows.diagnosis.astype(str).unique()))} against the "
            f"ground truth: AUC {auc:.2f} (chance 0.50), mass inside {mass:.2f} (chance "
            f"{chance:.2f}), pointing game {rows.pointing_game.mean():.2f}")
    if near_chance:
        text += ": near chance, the maps do not point at the true region"
    return [Finding(key, "warning" if near_chance else "ok", text)]


def _session_localisation(run: RunFolder, key: str) -> list[Finding]:
    table = _table(run.evaluation_file("localisation_sessions.tsv"))
    if table is None or "key" not in table:
        return []
    rows = table[(table.key == key) & table.auc.notna()]
    if rows.empty:
        return []
    auc, mass, chance = rows.auc.mean(), rows.mass_inside.mean(), rows.chance_mass.mean()
    near_chance = auc < NEAR_CHANCE_AUC or mass <= chance
    text = (f"{len(rows)} session maps against each session's own truth: AUC {auc:.2f} (chance "
            f"0.50), mass inside {mass:.2f} (chance {chance:.2f})")
    if near_chance:
        text += ": near chance"
    return [Finding(key, "warning" if near_chance else "ok", text)]


def _faithfulness(run: RunFolder, key: str) -> list[Finding]:
    table = _table(run.evaluation_file("faithfulness/summary.tsv"))
    if table is None or "deletion_beats_random" not in table:
        return []
    rows = table[table.key == key]
    if rows.empty or str(rows.deletion_beats_random.iloc[0]) not in ("True", "False"):
        return []
    row = rows.iloc[0]
    random = table[table.key == "baseline:random"]
    reference = (f" (random ranking {random.deletion_auc.iloc[0]:.2f} / "
                 f"{random.insertion_auc.iloc[0]:.2f})" if not random.empty else "")
    text = (f"deletion area {row.deletion_auc:.2f}, insertion area {row.insertion_auc:.2f} on "
            f"{int(row.n_sessions)} sessions{reference}")
    better = [test for test in ("deletion", "insertion")
              if str(row[f"{test}_beats_random"]) == "True"]
    if not better:
        text += ": no more faithful to the model than a random ranking"
    elif len(better) == 1:
        text += f": better than a random ranking in {better[0]} only"
    t_map = table[table.key == "baseline:t_map"]
    if "deletion" in better and not t_map.empty and row.deletion_auc < t_map.deletion_auc.iloc[0]:
        text += (f"; deleting by this map lowers the model's output faster than deleting by the "
                 f"data's voxel-wise t-map ({t_map.deletion_auc.iloc[0]:.2f}): where the two "
                 "differ the model's evidence lies away from the group difference, and a low "
                 "localisation score describes the model as much as the method")
    return [Finding(key, "ok" if better else "warning", text)]


def _layer_index(run: RunFolder, key: str) -> pd.DataFrame | None:
    """The rows of the method's ``index.tsv`` files that name a layer (CAM family), or None."""
    indexes = [_table(path) for _, _, path in fold_run_files(run.explanation_dir(key),
                                                              "index.tsv")]
    indexes = [index for index in indexes if index is not None and "layer_shape" in index]
    if not indexes:
        return None
    index = pd.concat(indexes, ignore_index=True)
    index = index[index.layer.notna() & (index.layer.astype(str) != "")]
    return None if index.empty else index


def _layer(run: RunFolder, key: str) -> list[Finding]:
    index = _layer_index(run, key)
    if index is None:
        return []
    layers = index.drop_duplicates(["layer", "layer_shape"])
    described = ", ".join(f"{row.layer} ({row.layer_shape})" for row in layers.itertuples())
    if index.layer_coarse.astype(bool).any():
        return [Finding(key, "warning", f"reads layer {described}, coarser than the minimum "
                        "size along an axis: its maps are a few blobs stretched over the "
                        "image (choose a finer --layer or a method such as hires_cam)")]
    return [Finding(key, "ok", f"reads layer {described}")]


def _outside_brain(run: RunFolder, key: str) -> list[Finding]:
    """Share of the group maps' relevance outside the MNI brain mask (3D maps on an MNI grid),
    mean over folds/runs: above :data:`OUTSIDE_BRAIN_SHARE` the map mostly points at no
    anatomy. Stated beside it: a uniform map's share, and, for a map drawn on one layer's grid
    (CAM family), the share of the brain mask itself seen at that grid
    (:func:`~voxplain.evaluate.localisation.brain_outside_at_layer`): the part the layer's
    resolution explains; the rest is where the method puts the model's evidence."""
    from voxplain.data.template import brain_mask
    from voxplain.evaluate.localisation import brain_outside_at_layer, relevance, share_outside

    record_file = run.explanation_dir(key) / "explanation.json"
    signed = bool(json.loads(record_file.read_text()).get("signed")) if record_file.is_file() \
        else False
    index = _layer_index(run, key)
    shapes = [] if index is None else sorted(set(index.layer_shape.astype(str)))
    layer_shape = tuple(int(n) for n in shapes[0].split("x")) if len(shapes) == 1 else None
    shares, background, resolution = [], [], []
    for path in group_maps(run, key).path:
        values, grid = read_map_on_grid(path)
        values = relevance(values, signed)
        if values.ndim != 3 or values.sum() <= 0:  # 2D maps show no brain
            continue
        inside = brain_mask(grid)
        if not inside.any():
            continue
        shares.append(share_outside(values, inside))
        background.append(float(1 - inside.mean()))
        if layer_shape is not None and len(layer_shape) == 3:
            resolution.append(brain_outside_at_layer(inside, layer_shape))
    if not shares:
        return []
    share, uniform = float(np.mean(shares)), float(np.mean(background))
    text = (f"{share:.0%} of the group maps' relevance lies outside the brain (a uniform map: "
            f"{uniform:.0%}")
    if resolution:
        text += (f"; the brain itself seen at the layer's {shapes[0]} grid: "
                 f"{np.mean(resolution):.0%}")
    text += ")"
    if share > OUTSIDE_BRAIN_SHARE:
        return [Finding(key, "warning", f"{text}: the maps mostly point at no anatomy (the "
                        "figures show the part inside the brain)")]
    return [Finding(key, "ok", text)]


def _identical(run: RunFolder, key: str) -> list[Finding]:
    summary = _table(run.evaluation_file("robustness/summary.tsv"))
    if summary is None or not {"method", "experiment", "metric", "mean"} <= set(summary.columns):
        return []
    rows = summary[(summary.method == key) & (summary.experiment == "inter-subject")
                   & (summary.metric == "rank_correlation")]
    if rows.empty:
        return []
    high = rows[rows["mean"] >= IDENTICAL_RANK_CORRELATION]
    if high.empty:
        return [Finding(key, "ok", "session maps differ between subjects (mean inter-subject "
                        "rank correlation " + ", ".join(
                            f"{row.diagnosis} {row.mean:.2f}" for row in rows.itertuples()) + ")")]
    return [Finding(key, "warning", "session maps nearly identical across subjects (mean "
                    "inter-subject rank correlation " + ", ".join(
                        f"{row.diagnosis} {row.mean:.2f}" for row in high.itertuples())
                    + "): they show the model or the layer, not the subject")]


def mask_findings(run: RunFolder) -> list[Finding]:
    """Flagged group masks (with their reasons), session masks and quality-check images."""
    findings = []
    for path in sorted(run.root.glob("masks/**/fold-*/run-*/summary.json")):
        record = json.loads(path.read_text())
        level = path.parent.parent.parent.relative_to(run.masks_dir).as_posix()
        if record.get("flagged"):
            findings.append(Finding(f"{level} mask fold {record['fold']} run {record['run']}",
                                    "warning", "; ".join(record.get("flag_reasons", [])) +
                                    " (left out of robustness unless --include-flagged)"))
    masks = [path for _, _, path in fold_run_files(run.masks_dir / "group", "summary.json")]
    if masks and not any(f.about.startswith("group mask") for f in findings):
        findings.append(Finding("group masks", "ok", f"{len(masks)} group mask(s), none flagged"))
    sessions = [_table(path)
                for _, _, path in fold_run_files(run.masks_dir / "session", "index.tsv")]
    sessions = pd.concat([s for s in sessions if s is not None], ignore_index=True) \
        if any(s is not None for s in sessions) else None
    if sessions is not None and "flagged" in sessions:
        flagged = sessions[sessions.flagged.astype(bool)]
        if len(flagged):
            findings.append(Finding("session masks", "warning", f"{len(flagged)} of "
                                    f"{len(sessions)} flagged as not converged: " + ", ".join(
                                        flagged.participant_id + "_" + flagged.session_id)))
    images = [_table(path)
              for _, _, path in fold_run_files(run.masks_dir / "group", "qc_flags.tsv")]
    images = [table[table.flagged.astype(bool)] for table in images
              if table is not None and "flagged" in table]
    images = pd.concat(images, ignore_index=True) if images else pd.DataFrame()
    if len(images):
        findings.append(Finding("quality check step 2", "warning", "images that make the "
                                "group-mask loss jump (check them for defects): " + ", ".join(
                                    sorted(set(images.participant_id + "_" + images.session_id)))))
    return findings


def findings_table(findings: list[Finding]) -> pd.DataFrame:
    return pd.DataFrame([{"about": f.about, "verdict": f.verdict, "finding": f.text}
                         for f in findings], columns=["about", "verdict", "finding"])


def _table(path: Path) -> pd.DataFrame | None:
    if not path.is_file() or path.stat().st_size == 0:
        return None
    table = read_tsv(path)
    return None if table.empty else table
