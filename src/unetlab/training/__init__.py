"""Training: the loop, losses, weight maps, schedules and the workbench tools."""

from .trainer import TrainResult, train

__all__ = ["TrainResult", "train"]
