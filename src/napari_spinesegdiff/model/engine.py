"""CPU inference through OpenVINO or ONNX Runtime: the same networks, exported once per checkpoint to ONNX and
cached on disk.

On a CPU, ONNX Runtime runs this project's small U-Nets about 1.4x faster than torch eager (fused convolution
and normalisation kernels; ``benchmarks/bench_cli.py``) and brings its own memory arena and thread pool, so a
run in a worker thread (the napari dock, a Dask worker) is as fast as one on the main thread; under torch
eager, glibc serves the large activations of a non-main thread by ``mmap`` and the run pays millions of page
faults.  OpenVINO compiles the same ONNX files and, on a CPU with bfloat16 instructions (AVX-512 BF16 or
AMX), runs them in bfloat16 with float32 accumulation: a denoiser pass about 1.45x faster again than ONNX
Runtime, with validation Dice unchanged to 4e-4 (README, Speed).  Where the CPU has no bfloat16 instructions
OpenVINO runs float32.  ``auto`` takes OpenVINO, then ONNX Runtime, then torch, whichever is installed first.
CUDA and Apple GPUs stay on torch.

Each network of a checkpoint (the diffusion model's image encoder and denoiser, the baseline presegmenter's
U-Net) is exported with ``torch.onnx`` on first use into :func:`cache_dir`, keyed by the checkpoint's SHA-256,
the export format and the torch version, and written atomically.  A later process with every part cached
never builds the torch network (nor imports MONAI).  A cache folder that cannot be written falls back to an
export held in memory; an unreadable cached file is exported again.

The wrappers take and return torch tensors and pad like the torch networks (:func:`network.denoiser_input`),
so the sampler and the pipeline use them unchanged.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import tempfile
import threading
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


#: the engines that serve the exported ONNX files, in the order ``auto`` prefers them
RUNTIMES = ("openvino", "onnxruntime")


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def onnxruntime_available() -> bool:
    """ONNX Runtime and the ``onnx`` package (which torch's exporter needs) are installed."""
    return _installed("onnxruntime") and _installed("onnx")


def openvino_available() -> bool:
    """OpenVINO and the ``onnx`` package (which torch's exporter needs) are installed."""
    return _installed("openvino") and _installed("onnx")


def _available(runtime: str) -> bool:
    return openvino_available() if runtime == "openvino" else onnxruntime_available()


def resolve_engine(name: str, device: torch.device | str) -> str:
    """``"torch"``, ``"openvino"`` or ``"onnxruntime"`` for an engine setting and the resolved device.

    ``auto``: on the CPU OpenVINO, else ONNX Runtime, whichever is installed, torch otherwise; always torch
    on a GPU.
    """
    dev = torch.device(device).type
    if name == "torch":
        return "torch"
    if name == "auto":
        if dev == "cpu":
            for runtime in RUNTIMES:
                if _available(runtime):
                    return runtime
        return "torch"
    if name in RUNTIMES:
        if dev != "cpu":
            raise EngineError(f"The {name} engine runs on the CPU only; use --engine torch on {dev}.")
        if not _available(name):
            raise EngineError(f"The {name} engine needs the {name} and onnx packages; "
                              "install them or use --engine torch.")
        return name
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


class _OpenVinoSession:
    """An OpenVINO model compiled for the CPU, with ONNX Runtime's ``run(None, feeds) -> [arrays]``.

    Precision is OpenVINO's CPU default: bfloat16 where the CPU has bfloat16 instructions, float32 otherwise
    (:attr:`precision`, ``"bf16"`` or ``"f32"``).  Cores are not pinned (napari's GUI thread and batch workers share
    them).  Each call takes an idle infer request from a small pool (one request must not run in two threads at
    once); the requests belong to the session, not to a thread: a thread-local request died with its thread inside
    Python's thread-state teardown, where OpenVINO's destructor crashed the process (a napari worker thread).  A
    model read from a file is compiled through OpenVINO's own cache (``openvino/`` beside the ONNX files, keyed by
    the model, the settings and OpenVINO's version), which cuts the compile time of the three networks from about
    0.4 s to 0.1 s.  Processes sharing the cache (batch and Dask workers starting together) compile one at a time
    under a lock file: OpenVINO's cache is not safe across processes (one worker's compile failed with "cannot set
    permissions: No such file or directory [...blob]" while another rewrote it), and a compile that fails through
    the cache is done again without it."""

    def __init__(self, model: bytes | Path, threads: int) -> None:
        import openvino as ov

        core = ov.Core()
        settings: dict[str, Any] = {
            "INFERENCE_NUM_THREADS": max(1, int(threads)),
            "PERFORMANCE_HINT": "LATENCY",
            "ENABLE_CPU_PINNING": False,
        }
        if isinstance(model, Path):
            blobs = model.parent / "openvino"
            try:
                blobs.mkdir(exist_ok=True)
                writable = os.access(blobs, os.W_OK)
            except OSError:
                writable = False
            compiled = None
            if writable:
                try:
                    with _file_lock(blobs / ".lock"):
                        compiled = core.compile_model(str(model), "CPU", {**settings, "CACHE_DIR": str(blobs)})
                except Exception:  # noqa: BLE001 - a cache another process broke: compile without it below
                    pass
            self._compiled = compiled if compiled is not None else core.compile_model(str(model), "CPU", settings)
        else:
            self._compiled = core.compile_model(core.read_model(model, b""), "CPU", settings)
        hint = str(self._compiled.get_property("INFERENCE_PRECISION_HINT")).lower()
        self.precision = "bf16" if "bf" in hint else "f32"
        self._outputs = list(self._compiled.outputs)
        self._idle: list[Any] = []
        self._lock = threading.Lock()

    def run(self, _names, feeds: dict[str, Any]) -> list[Any]:
        with self._lock:
            request = self._idle.pop() if self._idle else self._compiled.create_infer_request()
        try:
            # inputs read in place; outputs copied, as the request reuses its buffers on the next call
            result = request.infer(feeds, share_inputs=True, share_outputs=False)
            return [result[o] for o in self._outputs]
        finally:
            with self._lock:
                self._idle.append(request)


@contextlib.contextmanager
def _file_lock(path: Path):
    """An exclusive lock on ``path`` shared by processes (``fcntl.flock``; released when the file closes, also
    when a process dies holding it).  Where there is no ``fcntl`` (Windows) or the file cannot be opened, no
    lock: the caller copes with a failure."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    try:
        fh = open(path, "a+b")
    except OSError:
        yield
        return
    with fh:  # closing the file releases the lock
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        yield


def _session(model: bytes | Path, threads: int, runtime: str = "onnxruntime"):
    if runtime == "openvino":
        return _OpenVinoSession(model, threads)
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


def cached_session(key: str, part: str, export: Callable[[], bytes], threads: int,
                   runtime: str = "onnxruntime"):
    """A session of ``runtime`` (ONNX Runtime or OpenVINO) for ``part`` of the checkpoint ``key``: from the
    cache, else exported (and written to the cache atomically when the folder is writable)."""
    path = cache_dir() / f"{key}-{part}.onnx"
    if path.is_file():
        try:
            return _session(path, threads, runtime)
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
        return _session(data, threads, runtime)
    return _session(path, threads, runtime)


def is_cached(key: str, parts: Sequence[str]) -> bool:
    return all((cache_dir() / f"{key}-{part}.onnx").is_file() for part in parts)


def _run(session, feeds: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    arrays = {k: v.detach().cpu().contiguous().numpy() for k, v in feeds.items()}
    return [torch.from_numpy(a) for a in session.run(None, arrays)]


# ----------------------------------------------------------------------------------------------- wrappers


def precision(session) -> str:
    """The arithmetic a session runs in: ``"bf16"`` or ``"f32"`` (ONNX Runtime's CPU sessions: float32)."""
    return getattr(session, "precision", "f32")


class OnnxDiffusion:
    """A :class:`~.network.SpineSegDiffNet` served by ONNX Runtime or OpenVINO: ``encode(image)`` and
    ``(x_t, t, image, embeddings)`` -> logits, same shapes, padding and checks."""

    DIFFUSION_PARTS = ("encoder", "denoiser")

    def __init__(self, config: NetworkConfig, encoder, denoiser) -> None:
        self.config = config
        self._encoder, self._denoiser = encoder, denoiser

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    @property
    def precision(self) -> str:
        return precision(self._denoiser)

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
    """A :class:`~.baseline.BaselineNet` served by ONNX Runtime or OpenVINO: ``(image)`` -> logits."""

    BASELINE_PARTS = ("baseline",)

    def __init__(self, config: NetworkConfig, session) -> None:
        self.config = config
        self._session = session

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    @property
    def precision(self) -> str:
        return precision(self._session)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        check_image(self.config, image)
        padded, pads = pad_to_multiple(image.float())
        return crop_padding(_run(self._session, {"image": padded})[0], pads)


def onnx_model(path: str | os.PathLike, threads: int, runtime: str = "onnxruntime") -> tuple[Any, Any]:
    """(wrapper, checkpoint config) of one checkpoint for ``runtime`` (``"onnxruntime"`` or ``"openvino"``,
    which share the cached ONNX files); the torch network is built (and the checkpoint fully validated by
    :func:`~.checkpoint.load_checkpoint`) only when a part must be exported."""
    if runtime not in RUNTIMES:
        raise EngineError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}.")
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
        session = cached_session(key, "baseline", lambda: export_baseline(built()), threads, runtime)
        return OnnxBaseline(config.network, session), config
    encoder = cached_session(key, "encoder", lambda: export_encoder(built()), threads, runtime)
    denoiser = cached_session(key, "denoiser", lambda: export_denoiser(built()), threads, runtime)
    return OnnxDiffusion(config.network, encoder, denoiser), config
