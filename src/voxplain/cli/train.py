"""``voxplain train`` and ``voxplain predict``: cross-validated classifiers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from voxplain.cli.common import (
    CONFIG_OPTION,
    absolute,
    build_config,
    console,
    option,
    print_table,
    progress_bar,
    reported_errors,
    setup_logging,
    split_list,
)
from voxplain.config import ModelConfig, PredictConfig, TrainConfig


def train(
    cohort: Path = option(TrainConfig, "cohort", "--cohort"),
    out: Path = option(TrainConfig, "out", "--out"),
    caps: Path = option(TrainConfig, "caps", "--caps"),
    test: Path = option(TrainConfig, "test", "--test"),
    diagnosis_column: str = option(TrainConfig, "diagnosis_column", "--diagnosis-column"),
    classes: str = option(TrainConfig, "classes", "--classes"),
    folds: int = option(TrainConfig, "folds", "--folds"),
    runs: int = option(TrainConfig, "runs", "--runs"),
    seed: int = option(TrainConfig, "seed", "--seed"),
    epochs: int = option(TrainConfig, "epochs", "--epochs"),
    patience: int = option(TrainConfig, "patience", "--patience"),
    min_steps: int = option(TrainConfig, "min_steps", "--min-steps"),
    batch_size: int = option(TrainConfig, "batch_size", "--batch-size"),
    learning_rate: float = option(TrainConfig, "learning_rate", "--learning-rate"),
    weight_decay: float = option(TrainConfig, "weight_decay", "--weight-decay"),
    augmentation: str = option(TrainConfig, "augmentation", "--augmentation"),
    downsample: int = option(TrainConfig, "downsample", "--downsample"),
    qc_threshold: str = option(TrainConfig, "qc_threshold", "--qc-threshold"),
    cache: str = option(TrainConfig, "cache", "--cache"),
    device: str = option(TrainConfig, "device", "--device"),
    model: str = option(ModelConfig, "name", "--model"),
    channels: str = option(ModelConfig, "channels", "--channels"),
    dropout: float = option(ModelConfig, "dropout", "--dropout"),
    config: Path = CONFIG_OPTION,
) -> None:
    """Subject-level cross-validated training; writes models and metrics to the run folder."""
    from voxplain.train.trainer import train_cohort

    setup_logging()
    model_flags = {k: v for k, v in {"name": model, "channels": split_list(channels, int),
                                     "dropout": dropout}.items() if v is not None}
    settings = build_config(
        TrainConfig, "train", config, cohort=absolute(cohort), out=absolute(out),
        caps=absolute(caps), test=absolute(test), diagnosis_column=diagnosis_column,
        classes=split_list(classes), folds=folds, runs=runs, seed=seed, epochs=epochs,
        patience=patience, min_steps=min_steps, batch_size=batch_size, learning_rate=learning_rate,
        weight_decay=weight_decay, augmentation=augmentation,
        downsample=downsample, qc_threshold=qc_threshold, cache=cache, device=device, model=model_flags or None)
    with reported_errors(), progress_bar() as bar:
        summary = train_cohort(settings, progress=bar)
    _print_summary(summary)
    typer.echo(settings.out)



def predict(
    run: Path = option(PredictConfig, "run", "--run"),
    cohort: Path = option(PredictConfig, "cohort", "--cohort"),
    caps: Path = option(PredictConfig, "caps", "--caps"),
    out: Path = option(PredictConfig, "out", "--out"),
    device: str = option(PredictConfig, "device", "--device"),
    config: Path = CONFIG_OPTION,
) -> None:
    """Per-session class probabilities of every model of a run folder."""
    from voxplain.train.predict import predict_cohort

    setup_logging()
    settings = build_config(PredictConfig, "predict", config, run=run, cohort=cohort, caps=caps,
                            out=out, device=device)
    with reported_errors(), progress_bar() as bar:
        predictions = predict_cohort(settings, progress=bar)
    typer.echo(predictions.to_csv(sep="\t", index=False), nl=False)


def _print_summary(summary: Any) -> None:
    print_table("Cross-validation (best model of each fold and run)", summary,
                 ["fold", "run", "subset", "best_epoch", "epochs", "balanced_accuracy", "auc",
                  "loss", "at_chance"])
    for subset, group in summary.groupby("subset"):
        console.print(f"mean {subset} balanced accuracy: {group.balanced_accuracy.mean():.3f} "
                      f"(per fold: {', '.join(f'{v:.2f}' for v in group.balanced_accuracy)})")
