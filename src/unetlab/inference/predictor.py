"""Load a trained run and predict images of any size: tiled, batched, fast on CPU, streaming for huge images."""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..data.channels import apply_channels
from ..data.io import normalize
from ..errors import UnetlabError
from ..runfolder import Run
from .tiling import PredictFn, count_tiles, iter_tile_rows, model_tiling

log = logging.getLogger(__name__)


def cpu_supports_bf16() -> bool:
    """True when the CPU has native bf16 instructions (AVX512-BF16 or AMX), where bf16 autocast is fast."""
    return _cpu_flags_bf16()


@lru_cache(maxsize=1)
def _cpu_flags_bf16() -> bool:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in text or " amx_bf16" in text


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device`` (None = fp32); 'auto' picks bf16/fp16 where it pays."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if precision != "auto":
        raise UnetlabError(f"unknown precision '{precision}' (choose auto, fp32, bf16 or fp16)")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if device.type == "cpu" and cpu_supports_bf16() else None


def _dihedral(x: torch.Tensor, k: int, inverse: bool = False) -> torch.Tensor:
    """The k-th of the 8 flips/rotations of the last two axes (or its inverse)."""
    rot, flip = k % 4, k >= 4
    if not inverse:
        if flip:
            x = x.flip(-1)
        return torch.rot90(x, rot, (-2, -1))
    x = torch.rot90(x, -rot, (-2, -1))
    return x.flip(-1) if flip else x


def _rot90_vectors(v: torch.Tensor, turns: int) -> torch.Tensor:
    """Vector components (..., 2, H, W) as (dy, dx) after ``torch.rot90(., turns, (-2, -1))`` of the image:
    each quarter turn maps (dy, dx) to (-dx, dy)."""
    dy, dx = v[..., 0:1, :, :], v[..., 1:2, :, :]
    for _ in range(turns % 4):
        dy, dx = -dx, dy
    return torch.cat([dy, dx], dim=-3)


def dihedral_vectors(v: torch.Tensor, k: int, inverse: bool = False) -> torch.Tensor:
    """:func:`_dihedral` of a vector field (..., 2, H, W) of (dy, dx): the pixels move and the vectors turn."""
    rot, flip = k % 4, k >= 4
    if not inverse:
        if flip:
            v = torch.cat([v[..., 0:1, :, :], -v[..., 1:2, :, :]], dim=-3).flip(-1)
        return _rot90_vectors(torch.rot90(v, rot, (-2, -1)), rot)
    v = _rot90_vectors(torch.rot90(v, -rot, (-2, -1)), -rot)
    if flip:
        v = torch.cat([v[..., 0:1, :, :], -v[..., 1:2, :, :]], dim=-3).flip(-1)
    return v


