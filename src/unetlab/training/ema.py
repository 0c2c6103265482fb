"""An exponential moving average of the weights (``--ema DECAY``), as timm's ModelEmaV2 and YOLO keep one.

The average follows the trained network after every optimiser step, ``avg = d * avg + (1 - d) * weights``, with the
decay ramped up over the first steps, ``d = min(DECAY, (1 + n) / (10 + n))`` after n updates (TensorFlow's
ExponentialMovingAverage with num_updates), so that the average of the early, random weights fades quickly. BatchNorm running statistics are averaged alike; integer buffers
(``num_batches_tracked``) are copied. When it is on, validation, the best checkpoint (so tuning, the size model,
the test split and ``predict``) use the averaged weights; training goes on with the raw ones.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import UnetlabError


@dataclass
class WeightAverage:
    """The averaged copy of a network (``model``, in eval mode, no gradients) and how many updates it has seen."""

    model: nn.Module
    decay: float
    updates: int = 0

    def update(self, live: nn.Module) -> None:
        """Move the average towards ``live``'s current weights (after an optimiser step)."""
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        with torch.no_grad():
            avg, now = self.model.state_dict(), live.state_dict()
            floats = [k for k, v in avg.items() if v.is_floating_point()]
            torch._foreach_lerp_([avg[k] for k in floats], [now[k].detach() for k in floats], 1.0 - d)
            for k, v in avg.items():
                if not v.is_floating_point():
                    v.copy_(now[k])
        self.updates += 1

    def reset(self, live: nn.Module) -> None:
        """Start the average again from ``live``'s weights (after the collapse guard restored an earlier state)."""
        self.model.load_state_dict(live.state_dict())
        self.updates = 0

    def state_dict(self) -> dict:
        """What a checkpoint keeps to resume the average exactly."""
        return {"model": self.model.state_dict(), "updates": self.updates}

    def resume(self, state: dict | None, live: nn.Module) -> None:
        """Continue from :meth:`state_dict`, or start at ``live``'s weights when the checkpoint has none (written
        without --ema)."""
        if state is None:
            self.reset(live)
        else:
            self.model.load_state_dict(state["model"])
            self.updates = int(state["updates"])


def weight_average(model: nn.Module, decay: float) -> WeightAverage | None:
    """The weight average of ``model`` for ``--ema decay`` (None when 0: off); a decay outside [0, 1) is one error."""
    if not 0.0 <= decay < 1.0:
        raise UnetlabError(f"--ema must be in [0, 1) (0: off; 0.999 is usual), not {decay}")
    if decay == 0.0:
        return None
    avg = copy.deepcopy(model).eval()
    for p in avg.parameters():
        p.requires_grad_(False)
    return WeightAverage(avg, decay)


__all__ = ["WeightAverage", "weight_average"]
