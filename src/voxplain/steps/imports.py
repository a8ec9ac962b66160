"""``voxplain import``: a run folder around models voxplain did not train.

Two routes, one result: the run folder `voxplain train` writes (``config.toml`` with a
``[train]`` section describing the models, ``cohort.tsv``, ``grid.json``,
``splits/fold-K/{train,validation}.tsv``, ``models/fold-K/run-0/{model.safetensors,
model.json, metrics.tsv, predictions-validation.tsv}``), so that every later step (explain,
masks, evaluate, report, summary) takes it unchanged.

- :func:`run_import_clinicadl`: a ClinicaDL MAPS folder (:mod:`voxplain.models.clinicadl_maps`):
  its architecture rebuilt by :mod:`voxplain.models.clinicadl`, its splits, the
  ``best-<metric>`` checkpoint of each split (read with ``weights_only``).
- :func:`run_import_monai`: a network of ``monai.networks.nets`` by name and arguments, one
  weights file per fold (safetensors or a weights-only checkpoint), the splits from a folder of
  ``split-K/{train,validation}.tsv`` or made by voxplain's subject-level k-fold.

Input: the models read the cohort's images on the cohort's grid (no resampling: give a cohort
registered as the models' training data was), through the input each declares
(:mod:`voxplain.models.declared_input`, applied inside the model by every step): ``input_size``
(centred crop or zero pad to the network's size), ``normalisation`` (zscore, minmax, none) and,
for a network with one output (a sigmoid, found at import with two classes), the two logits
``(-z / 2, z / 2)``. ``model.json`` records it (``input``, ``preprocessing``); a later cohort on
another grid is refused by :meth:`~voxplain.run.RunFolder.check_training_grid`.

Each fold's model is evaluated on its validation sessions (``metrics.tsv``, with
``best_epoch`` from the checkpoint where it says, else -1); nothing is trained.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from rich.progress import Progress
from safetensors.torch import save_file
from torch import nn

from voxplain.config import (ClinicaDLImportConfig, FoldFilesImportConfig, ImportConfig,
                             ModelConfig, MonaiImportConfig, ProgramImportConfig,
                             PythonImportConfig, TrainConfig)
from voxplain.data.cohort import Cohort, CohortError, class_names, encode_labels, load_images
from voxplain.evaluate.classification import chance_p_value, classification_metrics
from voxplain.io import read_tsv, write_json, write_tsv
from voxplain.models.clinicadl_maps import read_clinicadl_checkpoint, read_maps
from voxplain.models.declared_input import Preprocessing, crop_or_pad, declared_input
from voxplain.models.device import resolve_device
from voxplain.models.programs import export_program, load_program
from voxplain.models.registry import build_model
from voxplain.models.serialization import load_checkpoint_state, save_model
from voxplain.run import RunFolder
from voxplain.steps.context import IDS, progress_callback
from voxplain.train.splits import subject_folds
from voxplain.train.trainer import Dataset, predict_proba, prediction_table

log = logging.getLogger("voxplain")

__all__ = ["import_model", "run_import_clinicadl", "run_import_monai", "run_import_program",
           "run_import_python"]

#: What ``model.json`` says an imported model reads.
INPUT = {"resampled": False,
         "reads": "the cohort's images on the grid of grid.json, through 'preprocessing'"}


@dataclass(frozen=True)
class ImportedFold:
    """One fold of an imported model: its sessions (cohort rows with ``image_index``), its
    network with the weights loaded, and where they came from."""

    index: int
    train: pd.DataFrame
    validation: pd.DataFrame
    model: nn.Module
    source: dict[str, Any]
    program: Path | None = None  # model 'program': the .pt2 file copied into the run folder


def run_import_clinicadl(config: ClinicaDLImportConfig,
                         progress: Progress | None = None) -> pd.DataFrame:
    """Import the image-level CNN of every selected split of a ClinicaDL MAPS; returns (and
    writes to ``evaluation/cross_validation.tsv``) the validation metrics of each fold."""
    maps = read_maps(config.maps, config.selection_metric, config.folds)
    cohort, images = _load_cohort(config, progress)
    channels, spatial = images.shape[1], list(config.input_size or images.shape[2:])
    expected = maps.parameters.get("input_size")
    if isinstance(expected, list) and expected != [channels, *spatial]:
        raise CohortError(f"{config.cohort}: images are {tuple(spatial)} (channels {channels}"
                          f"{', --input-size' if config.input_size else ''}); the MAPS's models "
                          f"take {tuple(expected[1:])} (channels {expected[0]}, maps.json "
                          "input_size): give --input-size to crop or pad them")
    dropout = maps.parameters.get("dropout", 0.5)
    model_config = ModelConfig(name=maps.model_name, in_channels=channels,
                               n_classes=len(maps.classes), input_shape=spatial,
                               dropout=dropout if isinstance(dropout, float) and 0 <= dropout < 1
                               else 0.5)
    preprocessing = _check_outputs(build_model(model_config), images, maps.classes,
                                   maps.model_name, config)
    folds = []
    for split in maps.splits:
        where = maps.root / "groups" / "train" / f"split-{split.index}"
        train, validation = (_cohort_rows(cohort, table, where / f"{subset}.tsv", maps.label)
                             for subset, table in (("train", split.train),
                                                   ("validation", split.validation)))
        state, extras = read_clinicadl_checkpoint(split.checkpoint)
        _check_flat_features(state, model_config, split.checkpoint)
        model = _with_weights(build_model(model_config), state, split.checkpoint)
        folds.append(ImportedFold(split.index, train, validation, model, {
            "from": "clinicadl", "maps": str(maps.root), "checkpoint": str(split.checkpoint),
            "architecture": maps.parameters["architecture"],
            "selection_metric": config.selection_metric,
            **{key: extras[key] for key in ("epoch", "name") if key in extras}}))
    return _write_run(config, "import_clinicadl", cohort, images, maps.classes, model_config,
                      folds, preprocessing)


def run_import_monai(config: MonaiImportConfig, progress: Progress | None = None) -> pd.DataFrame:
    """Import a MONAI network (one weights file per fold); returns (and writes to
    ``evaluation/cross_validation.tsv``) the validation metrics of each fold."""
    cohort, images = _load_cohort(config, progress)
    classes = config.classes or class_names(cohort.table["diagnosis"])
    model_config = ModelConfig(name="monai", network=config.network, arguments=config.arguments,
                               in_channels=images.shape[1], n_classes=len(classes),
                               input_shape=list(config.input_size or images.shape[2:]))
    preprocessing = _check_outputs(build_model(model_config), images, classes, config.network,
                                   config)
    folds = _folds_from_weights(config, cohort, model_config, {"from": "monai"})
    return _write_run(config, "import_monai", cohort, images, classes, model_config, folds,
                      preprocessing)


def run_import_program(config: ProgramImportConfig,
                       progress: Progress | None = None) -> pd.DataFrame:
    """Import one torch.export program (``.pt2``) per fold, loaded without unpickling
    (:func:`~voxplain.models.programs.load_program`; TorchScript is refused); each is copied
    into its model folder (``model.pt2``, with its tensors in ``model.safetensors``). Returns
    (and writes to ``evaluation/cross_validation.tsv``) the validation metrics of each fold."""
    cohort, images = _load_cohort(config, progress)
    return _import_programs(config, cohort, images)


def _import_programs(config: ProgramImportConfig, cohort: Cohort,
                     images: np.ndarray) -> pd.DataFrame:
    classes = config.classes or class_names(cohort.table["diagnosis"])
    model_config = ModelConfig(name="program", in_channels=images.shape[1],
                               n_classes=len(classes),
                               input_shape=list(config.input_size or images.shape[2:]))
    splits = _monai_splits(config, cohort, len(config.programs))
    folds, declared = [], []
    for (index, train, validation), program in zip(splits, config.programs):
        model = load_program(program)
        declared.append(_check_outputs(model, images, classes, str(program), config))
        _check_batches(model, images, program)
        folds.append(ImportedFold(index, train, validation, model,
                                  {"from": "program", "program": str(program)}, Path(program)))
    if len(set(declared)) > 1:
        raise ValueError("the programs differ in their number of outputs: "
                         + ", ".join(f"{program}: {'1' if d.single_logit else len(classes)}"
                                     for program, d in zip(config.programs, declared)))
    return _write_run(config, "import_program", cohort, images, classes, model_config, folds,
                      declared[0])


def run_import_python(config: PythonImportConfig,
                      progress: Progress | None = None) -> pd.DataFrame:
    """Import a network built by the user's factory (``package.module:function``; importing it
    runs that code), one weights file per fold. Returns (and writes to
    ``evaluation/cross_validation.tsv``) the validation metrics of each fold."""
    cohort, images = _load_cohort(config, progress)
    return _import_python(config, cohort, images)


def _import_python(config: PythonImportConfig, cohort: Cohort,
                   images: np.ndarray) -> pd.DataFrame:
    classes = config.classes or class_names(cohort.table["diagnosis"])
    model_config = ModelConfig(name="python", factory=config.factory,
                               arguments=config.arguments, in_channels=images.shape[1],
                               n_classes=len(classes),
                               input_shape=list(config.input_size or images.shape[2:]))
    preprocessing = _check_outputs(build_model(model_config), images, classes, config.factory,
                                   config)
    folds = _folds_from_weights(config, cohort, model_config,
                                {"from": "python", "factory": config.factory})
    return _write_run(config, "import_python", cohort, images, classes, model_config, folds,
                      preprocessing)


def import_model(modules: nn.Module | Sequence[nn.Module], *, cohort: Path, out: Path,
                 splits: Path | None = None, classes: list[str] | None = None,
                 factory: str | None = None, arguments: dict[str, Any] | None = None,
                 export: bool = False, split_seed: int = 2,
                 diagnosis_column: str = "diagnosis", batch_size: int = 8,
                 device: str = "auto", preprocessing: dict[str, Any] | None = None,
                 progress: Progress | None = None) -> pd.DataFrame:
    """A run folder around live PyTorch modules, one per fold (one module: one fold, which needs
    ``splits``), as ``voxplain import`` writes it; returns the validation metrics per fold.

    ``preprocessing``: the input the modules expect, applied inside the model by every step
    (:mod:`voxplain.models.declared_input`): ``{"normalisation": "zscore", "input_size": [96,
    112, 96]}`` (keys of :class:`~voxplain.config.ImportConfig`); a module with one output (a
    sigmoid) of two classes is read as the logits ``(-z / 2, z / 2)``.

    The architecture is recorded so that later steps rebuild it, one of two ways:

    - ``export=False`` (default): as model ``python``, ``factory`` (``"package.module:function"``
      or a class; default: the module's class, ``type(module).__module__:__qualname__``, which
      must be importable, not defined in ``__main__`` or inside a function) called with
      ``arguments``; the weights of each module go to ``OUT/imported/fold-K.safetensors``.
      Later steps import the factory, which runs that code: for local code you trust.
    - ``export=True``: as model ``program``: each module exported with ``torch.export`` (batch
      size free) to ``OUT/imported/fold-K.pt2``, then imported as ``voxplain import program``
      does; later steps need no Python code of yours, but LRP, Deep Taylor, CAM and
      DeepLift-SHAP need the network's modules and refuse a program.

    The import is recorded in ``config.toml`` (``[import_python]`` or ``[import_program]``,
    with those files), so the run folder replays like any other.
    """
    modules = [modules] if isinstance(modules, nn.Module) else list(modules)
    if not modules:
        raise ValueError("import_model needs at least one module (one per fold)")
    out = Path(out)
    declared = dict(preprocessing or {})
    unknown = sorted(set(declared) - {"normalisation", "input_size"})
    if unknown:
        raise ValueError(f"preprocessing: unknown key(s) {unknown}; give normalisation and/or "
                         "input_size")
    common = {"cohort": Path(cohort), "run": out, "splits": splits, "classes": classes,
              "split_seed": split_seed, "diagnosis_column": diagnosis_column,
              "batch_size": batch_size, "device": device, **declared}
    if export:
        if factory is not None or arguments is not None:
            raise ValueError("factory and arguments describe a 'python' model; with export=True "
                             "the exported program is the architecture")
        loaded, images = _load_cohort(ProgramImportConfig(programs=[Path("-")], **common),
                                      progress)
        example = torch.from_numpy(np.ascontiguousarray(images[:2]))
        if declared.get("input_size"):  # the modules take their own size, the program too
            example = crop_or_pad(example, declared["input_size"])
        programs = [export_program(module, example, out / "imported" / f"fold-{index}.pt2")
                    for index, module in enumerate(modules)]
        return _import_programs(ProgramImportConfig(programs=programs, **common), loaded,
                                images)
    factory = factory or _class_factory(modules[0])
    weights = []
    for index, module in enumerate(modules):
        path = out / "imported" / f"fold-{index}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({name: tensor.detach().cpu().contiguous()
                   for name, tensor in module.state_dict().items()}, str(path))
        weights.append(path)
    config = PythonImportConfig(factory=factory, arguments=arguments or {}, weights=weights,
                                **common)
    loaded, images = _load_cohort(config, progress)
    return _import_python(config, loaded, images)


def _class_factory(module: nn.Module) -> str:
    """``module.class:QualName`` of a module's class, when later steps can import it."""
    kind = type(module)
    if kind.__module__ == "__main__" or "<locals>" in kind.__qualname__:
        raise ValueError(f"{kind.__qualname__} is defined in {kind.__module__} (or inside a "
                         "function): later steps could not import it. Put it in a module on "
                         "the Python path and give factory='package.module:function', or "
                         "pass export=True to store an exported program instead")
    return f"{kind.__module__}:{kind.__qualname__}"


