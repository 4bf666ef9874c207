"""What runs in the dock's worker threads: the preload of the models (loaded, then run once on the chosen
scan), the pipeline generator (each step inside ``torch.inference_mode()``), each streamed step reduced to
uint8 before it crosses to the GUI thread, and the QA tables.  No Qt here; torch is imported only inside the
functions.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from ..config import SegmentationConfig
from ..io.volume import Volume
from .levels import LevelReport, compute_levels, inputs_from_result
from .qa import classes_from_probabilities, probability_rgb, slice_table, structure_table
from .state import ActiveRun


@dataclass(frozen=True)
class StreamFrame:
    """One streamed denoising step, already reduced to uint8 in the worker thread."""

    slices: tuple[int, ...]
    step: int
    total_steps: int
    batch: int
    n_batches: int
    rgb: np.ndarray  # (n, rows, cols, 3) uint8
    classes: np.ndarray  # (n, rows, cols) uint8
    max_uncertainty: float


#: One model load or warm-up at a time in this process.  A run that starts while the dock preloads waits here for
#: the preload and then finds its models in ``pipeline.load_models``'s cache, instead of loading them beside it.
_MODELS_LOCK = threading.Lock()
#: set while a run waits for the model lock: a warm-up holding it stops at its next step
_RUN_WAITING = threading.Event()
#: what :func:`warm_up` has run once: (models, scan shape, slices in a batch, ensemble)
_WARMED: set[tuple] = set()


def import_model_code() -> None:
    """Import torch, the CPU inference engine and the model code when the dock opens (about a second, once per
    session), then collect garbage once.

    Done on the GUI thread on purpose: a first import inside the worker holds the interpreter lock for
    long stretches and stalled the GUI by ~200 ms at the start of the first run.  The collection: CPython starts
    a full collection when the objects that survived since the last one reach a quarter of those that survived
    it; right after these imports that was the whole heap they made, so full collections came during the first
    run, from whichever thread allocated, holding the interpreter lock (up to 0.6 s on a busy two-core machine,
    ``benchmarks/bench_live_view.py``; 4 ms in a second run).  Collected here, inside the dock's opening, the
    next full collection waits until the heap has grown by a quarter.  Then frozen (``gc.freeze``): what
    survived is moved to the permanent generation that collections never scan, so the full collections that
    do come during a first run (the new layers, the level report: 263 ms on an idle two-core machine) walk
    only what was made since, not the millions of objects of torch, napari and Qt (alive for the session
    anyway)."""
    import gc
    import importlib

    import pandas  # noqa: F401 - the result stages' label features
    import scipy.ndimage  # noqa: F401
    import torch  # noqa: F401

    from .. import pipeline  # noqa: F401
    from ..model import baseline, checkpoint, diffusion, engine, network, sampler  # noqa: F401

    # the CPU engine that "auto" takes (the dock's runs use it); MONAI only when a network is exported
    runtime = engine.resolve_engine("auto", "cpu")
    if runtime != "torch":
        importlib.import_module(runtime)
    gc.collect()
    gc.freeze()


def shared_models(config: SegmentationConfig):
    """The models of ``config`` (``pipeline.load_models``, cached per process), loaded under the process's model
    lock: a run waits for a preload of the same models instead of loading them a second time."""
    import torch

    from ..pipeline import load_models

    _RUN_WAITING.set()
    try:
        with _MODELS_LOCK, torch.inference_mode():
            return load_models(config)
    finally:
        _RUN_WAITING.clear()


def warm_up(volume: Volume, config: SegmentationConfig, models) -> bool:
    """Run the first batch of ``config``'s slices of ``volume`` through its presegmentation and first denoising
    step, and drop the result; ``True`` when it ran to the end (not done before, no labels prior, and no run
    waiting for the model lock: that one stops it at its next step).

    A process's first pass through the pipeline is slower than the next (the networks' first calls at an input
    shape, OpenVINO preparing its kernels for it; arrays touched for the first time): done here, before Run, the
    first run does not pay for it.  Results do not change: the run seeds its own noise."""
    import torch

    from ..config import parse_slices
    from ..pipeline import StepUpdate, segment

    if config.prior not in ("baseline", "none"):
        return False
    chosen = parse_slices(config.slices, volume.orientation.canonical_shape[0])
    first = chosen[: config.batch_slices]
    key = (id(models), tuple(volume.shape), len(first), config.ensemble)
    if key in _WARMED or _RUN_WAITING.is_set():
        return False
    gen = segment(volume, config.replace(slices=f"{first.start}:{first.stop}"), stream_every=1, models=models)
    try:
        with torch.inference_mode():
            for ev in gen:
                if _RUN_WAITING.is_set():
                    return False
                if isinstance(ev, StepUpdate) and ev.step >= 1:
                    break
    finally:
        gen.close()
    _WARMED.add(key)
    return True


def preload_in_thread(config: SegmentationConfig, volume: Volume | None) -> str:
    """Worker: load the models of ``config`` and, with ``volume``, run them once on it (:func:`warm_up`), under
    the model lock; returns the device message (what the run will use)."""
    import torch

    from ..pipeline import SegmentationError, load_models

    try:
        with _MODELS_LOCK:
            with torch.inference_mode():
                models = load_models(config)
            if volume is not None:
                warm_up(volume, config, models)
    except RuntimeError as exc:  # superqt swallows RuntimeError as "worker deleted": re-raise as a sentence
        raise SegmentationError(str(exc)) from exc
    return models.device_message


def structure_view(probabilities: np.ndarray, class_names) -> np.ndarray:
    """(n, C, rows, cols) channel probabilities -> what the live view shows: canal, (whole) vertebra and disc
    for a model whose channels the label scheme knows (a four-channel model's body and whole-vertebra
    channels become one vertebra), else the channels as they are."""
    from ..labelscheme import ChannelRoles, structure_probabilities

    roles = ChannelRoles.of(class_names)
    if not roles.known:
        return probabilities
    return np.moveaxis(structure_probabilities(np.moveaxis(probabilities, 1, 0), roles), 0, 1)


def segment_in_thread(volume: Volume, config: SegmentationConfig, prior: np.ndarray | None, stream_every: int,
                      run: ActiveRun):
    """Worker generator: yields ``Progress`` and :class:`StreamFrame`; returns the ``SegmentationResult``."""
    import torch

    from ..pipeline import SegmentationError, StepUpdate, segment

    try:
        if run.trajectory_shape is not None:  # tens of MB zeroed here, not on the GUI thread (before any frame)
            run.trajectory = np.zeros(run.trajectory_shape, np.uint8)
        models = shared_models(config)
        class_names = list(models.diffusion_config.class_names)
        gen = segment(volume, config, prior_labels=prior, stream_every=stream_every, models=models,
                      keep_samples=config.ensemble > 1)  # the members give the level report's intervals
        run.pipeline_gen = gen
        while True:
            try:
                with torch.inference_mode():  # per step: never held across a yield
                    ev = next(gen)
            except StopIteration as stop:
                run.levels = result_levels(stop.value, volume, config)
                return stop.value
            if isinstance(ev, StepUpdate):
                view = structure_view(ev.probabilities, class_names)
                yield StreamFrame(ev.slices, ev.step, ev.total_steps, ev.batch, ev.n_batches,
                                  probability_rgb(view), classes_from_probabilities(view),
                                  float(ev.uncertainty.max()) if ev.uncertainty.size else 0.0)
            else:
                run.steps_done, run.total = ev.done, ev.total
                yield ev
    except RuntimeError as exc:  # superqt swallows RuntimeError as "worker deleted": re-raise as a sentence
        raise SegmentationError(str(exc)) from exc


def result_levels(result, volume: Volume, config: SegmentationConfig) -> LevelReport | None:
    """The level report of a run's result (its structures named and measured, intervals from its ensemble
    members), made here in the worker so that the GUI thread only shows it; ``None`` for a model whose channels
    the label scheme does not know."""
    inputs = inputs_from_result(result, volume.orientation.canonical_spacing, config.vertebrae)
    return compute_levels(inputs) if inputs is not None else None


def qa_in_thread(labels: np.ndarray, uncertainty: np.ndarray, scale, label_names, slices):
    """The Review panel's two tables (structures, slices), computed off the GUI thread."""
    return (structure_table(labels, uncertainty, scale, label_names, slices),
            slice_table(labels, uncertainty, slices))
