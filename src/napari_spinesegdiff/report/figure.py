"""The level report figure of one scan: its mid-sagittal slice with the structures coloured, their level names
and the measured lines, beside a table of the measurements (a PNG, ``spinesegdiff batch --report``).

Drawn on matplotlib's Agg canvas (a :class:`matplotlib.figure.Figure` without pyplot, so no GUI backend and no
Qt, whatever ``MPLBACKEND`` says).  matplotlib is optional (the ``report`` extra): :func:`check_available`
refuses in one sentence where it is missing.  Everything is in the canonical frame (slices left -> right, rows
superior -> inferior, columns anterior -> posterior), so the slice is shown with anterior on the left; pixels
are drawn with their physical aspect (row / column spacing).
"""

from __future__ import annotations

import importlib.util
import io
import math
import textwrap
from typing import Any, Sequence

import numpy as np

#: Colours (RGB) of the overlay: vertebrae and discs alternate between two shades, so neighbours differ.
VERTEBRA_RGB = ((0.95, 0.60, 0.15), (0.95, 0.85, 0.20))
DISC_RGB = ((0.20, 0.70, 0.95), (0.35, 0.45, 0.95))
CANAL_RGB = (0.30, 0.85, 0.35)
OVERLAY_ALPHA = 0.35
LINE_RGB = {"canal": (0.2, 1.0, 0.3), "disc": (0.2, 0.9, 1.0), "vertebra": (1.0, 0.35, 0.2)}
FIGURE_HEIGHT_IN = 8.0
TABLE_WIDTH_IN = 7.0
DPI = 100
HEAD_WIDTH = 62  # characters of the title lines (monospace, 9 pt, in the table's width)


class FigureError(ValueError):
    """A report figure that cannot be drawn, in one sentence."""


def check_available() -> None:
    """Refuse (:class:`FigureError`) when matplotlib, which draws the figures, is not installed."""
    if importlib.util.find_spec("matplotlib") is None:
        raise FigureError("The report figures need matplotlib, which is not installed (pip install matplotlib, "
                          "or install spinesegdiff with its 'report' extra).")