def _load_cohort(config: ImportConfig, progress: Progress | None) -> tuple[Cohort, np.ndarray]:
    cohort = Cohort.from_tsv(config.cohort, config.diagnosis_column)
    stack = load_images(cohort, 1, None, progress_callback(progress, "loading cohort",
                                                           len(cohort)))
    return cohort, stack.array


def _cohort_rows(cohort: Cohort, sessions: pd.DataFrame, source: Path,
                 label: str | None = None) -> pd.DataFrame:
    """The cohort rows (with ``image_index``) of ``sessions``, in their order; a session missing
    from the cohort, or labelled otherwise there (its ``label`` column, when it has one), is an
    error naming it."""
    table = cohort.table.reset_index(names="image_index")
    split = sessions[IDS[:2]].assign(split_label=sessions[label] if label in sessions else None)
    rows = split.merge(table, on=IDS[:2], how="left", indicator=True)
    missing = rows[rows["_merge"] == "left_only"]
    if len(missing):
        first = missing.iloc[0]
        raise CohortError(f"{source}: {first.participant_id} {first.session_id} is not in "
                          f"{cohort.source} ({len(missing)} session(s) of the split are not); "
                          "the cohort must hold every session of the splits")
    labelled = rows[rows["split_label"].notna()]
    differ = labelled[labelled["split_label"].astype(str) != labelled["diagnosis"].astype(str)]
    if len(differ):
        first = differ.iloc[0]
        raise CohortError(f"{source}: {first.participant_id} {first.session_id} is "
                          f"{first.split_label!r} there but {first.diagnosis!r} in "
                          f"{cohort.source}")
    return rows[[*IDS, "image_index"]]


