"""Training: recipes (config), the accelerate loop, checkpoints, method objectives."""

from lmdistill.train.config import TrainConfig, load_config
from lmdistill.train.trainer import TrainingError, train

__all__ = ["TrainConfig", "TrainingError", "load_config", "train"]
