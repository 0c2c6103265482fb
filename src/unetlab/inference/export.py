"""Export a trained network to ONNX or TorchScript with dynamic batch, height and width, and run ONNX files.

ONNX goes through the tracing exporter (sizes traced as tensors, so dynamic; fast; honours the opset) and falls
back to the ``torch.export``-based one (opset >= 18) if that fails; TorchScript through ``torch.jit.script``.
Either way the padding to a multiple of ``2**depth`` stays computed from the input's shape.
Every export is checked against PyTorch on two input sizes before the file is moved into place.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ..errors import UnetlabError
from ..files import atomic_output

log = logging.getLogger(__name__)

FORMATS = ("onnx", "torchscript")
SUFFIXES = {"onnx": ".onnx", "torchscript": ".pt"}
CHECK_SIZES = ((75, 90), (67, 93))  # not multiples of 32, different from each other
TOLERANCE = 1e-4


def export_model(
    model: nn.Module,
    fmt: str,
    out: str | Path,
    in_channels: int,
    opset: int = 17,
    check: bool = True,
    onnx_exporter: str = "auto",
) -> Path:
    """Write ``model`` as ``fmt`` ('onnx' or 'torchscript') to ``out`` atomically; returns the path.

    The file takes inputs of any batch size, height and width (valid-padding models: sizes they accept) and,
    when ``check``, its output is verified against PyTorch within 1e-4 on two odd-sized random inputs.
    ``onnx_exporter``: 'auto' (tracing exporter, torch.export if that fails), 'trace' or 'dynamo'.
    """
    if fmt not in FORMATS:
        raise UnetlabError(f"unknown export format {fmt!r} (known: {', '.join(FORMATS)})")
    model_channels = getattr(model, "in_channels", None)
    if model_channels is not None and int(model_channels) != int(in_channels):
        raise UnetlabError(f"the model takes {model_channels} input channels, not {in_channels}")
    out = Path(out)
    model = copy.deepcopy(model).cpu().float().eval()
    sizes = [_accepted_size(model, h, w) for h, w in CHECK_SIZES]
    example = torch.randn(1, int(in_channels), *sizes[0])
    with atomic_output(out) as tmp:
        try:
            if fmt == "onnx":
                _export_onnx(model, example, tmp, opset, onnx_exporter)
                runner: Callable[[torch.Tensor], torch.Tensor] = load_onnx(tmp)
            else:
                _export_torchscript(model, tmp)
                runner = load_torchscript(tmp)
            if check:
                _check_outputs(model, runner, int(in_channels), sizes, fmt)
        finally:
            Path(f"{tmp}.data").unlink(missing_ok=True)  # external weights, should an exporter write them
    log.info("exported %s model to %s", fmt, out)
    return out


def _accepted_size(model: nn.Module, h: int, w: int) -> tuple[int, int]:
    fit = getattr(model, "valid_input_size", None)
    if fit is None:
        return h, w
    # Valid-padding models need a minimum size; keep the sizes off multiples of 32 where possible.
    return int(fit(h)), int(fit(w))


def _export_onnx(model: nn.Module, example: torch.Tensor, path: Path, opset: int, exporter: str) -> None:
    if exporter not in ("auto", "trace", "dynamo"):
        raise ValueError(f"unknown ONNX exporter {exporter!r} (auto, trace, dynamo)")
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise UnetlabError("ONNX export needs the onnx package", hint="pip install 'unetlab[export]'") from None
    if exporter == "dynamo":
        _export_onnx_dynamo(model, example, path, opset)
    else:
        try:
            _export_onnx_traced(model, example, path, opset)
        except Exception as exc:  # the tracing exporter is deprecated: fall back to torch.export
            if exporter == "trace":
                raise
            log.warning("the tracing ONNX exporter failed (%s: %s); trying the torch.export-based one",
                        type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
            _export_onnx_dynamo(model, example, path, opset)
    _add_onnx_metadata(path, model)


def _export_onnx_traced(model: nn.Module, example: torch.Tensor, path: Path, opset: int) -> None:
    # Sizes are traced as tensors, so the padding to a multiple of 2**depth stays dynamic; fast and any opset.
    axes = {0: "batch", 2: "height", 3: "width"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=opset, input_names=["image"],
                          output_names=["logits"], dynamic_axes={"image": axes, "logits": axes})


def _export_onnx_dynamo(model: nn.Module, example: torch.Tensor, path: Path, opset: int) -> None:
    try:
        import onnxscript  # noqa: F401
    except ImportError:
        raise UnetlabError("ONNX export needs onnxscript", hint="pip install 'unetlab[export]'") from None
    from torch.export import Dim

    dims = {0: Dim.DYNAMIC, 2: Dim.DYNAMIC, 3: Dim.DYNAMIC}
    with warnings.catch_warnings(), _quiet_loggers("torch.onnx", "torch.export", "onnxscript"):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, (example,), dynamo=True, dynamic_shapes=(dims,), input_names=["image"],
                                    output_names=["logits"], opset_version=max(opset, 18), verbose=False)
    program.save(str(path))


def _add_onnx_metadata(path: Path, model: nn.Module) -> None:
    import onnx

    proto = onnx.load(str(path))
    meta = {"producer": "unetlab"}
    for key in ("padding", "depth", "in_channels", "out_channels"):
        if hasattr(model, key):
            meta[key] = str(getattr(model, key))
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(path))


def _export_torchscript(model: nn.Module, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            scripted = torch.jit.script(model)
        except Exception as exc:  # a model that does not script: say which and why, briefly
            raise UnetlabError(f"TorchScript export failed for {type(model).__name__}: "
                               f"{str(exc).strip().splitlines()[0]}", hint="try --format onnx") from exc
        torch.jit.save(scripted, str(path))


@contextlib.contextmanager
def _quiet_loggers(*names: str):
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _check_outputs(model: nn.Module, runner: Callable[[torch.Tensor], torch.Tensor], in_channels: int,
                   sizes: list[tuple[int, int]], fmt: str) -> None:
    gen = torch.Generator().manual_seed(0)
    for batch, (h, w) in zip((1, 2), sizes):
        x = torch.randn(batch, in_channels, h, w, generator=gen)
        with torch.no_grad():
            expected = model(x)
            got = runner(x)
        if tuple(got.shape) != tuple(expected.shape):
            raise RuntimeError(f"{fmt} export gives shape {tuple(got.shape)} for input {tuple(x.shape)}, "
                               f"PyTorch {tuple(expected.shape)}")
        err = float((got - expected).abs().max())
        if err > TOLERANCE:
            raise RuntimeError(f"{fmt} export differs from PyTorch by {err:.2e} on input {tuple(x.shape)}")
        log.debug("%s export matches PyTorch on %s (max abs diff %.2e)", fmt, tuple(x.shape), err)


def load_onnx(path: str | Path, device: str = "cpu") -> Callable[[torch.Tensor], torch.Tensor]:
    """A function running the ONNX file with onnxruntime: ``(N, C, H, W)`` tensor in, logits tensor out."""
    path = Path(path)
    try:
        import onnxruntime as ort
    except ImportError:
        raise UnetlabError("onnxruntime is not installed", path, hint="pip install 'unetlab[export]'") from None
    if not path.is_file():
        raise UnetlabError("ONNX file not found", path, "write it with `unetlab export MODEL --format onnx` and "
                           "give it to predict with --onnx FILE")
    dev = torch.device(device)
    providers: list = ["CPUExecutionProvider"]
    if dev.type == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise UnetlabError(f"onnxruntime has no CUDA support here (providers: "
                               f"{', '.join(ort.get_available_providers())})", path,
                               hint="use --device cpu, or install onnxruntime-gpu for --device cuda")
        providers = [("CUDAExecutionProvider", {"device_id": dev.index or 0}), "CPUExecutionProvider"]
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as exc:
        raise UnetlabError(f"not a loadable ONNX model ({str(exc).splitlines()[0][:200]})", path) from None
    input_name = session.get_inputs()[0].name

    def run(x: torch.Tensor) -> torch.Tensor:
        arr = x.detach().to("cpu", torch.float32).contiguous().numpy()
        y = session.run(None, {input_name: arr})[0]
        return torch.from_numpy(y).to(x.device)

    return run


def load_torchscript(path: str | Path, device: str = "cpu") -> torch.jit.ScriptModule:
    """Load a TorchScript file written by :func:`export_model` (eval mode) on ``device``."""
    path = Path(path)
    if not path.is_file():
        raise UnetlabError("TorchScript file not found", path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            module = torch.jit.load(str(path), map_location=device)
    except Exception as exc:
        raise UnetlabError(f"not a loadable TorchScript model ({str(exc).splitlines()[0][:200]})", path) from None
    return module.eval()


def export_run(run_dir: str | Path, fmt: str, out: str | Path | None = None, overwrite: bool = False,
               opset: int = 17) -> Path:
    """Export the model of a run folder (``unetlab export``); ``out`` defaults to ``RUN_DIR/model.onnx|.pt``."""
    if fmt not in FORMATS:
        raise UnetlabError(f"unknown export format {fmt!r} (known: {', '.join(FORMATS)})")
    from ..runfolder import is_pretrained, resolve_run_dir

    if out is None:  # beside the run, or for a shipped pretrained model in the working folder, never the package
        out = Path(f"{run_dir}{SUFFIXES[fmt]}") if is_pretrained(run_dir) else Path(run_dir) / f"model{SUFFIXES[fmt]}"
    run_dir, out = resolve_run_dir(run_dir), Path(out)
    if out.exists() and not overwrite:
        raise UnetlabError("output file exists", out, hint="pass --overwrite to replace it")
    from ..runfolder import load_run

    run = load_run(run_dir)
    model = run.model
    in_channels = getattr(model, "in_channels", None) or run.config.model.in_channels
    if not in_channels:
        raise UnetlabError("cannot tell the model's number of input channels", run_dir)
    return export_model(model, fmt, out, int(in_channels), opset=opset)
