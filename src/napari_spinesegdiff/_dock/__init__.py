"""The napari edge's dock, one job per module, all sharing one :class:`~.state.RunState`:

* ``dock`` -- the dock widget napari opens: the Segment, Review and Queue tabs, the status line, the wiring.
* ``state`` -- the shared run state (current image, configuration, result, run status) and its signals.
* ``segment`` -- the Segment panel: settings form, persisted settings, Run / Cancel.
* ``run`` -- the run controller: thread worker, streamed steps, cancel, one result layer per event-loop turn.
* ``worker`` -- what runs in the worker threads (no Qt): the pipeline under inference mode, the QA tables.
* ``layers`` -- the result layers: put, merge, geometry, the live denoising canvas and trajectory.
* ``review`` -- the Review panel: levels table and renumbering, QA tables, uncertainty overlay, navigation.
* ``queue`` -- the Queue panel: a batch's scans in review order, open, decide, save edits, next / previous.
* ``navigation`` -- the viewer's current slice of an image, going to a position.
* ``export`` -- export in the scan's file geometry and the provenance sidecar.
* ``qa`` -- Qt-free QA tables and live-view colouring (plain numpy).
* ``levels`` -- Qt-free level report: made and renumbered through ``report``, its table cells, layer features and lines.
* ``queue_table`` -- Qt-free tables of the queue: a batch's results as queue items, their order, the review table.
"""

from .dock import SpineSegDiffWidget

__all__ = ["SpineSegDiffWidget"]
