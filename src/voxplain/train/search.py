"""Paper 1's random search space (2.2.2): what one trial draws and the training settings it gives.

"The hyperparameters explored for the architecture were the number of convolutional blocks, of
filters in the first layer and of convolutional layers in a block, the dimension reduction
strategy (...), the number of fully-connected layers and the dropout rate. Other
hyperparameters such as the learning rate, the weight decay, the batch size (...) were also
part of the search." A trial draws (Optuna names):

- ``blocks``; ``first_channels``, block b having min(first_channels 2^b, max_channels) filters;
- ``convs_block_1`` ... ``convs_block_B``: convolutions of each block, drawn block by block
  (fig. 1 mixes blocks of 1, 2 and 3 convolutions);
- ``reduction`` (one for all blocks), ``fc_layers``, ``dropout`` (uniform);
- ``learning_rate`` and ``weight_decay`` (log-uniform), ``batch_size``.

Works with any Optuna trial (``suggest_int``, ``suggest_float``, ``suggest_categorical``), so
the sampler (random, TPE) is the caller's choice.
"""

from __future__ import annotations

from typing import Any, Protocol

from voxplain.config import SearchSpaceConfig, TrainConfig


class Trial(Protocol):
    """The part of :class:`optuna.trial.Trial` a search space uses."""

    def suggest_int(self, name: str, low: int, high: int) -> int: ...

    def suggest_float(self, name: str, low: float, high: float, *, log: bool = False) -> float: ...

    def suggest_categorical(self, name: str, choices: Any) -> Any: ...


def suggest_settings(trial: Trial, space: SearchSpaceConfig) -> dict[str, Any]:
    """Draw one point of ``space``: the :class:`~voxplain.config.TrainConfig` fields it sets,
    ``model`` holding the :class:`~voxplain.config.ModelConfig` fields of the CNN."""
    blocks = trial.suggest_int("blocks", *space.blocks)
    first = trial.suggest_categorical("first_channels", list(space.first_channels))
    convs = [trial.suggest_int(f"convs_block_{b}", *space.convs_per_block)
             for b in range(1, blocks + 1)]
    model = {
        "channels": [min(first * 2 ** b, space.max_channels) for b in range(blocks)],
        "convs_per_block": convs,
        "reduction": trial.suggest_categorical("reduction", list(space.reduction)),
        "fc_layers": trial.suggest_int("fc_layers", *space.fc_layers),
        "dropout": trial.suggest_float("dropout", *space.dropout),
    }
    return {
        "learning_rate": trial.suggest_float("learning_rate", *space.learning_rate, log=True),
        "weight_decay": trial.suggest_float("weight_decay", *space.weight_decay, log=True),
        "batch_size": trial.suggest_categorical("batch_size", list(space.batch_size)),
        "model": model,
    }


def trial_config(base: TrainConfig, settings: dict[str, Any], **update: Any) -> TrainConfig:
    """The :class:`~voxplain.config.TrainConfig` of a trial: ``base``'s training fields (a
    :class:`~voxplain.config.SearchConfig` loses its search fields) with the drawn
    ``settings`` and ``update`` (e.g. the trial's run folder), validated."""
    values = base.model_dump(include=set(TrainConfig.model_fields))
    values.update({key: value for key, value in settings.items() if key != "model"}, **update)
    values["model"] = {**values["model"], **settings.get("model", {})}
    return TrainConfig.model_validate(values)
