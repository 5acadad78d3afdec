"""Figures for the methods' plots, through matplotlib's object API: the process-wide backend is never touched."""

from __future__ import annotations

import os
from typing import Any


def new_figure(figsize: tuple[float, float]) -> tuple[Any, Any]:
    """A ``Figure`` with one axes and its own Agg canvas (no pyplot, no global state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=figsize)
    FigureCanvasAgg(figure)
    return figure, figure.add_subplot()


def save_figure(figure: Any, path: str, dpi: int = 100) -> str:
    """Lay out ``figure`` and write it to ``path`` (PNG), creating the folder; return the path."""
    figure.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.savefig(path, dpi=dpi)
    return path
