"""Every published figure, drawn from the committed results at its published size, is checked
for what a reader cannot see: text smaller than 8 pt, a legend lying on data (lines, markers,
bars, bands of any panel), and labels lying on each other (tick labels of one axis, annotations
of one panel). Drawing happens in memory; nothing is written to figures/."""

from __future__ import annotations

import itertools

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
from matplotlib.collections import Collection  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
from matplotlib.text import Text  # noqa: E402
from matplotlib.transforms import Bbox  # noqa: E402

from lib import figures, paths  # noqa: E402
from lib.plotting import legend_below  # noqa: E402

MIN_POINTS = 8.0
#: legend boxes shrink by this many pixels on each side before the test (the frame's padding)
PAD = 2.0


def _texts(fig):
    for t in fig.findobj(Text):
        # a hidden panel's tick labels are not drawn, though each says it is visible
        if (
            t.get_visible()
            and t.get_text().strip()
            and t.get_figure() is fig
            and (t.axes is None or t.axes.get_visible())
        ):
            yield t


def small_texts(fig) -> list[str]:
    return [
        f"{t.get_text()!r} at {t.get_fontsize():.1f} pt" for t in _texts(fig) if t.get_fontsize() < MIN_POINTS - 1e-6
    ]


def _legends(fig):
    out = [leg for ax in fig.axes if (leg := ax.get_legend()) is not None and leg.get_visible()]
    return out + [leg for leg in fig.legends if leg.get_visible()]


def _inner(bbox: Bbox) -> Bbox:
    return Bbox.from_extents(bbox.x0 + PAD, bbox.y0 + PAD, bbox.x1 - PAD, bbox.y1 - PAD)


def _data_hits(ax, box: Bbox, renderer) -> list[str]:
    hits = []
    clip = ax.get_window_extent(renderer)
    for line in ax.get_lines():
        if not line.get_visible():
            continue
        path = line.get_transform().transform_path(line.get_path())
        vertices = path.vertices
        inside = [(x, y) for x, y in vertices if box.contains(x, y) and clip.contains(x, y)]
        drawn_line = line.get_linestyle() not in ("None", "none", "", " ")
        if inside or (drawn_line and path.intersects_bbox(Bbox.intersection(box, clip) or box, filled=False)):
            hits.append(f"line {line.get_label()!r}")
    for patch in ax.patches:
        if isinstance(patch, Rectangle) and patch.get_visible() and patch.get_width() and patch.get_height():
            ext = patch.get_window_extent(renderer)
            overlap = Bbox.intersection(ext, box)
            if overlap is not None and overlap.width > 1 and overlap.height > 1:
                hits.append(f"bar {patch.get_label()!r}")
                break
    for coll in ax.collections:
        if not isinstance(coll, Collection) or not coll.get_visible():
            continue
        offsets = coll.get_offsets()
        if len(offsets) and coll.get_offset_transform() is not None and not len(coll.get_paths()) > 1:
            points = coll.get_offset_transform().transform(offsets)
            if any(box.contains(x, y) and clip.contains(x, y) for x, y in points):
                hits.append(f"markers {coll.get_label()!r}")
            continue
        transform = coll.get_transform()
        for path in coll.get_paths():
            if transform.transform_path(path).intersects_bbox(box, filled=True):
                hits.append(f"band {coll.get_label()!r}")
                break
    return hits


def legends_on_data(fig) -> list[str]:
    renderer = fig.canvas.get_renderer()
    out = []
    for leg in _legends(fig):
        box = _inner(leg.get_window_extent(renderer))
        for ax in fig.axes:
            if ax.get_window_extent(renderer).overlaps(box):
                out += [
                    f"legend ({', '.join(t.get_text() for t in leg.get_texts())[:60]}) over {h}"
                    for h in _data_hits(ax, box, renderer)
                ]
    return out


def legends_on_text(fig) -> list[str]:
    """A legend lying on any text of the figure that is not its own (an axis label, tick labels, a title)."""
    renderer = fig.canvas.get_renderer()
    # every text that is drawn: tick labels only where _drawn says so, then the rest
    axes = [(ax, axis) for ax in fig.axes for axis in (ax.xaxis, ax.yaxis)]
    ticks = {id(tick.label1) for _, axis in axes for tick in axis.get_major_ticks()}
    texts = [t for t in _texts(fig) if id(t) not in ticks]
    texts += [t for ax, axis in axes if ax.get_visible() for t in _drawn(axis)]
    out = []
    for leg in _legends(fig):
        box = _inner(leg.get_window_extent(renderer))
        own = {id(t) for t in leg.get_texts()} | {id(leg.get_title())}
        for t in (t for t in texts if id(t) not in own):
            overlap = Bbox.intersection(t.get_window_extent(renderer), box)
            if overlap is not None and overlap.width > 1 and overlap.height > 1:
                out.append(
                    f"legend ({', '.join(x.get_text() for x in leg.get_texts())[:60]}) over text {t.get_text()!r}"
                )
    return out


