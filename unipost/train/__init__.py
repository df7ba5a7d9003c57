"""unipost.train: one Trainer for every recipe, typed configs, checkpoints, metrics, the main job."""

from unipost.train.config import (
    EnvConfig,
    EvalConfig,
    ModelConfig,
    OptimConfig,
    RolloutConfig,
    TeacherConfig,
    TrainConfig,
    WarmStartConfig,
)
from unipost.train.trainer import ConfigError, Trainer, train

__all__ = [
    "ConfigError",
    "EnvConfig",
    "EvalConfig",
    "ModelConfig",
    "OptimConfig",
    "RolloutConfig",
    "TeacherConfig",
    "TrainConfig",
    "Trainer",
    "WarmStartConfig",
    "train",
]
