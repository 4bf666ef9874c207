"""The Segment panel: the run's settings form (with a tooltip on every control), the settings that persist
between sessions, and the Run / Cancel buttons.  It turns the form into a checked :class:`RunRequest`;
starting and stopping the run is the run controller's job.

Settings persist in ``$SPINESEGDIFF_CONFIG_DIR/widget.json`` (default ``~/.config/spinesegdiff``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from magicgui.widgets import ComboBox, Container, FileEdit, FloatSpinBox, LineEdit, PushButton, SpinBox
from qtpy.QtWidgets import QHBoxLayout, QVBoxLayout, QWidget

from ..config import SegmentationConfig
from ..io.volume import Volume
from .layers import OUTPUT_KEY, OVERLAY_NAME, layer_volume
from .navigation import current_slice
from .state import RunRequest, RunState

#: Environment variable naming the folder of the dock's settings file (tests point it at tmp_path).
SETTINGS_ENV = "SPINESEGDIFF_CONFIG_DIR"

SLICE_MODES = ("current slice", "all slices", "range")
VERTEBRAE = ("whole", "split")

TIPS = {
    "image": "The sagittal scan to segment (a 3-D image layer).",
    "checkpoint": "Diffusion model weights (.safetensors, or an official .pt/.pth file). Empty = the model "
                  "shipped with the plugin. Loading takes a few seconds the first time, then it is cached.",
    "num_classes": "Number of foreground classes. Prefilled from the checkpoint; a run whose class count does "
                   "not match the checkpoint is refused before it starts.",
    "vertebrae": "whole: label 2 = the whole vertebra (body and posterior elements), as in SPIDER; split: 2 = "
                 "vertebral body, 4 = posterior elements (needs a v4 model)",
    "prior": "Presegmentation the denoising starts from: the shipped baseline network (fast, the paper's "
             "setting), a labels layer (e.g. your corrections), or none (start from pure noise at t=T, which "
             "needs more steps for the same quality).",
    "steps": "Denoising (DDIM) steps. Time grows linearly: each step is one network pass per slice and "
             "ensemble member.",
    "t_start": "Noise level the presegmentation is pushed to before denoising (0..T). Higher lets the model "
               "change more of the prior; it does not change the run time (that is set by the steps).",
    "baseline_weight": "Weight of the baseline presegmentation in the final mask: (1 - w) diffusion + w "
                       "presegmentation (only with the baseline prior). 0 = the diffusion output alone, as in the "
                       "paper; 0.5 (default) was the better choice on validation scans. The uncertainty map does "
                       "not depend on it.",
    "ensemble": "Stochastic samples per slice, run as one batch. More samples give a better uncertainty map; "
                "time and memory grow linearly.",
    "batch_slices": "Slices denoised together. Larger batches are faster on a GPU but need more memory.",
    "slices": "Which sagittal slices to segment: the slice shown now (seconds), all slices (time x number of "
              "slices), or a range.",
    "slice_range": "Canonical slice range 'A:B' (B excluded) or a single index 'K'.",
    "device": "Where the model runs: auto picks a CUDA GPU, then Apple mps, then the CPU (the status line says "
              "which). A GPU is typically 10-50x faster than the CPU.",
    "seed": "Random seed of the noise; the same seed and settings give the same result.",
    "stream_every": "Show the current estimate every N denoising steps (0 = only the final result). Streaming "
                    "costs a few milliseconds per update.",
}

#: Controls whose value is persisted as it is (the checkpoint and the prior are handled apart).
PERSISTED = ("steps", "t_start", "ensemble", "baseline_weight", "vertebrae", "batch_slices", "slice_mode",
             "slice_range", "device", "seed", "stream_every")


def settings_path() -> Path:
    """The JSON settings file (``$SPINESEGDIFF_CONFIG_DIR`` or ``~/.config/spinesegdiff``)."""
    folder = os.environ.get(SETTINGS_ENV) or str(Path.home() / ".config" / "spinesegdiff")
    return Path(folder) / "widget.json"


def load_settings() -> dict[str, Any]:
    """Saved settings, or ``{}`` when there are none (or the file is unreadable)."""
    try:
        data = json.loads(settings_path().read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def save_settings(settings: dict[str, Any]) -> Path | None:
    """Write the settings; returns the path, or ``None`` when the folder cannot be written."""
    path = settings_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(settings, indent=1, default=str))
    except OSError:
        return None
    return path


def checkpoint_info(path: str | Path | None) -> dict[str, Any] | None:
    """``{"num_classes", "class_names", "T"}`` from one of our ``.safetensors`` files without loading weights
    or torch (``None`` = shipped model); ``None`` when the file carries no such metadata (official files)."""
    from ..pipeline import SHIPPED_DIFFUSION

    p = Path(path) if path else SHIPPED_DIFFUSION
    if p.suffix != ".safetensors" or not p.is_file():
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(p), framework="numpy") as fh:
            meta = fh.metadata() or {}
        cfg = json.loads(meta["spinesegdiff"])
    except Exception:  # noqa: BLE001 - an unreadable file is reported by the run itself
        return None
    names = list(cfg.get("class_names") or [])
    return {"num_classes": len(names), "class_names": names, "T": int((cfg.get("schedule") or {}).get("T", 1000))}


class SegmentPanel(QWidget):
    """The Segment tab: the settings form and the Run / Cancel buttons."""

    def __init__(self, state: RunState, parent: QWidget | None = None):
        super().__init__(parent)
        self.state = state
        self._build()
        self.apply_settings(load_settings())
        self._on_checkpoint_changed()
        state.status_changed.connect(self._on_status)
        for ev in (state.viewer.layers.events.inserted, state.viewer.layers.events.removed):
            ev.connect(self.reset_choices)

    def _build(self) -> None:
        self.image = ComboBox(label="image", choices=self._image_choices, tooltip=TIPS["image"])
        self.checkpoint = FileEdit(label="checkpoint", mode="r", nullable=True, value=None,
                                   filter="*.safetensors *.pt *.pth *.bin", tooltip=TIPS["checkpoint"])
        line = getattr(self.checkpoint, "line_edit", None)
        if line is not None:
            line.native.setPlaceholderText("shipped model")
        self.num_classes = SpinBox(label="classes", min=1, max=64, value=3, tooltip=TIPS["num_classes"])
        self.vertebrae = ComboBox(label="vertebrae", choices=list(VERTEBRAE), value=SegmentationConfig().vertebrae,
                                  tooltip=TIPS["vertebrae"])
        self.prior = ComboBox(label="prior", choices=self._prior_choices, tooltip=TIPS["prior"])
        self.steps = SpinBox(label="timesteps", min=1, max=1000, value=10, tooltip=TIPS["steps"])
        self.t_start = SpinBox(label="t_start", min=0, max=999, value=300, tooltip=TIPS["t_start"])
        self.ensemble = SpinBox(label="ensemble", min=1, max=64, value=5, tooltip=TIPS["ensemble"])
        self.baseline_weight = FloatSpinBox(label="preseg. weight", min=0.0, max=1.0, step=0.05,
                                            value=SegmentationConfig().baseline_weight,
                                            tooltip=TIPS["baseline_weight"])
        self.batch_slices = SpinBox(label="batch slices", min=1, max=64, value=4, tooltip=TIPS["batch_slices"])
        self.slice_mode = ComboBox(label="slices", choices=list(SLICE_MODES), value="current slice",
                                   tooltip=TIPS["slices"])
        self.slice_range = LineEdit(label="range", value="0:4", tooltip=TIPS["slice_range"])
        self.device = ComboBox(label="device", choices=["auto", "cpu", "cuda", "mps"], value="auto",
                               tooltip=TIPS["device"])
        self.seed = SpinBox(label="seed", min=0, max=2**31 - 1, value=0, tooltip=TIPS["seed"])
        self.stream_every = SpinBox(label="stream every", min=0, max=1000, value=1, tooltip=TIPS["stream_every"])
        self.run_button = PushButton(text="Run")
        self.run_button.tooltip = "Segment the chosen slices in the background."
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.cancel_button.tooltip = "Stop at the next denoising step; nothing partial is kept."
        self.form = Container(widgets=[
            self.image, self.checkpoint, self.num_classes, self.vertebrae, self.prior, self.steps, self.t_start,
            self.ensemble, self.baseline_weight, self.batch_slices, self.slice_mode, self.slice_range, self.device,
            self.seed, self.stream_every,
        ])
        self._locked = [w for w in self.form] + [self.run_button]
        self.checkpoint.changed.connect(self._on_checkpoint_changed)
        self.slice_mode.changed.connect(self._on_slice_mode)

        lay = QVBoxLayout(self)
        lay.addWidget(self.form.native)
        row = QHBoxLayout()
        row.addWidget(self.run_button.native)
        row.addWidget(self.cancel_button.native)
        lay.addLayout(row)
        lay.addStretch(1)
        self._on_slice_mode()

    # --------------------------------------------------------------------------------------- choices

    def _image_choices(self, _widget=None) -> list[tuple[str, Any]]:
        from napari.layers import Image

        return [(layer.name, layer) for layer in self.state.viewer.layers
                if isinstance(layer, Image) and not layer.rgb and layer.ndim == 3
                and not (layer.metadata or {}).get(OUTPUT_KEY)]

    def _prior_choices(self, _widget=None) -> list[tuple[str, Any]]:
        from napari.layers import Labels

        out: list[tuple[str, Any]] = [("baseline (shipped presegmenter)", "baseline"), ("none (pure noise)", "none")]
        out += [(f"labels: {layer.name}", layer) for layer in self.state.viewer.layers
                if isinstance(layer, Labels) and layer.ndim == 3 and layer.name not in (OVERLAY_NAME,)]
        return out

    def reset_choices(self, _event=None) -> None:
        try:
            self.form.reset_choices()
        except RuntimeError:  # the Qt side is already deleted (viewer closing)
            pass

    def _on_checkpoint_changed(self, _value=None) -> None:
        info = checkpoint_info(self.checkpoint.value)
        if info is not None:
            self.num_classes.value = info["num_classes"]
            self.t_start.max = max(0, info["T"] - 1)

    def _on_slice_mode(self, _value=None) -> None:
        self.slice_range.enabled = self.slice_mode.value == "range" and not self.state.is_running

    def _on_status(self, _status: str) -> None:
        running = self.state.is_running
        for w in self._locked:
            w.enabled = not running
        self.cancel_button.enabled = running
        if not running:
            self._on_slice_mode()

    # -------------------------------------------------------------------------------------- settings

    def settings(self) -> dict[str, Any]:
        """The persisted settings (everything but the layers)."""
        prior = self.prior.value
        return {
            "checkpoint": str(self.checkpoint.value) if self.checkpoint.value else None,
            **{key: getattr(self, key).value for key in PERSISTED},
            "prior": prior if isinstance(prior, str) else "labels",
        }

    def apply_settings(self, s: dict[str, Any]) -> None:
        for key in PERSISTED:
            if key in s:
                try:
                    getattr(self, key).value = s[key]
                except (ValueError, TypeError):
                    pass  # a stale or hand-edited value: keep the default
        ckpt = s.get("checkpoint")
        if ckpt and Path(ckpt).is_file():
            self.checkpoint.value = ckpt
        if s.get("prior") in ("baseline", "none"):
            self.prior.value = s["prior"]

    # ------------------------------------------------------------------------------------ the request

    def slices_spec(self, image=None) -> str:
        """The pipeline's ``slices`` string for the chosen mode ('current slice' -> the index shown now)."""
        mode = self.slice_mode.value
        if mode == "all slices":
            return "all"
        if mode == "range":
            return self.slice_range.value.strip()
        return str(current_slice(self.state.viewer, image or self.image.value))

    def build_config(self) -> SegmentationConfig:
        """The run's configuration from the controls (``ValueError`` with one sentence when invalid)."""
        prior = self.prior.value
        return SegmentationConfig(
            checkpoint=str(self.checkpoint.value) if self.checkpoint.value else None,
            steps=self.steps.value, t_start=self.t_start.value, ensemble=self.ensemble.value,
            baseline_weight=float(self.baseline_weight.value), num_classes=self.num_classes.value,
            device=self.device.value, seed=self.seed.value,
            slices=self.slices_spec(), batch_slices=self.batch_slices.value,
            prior=prior if isinstance(prior, str) else "labels", vertebrae=self.vertebrae.value,
        )

    def preload_request(self) -> tuple[SegmentationConfig, Volume, str] | None:
        """What to prepare before a Run (the run controller's preload): the configuration from the controls, the
        chosen scan's pipeline input and its name; ``None`` without a scan or with controls that make no valid
        configuration (the Run refuses those with a sentence)."""
        image = self.image.value
        if image is None:
            return None
        try:
            config = self.build_config()
        except ValueError:
            return None
        return config, layer_volume(image), image.name

    def request(self) -> RunRequest | None:
        """The checked run request from the form, with the settings saved; ``None`` (and a refusal on the
        status line and as a notification) when the inputs are refused."""
        image = self.image.value
        if image is None:
            self.state.refuse("Open a scan (an image layer) to segment first.")
            return None
        try:
            config = self.build_config()
        except ValueError as exc:
            self.state.refuse(str(exc))
            return None
        info = checkpoint_info(config.checkpoint)
        if info is not None and info["num_classes"] != config.num_classes:
            self.state.refuse(f"The run asks for {config.num_classes} classes but the checkpoint has "
                              f"{info['num_classes']}.")
            return None
        prior = None
        if config.prior == "labels":
            prior = np.asarray(self.prior.value.data)
            if prior.shape != tuple(image.data.shape):
                self.state.refuse(f"The prior labels layer has shape {prior.shape}; the scan has "
                                  f"{tuple(image.data.shape)}.")
                return None
        volume = layer_volume(image)
        save_settings(self.settings())
        return RunRequest(image, volume, config, prior, int(self.stream_every.value))
