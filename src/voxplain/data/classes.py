"""Classes of a classifier: which one is "the patient class", and which class a step explains.

One rule each, used by masks, explanations, CyCE and localisation alike:

- :func:`patient_class`: the named diagnosis, else the only class that is not a control label
  (CN, HC, ...), else class 1 of a two-class problem (:func:`~voxplain.data.cohort.class_names`
  puts controls first);
- :func:`resolve_target`: ``true`` (the session's diagnosis), ``predicted`` (the model's
  prediction), a class name, or a class index -> one class index.
"""

from __future__ import annotations

from collections.abc import Sequence

from voxplain.data.cohort import CONTROL_LABELS

__all__ = ["patient_class", "class_index", "resolve_target"]


def patient_class(classes: Sequence[str], diagnosis: str | None = None) -> str:
    """The patient class among ``classes``: ``diagnosis`` when given (checked), else the only
    class that is not a control label, else class 1 of a two-class problem.

    Raises:
        ValueError: ``diagnosis`` is not a class, or no rule tells the patient class (several
            non-control classes): name it.
    """
    classes = list(classes)
    if diagnosis is not None:
        if diagnosis not in classes:
            raise ValueError(f"diagnosis {diagnosis!r} is not a class of the model {classes}")
        return diagnosis
    patients = [name for name in classes if name not in CONTROL_LABELS]
    if len(patients) == 1:
        return patients[0]
    if len(classes) == 2:
        return classes[1]
    raise ValueError(f"cannot tell the patient class among {classes}: name it with --diagnosis")


def class_index(target: int | str, classes: Sequence[str]) -> int:
    """A class given by index or by name, checked against ``classes``."""
    classes = list(classes)
    if isinstance(target, int):
        if not 0 <= target < len(classes):
            raise ValueError(f"target class {target} is not an index of the classes {classes}")
        return target
    if target not in classes:
        raise ValueError(f"target {target!r} is neither true, predicted, nor a class of the "
                         f"model {classes}")
    return classes.index(target)


def resolve_target(target: int | str, classes: Sequence[str], diagnosis: str | None = None,
                   predicted: int | None = None, where: str = "") -> int:
    """The class index explained for one image: its ``diagnosis`` (``"true"``), the model's
    ``predicted`` class (``"predicted"``), or a fixed class (name or index).

    ``where`` names the image in errors. Without a ``diagnosis`` (``"true"``) or a
    ``predicted`` class (``"predicted"``) the target cannot be resolved: an error.
    """
    classes = list(classes)
    prefix = f"{where}: " if where else ""
    if target == "predicted":
        if predicted is None:
            raise ValueError(f"{prefix}target 'predicted' needs the model's prediction")
        return int(predicted)
    if target == "true":
        if diagnosis not in classes:
            raise ValueError(f"{prefix}diagnosis {diagnosis!r} is not a class of the model "
                             f"{classes}; explain it with --target predicted or a class")
        return classes.index(diagnosis)
    return class_index(target, classes)
