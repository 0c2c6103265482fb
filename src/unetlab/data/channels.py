"""Channel selection and channel loading codes, applied to each (C, H, W) image as it is loaded.

``DataConfig.channels`` (e.g. ``[0, 2]``) first keeps those channels, in that order. ``DataConfig.channel_code``
then builds the model's input channels from the result, one comma-separated term per output channel:

=====================  ================================================================================
term                   output channel
=====================  ================================================================================
``2``                  channel 2 as it is
``2?0.3``              channel 2, replaced by zeros with probability 0.3 (channel dropout)
``rand(0,1,3)``        one of channels 0, 1, 3 picked at random for each sample
``max(0,1)``           the pixel-wise maximum of channels 0 and 1 (merge)
``mean(0,1)``          the pixel-wise mean of channels 0 and 1 (merge)
``mean(0?0.5,1?0.5)``  merge with per-channel dropout: each input is left out with probability 0.5
                       (the mean/max of the ones kept; zeros if none is kept)
``max(0,1)?0.2``       a ``?p`` after any term drops the whole output channel with probability p
=====================  ================================================================================

Example: ``channel_code: "rand(0,1),2?0.2,max(3?0.5,4?0.5)"`` turns a 5-channel image into 3 input channels: a
random one of the first two, channel 2 dropped one time in five, and the maximum of channels 3 and 4 where each
is left out half of the time. Spaces are ignored.

At inference (``rng=None``) everything is deterministic: no dropout, and ``rand(...)`` becomes the mean of its
channels. Dropped channels are zeros, so apply codes after normalisation (zero = the low percentile).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from ..config import DataConfig
from ..errors import UnetlabError

_FUNCS = ("rand", "max", "mean")
_NUM = r"(?:\d+(?:\.\d*)?|\.\d+)"
_ARG = re.compile(rf"^(\d+)(?:\?({_NUM}))?$")
_TERM = re.compile(rf"^(?:(\d+)|({'|'.join(_FUNCS)})\(([^()]*)\))(?:\?({_NUM}))?$")


@dataclass(frozen=True)
class ChannelTerm:
    """One output channel of a loading code: ``op`` over ``inputs`` ((channel, dropout p) pairs), then ``drop``."""

    op: str  # "take" | "rand" | "max" | "mean"
    inputs: tuple[tuple[int, float], ...]
    drop: float = 0.0


def _prob(text: str | None, code: str) -> float:
    if text is None:
        return 0.0
    p = float(text)
    if not 0.0 <= p <= 1.0:
        raise UnetlabError(f"channel code {code!r}: probability {text} is not between 0 and 1")
    return p


def _split_top(code: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in code:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth < 0:
                raise UnetlabError(f"channel code {code!r}: unbalanced ')'")
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if depth:
        raise UnetlabError(f"channel code {code!r}: unbalanced '('")
    return parts + [cur]


@lru_cache(maxsize=64)
def parse_channel_code(code: str) -> tuple[ChannelTerm, ...]:
    """Parse a loading code (see the module docstring) into one :class:`ChannelTerm` per output channel."""
    if re.search(r"\d\s+\d", code or ""):  # '0 1' is not channel 1 nor channel 01
        raise UnetlabError(f"channel code {code!r}: separate channels with commas, e.g. "
                           f"{','.join((code or '').split())!r}")
    text = re.sub(r"\s+", "", code or "")
    if not text:
        raise UnetlabError("empty channel code")
    terms = []
    for part in _split_top(text):
        m = _TERM.match(part)
        if not m:
            raise UnetlabError(
                f"channel code {code!r}: cannot read term {part!r}",
                hint="terms are N, N?p, rand(a,b,...), max(a,b,...), mean(a,b?p,...), each optionally followed by ?p",
            )
        index, func, args, drop = m.groups()
        if index is not None:
            terms.append(ChannelTerm("take", ((int(index), 0.0),), _prob(drop, code)))
            continue
        inputs = []
        for a in args.split(","):
            am = _ARG.match(a)
            if not am:
                raise UnetlabError(f"channel code {code!r}: cannot read channel {a!r} in {func}(...)")
            inputs.append((int(am.group(1)), _prob(am.group(2), code)))
        terms.append(ChannelTerm(func, tuple(inputs), _prob(drop, code)))
    return tuple(terms)


def channels_out(in_channels: int, cfg: DataConfig) -> int:
    """How many channels :func:`apply_channels` produces from images of ``in_channels`` (the model's in_channels)."""
    n = in_channels
    if cfg.channels:
        bad = [c for c in cfg.channels if not 0 <= c < in_channels]
        if bad:
            raise UnetlabError(f"channel {bad[0]} in channels {cfg.channels} is out of range: images have "
                               f"{in_channels} channels (0..{in_channels - 1})")
        n = len(cfg.channels)
    if cfg.channel_code:
        terms = parse_channel_code(cfg.channel_code)
        bad = [i for t in terms for i, _ in t.inputs if i >= n]
        if bad:
            raise UnetlabError(f"channel {bad[0]} in channel_code {cfg.channel_code!r} is out of range: "
                               f"{n} channels are available (0..{n - 1})")
        n = len(terms)
    return n


def _merge(image: np.ndarray, term: ChannelTerm, rng: np.random.Generator | None) -> np.ndarray:
    idx = [i for i, p in term.inputs if rng is None or p == 0.0 or rng.random() >= p]
    if not idx:
        return np.zeros(image.shape[1:], dtype=image.dtype)
    if term.op == "take":
        return image[idx[0]]
    if term.op == "rand":
        if rng is None:
            return image[idx].mean(axis=0).astype(image.dtype, copy=False)
        return image[idx[int(rng.integers(len(idx)))]]
    if term.op == "max":
        return image[idx].max(axis=0)
    return image[idx].mean(axis=0).astype(image.dtype, copy=False)


def apply_channels(image: np.ndarray, cfg: DataConfig, rng: np.random.Generator | None,
                   source: str | Path | None = None) -> np.ndarray:
    """Apply ``cfg.channels`` then ``cfg.channel_code`` to a (C, H, W) image; ``rng=None`` is deterministic.

    ``source`` (the image file or sample name) is named in the error when a channel index is out of range.
    """
    if not cfg.channels and not cfg.channel_code:
        return image
    if image.ndim != 3:
        raise UnetlabError(f"expected a (C, H, W) image, got shape {image.shape}", source)
    c = image.shape[0]
    if cfg.channels:
        bad = [i for i in cfg.channels if not 0 <= i < c]
        if bad:
            raise UnetlabError(f"channel {bad[0]} requested (channels {cfg.channels}) but the image has {c} "
                               f"channel{'s' * (c != 1)}", source)
        image = image[list(cfg.channels)]
    if not cfg.channel_code:
        return image
    terms = parse_channel_code(cfg.channel_code)
    c = image.shape[0]
    bad = [i for t in terms for i, _ in t.inputs if i >= c]
    if bad:
        raise UnetlabError(f"channel {bad[0]} used in channel_code {cfg.channel_code!r} but the image has {c} "
                           f"channel{'s' * (c != 1)}" + (" after the channels selection" if cfg.channels else ""),
                           source)
    out = []
    for t in terms:
        ch = _merge(image, t, rng)
        if rng is not None and t.drop > 0.0 and rng.random() < t.drop:
            ch = np.zeros_like(ch)
        out.append(ch)
    return np.stack(out)
