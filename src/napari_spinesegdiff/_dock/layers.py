"""The dock's layers in the viewer: their names, putting a layer (update in place or add), merging a re-run
into the slices of the earlier results, placement on the image's scale and translate, the live
``denoising`` canvas and the ``denoising trajectory``.

Results: ``spine labels`` (fixed label colours, ``CLASS_COLORS``; label names from the label scheme) and
``uncertainty`` (inferno, 0..1/e), with the image's scale and translate.  A re-run on the same image with the
same label scheme replaces the slices it segmented (the other slices and their edits stay); any other run
replaces the layers.  Kept, and made layers on request (:meth:`ResultLayers.probability_stages`,
:meth:`ResultLayers.show_trajectory`; then updated by every later run): one hidden ``P(<channel>)`` layer per
model channel and the run's ``denoising trajectory``.  Each napari layer added costs the GUI thread 0.1-0.3 s
(its vispy visuals and controls) and a 4-D one re-slices the viewer, so a run adds only what is looked at.

The level report's layers: ``instances`` (the structures in SPIDER's values, outlined; its features give each
value's level name and measurements, which napari's status bar shows under the cursor) and ``measurements``
(a Vectors layer of the measured lines) and, on request, ``measured values`` (their values as text,
:meth:`ResultLayers.show_values`).

A new layer is added hidden and shown by the next stage (:class:`Reveal`): the layer's construction and its
first slicing and drawing are two turns of the event loop, not one.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np

from .. import CLASS_COLORS
from ..io.volume import Volume
from ..labelscheme import ChannelRoles, label_names
from .levels import LevelInputs, LevelReport, instance_features, measured_lines
from .qa import MAX_UNCERTAINTY, streamed_steps, trajectory_frames
from .state import ActiveRun, RunState

if TYPE_CHECKING:
    from napari.layers import Image

#: Memory the denoising trajectory may take (uint8 class maps of the whole canonical volume per frame).
TRAJECTORY_BUDGET_BYTES = 256 * 2**20

LABELS_NAME = "spine labels"
UNCERTAINTY_NAME = "uncertainty"
DENOISING_NAME = "denoising"
TRAJECTORY_NAME = "denoising trajectory"
OVERLAY_NAME = "uncertain boundary"
INSTANCES_NAME = "instances"  # SPIDER instance values; features: each structure's level name and measurements
MEASUREMENTS_NAME = "measurements"  # the measured lines (Vectors: start, direction)
VALUES_NAME = "measured values"  # their values as text, on request (Points at the lines' starts)
OUTPUT_KEY = "spinesegdiff_output"  # metadata flag of the layers the dock makes

LABEL_COLORS = CLASS_COLORS
PROBABILITY_PREFIX = "P("


class Reveal:
    """A stage that shows a layer just added hidden (its first slicing and drawing, one event-loop turn after
    its construction)."""

    def __init__(self, layer):
        self.layer = layer

    def __call__(self) -> None:
        self.layer.visible = True


@contextmanager
def keeping_selection(viewer) -> Iterator[None]:
    """Layers added (or removed) inside leave the layer list's selection as it was: napari selects every layer
    it inserts."""
    selection = viewer.layers.selection
    selected, active = set(selection), selection.active
    try:
        yield
    finally:
        selection.clear()
        if active is not None and active in viewer.layers:
            selection.active = active
        selection.update(lay for lay in selected if lay in viewer.layers)


def layer_volume(layer: Image) -> Volume:
    """The pipeline input for an image layer holding a canonical array (reader/sample layers carry
    ``canonical_affine``; any other layer is placed from its scale and translate)."""
    data = np.asarray(layer.data)
    meta = layer.metadata or {}
    source = Path(meta["source"]) if meta.get("source") else None
    if meta.get("canonical_affine") is not None:
        return Volume(data, np.asarray(meta["canonical_affine"], dtype=float), kind="image", source=source)
    vol = Volume.from_canonical(data, _spacing(layer), _origin(layer), kind="image")
    return Volume(vol.data, vol.affine, kind="image", source=source)


def _spacing(layer) -> tuple[float, float, float]:
    return tuple(abs(float(s)) or 1.0 for s in list(layer.scale)[-3:])  # type: ignore[return-value]


def _origin(layer) -> tuple[float, float, float]:
    t = [float(v) for v in list(layer.translate)[-3:]]
    return (t[0], -t[2], -t[1])  # napari shows world (x, -z, -y): see io.napari_geometry


def geometry_of(layer) -> dict[str, tuple]:
    return {"scale": tuple(layer.scale), "translate": tuple(layer.translate)}


def place(layer, geometry: dict) -> None:
    """Give ``layer`` the scale and translate of ``geometry``, setting only what differs (each setter
    refreshes the layer: a re-slice and a thumbnail)."""
    for key in ("scale", "translate"):
        now, want = np.asarray(getattr(layer, key), float), np.asarray(geometry[key], float)
        if now.shape != want.shape or not np.allclose(now, want):
            setattr(layer, key, geometry[key])


def written_label_names(class_names, vertebrae: str = "whole") -> dict[int, str]:
    """Names of a result's written labels: the label scheme's for a model whose channels it knows (label 2
    "vertebral body" and 4 "posterior elements" when vertebrae are split), else channel k as label k + 1."""
    if ChannelRoles.of(class_names).known:
        return label_names(vertebrae)  # type: ignore[arg-type]
    return {i + 1: str(n) for i, n in enumerate(class_names)}


def prepare_labels_code(viewer) -> None:
    """Pay napari's one-time costs of a first labels layer and a first Vectors layer now (the dock's opening),
    not when the first run's result arrives: add an empty 1 x 1 x 1 labels layer and a one-vector layer and
    remove them again within this one turn of the event loop, so they are never drawn, then give the layer
    list back the selection it had.

    The first layer of a kind in a session builds what later ones reuse (imports, the vispy visuals of the layer
    and of its overlays, their shader templates): on a busy two-core machine the first run's ``spine labels``
    took 235-245 ms of GUI-thread CPU without this and 93-115 ms with it, as much as a later labels layer; on an
    idle one the shapes layer took the first run's GUI-thread CPU from 1.49 to 1.26 s.  Drawing the warm-up
    layers off screen as well (shader programs, glyphs) cost the opening 0.75 s and the first run's largest
    gap only 45 ms less (vispy keeps glyphs per text visual), so they are not drawn.  No user layer is
    touched: their data, undo history and visibility stay as they are."""
    with keeping_selection(viewer):
        layer = viewer.add_labels(np.zeros((1, 1, 1), np.uint8), name="spinesegdiff warm-up",
                                  metadata={OUTPUT_KEY: True})
        viewer.layers.remove(layer)
        lines = viewer.add_vectors(np.array([[[0.0, 0.0, 0.0], [0.0, 1.0, 1.0]]]),
                                   name="spinesegdiff warm-up lines", features={"label": ["Hm 0.0"]},
                                   metadata={OUTPUT_KEY: True})
        viewer.layers.remove(lines)


class ResultLayers:
    """Puts, merges and removes the dock's layers; records what they hold in the shared :class:`RunState`."""

    def __init__(self, state: RunState):
        self.state = state
        self.values_shown = False  # the measurements layer writes each value beside its line
        self._probability_geometry: tuple[dict, dict] = ({}, {})

    @property
    def viewer(self):
        return self.state.viewer

    def find(self, name: str):
        """The dock's own layer ``name`` (flagged ``OUTPUT_KEY``), also when napari renamed it ``name [1]``
        because a layer of the user's had the name.  A user's layer is never found, so never updated, merged
        into or removed by a run or the queue."""
        for layer in self.viewer.layers:
            if (layer.metadata or {}).get(OUTPUT_KEY) and (layer.name == name or layer.name.startswith(f"{name} [")):
                return layer
        return None

    def remove(self, name: str) -> None:
        layer = self.find(name)
        if layer is not None:
            self.viewer.layers.remove(layer)

    def put(self, name: str, data: np.ndarray, kind: str, geometry: dict, **kwargs):
        """Update the layer called ``name`` (same kind) or add it; returns the layer."""
        from napari.layers import Labels

        layer = self.find(name)
        if layer is not None and (isinstance(layer, Labels) != (kind == "labels") or layer.ndim != data.ndim
                                  or getattr(layer, "rgb", False)):
            self.viewer.layers.remove(layer)
            layer = None
        if layer is None:
            add = self.viewer.add_labels if kind == "labels" else self.viewer.add_image
            return add(data, name=name, **geometry, **kwargs)
        kwargs.pop("visible", None)  # an existing layer keeps the visibility the user gave it
        layer.data = data
        place(layer, geometry)
        for key in ("contrast_limits", "metadata", "features", "colormap"):
            if key in kwargs:
                setattr(layer, key, kwargs[key])
        return layer

    def put_revealed(self, name: str, data: np.ndarray, kind: str, geometry: dict, **kwargs):
        """:meth:`put`; a layer that is new (and asked visible) is added hidden: returns ``(layer, reveal)`` with
        the :class:`Reveal` stage to run next, ``None`` for a layer that was there."""
        visible = kwargs.pop("visible", True)
        new = self.find(name) is None
        layer = self.put(name, data, kind, geometry, visible=visible and not new, **kwargs)
        return layer, (Reveal(layer) if new and visible else None)

    def can_merge(self, name: str, shape: tuple[int, ...], same: bool) -> bool:
        """Whether a result of ``shape`` merges into the existing layer ``name`` (the same image and scheme)."""
        layer = self.find(name)
        return same and layer is not None and tuple(layer.data.shape) == tuple(shape)

    def merged(self, name: str, new: np.ndarray, idx: list[int], same: bool) -> np.ndarray:
        """``new`` with the other slices of the existing layer ``name`` kept when it shows the same image."""
        if not self.can_merge(name, new.shape, same):
            return new
        data = np.array(self.find(name).data, copy=True)
        data[idx] = new[idx]
        return data

    def result_stages(self, run: ActiveRun, res) -> list[Callable[[], Any]]:
        """Merge ``res`` into the result layers: the bookkeeping now, then one callable per layer to merge and
        put (adding a napari layer takes 0.1-0.3 s, so the caller runs them one event-loop turn each; a stage
        that returns a callable has it run the next turn)."""
        image = run.image
        idx = list(res.slices)
        names = written_label_names(res.class_names, run.config.vertebrae)
        same = self.state.result_image is image and self.state.label_names == names
        keep = (self.can_merge(LABELS_NAME, res.canonical_labels.shape, same)
                and self.can_merge(UNCERTAINTY_NAME, res.canonical_uncertainty.shape, same))
        self.state.adopt(image, res, names, merged=keep)
        geometry = geometry_of(image)
        meta = {**(image.metadata or {}), OUTPUT_KEY: True, "source_image": image.name,
                "provenance": res.provenance}
        self._keep_probabilities(res, idx, keep, geometry, meta)
        stages: list[Callable[[], Any]] = []
        if self.probability_layers():  # asked for earlier: kept up to date
            stages += self.probability_stages()
        stages += [
            lambda: self.put_revealed(UNCERTAINTY_NAME,
                                      self.merged(UNCERTAINTY_NAME, res.canonical_uncertainty, idx, keep), "image",
                                      geometry, colormap="inferno", contrast_limits=(0.0, MAX_UNCERTAINTY),
                                      blending="additive", opacity=0.6, metadata=meta)[1],
            lambda: self.put_labels(self.merged(LABELS_NAME, res.canonical_labels, idx, keep), names, geometry, meta),
            lambda: self.finish_trajectory(run),
        ]
        if not keep and run.levels is not None:  # merged into earlier slices: the Review tab measures the layer
            stages += self.level_stages(run.levels)
        return stages

    def level_stages(self, report: LevelReport, token: tuple | None = None) -> list[Callable[[], Any]]:
        """Put the report's layers (``instances``, ``measurements``), then show it (:meth:`RunState.show_levels`
        with ``token``), one stage each."""
        return [lambda: self.put_instances(report), lambda: self.put_measurements(report),
                lambda: self.state.show_levels(report, token)]

    # ------------------------------------------------------------------- kept results, layers on request

    def _keep_probabilities(self, res, idx: list[int], keep: bool, geometry: dict, meta: dict) -> None:
        """The class probabilities of the result (its own array, not copied), merged into the earlier runs'
        slices like the layers (the ``P(...)`` layers show views of this array)."""
        probs = np.asarray(res.canonical_probabilities, np.float32)
        old = self.state.probabilities
        if keep and old is not None and old.shape == probs.shape and self.state.channels == tuple(res.class_names):
            old[:, idx] = probs[:, idx]
        else:
            self.state.probabilities = probs
        self.state.channels = tuple(res.class_names)
        self._probability_geometry = (geometry, meta)

    def probability_layers(self) -> list:
        """The dock's ``P(...)`` layers in the viewer."""
        return [lay for lay in self.viewer.layers
                if (lay.metadata or {}).get(OUTPUT_KEY) and lay.name.startswith(PROBABILITY_PREFIX)]

    def probability_stages(self) -> list[Callable[[], Any]]:
        """One stage per channel to put its hidden ``P(<channel>)`` layer from the kept probabilities (removing
        those of channels the result does not have); none without a result."""
        probs = self.state.probabilities
        if probs is None:
            return []
        geometry, meta = self._probability_geometry
        wanted = [f"{PROBABILITY_PREFIX}{c})" for c in self.state.channels]
        stages: list[Callable[[], Any]] = [lambda lay=lay: self.viewer.layers.remove(lay)
                                           for lay in self.probability_layers() if lay.name.split(" [")[0] not in wanted]
        for c, name in enumerate(wanted):
            stages.append(lambda n=name, c=c: self.put(n, probs[c], "image", geometry, colormap="gray",
                                                       contrast_limits=(0.0, 1.0), blending="additive",
                                                       metadata=meta, visible=False))
        return stages

    def qa_inputs(self) -> tuple | None:
        """The arguments of :func:`.worker.qa_in_thread` for the result layers as they are now (a copy of the
        labels, edits included, so painting during the computation is safe); ``None`` without both layers."""
        labels, unc = self.find(LABELS_NAME), self.find(UNCERTAINTY_NAME)
        if labels is None or unc is None or labels.data.shape != unc.data.shape:
            return None
        return (np.array(labels.data, copy=True), np.asarray(unc.data), tuple(labels.scale),
                dict(self.state.label_names), sorted(self.state.segmented))

    def level_inputs(self) -> LevelInputs | None:
        """The inputs of a level report of the labels layer as it is (a copy, edits included; no ensemble members,
        so no intervals); ``None`` without labels in the project's scheme."""
        labels, unc = self.find(LABELS_NAME), self.find(UNCERTAINTY_NAME)
        vertebrae = next((v for v in ("whole", "split") if self.state.label_names == label_names(v)), None)
        if labels is None or vertebrae is None:
            return None
        u = np.asarray(unc.data, np.float32) if unc is not None and unc.data.shape == labels.data.shape else None
        return LevelInputs(np.array(labels.data, copy=True), _spacing(labels), vertebrae, u, None, "labels")

    def put_labels(self, labels: np.ndarray, names: dict[int, str], geometry: dict, meta: dict) -> Reveal | None:
        import pandas as pd

        features = pd.DataFrame({"index": [0, *names], "class": ["background", *names.values()]})
        existed = self.find(LABELS_NAME)
        layer, reveal = self.put_revealed(LABELS_NAME, labels, "labels", geometry, colormap=dict(LABEL_COLORS),
                                          features=features, metadata=meta, opacity=0.5)
        if existed is None or existed is not layer:
            layer.events.paint.connect(self.state.count_edit)
        self.state.labels_reset(labels)
        return reveal

    def put_instances(self, report: LevelReport) -> Reveal | None:
        """The ``instances`` labels layer: the report's instance map (SPIDER values), drawn as outlines over the
        class colours, with a features row per value (hovering a structure shows its level name, confidence and
        measurements in the status bar); removed when the report named nothing."""
        labels = self.find(LABELS_NAME)
        if report.instances is None or labels is None:
            self.remove(INSTANCES_NAME)
            return None
        existed = self.find(INSTANCES_NAME) is not None
        layer, reveal = self.put_revealed(INSTANCES_NAME, np.asarray(report.instances.canonical), "labels",
                                          geometry_of(labels), features=instance_features(report),
                                          metadata={OUTPUT_KEY: True, "shift": report.shift}, opacity=0.9)
        if not existed:
            layer.contour = 2
        return reveal

    def put_measurements(self, report: LevelReport) -> Reveal | None:
        """The ``measurements`` layer: every measured line of the report as a vector (start, direction) in its
        colour, with its features (``label``, ``level``, ``measure``, ``value``); removed when there is none.
        A Vectors layer, not Shapes: one mesh visual to build and draw (a new Shapes layer's first drawing took
        170 ms of the GUI thread under llvmpipe, a Vectors layer's 35-65 ms).  The values as text are the
        ``measured values`` layer (:meth:`show_values`)."""
        labels = self.find(LABELS_NAME)
        lines, features = measured_lines(report)
        vectors = np.stack([np.stack([a, b - a]) for a, b in lines]) if lines else np.zeros((0, 2, 3))
        old = self.find(MEASUREMENTS_NAME)
        if old is not None and labels is not None and np.array_equal(np.asarray(old.data), vectors):
            old.features = features  # the same lines (a renumbering): new level names only
            self._put_values()
            return None
        visible = True if old is None else old.visible
        if old is not None:
            self.viewer.layers.remove(old)
        if not lines or labels is None:
            self.remove(VALUES_NAME)
            return None
        layer = self.viewer.add_vectors(vectors, name=MEASUREMENTS_NAME, features=features,
                                        edge_color=list(features["color"]), edge_width=0.8, vector_style="line",
                                        visible=False, metadata={OUTPUT_KEY: True}, **geometry_of(labels))
        self._put_values()
        return Reveal(layer) if visible else None

    def show_values(self, shown: bool) -> None:
        """Write each measured value beside its line (the ``measured values`` layer: text at the lines' starts),
        or remove them.  Off by default: the Review table lists the values, and a text visual's first drawing
        builds its glyphs (0.1-0.3 s of the GUI thread in software OpenGL)."""
        self.values_shown = bool(shown)
        self._put_values()

    def _put_values(self) -> None:
        lines = self.find(MEASUREMENTS_NAME)
        if not self.values_shown or lines is None or not len(lines.data):
            self.remove(VALUES_NAME)
            return
        starts = np.asarray(lines.data)[:, 0]
        old = self.find(VALUES_NAME)
        if old is not None and np.array_equal(np.asarray(old.data), starts):
            old.features = lines.features
            return
        self.remove(VALUES_NAME)
        with keeping_selection(self.viewer):  # the text only: the layer being worked on stays selected
            self.viewer.add_points(starts, name=VALUES_NAME, features=lines.features, size=0.0, border_width=0.0,
                                   face_color="transparent", metadata={OUTPUT_KEY: True},
                                   text={"string": "{label}", "color": "white", "size": 8, "anchor": "upper_left"},
                                   scale=lines.scale, translate=lines.translate)

    def show_result(self) -> None:
        """After the result layers are put: hide the live canvas, select the labels."""
        den = self.find(DENOISING_NAME)
        if den is not None:
            den.visible = False
        labels = self.find(LABELS_NAME)
        if labels is not None:
            self.viewer.layers.selection.active = labels

    # --------------------------------------------------------------------------------- live denoising

    def prepare_denoising(self, run: ActiveRun) -> None:
        """The live ``denoising`` layer: an RGB canvas of the scan's canonical shape, cleared and hidden until
        the run's first streamed step shows it (:meth:`.run.RunController._show_frame`: a new layer's
        construction and its first drawing are then two turns of the event loop)."""
        image = run.image
        data = np.zeros((*image.data.shape, 3), np.uint8)
        layer = self.find(DENOISING_NAME)
        if layer is not None and (not getattr(layer, "rgb", False) or layer.data.shape != data.shape):
            self.viewer.layers.remove(layer)
            layer = None
        if layer is None:
            layer = self.viewer.add_image(data, name=DENOISING_NAME, rgb=True, blending="additive", visible=False,
                                          metadata={OUTPUT_KEY: True}, **geometry_of(image))
        else:
            layer.visible = False
            layer.data = data
            place(layer, geometry_of(image))
        run.denoise_layer = layer

    def prepare_trajectory(self, run: ActiveRun) -> None:
        """The shape of the run's trajectory array, sized for the requested steps within the memory budget (the
        worker allocates it).  It is kept when the run completes and becomes the ``denoising trajectory`` layer
        on request: a 4-D layer added or removed changes the viewer's dimensions and re-slices every layer."""
        shape = run.image.data.shape
        n = trajectory_frames(len(streamed_steps(run.config.steps, run.stream_every)), shape,
                              TRAJECTORY_BUDGET_BYTES)
        run.trajectory_shape = (n, *shape)

    def finish_trajectory(self, run: ActiveRun) -> None:
        """Keep the run's streamed frames (the result's denoising trajectory); the ``denoising trajectory``
        layer, when it was asked for, shows them."""
        if run.trajectory is None:  # a run without the live view recorded none
            self.state.trajectory = None
            return
        used = max(1, run.frames_used)
        geo = {"scale": (1.0, *run.image.scale), "translate": (0.0, *run.image.translate)}
        self.state.trajectory = (run.trajectory[:used], geo)
        if self.find(TRAJECTORY_NAME) is not None:
            self.show_trajectory()

    def show_trajectory(self) -> bool:
        """Put the kept frames as the (4-D) ``denoising trajectory`` labels layer, show the final estimate's
        frame, label the step axis; ``False`` without a trajectory."""
        if self.state.trajectory is None:
            return False
        frames, geo = self.state.trajectory
        self.put(TRAJECTORY_NAME, frames, "labels", geo, colormap=dict(LABEL_COLORS),
                 metadata={OUTPUT_KEY: True, "axes": ["step", "slice", "row", "column"]})
        dims = self.viewer.dims
        if dims.ndim == 4 and max(lay.ndim for lay in self.viewer.layers) == 4:
            dims.set_current_step(0, len(frames) - 1)  # scrub back from the final estimate
            if dims.axis_labels[0] in ("0", "-4"):
                dims.axis_labels = ("denoising step", *dims.axis_labels[1:])
        return True

    def discard_live(self) -> None:
        """The live estimate of a run that did not finish is not a result: the ``denoising`` canvas is hidden and
        cleared, as a finished run leaves it (removing a layer costs the viewer a re-slice and a redraw); its
        trajectory never became a layer."""
        layer = self.find(DENOISING_NAME)
        if layer is not None:
            layer.visible = False
            layer.data[...] = 0  # in place: nothing redraws a hidden layer; the next run sets new data
