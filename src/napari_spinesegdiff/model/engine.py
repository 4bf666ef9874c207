"""CPU inference through ONNX Runtime: the same networks, exported once per checkpoint and cached on disk.

On a CPU, ONNX Runtime runs this project's small U-Nets about 1.4x faster than torch eager (fused convolution
and normalisation kernels; ``benchmarks/bench_cli.py``) and brings its own memory arena and thread pool, so a
run in a worker thread (the napari dock, a Dask worker) is as fast as one on the main thread; under torch
eager, glibc serves the large activations of a non-main thread by ``mmap`` and the run pays millions of page
faults.  CUDA and Apple GPUs stay on torch.

Each network of a checkpoint (the diffusion model's image encoder and denoiser, the baseline presegmenter's
U-Net) is exported with ``torch.onnx`` on first use into :func:`cache_dir`, keyed by the checkpoint's SHA-256,
the export format and the torch version, and written atomically.  A later process with every part cached
never builds the torch network (nor imports MONAI).  A cache folder that cannot be written falls back to an
export held in memory; an unreadable cached file is exported again.

The wrappers take and return torch tensors and pad like the torch networks (:func:`network.denoiser_input`),
so the sampler and the pipeline use them unchanged.
"""

from __future__ import annotations

import importlib.util
import io
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..config import ENGINES
from .network import NetworkConfig, check_image, crop_padding, denoiser_input, pad_to_multiple

#: bump when the exported graphs change: old cache files are then simply not found
EXPORT_FORMAT = 1
_OPSET = 17
_LEVELS = 5  # encoder features at full, 1/2, 1/4, 1/8, 1/16 resolution


class EngineError(RuntimeError):
    """An engine that cannot run here (one sentence)."""


def onnxruntime_available() -> bool:
    """ONNX Runtime and the ``onnx`` package (which torch's exporter needs) are installed."""
    return importlib.util.find_spec("onnxruntime") is not None and importlib.util.find_spec("onnx") is not None


def resolve_engine(name: str, device: torch.device | str) -> str:
    """``"torch"`` or ``"onnxruntime"`` for an engine setting and the resolved device.

    ``auto``: ONNX Runtime on the CPU when it is installed, torch otherwise (and always on a GPU).
    """
    dev = torch.device(device).type
    if name == "torch":
        return "torch"
    if name == "auto":
        return "onnxruntime" if dev == "cpu" and onnxruntime_available() else "torch"
    if name == "onnxruntime":
        if dev != "cpu":
            raise EngineError(f"The onnxruntime engine runs on the CPU only; use --engine torch on {dev}.")
        if not onnxruntime_available():
            raise EngineError("The onnxruntime engine needs the onnxruntime and onnx packages; "
                              "install them or use --engine torch.")
        return "onnxruntime"
    raise EngineError(f"engine must be one of {', '.join(ENGINES)}, got {name!r}.")


def cache_dir() -> Path:
    """``$SPINESEGDIFF_CACHE`` or ``$XDG_CACHE_HOME/spinesegdiff`` (``~/.cache/spinesegdiff``), then ``onnx``."""
    root = os.environ.get("SPINESEGDIFF_CACHE")
    if not root:
        root = str(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "spinesegdiff")
    return Path(root) / "onnx"


def cache_key(sha256: str) -> str:
    """File-name stem of a checkpoint's exported parts."""
    torch_version = torch.__version__.split("+")[0]
    return f"{sha256[:24]}-f{EXPORT_FORMAT}-torch{torch_version}"


# ------------------------------------------------------------------------------------------------ export


class _Denoiser(torch.nn.Module):
    """The denoiser with the five encoder features as separate inputs (ONNX takes no lists)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x, t, e0, e1, e2, e3, e4):  # noqa: D102 - export signature
        return self.model(x, t, [e0, e1, e2, e3, e4])


class _Encoder(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, image):  # noqa: D102 - export signature
        return tuple(self.model(image))


def _spatial(name: str, level: int = 0) -> dict[int, str]:
    return {0: "batch", 2: f"h{level}", 3: f"w{level}"}


def _export(module: torch.nn.Module, args: tuple, inputs: list[str], outputs: list[str],
            axes: dict[str, dict[int, str]]) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer notes on shape checks that padded inputs always pass
        torch.onnx.export(module.eval(), args, buf, input_names=inputs, output_names=outputs,
                          dynamic_axes=axes, opset_version=_OPSET, dynamo=False)
    return buf.getvalue()


def export_encoder(net: torch.nn.Module) -> bytes:
    """ONNX of a :class:`~.network.SpineSegDiffNet`'s image encoder (padded image -> five features)."""
    c = net.config
    image = torch.zeros(1, c.in_channels, 32, 32)
    outs = [f"e{i}" for i in range(_LEVELS)]
    axes = {"image": _spatial("image"), **{n: _spatial(n, i) for i, n in enumerate(outs)}}
    return _export(_Encoder(net.embed_model), (image,), ["image"], outs, axes)


