"""Training: recipes (config), sequence sources (policies), the accelerate loop, checkpoints."""

from lmdistill.train.config import TrainConfig
from lmdistill.train.recipes import config_yaml, load_config
from lmdistill.train.trainer import Callback, TrainingError, train

__all__ = ["Callback", "TrainConfig", "TrainingError", "config_yaml", "load_config", "train"]
