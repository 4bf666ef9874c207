"""Export and provenance: the (edited) labels and the uncertainty map written in the scan's own file
geometry and array order, with the level report when it describes those labels (the instance map in SPIDER's
values and the levels table), and a JSON sidecar naming the runs behind them, the segmented slices, what was
edited by hand and the numbering.  All files are written to temporaries and moved into place together
(:class:`~..io.outputs.OutputSet`): a failed export leaves what the folder held before."""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from qtpy.QtWidgets import QFileDialog, QWidget

from .. import __version__
from ..io.volume import Volume
from .layers import LABELS_NAME, UNCERTAINTY_NAME, ResultLayers, layer_volume
from .state import RunState

if TYPE_CHECKING:
    from napari.layers import Image


def export_like(layer: Image) -> Volume:
    """A data-less stand-in for the scan behind ``layer`` in its *file* geometry and array order, for the
    writers: the reader's metadata, else the file ``affine`` with the matching file shape, else the
    canonical geometry."""
    from ..io.orientation import SagittalOrientation
    from ..io.writers import like_from_metadata

    meta = layer.metadata or {}
    canon_shape = tuple(int(s) for s in np.shape(layer.data)[-3:])
    like = like_from_metadata(meta)
    if like is not None and like.orientation.canonical_shape == canon_shape:
        return like
    source = Path(meta["source"]) if meta.get("source") else None
    if meta.get("affine") is not None:
        affine = np.asarray(meta["affine"], dtype=float).reshape(4, 4)
        for perm in set(itertools.permutations(canon_shape)):
            orient = SagittalOrientation(affine, perm)
            same = orient.canonical_shape == canon_shape
            if same and (meta.get("canonical_affine") is None
                         or np.allclose(orient.canonical_affine, meta["canonical_affine"], atol=1e-6)):
                return Volume(np.broadcast_to(np.zeros((), np.uint8), perm), affine, source=source)
    base = layer_volume(layer)
    return Volume(np.broadcast_to(np.zeros((), np.uint8), base.shape), base.affine, source=source)


class Exporter:
    """Writes the result layers and their provenance (``parent``: the widget that owns the folder dialog)."""

    def __init__(self, state: RunState, layers: ResultLayers, parent: QWidget | None = None):
        self.state = state
        self.layers = layers
        self.parent = parent

    def export_results(self, folder: str | Path | None = None) -> list[Path]:
        """Write the labels layer (with edits) and the uncertainty map in the scan's geometry, and a JSON
        provenance sidecar, to ``folder`` (default: the scan's folder, or one asked for when the scan has
        no file).  Returns the written paths (``[]`` when nothing was written)."""
        from ..io.outputs import OutputSet
        from ..io.readers import file_stem, file_suffix
        from ..report.table import write_levels_table

        labels, unc = self.layers.find(LABELS_NAME), self.layers.find(UNCERTAINTY_NAME)
        image = self.state.result_image
        if labels is None or unc is None or image is None:
            self.state.refuse("Run a segmentation before exporting.")
            return []
        like = export_like(image)
        src = like.source
        if folder is None:
            folder = src.parent if src is not None else QFileDialog.getExistingDirectory(self.parent, "Export folder")
            if not folder:
                return []
        folder = Path(folder)
        stem = file_stem(src) if src is not None else (re.sub(r"[^\w.-]+", "_", image.name).strip("_") or "scan")
        ext = file_suffix(src) if src is not None and file_suffix(src) in (".nii.gz", ".nii", ".mha", ".nrrd") \
            else ".nii.gz"
        note = f"spinesegdiff {__version__} napari"
        to_file = like.orientation.from_canonical
        report = self.state.levels if self.state.levels_current and self.state.levels.instances is not None else None
        try:
            with OutputSet() as out:
                out_l = out.add_volume(to_file(np.asarray(labels.data)), folder / f"{stem}_spinesegdiff_labels{ext}",
                                       like, kind="labels", produced_by=f"{note} labels")
                out_u = out.add_volume(to_file(np.asarray(unc.data, np.float32)),
                                       folder / f"{stem}_spinesegdiff_uncertainty{ext}", like, kind="image",
                                       produced_by=f"{note} uncertainty")
                levels = None
                if report is not None:
                    levels = (out.add_volume(to_file(np.asarray(report.instances.canonical)),
                                             folder / f"{stem}_spinesegdiff_instances{ext}", like, kind="labels",
                                             produced_by=f"{note} instances (SPIDER values)"),
                              write_levels_table(report.rows, folder / f"{stem}_spinesegdiff_levels.csv", outputs=out))
                sidecar = out.add_text(folder / f"{stem}_spinesegdiff.json",
                                       json.dumps(self.provenance(out_l, out_u, levels), indent=1, default=str))
                written = out.commit()
        except (OSError, ValueError) as exc:
            self.state.refuse(str(exc))
            return []
        why = "" if report is not None or self.state.levels is None else (
            " The levels were left out: the labels changed since they were measured (press Refresh tables, then "
            "Export).")
        self.state.say(f"Exported to {folder}: {', '.join(p.name for p in written)}.{why}")
        return [out_l, out_u, *(levels or ()), sidecar]

    def provenance(self, labels_path: Path | None = None, uncertainty_path: Path | None = None,
                   levels: tuple[Path, Path] | None = None) -> dict[str, Any]:
        """The sidecar: the runs behind the layers, the segmented slices, what was edited by hand and, with
        ``levels`` (the instance map and levels table written), the level report's numbering."""
        st = self.state
        labels = self.layers.find(LABELS_NAME)
        changed = 0
        if labels is not None and st.original_labels is not None and st.original_labels.shape == labels.data.shape:
            changed = int(np.count_nonzero(np.asarray(labels.data) != st.original_labels))
        return {
            "produced_by": f"spinesegdiff {__version__} napari widget",
            "outputs": {"labels": str(labels_path) if labels_path else None,
                        "uncertainty": str(uncertainty_path) if uncertainty_path else None,
                        "instances": str(levels[0]) if levels else None,
                        "levels": str(levels[1]) if levels else None},
            "levels": None if not levels or st.levels is None else {
                "anchor": st.levels.anchor, "shift": st.levels.shift, "flags": list(st.levels.scan_flags),
                "measured_on": st.levels.inputs.source, "intervals": st.levels.has_intervals},
            "image_layer": st.result_image.name if st.result_image is not None else None,
            "segmented_slices": sorted(st.segmented),
            "classes": {str(k): v for k, v in st.label_names.items()},
            "edited_layers": {LABELS_NAME: {"edited": bool(changed or st.paint_events),
                                            "changed_voxels": changed, "edit_operations": st.paint_events}},
            "runs": st.runs,
        }
