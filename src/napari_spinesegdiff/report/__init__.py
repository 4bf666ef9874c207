"""The level-by-level report between the pipeline and the edges (CLI, napari, batch): numpy and scipy only.

``measure`` (heights, depths, ratios, canal diameters and slips in millimetres, in each structure's own frame),
``intervals`` (their ensemble intervals, conformally calibrated on validation cases) and ``table`` (the levels
table, CSV or Parquet); ``instances`` splits the labels into named structures.
"""
