"""Every training method by name: ``hnet`` (the paper's) and the baselines.

``TrainConfig.method`` picks one; :func:`make_method` builds it for the tasks about to be trained,
continuing an existing :class:`~hnet_serve.model.HNetModel` (add-task) where the method can.
"""

from __future__ import annotations

from collections.abc import Callable

from hnet_serve.errors import ConfigError
from hnet_serve.model import HNetModel
from hnet_serve.training.config import TrainConfig
from hnet_serve.training.data import TaskData
from hnet_serve.training.methods.base import ContinualMethod
from hnet_serve.training.methods.baselines import BASELINES, baseline_factory
from hnet_serve.training.methods.hnet import HNetMethod, build_model

MethodFactory = Callable[[TrainConfig, list[TaskData], "HNetModel | None"], ContinualMethod]


def _hnet(config: TrainConfig, tasks: list[TaskData], model: HNetModel | None) -> ContinualMethod:
    return HNetMethod(model or build_model(config, tasks), config)


METHODS: dict[str, MethodFactory] = {
    "hnet": _hnet,
    **{name: baseline_factory(name) for name in BASELINES},
}


def make_method(
    config: TrainConfig, tasks: list[TaskData], model: HNetModel | None = None
) -> ContinualMethod:
    """The learner for ``config.method``; ``model`` is an existing model to continue, or None."""
    factory = METHODS.get(config.method)
    if factory is None:
        raise ConfigError(
            f"unknown training method {config.method!r} (available: {', '.join(sorted(METHODS))})"
        )
    return factory(config, tasks, model)
