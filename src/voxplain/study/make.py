"""Blinded, randomised questionnaires comparing explanation methods (paper 3, 3.4).

From a run folder, N correctly classified samples per class are drawn (seeded); each sample's
explanation by each method is rendered as the same kind of overlay; the method order is
randomised per question; two variants A and B show the methods in reversed orders so that an
order effect shows up as a difference between them. Only opaque random ids reach the raters::

    STUDY/
      config.toml                      the settings that made the study
      key.tsv                          image id -> method, sample, position in A and B
      questionnaire/
        questionnaire.json             criteria, scores, questions of A and B (ids only)
        images/ID.png                  one original per question + one overlay per method

The key is the only file that names the methods, and it lives outside ``questionnaire/``.

Rendering: the image in grey (scaled to its own minimum and maximum), and the map divided by its
largest absolute value so that every method spans the same ``[-1, 1]`` range of one diverging
colormap centred on 0 (red: evidence for the explained class, blue: against it with ``RdBu_r``);
the overlay's opacity grows with ``|map|`` so the image stays visible where the map is zero.
For volumes, every image of a question shows the same axial slice (last array axis): the one
through the maximum of the sum of the methods' absolute maps, each scaled to a maximum of 1, so
the anatomy is the same and only the overlays differ.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from voxplain.config import StudyMakeConfig
from voxplain.data.cohort import class_names, read_cohort_table
from voxplain.data.images import read_image
from voxplain.io import atomic_path, read_tsv, write_json, write_tsv
from voxplain.run import RunFolder
from voxplain.run.maps import read_map

log = logging.getLogger(__name__)

#: The question a rater answers for each of paper 3's criteria (3.4).
CRITERION_PROMPTS = {
    "intuitive validity": "Does it look reasonable?",
    "semantic meaningfulness": "Does it make sense?",
    "image quality": "Does it look good?",
}
VARIANTS = ("A", "B")
#: Map files, in order of preference: NIfTI, then the ``.npy`` 2D maps of earlier versions.
MAP_SUFFIXES = (".nii.gz", ".npy")


@dataclass(frozen=True)
class StudyFolder:
    """Paths of a study folder; creating the object touches nothing on disk."""

    root: Path

    @property
    def key_file(self) -> Path:
        return self.root / "key.tsv"

    @property
    def questionnaire_dir(self) -> Path:
        return self.root / "questionnaire"

    @property
    def questionnaire_file(self) -> Path:
        return self.questionnaire_dir / "questionnaire.json"

    @property
    def image_dir(self) -> Path:
        return self.questionnaire_dir / "images"

    @property
    def database(self) -> Path:
        return self.root / "answers.sqlite"

    @property
    def analysis_dir(self) -> Path:
        return self.root / "analysis"

    def questionnaire(self) -> dict:
        if not self.questionnaire_file.is_file():
            raise FileNotFoundError(f"{self.questionnaire_file}: no questionnaire (run "
                                    "`voxplain study make` first)")
        return json.loads(self.questionnaire_file.read_text())

    def key(self) -> pd.DataFrame:
        if not self.key_file.is_file():
            raise FileNotFoundError(f"{self.key_file}: no study key")
        return read_tsv(self.key_file)


def explanation_dir(run: Path, method: str, fold: int, model_run: int) -> Path:
    """``RUN/explanations/METHOD/fold-K/run-R``."""
    return RunFolder(run).explanation_dir(method, fold, model_run)


def available_methods(run: Path, fold: int, model_run: int) -> list[str]:
    """Methods with an ``index.tsv`` for this fold and run, sorted."""
    return sorted(path.name for path in RunFolder(run).explanations_dir.glob("*")
                  if (explanation_dir(run, path.name, fold, model_run) / "index.tsv").is_file())


def correctly_classified(run: Path, methods: list[str], fold: int, model_run: int,
                         classes: list[str]) -> pd.DataFrame:
    """Sessions explained by every method whose prediction equals the diagnosis.

    Returns one row per session: participant_id, session_id, diagnosis, and one ``map:METHOD``
    column with the path of each method's map.
    """
    merged = None
    for method in methods:
        folder = explanation_dir(run, method, fold, model_run)
        index_file = folder / "index.tsv"
        if not index_file.is_file():
            raise FileNotFoundError(f"{index_file}: no explanations of method '{method}'")
        index = read_tsv(index_file)
        missing = {"participant_id", "session_id", "diagnosis", "predicted"} - set(index.columns)
        if missing:
            raise ValueError(f"{index_file}: missing columns {sorted(missing)}")
        predicted = [_class_name(value, classes, index_file) for value in index["predicted"]]
        index = index[np.asarray(predicted) == index["diagnosis"].astype(str).to_numpy()]
        index = index.assign(**{f"map:{method}": [_map_file(folder, p, s) for p, s in
                                                   zip(index["participant_id"],
                                                       index["session_id"])]})
        columns = ["participant_id", "session_id", "diagnosis", f"map:{method}"]
        index = index[columns].dropna()
        merged = index if merged is None else merged.merge(
            index, on=["participant_id", "session_id", "diagnosis"])
    return merged.sort_values(["participant_id", "session_id"]).reset_index(drop=True)


def _class_name(value: object, classes: list[str], source: Path) -> str:
    text = str(value)
    if text in classes:
        return text
    try:
        return classes[int(float(text))]
    except (ValueError, IndexError):
        raise ValueError(f"{source}: predicted class {text!r} is neither one of {classes} "
                         "nor a class index") from None


def _map_file(folder: Path, participant: str, session: str) -> str | None:
    for suffix in MAP_SUFFIXES:
        path = folder / f"{participant}_{session}{suffix}"
        if path.is_file():
            return str(path)
    return None


def draw_samples(candidates: pd.DataFrame, classes: list[str], per_class: int,
                 seed: int) -> pd.DataFrame:
    """``per_class`` rows of each class, drawn without replacement, in a seeded random order."""
    rng = np.random.default_rng(seed)
    drawn = []
    for diagnosis in classes:
        rows = candidates[candidates["diagnosis"] == diagnosis]
        if len(rows) < per_class:
            raise ValueError(f"only {len(rows)} correctly classified '{diagnosis}' samples have "
                             f"explanations by every method; {per_class} asked")
        drawn.append(rows.iloc[np.sort(rng.choice(len(rows), per_class, replace=False))])
    samples = pd.concat(drawn)
    return samples.iloc[rng.permutation(len(samples))].reset_index(drop=True)


def representative_slice(maps: list[np.ndarray]) -> int:
    """Axial index (last axis) through the maximum of ``sum_k |map_k| / max |map_k|``.

    Args:
        maps: volumes ``(X, Y, Z)`` of one sample, one per method.
    """
    total = np.zeros(maps[0].shape, dtype=np.float64)
    for relevance in maps:
        scale = np.abs(relevance).max()
        if scale > 0:
            total += np.abs(relevance) / scale
    return int(np.unravel_index(np.argmax(total), total.shape)[-1])


def display_plane(array: np.ndarray, axial: int | None) -> np.ndarray:
    """``(H, W)`` plane to show: the image itself in 2D, the axial slice (rotated so that
    anterior is up) in 3D. ``array`` is ``(C, *spatial)``; channels are averaged."""
    plane = array.mean(axis=0)
    if plane.ndim == 3:
        plane = np.rot90(plane[:, :, axial])
    return plane


def overlay(image: np.ndarray, relevance: np.ndarray | None, colormap: str = "RdBu_r",
            opacity: float = 0.8) -> np.ndarray:
    """Colour overlay of a relevance map on a grey image.

    Args:
        image: ``(H, W)`` intensities, scaled to [0, 1] by their own minimum and maximum.
        relevance: ``(H, W)`` map divided by its largest absolute value, shown through
            ``colormap`` centred on 0 with opacity ``opacity * |map|``; None: the image alone.

    Returns:
        ``(H, W, 3)`` uint8 RGB.
    """
    from matplotlib import colormaps

    low, high = float(image.min()), float(image.max())
    grey = (image - low) / (high - low) if high > low else np.zeros_like(image)
    rgb = np.repeat(grey[..., np.newaxis], 3, axis=-1)
    if relevance is not None:
        scale = float(np.abs(relevance).max())
        scaled = relevance / scale if scale > 0 else np.zeros_like(relevance)
        colour = colormaps[colormap]((scaled + 1) / 2)[..., :3]
        alpha = (opacity * np.abs(scaled))[..., np.newaxis]
        rgb = (1 - alpha) * rgb + alpha * colour
    return np.round(np.clip(rgb, 0, 1) * 255).astype(np.uint8)


def save_png(path: Path, rgb: np.ndarray, pixels: int) -> None:
    """Save ``(H, W, 3)`` uint8, enlarged by an integer factor (nearest) to ``pixels`` or more,
    without metadata, atomically."""
    from PIL import Image

    factor = max(1, math.ceil(pixels / min(rgb.shape[:2])))
    enlarged = np.repeat(np.repeat(rgb, factor, axis=0), factor, axis=1)
    with atomic_path(path) as temporary:
        Image.fromarray(enlarged, mode="RGB").save(temporary, format="PNG")


def make_questionnaires(config: StudyMakeConfig) -> pd.DataFrame:
    """Write questionnaires A and B and the key (see the module docstring); returns the key.

    A finished study folder is left as it is (its key is returned), so a re-run is free; other
    settings for the same study folder are an error.
    """
    if config.score_min >= config.score_max:
        raise ValueError(f"score_min {config.score_min} must be below score_max {config.score_max}")
    run = RunFolder(config.run)
    folder = StudyFolder(config.out or config.run / "study")
    # the settings live with the study (STUDY/config.toml), so one run folder can hold several
    RunFolder(folder.root).record_config("study_make", config)
    if folder.key_file.is_file() and folder.questionnaire_file.is_file():
        log.info("%s: questionnaires already made", folder.root)
        return folder.key()
    cohort = read_cohort_table(run.cohort_file)
    classes = class_names(cohort["diagnosis"].tolist())
    methods = config.methods or available_methods(config.run, config.fold, config.model_run)
    if len(methods) < 2:
        raise ValueError(f"{config.run / 'explanations'}: a study compares at least two methods, "
                         f"found {methods}")
    candidates = correctly_classified(config.run, methods, config.fold, config.model_run, classes)
    samples = draw_samples(candidates, classes, config.samples_per_class, config.seed)
    paths = {(p, s): path for p, s, path in zip(cohort["participant_id"], cohort["session_id"],
                                                 cohort["path"])}
    rng = np.random.default_rng([config.seed, 1])
    key_rows, questions = [], {variant: [] for variant in VARIANTS}
    for number, sample in enumerate(samples.to_dict("records"), start=1):
        question = f"q{number:02d}"
        session = (sample["participant_id"], sample["session_id"])
        if session not in paths:
            raise ValueError(f"{run.cohort_file}: no image for {' '.join(session)}, which has "
                             "explanations")
        image, _ = read_image(Path(paths[session]))
        maps = [read_map(sample[f"map:{method}"]) for method in methods]
        if any(m.shape != image.shape[1:] for m in maps):
            raise ValueError(f"{' '.join(session)}: maps of shapes {[m.shape for m in maps]} "
                             f"differ from the image's {image.shape[1:]}")
        axial = representative_slice(maps) if image.ndim == 4 else None
        original_id = _opaque_id(rng)
        save_png(folder.image_dir / f"{original_id}.png",
                 overlay(display_plane(image, axial), None), config.pixels)
        order_a = rng.permutation(len(methods))
        ids = [_opaque_id(rng) for _ in methods]
        for position, k in enumerate(order_a):
            relevance = display_plane(maps[k][np.newaxis], axial)
            save_png(folder.image_dir / f"{ids[k]}.png",
                     overlay(display_plane(image, axial), relevance, config.colormap,
                             config.opacity), config.pixels)
            key_rows.append({"question": question, "image": ids[k], "method": methods[k],
                             "participant_id": session[0], "session_id": session[1],
                             "diagnosis": sample["diagnosis"],
                             "position_A": position + 1, "position_B": len(methods) - position,
                             "slice": axial})
        for variant, order in (("A", order_a), ("B", order_a[::-1])):
            questions[variant].append({"question": question, "original": original_id,
                                       "images": [ids[k] for k in order]})
    write_json(folder.questionnaire_file, {
        "criteria": [{"name": name, "prompt": CRITERION_PROMPTS.get(name, "")}
                     for name in config.criteria],
        "score_min": config.score_min, "score_max": config.score_max, "variants": questions})
    key = pd.DataFrame(key_rows)
    write_tsv(folder.key_file, key)
    log.info("%s: %d questions x %d methods, variants A and B", folder.root, len(samples),
             len(methods))
    return key


def _opaque_id(rng: np.random.Generator) -> str:
    return rng.bytes(8).hex()
