"""Render the README's screenshot (and an animation of the denoising) from a real napari viewer.

    xvfb-run -a -s "-screen 0 1400x1000x24" .venv/bin/python scripts/readme_screenshot.py SCAN [--out docs]

Opens SCAN through the plugin's reader, runs the dock widget with the shipped model on the middle slices,
waits for the result and the QA tables, then saves ``screenshot.png`` (whole window) and
``denoising.gif`` (the canvas at each step of a second run on the middle slice from pure noise, replayed
from the trajectory layer).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("scan")
    ap.add_argument("--out", type=Path, default=Path("docs"))
    ap.add_argument("--slices", type=int, default=9, help="how many middle slices to segment")
    ap.add_argument("--vertebrae", choices=["whole", "split"], default="whole")
    args = ap.parse_args()

    import napari
    import numpy as np
    from imageio.v3 import imwrite
    from qtpy.QtCore import QEventLoop, QTimer
    from qtpy.QtWidgets import QApplication

    args.out.mkdir(parents=True, exist_ok=True)
    viewer = napari.Viewer(show=True)
    viewer.window._qt_window.resize(1400, 950)
    layers = viewer.open(args.scan, plugin="spinesegdiff")
    image = layers[0]
    _, w = viewer.window.add_plugin_dock_widget("spinesegdiff", "SpineSegDiff")
    form = w.segment  # the Segment panel's controls
    form.image.value = image
    n = image.data.shape[0]
    a = max(0, n // 2 - args.slices // 2)
    form.steps.value, form.ensemble.value, form.batch_slices.value = 10, 5, 3
    form.slice_mode.value, form.slice_range.value = "range", f"{a}:{a + args.slices}"
    form.stream_every.value, form.prior.value, form.device.value = 1, "baseline", "auto"
    form.vertebrae.value = args.vertebrae
    loop = QEventLoop()
    w.run_finished.connect(lambda _status: loop.quit())
    w.run()
    loop.exec()
    app = QApplication.instance()
    while w.review.busy:
        app.processEvents()
    mid = n // 2
    w.go_to(image, (mid, image.data.shape[1] // 2, image.data.shape[2] // 2))
    viewer.reset_view()
    for _ in range(20):
        app.processEvents()
    imwrite(args.out / "screenshot.png", viewer.screenshot(canvas_only=False, flash=False))

    # the denoising history of one slice from pure noise (no prior): scrub the trajectory's step axis
    form.prior.value, form.slice_range.value, form.steps.value = "none", f"{mid}:{mid + 1}", 12
    loop = QEventLoop()
    w.run_finished.connect(lambda _status: loop.quit())
    w.run()
    loop.exec()
    while w.review.busy:
        app.processEvents()
    traj = viewer.layers["denoising trajectory"] if "denoising trajectory" in viewer.layers else None
    if traj is not None:
        for name in ("uncertainty", "uncertain boundary"):
            if name in viewer.layers:
                viewer.layers[name].visible = False
        viewer.layers["spine labels"].visible = False
        traj.visible = True
        frames = []
        for k in range(traj.data.shape[0]):
            step = list(viewer.dims.current_step)
            step[0], step[-3] = k, mid
            viewer.dims.current_step = tuple(step)
            app.processEvents()
            frames.append(np.asarray(viewer.screenshot(canvas_only=True, flash=False))[..., :3])
        frames += [frames[-1]] * 4
        imwrite(args.out / "denoising.gif", np.stack(frames), duration=300, loop=0)
    QTimer.singleShot(0, viewer.close)
    print(f"wrote {args.out / 'screenshot.png'}")


if __name__ == "__main__":
    main()
