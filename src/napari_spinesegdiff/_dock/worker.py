"""What runs in the dock's worker threads: the pipeline generator (each step inside
``torch.inference_mode()``), each streamed step reduced to uint8 before it crosses to the GUI thread, and
the QA tables.  No Qt here; torch is imported only inside the functions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..config import SegmentationConfig
from ..io.volume import Volume
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


def import_model_code() -> None:
    """Import torch, the CPU inference engine and the model code when the dock opens (about a second, once per session).

    Done on the GUI thread on purpose: a first import inside the worker holds the interpreter lock for
    long stretches and stalled the GUI by ~200 ms at the start of the first run."""
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

    from ..pipeline import SegmentationError, StepUpdate, load_models, segment

    try:
        with torch.inference_mode():
            models = load_models(config)
        class_names = list(models.diffusion_config.class_names)
        gen = segment(volume, config, prior_labels=prior, stream_every=stream_every, models=models)
        run.pipeline_gen = gen
        while True:
            try:
                with torch.inference_mode():  # per step: never held across a yield
                    ev = next(gen)
            except StopIteration as stop:
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


def qa_in_thread(labels: np.ndarray, uncertainty: np.ndarray, scale, label_names, slices):
    """The Review panel's two tables (structures, slices), computed off the GUI thread."""
    return (structure_table(labels, uncertainty, scale, label_names, slices),
            slice_table(labels, uncertainty, slices))
