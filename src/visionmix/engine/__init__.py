"""Training and evaluation: one trainer for every registered model, atomic run directories, DDP."""

from visionmix.engine.config import TrainConfig
from visionmix.engine.evaluate import evaluate, plot_confusion
from visionmix.engine.run_files import load_run, read_meta
from visionmix.engine.train import (
    resume_run,
    train,
)

__all__ = ["TrainConfig", "evaluate", "load_run", "plot_confusion",
           "read_meta", "resume_run", "train"]