def make_predict_fn(
    model: nn.Module,
    activation: str,
    device: torch.device,
    precision: str = "auto",
    channels_last: bool = True,
    fuse: bool = True,
    tta: bool | list[int] = False,
    compile: bool = False,
    vectors: tuple[int, int] | None = None,
) -> PredictFn:
    """A function (B, C, H, W) numpy -> probabilities on ``device``: eval, BN folded, channels-last, autocast, TTA.

    ``vectors``: the output channels (dy, dx) that hold a vector field encoded as ``(v + 1) / 2`` (flow target),
    which TTA turns back with the image."""
    from ..models import fuse_batchnorm

    net = fuse_batchnorm(model) if fuse else copy.deepcopy(model)  # a copy: the caller's model stays as it is
    net = net.eval().to(device)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    if compile:
        net = torch.compile(net, dynamic=False)
    dtype = resolve_precision(precision, device)
    transforms = tta_transforms(tta)
    pin = device.type == "cuda"

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            y = net(x)
        return activate(y, activation)

    def predict(batch: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(batch)
        if pin:
            x = x.pin_memory()
        x = x.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            return tta_average(run, x, transforms, vectors)

    return predict


def activate(logits: torch.Tensor, activation: str) -> torch.Tensor:
    """Probabilities (float32) from a network's logits: sigmoid, or softmax over the channels."""
    y = logits.float()
    return torch.sigmoid(y) if activation == "sigmoid" else torch.softmax(y, dim=1)


def tta_transforms(tta: bool | list[int]) -> list[int]:
    """The dihedral transforms ``--tta`` asks for: all 8, the listed ones, or only the identity ([0])."""
    return list(range(8)) if tta is True else (list(tta) if tta else [0])


def tta_average(run: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, transforms: list[int],
                vectors: tuple[int, int] | None = None) -> torch.Tensor:
    """The one test-time augmentation rule: the mean of ``run`` (a batch -> probabilities) over the transformed
    inputs, each output turned back; a non-square batch uses only the transforms that keep its shape.
    ``vectors``: the output channels (dy, dx) of a vector field encoded as ``(v + 1) / 2``, turned too."""
    if transforms == [0]:
        return run(x)
    square = x.shape[-1] == x.shape[-2]
    ks = [k for k in transforms if square or k % 2 == 0]
    acc = None
    for k in ks:
        if vectors is not None and k:
            raw, a, b = run(_dihedral(x, k)), vectors[0], vectors[1] + 1
            y = _dihedral(raw, k, inverse=True)
            y[:, a:b] = (dihedral_vectors(raw[:, a:b] * 2 - 1, k, inverse=True) + 1) / 2
        else:
            y = _dihedral(run(_dihedral(x, k)), k, inverse=True)
        acc = y if acc is None else acc + y
    return acc / len(ks)


def check_channels(got: int, image_channels: int, want: int, data, source: str | Path | None) -> None:
    """One line when the channels chosen from an image (``data``'s selection) are not as many as the model takes."""
    if got == want:
        return
    how = (f"channel code {data.channel_code}" if data.channel_code else
           f"--channels {','.join(map(str, data.channels))}" if data.channels else None)
    said = (f"{how} selects {got} of this image's {image_channels}" if how else f"this image has {image_channels}")
    raise UnetlabError(f"the model takes {want} input channel(s), but {said}", source, "choose the channels with "
                       "--channels, convert the image, or predict it with a model trained on such images")


def _onnx_predict_fn(run: Run, path: Path, device: torch.device, precision: str, tta: bool | list[int],
                     compile: bool) -> tuple[PredictFn, str]:
    """The predict function of an exported ONNX file through onnxruntime (CUDA provider on a CUDA device),
    with the same TTA rule as PyTorch; returns it and the precision it runs at. What onnxruntime cannot do
    (autocast to bf16/fp16, torch.compile) is a one-line error naming the fix."""
    from .export import load_onnx

    if precision not in ("auto", "fp32"):
        raise UnetlabError(f"--precision {precision} with --backend onnx: onnxruntime runs the exported model in "
                           "fp32", path, "use --precision fp32 (or auto), or --backend torch for bf16/fp16")
    if compile:
        raise UnetlabError("--compile compiles the PyTorch network; it does nothing with --backend onnx", path,
                           "leave out --compile, or use --backend torch")
    fn = load_onnx(path, str(device))
    act, transforms = run.activation, tta_transforms(tta)
    vectors = (1, 2) if run.info.get("target") == "flow" else None

    def predict(batch: np.ndarray) -> torch.Tensor:
        with torch.inference_mode():
            return tta_average(lambda x: activate(fn(x), act), torch.from_numpy(batch), transforms, vectors)

    return predict, "fp32"


def onnx_device(device: str | torch.device) -> torch.device:
    """The device onnxruntime runs on: 'auto' is CUDA when both PyTorch and onnxruntime have it, else the CPU."""
    if str(device) != "auto":
        return device if isinstance(device, torch.device) else torch.device(str(device))
    try:
        import onnxruntime as ort
    except ImportError:
        return torch.device("cpu")
    cuda = torch.cuda.is_available() and "CUDAExecutionProvider" in ort.get_available_providers()
    return torch.device("cuda") if cuda else torch.device("cpu")


def precision_name(dtype: torch.dtype | None) -> str:
    """'fp32', 'bf16' or 'fp16' for an autocast dtype from :func:`resolve_precision` (None = fp32)."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")  # type: ignore[arg-type]


@dataclass
class Predictor:
    """Everything to turn a raw image into probabilities with one run: built once, used for many images."""

    run: Run
    device: torch.device
    tile: int = 512
    overlap: float = 0.25
    batch_size: int = 4
    margin: int = 0
    predict_fn: PredictFn | None = None
    precision: str = "fp32"  # the precision predict_fn runs at: fp32, bf16 or fp16

    @classmethod
    def from_run(
        cls,
        run: Run,
        device: str | torch.device = "auto",
        precision: str = "auto",
        tile: int = 512,
        overlap: float = 0.25,
        batch_size: int = 4,
        tta: bool | list[int] = False,
        compile: bool = False,
        margin: int = 0,
        backend: str = "torch",
        onnx_path: str | Path | None = None,
    ) -> Predictor:
        """Build the predict function for ``run`` (torch, or an exported ONNX model through onnxruntime)."""
        from .._runtime import resolve_device

        if backend == "onnx":
            path = Path(onnx_path) if onnx_path else (run.path / "model.onnx")
            predict, used = _onnx_predict_fn(run, path, onnx_device(device), precision, tta, compile)
            dev = torch.device("cpu")  # onnxruntime takes and gives host arrays, whichever provider runs it
        elif backend == "torch":
            dev = resolve_device(str(device)) if not isinstance(device, torch.device) else device
            vectors = (1, 2) if run.info.get("target") == "flow" else None
            predict = make_predict_fn(run.model, run.activation, dev, precision, tta=tta, compile=compile,
                                      vectors=vectors)
            used = precision_name(resolve_precision(precision, dev))
        else:
            raise UnetlabError(f"unknown backend '{backend}' (choose torch or onnx)")
        return cls(run, dev, tile, overlap, batch_size, margin, predict, used)

    def _geometry(self) -> dict:
        return model_tiling(self.run.model, self.tile, self.overlap, self.margin)

    def prepare(self, image: np.ndarray, source: str | Path | None = None) -> np.ndarray:
        """Normalise and select channels of a raw (C, H, W) image as training did; checks the channel count."""
        cfg = self.run.config.data
        img = normalize(image, cfg.normalization, cfg.norm_low, cfg.norm_high)
        img = apply_channels(img, cfg, None, source=source)
        check_channels(img.shape[0], image.shape[0], int(self.run.info["in_channels"]), cfg, source)
        return img

    def n_tiles(self, shape: tuple[int, int]) -> int:
        """Number of tiles one image of ``shape`` needs."""
        g = self._geometry()
        return count_tiles(shape, g["tile"], g["overlap"], g["align"], g["margin"], g["output_size"],
                           g["valid_input_size"])

    def predict_prepared(self, image: np.ndarray, progress: Callable[[int], None] | None = None) -> np.ndarray:
        """Probabilities (K, H, W) float32 for an already normalised (C, H, W) image."""
        bands = [
            b.cpu()
            for _y0, _y1, b in iter_tile_rows(
                self.predict_fn, image, self.run.out_channels, batch_size=self.batch_size, device=self.device,
                progress=progress, **self._geometry()
            )
        ]
        return torch.cat(bands, 1).numpy()

    def predict_stream(self, image, source: str | Path | None = None,
                       progress: Callable[[int], None] | None = None) -> Iterator[tuple[int, int, np.ndarray]]:
        """Yield ``(y0, y1, probabilities (K, y1 - y0, W))`` band by band for a raw (C, H, W) array-like that is
        read lazily (e.g. :class:`~unetlab.inference.streaming.TiffRows`): the normalisation statistics come from
        a strided subsample and are applied to each band as it is read, so memory stays bounded by one band."""
        from .streaming import band_normalizer

        cfg = self.run.config.data
        norm = band_normalizer(image, cfg.normalization, cfg.norm_low, cfg.norm_high)

        def transform(band: np.ndarray) -> np.ndarray:
            return apply_channels(norm(band), cfg, None, source=source)

        got = transform(np.asarray(image[:, :1, :1])).shape[0]
        check_channels(got, image.shape[0], int(self.run.info["in_channels"]), cfg, source)
        for y0, y1, band in iter_tile_rows(
            self.predict_fn, image, self.run.out_channels, batch_size=self.batch_size, device=self.device,
            progress=progress, transform=transform, **self._geometry()
        ):
            yield y0, y1, band.cpu().numpy()

    def predict_image(self, image: np.ndarray, source: str | Path | None = None,
                      progress: Callable[[int], None] | None = None) -> np.ndarray:
        """Probabilities (K, H, W) for a raw (C, H, W) image."""
        return self.predict_prepared(self.prepare(image, source), progress)
