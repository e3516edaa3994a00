"""The heatmap's display choices, torch-free: ``engram inspect`` takes its flag choices from here
without loading the model code (``engram.inspect.heatmap`` checks values against them)."""

from __future__ import annotations

COLOR_MODES = ("auto", "truecolor", "256", "none")  # auto: none off a terminal or with NO_COLOR, else by $COLORTERM
SCALES = ("rank", "relative", "absolute")  # how gates map to shades (heatmap.scale_values)
