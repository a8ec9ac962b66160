"""The training loop (paper 1, 2.2): subject-level folds, augmentation, early stopping; it takes
arrays and a model, and writes one model's files into the folder it is given."""

from voxplain.train.augment import augment
from voxplain.train.splits import Fold, baseline_sessions, subject_folds
from voxplain.train.trainer import Dataset, predict_proba, prediction_table, train_fold

__all__ = ["Dataset", "Fold", "augment", "baseline_sessions", "predict_proba",
           "prediction_table", "subject_folds", "train_fold"]