def export_denoiser(net: torch.nn.Module) -> bytes:
    """ONNX of a :class:`~.network.SpineSegDiffNet`'s denoiser (padded [image | x_t], t, five features)."""
    c = net.config
    x = torch.zeros(1, c.in_channels + c.num_classes, 32, 32)
    with torch.no_grad():
        feats = net.embed_model(x[:, : c.in_channels])
    names = [f"e{i}" for i in range(_LEVELS)]
    axes = {"x": _spatial("x"), "t": {0: "batch"}, "logits": _spatial("logits"),
            **{n: _spatial(n, i) for i, n in enumerate(names)}}
    return _export(_Denoiser(net.model), (x, torch.zeros(1, dtype=torch.long), *feats), ["x", "t", *names],
                   ["logits"], axes)


def export_baseline(net: torch.nn.Module) -> bytes:
    """ONNX of a :class:`~.baseline.BaselineNet`'s U-Net (padded image -> logits)."""
    image = torch.zeros(1, net.config.in_channels, 32, 32)
    return _export(net.unet, (image,), ["image"], ["logits"],
                   {"image": _spatial("image"), "logits": _spatial("logits")})


# ----------------------------------------------------------------------------------------------- sessions


def _session(model: bytes | Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, int(threads))
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    # idle pool threads sleep instead of spinning: the same wall time here (benchmarks/bench_cli.py) and the
    # cores stay free for the torch steps between passes, the napari event loop and other batch workers
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    source = str(model) if isinstance(model, Path) else model
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def cached_session(key: str, part: str, export: Callable[[], bytes], threads: int):
    """An ONNX Runtime session for ``part`` of the checkpoint ``key``: from the cache, else exported (and
    written to the cache atomically when the folder is writable)."""
    path = cache_dir() / f"{key}-{part}.onnx"
    if path.is_file():
        try:
            return _session(path, threads)
        except Exception:  # a truncated or foreign file: export again below
            pass
    data = export()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError:
        return _session(data, threads)
    return _session(path, threads)


def is_cached(key: str, parts: Sequence[str]) -> bool:
    return all((cache_dir() / f"{key}-{part}.onnx").is_file() for part in parts)


def _run(session, feeds: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    arrays = {k: v.detach().cpu().contiguous().numpy() for k, v in feeds.items()}
    return [torch.from_numpy(a) for a in session.run(None, arrays)]


# ----------------------------------------------------------------------------------------------- wrappers


class OnnxDiffusion:
    """A :class:`~.network.SpineSegDiffNet` served by ONNX Runtime: ``encode(image)`` and
    ``(x_t, t, image, embeddings)`` -> logits, same shapes, padding and checks."""

    DIFFUSION_PARTS = ("encoder", "denoiser")

    def __init__(self, config: NetworkConfig, encoder, denoiser) -> None:
        self.config = config
        self._encoder, self._denoiser = encoder, denoiser

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    def encode(self, image: torch.Tensor) -> list[torch.Tensor]:
        check_image(self.config, image)
        padded, _ = pad_to_multiple(image.float())
        return _run(self._encoder, {"image": padded})

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor | int, image: torch.Tensor,
                 embeddings: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        x, t, pads = denoiser_input(self.config, x_t.float(), t, image.float(), embeddings)
        if embeddings is None:
            embeddings = _run(self._encoder, {"image": x[:, : self.config.in_channels]})
        feeds = {"x": x, "t": t.to(torch.long), **{f"e{i}": e for i, e in enumerate(embeddings)}}
        return crop_padding(_run(self._denoiser, feeds)[0], pads)


class OnnxBaseline:
    """A :class:`~.baseline.BaselineNet` served by ONNX Runtime: ``(image)`` -> logits."""

    BASELINE_PARTS = ("baseline",)

    def __init__(self, config: NetworkConfig, session) -> None:
        self.config = config
        self._session = session

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        check_image(self.config, image)
        padded, pads = pad_to_multiple(image.float())
        return crop_padding(_run(self._session, {"image": padded})[0], pads)


def onnx_model(path: str | os.PathLike, threads: int) -> tuple[Any, Any]:
    """(wrapper, checkpoint config) of one checkpoint for ONNX Runtime; the torch network is built (and the
    checkpoint fully validated by :func:`~.checkpoint.load_checkpoint`) only when a part must be exported."""
    from .checkpoint import file_sha256, load_checkpoint, read_config

    key = cache_key(file_sha256(path))
    config = read_config(path) if str(path).endswith(".safetensors") else None
    kind = getattr(config, "kind", None)
    parts = OnnxBaseline.BASELINE_PARTS if kind == "baseline" else OnnxDiffusion.DIFFUSION_PARTS
    net = None
    if config is None or not is_cached(key, parts):
        net, config = load_checkpoint(path, map_location="cpu")
        kind = getattr(config, "kind", "diffusion")

    def built() -> torch.nn.Module:  # also when a cached part turns out unreadable
        nonlocal net
        if net is None:
            net = load_checkpoint(path, map_location="cpu")[0]
        return net

    if kind == "baseline":
        session = cached_session(key, "baseline", lambda: export_baseline(built()), threads)
        return OnnxBaseline(config.network, session), config
    encoder = cached_session(key, "encoder", lambda: export_encoder(built()), threads)
    denoiser = cached_session(key, "denoiser", lambda: export_denoiser(built()), threads)
    return OnnxDiffusion(config.network, encoder, denoiser), config
