"""What input sizes a network takes and what it returns: the one rule that tiling, validation and export share.

Every unetlab network declares ``padding`` ('same' or 'valid'), ``size_multiple`` (the product of its
down-sampling strides: sizes it handles without padding inside), ``output_size(n)`` and ``valid_input_size(n)``;
:func:`model_geometry` reads them into one :class:`Geometry`, so no caller guesses from ``depth``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from ..errors import UnetlabError


@dataclass(frozen=True)
class Geometry:
    """Sizes along one spatial axis (the networks treat H and W alike)."""

    padding: str  # 'same': output size = input size; 'valid': the output is smaller by 2 * halo
    size_multiple: int  # tiles and exported sizes step by this; same-padding inputs are padded to it inside
    output_size: Callable[[int], int]
    valid_input_size: Callable[[int], int]  # smallest accepted input size >= n

    @property
    def min_input(self) -> int:
        """The smallest input size the network accepts (one multiple for same padding)."""
        return self.size_multiple if self.padding == "same" else int(self.valid_input_size(1))

    @property
    def halo(self) -> int:
        """Pixels lost on each side of the input (valid padding), 0 for same padding."""
        if self.padding == "same":
            return 0
        n = self.min_input
        return (n - int(self.output_size(n))) // 2


def model_geometry(model: nn.Module) -> Geometry:
    """The :class:`Geometry` a network declares; a network without the declaration is a UnetlabError."""
    missing = [a for a in ("padding", "size_multiple", "output_size", "valid_input_size") if not hasattr(model, a)]
    if missing:
        raise UnetlabError(f"{type(model).__name__} does not declare its input geometry ({', '.join(missing)})",
                           hint="use a network built by unetlab.models.build_model")
    padding = str(model.padding)
    if padding not in ("same", "valid"):
        raise UnetlabError(f"{type(model).__name__} has unknown padding {padding!r} (same or valid)")
    return Geometry(padding, int(model.size_multiple), model.output_size, model.valid_input_size)


__all__ = ["Geometry", "model_geometry"]
