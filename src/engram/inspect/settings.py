"""The heatmap's display choices and the table-use controls, torch-free: ``engram inspect`` and
``engram analyze table-use`` take their flag choices from here without loading the model code
(``engram.inspect.heatmap`` and ``engram.inspect.table_use`` check values against them)."""

from __future__ import annotations

COLOR_MODES = ("auto", "truecolor", "256", "none")  # auto: none off a terminal or with NO_COLOR, else by $COLORTERM
SCALES = ("rank", "relative", "absolute")  # how gates map to shades (heatmap.scale_values)
# The controls of ``engram analyze table-use`` (engram.inspect.table_use), in the order they are scored.
TABLE_USE_CONTROLS = ("removed", "mean_row", "shuffled_rows", "redrawn_rows", "reseeded_hash")
