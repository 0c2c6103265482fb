"""evaluation stage: pixel and object metrics, and comparing prediction folders with ground truth."""

from .evaluate import evaluate, format_summary
from .metrics import (
    adapted_rand_error,
    batch_dice_counts,
    dice_from_counts,
    dice_per_class,
    match_objects,
    pixel_metrics,
)

__all__ = [
    "adapted_rand_error",
    "batch_dice_counts",
    "dice_from_counts",
    "dice_per_class",
    "evaluate",
    "format_summary",
    "match_objects",
    "pixel_metrics",
]
