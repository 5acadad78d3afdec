"""What a plot drew: the figures a call saves, captured so a test can read their data instead of the PNG bytes."""

from matplotlib.figure import Figure


def capture_saved_figures(monkeypatch) -> list[Figure]:
    """Record every ``Figure`` saved from now on (it is still written as before); returns the growing list."""
    saved: list[Figure] = []
    savefig = Figure.savefig

    def recording(self, *args, **kwargs):
        saved.append(self)
        return savefig(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", recording)
    return saved


def bar_spans(ax) -> list[tuple[float, float, float]]:
    """``(y centre, x start, x stop)`` of every rectangle that ``broken_barh`` drew on ``ax``, sorted."""
    spans = []
    for collection in ax.collections:
        for path in collection.get_paths():
            xs, ys = path.vertices[:, 0], path.vertices[:, 1]
            spans.append((round((ys.min() + ys.max()) / 2, 6), float(xs.min()), float(xs.max())))
    return sorted(spans)


def history_spans(history: list[tuple[int, list[int]]], end: int) -> list[tuple[float, float, float]]:
    """``(block, first step, stop step)`` of each block of each period of a LISA history ending at ``end``, sorted."""
    stops = [step for step, _ in history[1:]] + [end]
    return sorted(
        (float(block), float(start), float(stop))
        for (start, blocks), stop in zip(history, stops, strict=True)
        for block in blocks
    )