def _overlapping(texts, renderer) -> list[str]:
    # a slanted label's box is not the text's outline (neighbours' boxes overlap where the text does not)
    boxes = [
        (t.get_text(), t.get_window_extent(renderer))
        for t in texts
        if t.get_visible() and t.get_text().strip() and t.get_rotation() % 90 == 0
    ]
    out = []
    for (a, ba), (b, bb) in itertools.combinations(boxes, 2):
        overlap = Bbox.intersection(ba, bb)
        if overlap is not None and overlap.width > 1 and overlap.height > 1:
            out.append(f"{a!r} over {b!r}")
    return out


def _drawn(axis) -> list[Text]:
    """The major tick labels of ``axis`` that are drawn: visible, at a tick inside the view interval."""
    lo, hi = axis.get_view_interval()
    return [
        tick.label1
        for tick, loc in zip(axis.get_major_ticks(), axis.get_majorticklocs())
        if tick.label1.get_visible() and min(lo, hi) <= loc <= max(lo, hi)
    ]


def overlapping_labels(fig) -> list[str]:
    renderer = fig.canvas.get_renderer()
    out = []
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            out += _overlapping(_drawn(axis), renderer)
        out += _overlapping(ax.texts, renderer)
    return out


def problems(fig) -> list[str]:
    fig.tight_layout()
    fig.canvas.draw()
    return (
        [f"text under {MIN_POINTS:g} pt: {p}" for p in small_texts(fig)]
        + legends_on_data(fig)
        + legends_on_text(fig)
        + [f"labels overlap: {p}" for p in overlapping_labels(fig)]
    )


def published_figures():
    """(notebook, draw) for every notebook whose results are committed."""
    return [(nb, draw) for nb, draw in figures.drawers().items() if (paths.results_dir(False) / f"{nb}.json").is_file()]


@pytest.mark.parametrize("notebook, draw", published_figures(), ids=lambda v: v if isinstance(v, str) else "")
def test_published_figures_are_readable(notebook, draw, monkeypatch):
    found = {}

    def check(fig, name=None, **kwargs):
        found[name] = problems(fig)
        plt.close(fig)
        return []

    module = __import__(draw.__module__, fromlist=["draw"])
    for mod in {module, *[m for m in (figures_module(n) for n in ("snr_sweep",)) if m]}:
        monkeypatch.setattr(mod, "savefig", check, raising=False)
    draw(paths.read_json(paths.results_dir(False) / f"{notebook}.json"), smoke=False)
    assert found, f"{notebook} drew no figure"
    bad = {name: p for name, p in found.items() if p}
    assert not bad, "\n".join(f"{name}: {'; '.join(p[:6])}{' ...' if len(p) > 6 else ''}" for name, p in bad.items())


def figures_module(name):
    import importlib

    try:
        return importlib.import_module(f"lib.figures.{name}")
    except ImportError:
        return None


def test_the_checks_see_a_legend_on_data_and_small_text():
    fig, ax = plt.subplots(figsize=(4, 3))
    ax.plot([0, 1], [1, 1], label="a line through the legend")
    ax.legend(loc="upper left")
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("tiny", fontsize=5)
    found = problems(fig)
    assert any("legend" in p and "line" in p for p in found) and any("tiny" in p for p in found)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(4, 3))
    ax.plot([0, 1], [0, 0.2], label="low")
    ax.set_ylim(0, 1)
    ax.legend(loc="upper right")
    assert problems(fig) == []
    plt.close(fig)
    # a legend hung under the axes at a fixed fraction of its height lands on the x label of a short panel
    fig, ax = plt.subplots(figsize=(4, 2))
    ax.plot([0, 1], [0, 1], label="a")
    ax.set_xlabel("the x label")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.05))
    assert any("over text 'the x label'" in p for p in problems(fig))
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(4, 2))
    for i in range(5):
        ax.plot([0, 1], [0, i], label=f"line {i}")
    ax.set_xlabel("the x label")
    legend_below(ax, ncol=1)
    assert problems(fig) == []
    plt.close(fig)