def _check_flat_features(state: dict[str, torch.Tensor], config: ModelConfig,
                         checkpoint: Path) -> None:
    """A ClinicaDL CNN's first linear layer fixes its input grid: refuse a cohort whose images
    would give another number of features, with both grids' numbers."""
    weight = state.get("fc.2.weight")
    ours = build_model(config).fc[2].in_features
    if weight is not None and weight.ndim == 2 and weight.shape[1] != ours:
        raise CohortError(f"{checkpoint}: the model's first linear layer takes {weight.shape[1]} "
                          f"features; images of shape {tuple(config.input_shape or ())} give "
                          f"{ours}: the cohort is not on the grid the model was trained on")


def _with_weights(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> nn.Module:
    """``model`` with ``state`` loaded strictly (every name and shape must match), in eval
    mode; an error names the file and the first differences."""
    own = model.state_dict()
    missing = [name for name in own if name not in state]
    unexpected = [name for name in state if name not in own]
    shapes = [f"{name} {tuple(state[name].shape)} vs {tuple(own[name].shape)}"
              for name in own if name in state and state[name].shape != own[name].shape]
    if missing or unexpected or shapes:
        problems = [f"{label}: {', '.join(names[:4])}{' ...' if len(names) > 4 else ''}"
                    for label, names in (("missing", missing), ("not in the network", unexpected),
                                         ("shape (file vs network)", shapes)) if names]
        raise ValueError(f"{path}: the weights do not fit {type(model).__name__} "
                         f"({'; '.join(problems)})")
    model.load_state_dict(state)
    return model.eval().requires_grad_(False)


def _check_outputs(model: nn.Module, images: np.ndarray, classes: list[str], network: str,
                   config: ImportConfig) -> Preprocessing:
    """One forward pass of the first image through the input the import declares (crop or pad,
    normalisation): the network must take it and return one logit per class ``(1, K)``, or one
    logit of two classes (a sigmoid: declared ``single_logit``). Returns the declaration."""
    declared = Preprocessing(config.normalisation,
                             None if config.input_size is None else tuple(config.input_size))
    try:
        with torch.no_grad():
            output = declared_input(model.eval(), declared)(
                torch.from_numpy(np.ascontiguousarray(images[:1])))
    except (RuntimeError, ValueError) as error:
        size = f", --input-size {tuple(config.input_size)}" if config.input_size else ""
        raise ValueError(f"{network} does not take the cohort's images {images.shape[1:]} "
                         f"(channels, *spatial{size}): {str(error).splitlines()[0]}") from None
    if not isinstance(output, torch.Tensor) or output.ndim != 2:
        found = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        raise ValueError(f"{network} returns {found}; voxplain needs logits (N, classes)")
    if output.shape[1] == 1 and len(classes) == 2:
        log.info("%s has a single output (a sigmoid): read as the logits (-z/2, z/2) of %s",
                 network, classes)
        return replace(declared, single_logit=True)
    if output.shape[1] != len(classes):
        raise ValueError(f"{network} has {output.shape[1]} output(s) but there are "
                         f"{len(classes)} classes {classes}; give --classes in output order"
                         + (" (a single output, a sigmoid, needs two classes)"
                            if output.shape[1] == 1 else ""))
    return declared


def _check_batches(model: nn.Module, images: np.ndarray, program: Path) -> None:
    """A program exported for one batch size fails on any other: refuse it at import."""
    if len(images) < 3:
        return
    try:
        with torch.no_grad():
            model(torch.from_numpy(np.ascontiguousarray(images[:3])))
    except Exception as error:  # noqa: BLE001 - the program's shape guards raise various types
        raise ValueError(f"{program}: the program does not take a batch of 3 images "
                         f"({str(error).strip().splitlines()[0][:200]}); export it with a "
                         "dynamic batch size: torch.export.export(model, (x,), dynamic_shapes="
                         "({0: torch.export.Dim('batch')},))") from None


def _folds_from_weights(config: MonaiImportConfig | PythonImportConfig, cohort: Cohort,
                        model_config: ModelConfig,
                        origin: dict[str, Any]) -> list[ImportedFold]:
    """One fold per weights file of ``config.weights``, the network of ``model_config`` with
    those weights, on the splits of :func:`_monai_splits`; ``origin`` (and the checkpoint's
    epoch) recorded in each model's description."""
    folds = []
    splits = _monai_splits(config, cohort, len(config.weights))
    for (index, train, validation), weights in zip(splits, config.weights):
        state, extras = load_checkpoint_state(weights)
        model = _with_weights(build_model(model_config), state, weights)
        folds.append(ImportedFold(index, train, validation, model, {
            **origin, "weights": str(weights),
            **{key: extras[key] for key in ("epoch",) if key in extras}}))
    return folds


def _monai_splits(config: FoldFilesImportConfig, cohort: Cohort,
                  n: int) -> list[tuple[int, pd.DataFrame, pd.DataFrame]]:
    """``(fold, train rows, validation rows)``: from ``config.splits`` (``split-K`` or
    ``fold-K`` folders, in K order), or voxplain's subject-level k-fold of the cohort; one per
    weights file (or program)."""
    if config.splits is None:
        if n < 2:
            raise ValueError("one weights file: give its split with --splits DIR "
                             "(split-0/{train,validation}.tsv); voxplain's k-fold needs "
                             "at least 2 folds")
        folds = subject_folds(cohort.table, n, config.split_seed)
        return [(fold.index, _cohort_rows(cohort, fold.train, config.cohort),
                 _cohort_rows(cohort, fold.validation, config.cohort)) for fold in folds]
    found = sorted((int(path.name.split("-")[1]), path) for path in Path(config.splits).iterdir()
                   if path.is_dir() and path.name.split("-")[0] in ("split", "fold")
                   and path.name.split("-")[-1].isdigit())
    if len(found) != n:
        raise ValueError(f"{config.splits}: {len(found)} split folders (split-K or fold-K) for "
                         f"{n} weights file(s); give one weights file per split, in order")
    splits = []
    for index, folder in found:
        tables = []
        for subset in ("train", "validation"):
            path = folder / f"{subset}.tsv"
            if not path.is_file():
                raise FileNotFoundError(f"{path}: split file not found")
            tables.append(_cohort_rows(cohort, read_tsv(path), path, "diagnosis"))
        splits.append((index, *tables))
    return splits


def _write_run(config: ImportConfig, section: str, cohort: Cohort, images: np.ndarray,
               classes: list[str], model_config: ModelConfig, folds: Sequence[ImportedFold],
               preprocessing: Preprocessing) -> pd.DataFrame:
    """Write the run folder of the imported ``folds`` (see the module docstring)."""
    run = RunFolder(config.run)
    device = resolve_device(config.device)
    table = cohort.table
    outside = sorted(set(table["diagnosis"]) - set(classes))
    if outside:
        log.warning("%s: sessions of diagnoses %s are not classes of the models %s: left out "
                    "of the run's cohort", config.cohort, outside, classes)
    for fold in folds:
        for subset in (fold.train, fold.validation):
            encode_labels(subset, classes, config.cohort)  # split sessions must be classes
    # what later steps read of [train]: the model, the classes, the grid (no downsampling, no
    # slices), the batch size; n_folds is at least the 2 a k-fold section validates with (the
    # import's own section holds what was imported)
    train = TrainConfig(cohort=config.cohort, run=config.run, n_folds=max(2, len(folds)),
                        split="kfold", classes=classes, qc_threshold=None, device=config.device,
                        batch_size=config.batch_size, diagnosis_column=config.diagnosis_column,
                        model=model_config)
    run.record_config(section, config)
    run.record_config("train", train)
    for folder in (run.root / "models", run.root / "splits", run.evaluation_dir):
        run.remove_leftovers(folder)
    write_tsv(run.cohort_file, table[table["diagnosis"].isin(classes)])
    write_tsv(run.qc_rejected_file, pd.DataFrame(columns=[*IDS, "path", "max_value"]))
    write_json(run.grid_file, {"shape": list(images.shape[2:]), "channels": int(images.shape[1]),
                               "affine": np.asarray(cohort.affine).tolist()})
    for fold in folds:
        for subset in ("train", "validation"):
            write_tsv(run.split_file(fold.index, subset), getattr(fold, subset)[IDS])
        folder = run.model_dir(fold.index, 0)
        if (folder / "metrics.tsv").is_file():
            log.info("fold %d already imported: skipped", fold.index)
            continue
        _write_model(folder, fold, model_config, classes, images, config, device,
                     preprocessing)
    summary = pd.concat([read_tsv(folder / "metrics.tsv") for _, _, folder in run.model_dirs()],
                        ignore_index=True)
    write_tsv(run.evaluation_file("cross_validation.tsv"), summary)
    return summary


def _write_model(folder: Path, fold: ImportedFold, model_config: ModelConfig,
                 classes: list[str], images: np.ndarray, config: ImportConfig,
                 device: torch.device, preprocessing: Preprocessing) -> None:
    """``model.safetensors`` (the network's own tensors) and ``model.json`` (with the declared
    ``preprocessing``), the validation predictions, and, last (it marks the fold done),
    ``metrics.tsv``."""
    epoch = fold.source.get("epoch", -1)
    save_model(folder, fold.model, model_config, classes, {
        "fold": fold.index, "run": 0, "best_epoch": epoch, "downsample": 1,
        "imported": fold.source, "input": INPUT, "preprocessing": preprocessing.record()},
        program=fold.program)
    validation = Dataset(fold.validation, images,
                         encode_labels(fold.validation, classes, config.cohort))
    model = declared_input(fold.model, preprocessing).to(device)
    probabilities, loss = predict_proba(model, validation, config.batch_size, device)
    write_tsv(folder / "predictions-validation.tsv",
              prediction_table(validation, probabilities, classes))
    p_value = chance_p_value(validation.labels, probabilities.argmax(1))
    metrics = {"fold": fold.index, "run": 0, "subset": "validation", "best_epoch": epoch,
               "loss": loss, **classification_metrics(validation.labels, probabilities),
               "chance_p": p_value, "at_chance": not p_value <= TrainConfig.model_fields[
                   "chance_alpha"].default}
    write_tsv(folder / "metrics.tsv", pd.DataFrame([metrics]))
    log.info("fold %d: imported; validation balanced accuracy %.3f", fold.index,
             metrics["balanced_accuracy"])