def mid_sagittal_slice(inst) -> int:
    """The slice through the canal's centroid (the spine's midline), else the middle of the labelled slices."""
    canal = next((s for s in inst.structures if s.structure == "canal" and s.n_voxels), None)
    n = inst.canonical.shape[0]
    if canal is not None:
        return int(np.clip(round(canal.centroid[0]), 0, n - 1))
    labelled = np.nonzero(inst.canonical.reshape(n, -1).any(axis=1))[0]
    return int(labelled[len(labelled) // 2]) if labelled.size else n // 2


def _overlay(slice_map: np.ndarray) -> np.ndarray:
    """RGBA of one slice of the instance map (SPIDER values: vertebrae 1-25, canal 100, discs 201-225)."""
    rgba = np.zeros((*slice_map.shape, 4), np.float32)
    for value in np.unique(slice_map):
        if value == 0:
            continue
        if value == 100:
            rgb = CANAL_RGB
        elif value > 200:
            rgb = DISC_RGB[int(value) % 2]
        else:
            rgb = VERTEBRA_RGB[int(value) % 2]
        rgba[slice_map == value] = (*rgb, OVERLAY_ALPHA)
    return rgba


def _label_position(slice_map: np.ndarray, st) -> tuple[float, float]:
    """Where a structure's name goes on the slice: its centroid row, and the column a quarter of the way
    into its voxels on this slice from the front (a whole vertebra's body, not its arch); the 3-D centroid
    when the slice misses it."""
    r, c = np.nonzero(slice_map == st.value)
    if r.size == 0:
        return st.centroid[1], st.centroid[2]
    return float(r.mean()), float(np.percentile(c, 25 if st.structure == "vertebra" else 50))


def _num(v: Any, digits: int = 1) -> str:
    try:
        v = float(v)
    except (TypeError, ValueError):
        return "-"
    return f"{v:.{digits}f}" if math.isfinite(v) else "-"


def _table_lines(inst, rows: Sequence[dict[str, Any]]) -> list[str]:
    """The measurements, one line per vertebra and disc from top to bottom, the canal's AP diameter at the
    same level on the same line."""
    canal = {r["level"]: r for r in rows if r.get("structure") == "canal"}
    order = {(s.structure, s.level): s.centroid[1] for s in inst.structures}
    own = sorted((r for r in rows if r.get("structure") in ("vertebra", "disc")),
                 key=lambda r: order.get((r["structure"], r["level"]), math.inf))
    lines = [f"{'level':<8}{'heights a/m/p mm':<18}{'depth':>6}{'wedge':>7}{'bicon':>7}{'slip%':>7}{'canal AP':>10}"]
    for r in own:
        heights = "/".join(_num(r.get(f"height_{k}_mm")) for k in ("anterior", "middle", "posterior"))
        wedge, bicon = (_num(r.get(k), 2) if r["structure"] == "vertebra" else "" for k in ("wedge_ratio",
                                                                                            "biconcavity_ratio"))
        slip = _num(r.get("slip_percent")) if r["structure"] == "vertebra" else ""
        ap = canal.get(r["level"], {}).get("ap_diameter_mm")
        name = r["level"] if r["structure"] == "vertebra" else f" {r['level']}"
        lines.append(f"{name:<8}{heights:<18}{_num(r.get('depth_mm')):>6}{wedge:>7}{bicon:>7}{slip:>7}"
                     f"{(_num(ap) if ap is not None else ''):>10}")
        flags = [f for f in str(r.get("flags") or "").split(";") if f]
        flags += [f for f in str(canal.get(r["level"], {}).get("flags") or "").split(";") if f.startswith("stenosis")]
        if flags:
            lines.append(f"{'':<8}! {', '.join(flags)}")
    return lines


def level_figure(image: np.ndarray | None, inst, rows: Sequence[dict[str, Any]], *, title: str = "",
                 slice_index: int | None = None):
    """The figure (a :class:`matplotlib.figure.Figure` on an Agg canvas) of one scan: ``image`` the canonical
    scan (or None: the labels alone), ``inst`` its :class:`~.instances.Instances`, ``rows`` its levels table
    rows (each row's ``lines``, when it has them, are drawn)."""
    check_available()
    from matplotlib import patheffects
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    k = mid_sagittal_slice(inst) if slice_index is None else int(slice_index)
    spacing = inst.spacing
    n_rows, n_cols = inst.canonical.shape[1:]
    aspect = spacing[1] / spacing[2]
    image_width = FIGURE_HEIGHT_IN * min(2.0, max(0.4, n_cols / (n_rows * aspect)))
    fig = Figure(figsize=(image_width + TABLE_WIDTH_IN, FIGURE_HEIGHT_IN), dpi=DPI, facecolor="white")
    FigureCanvasAgg(fig)
    share = image_width / (image_width + TABLE_WIDTH_IN)
    ax = fig.add_axes((0.01, 0.02, share - 0.02, 0.9))
    if image is not None:
        s = np.asarray(image[k], np.float32)
        lo, hi = np.percentile(s, (1, 99)) if s.size else (0.0, 1.0)
        ax.imshow(s, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1, aspect=aspect, interpolation="nearest")
    else:
        ax.imshow(np.zeros((n_rows, n_cols)), cmap="gray", vmin=0, vmax=1, aspect=aspect)
    ax.imshow(_overlay(inst.canonical[k]), aspect=aspect, interpolation="nearest")
    outline = [patheffects.withStroke(linewidth=2.5, foreground="black")]
    for r in rows:
        for line in r.get("lines") or ():
            colour = LINE_RGB.get(r.get("structure"), (1, 1, 1))
            ax.plot([line.start[2], line.end[2]], [line.start[1], line.end[1]], color=colour, linewidth=1.0)
        if r.get("structure") == "canal" and r.get("lines"):
            end = r["lines"][0].end
            ax.text(end[2] + 2, end[1], _num(r.get("ap_diameter_mm")), color="white", fontsize=7, va="center",
                    path_effects=outline)
    for st in inst.structures:
        if st.structure not in ("vertebra", "disc") or not st.n_voxels or st.value is None:
            continue
        row, col = _label_position(inst.canonical[k], st)
        disc = st.structure == "disc"
        ax.text(col, row, st.level, color="white", fontsize=7 if disc else 9, ha="center", va="center",
                fontweight="normal" if disc else "bold", path_effects=outline)
    ax.set_xlim(-0.5, n_cols - 0.5)
    ax.set_ylim(n_rows - 0.5, -0.5)
    ax.set_axis_off()
    ax.set_title(f"slice {k} (anterior left)", fontsize=8)
    head = [title] if title else []
    head.append(f"levels counted from the {inst.anchor}" + (f"; {', '.join(inst.flags)}" if inst.flags else ""))
    head = [textwrap.fill(h, HEAD_WIDTH, subsequent_indent="  ") for h in head]
    fig.text(share + 0.01, 0.98, "\n".join(head), fontsize=9, va="top", family="monospace", fontweight="bold")
    fig.text(share + 0.01, 0.86, "\n".join(_table_lines(inst, rows)), fontsize=8, va="top", family="monospace")
    return fig


def figure_png(fig) -> bytes:
    """The figure as PNG bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, facecolor="white")
    return buf.getvalue()


def report_png(image: np.ndarray | None, inst, rows: Sequence[dict[str, Any]], *, title: str = "",
               slice_index: int | None = None) -> bytes:
    """:func:`level_figure` as PNG bytes."""
    return figure_png(level_figure(image, inst, rows, title=title, slice_index=slice_index))
