"""Server-side SVG plots: line charts with a spread band and bar charts, as markup for the templates.

No JavaScript and no inline ``style`` attributes (a strict CSP allows them): colours are presentation
attributes, text is escaped, every point has a ``<title>`` (the browser's hover tooltip) with its numbers and
may link to the records behind it. Colours follow the model (:func:`model_colours`), the same on every page.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from markupsafe import Markup, escape

__all__ = ["PALETTE", "BarChart", "LineChart", "Point", "Series", "model_colours", "nice_ticks"]

# Okabe-Ito: distinguishable with the common colour-vision deficiencies
PALETTE: tuple[str, ...] = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#000000")

WIDTH, HEIGHT = 640, 300
LEFT, RIGHT, TOP, BOTTOM = 64, 16, 34, 62


def model_colours(names: Iterable[str]) -> dict[str, str]:
    """One colour per model name, by sorted name (so every chart and legend agrees)."""
    return {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(sorted(set(names)))}


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values covering [low, high]."""
    if not math.isfinite(low) or not math.isfinite(high) or high <= low:
        high = low + 1.0
    raw = (high - low) / max(count - 1, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    start = math.floor(low / step) * step
    ticks = []
    value = start
    while value <= high + step * 1e-9:
        ticks.append(round(value, 10))
        value += step
    if ticks[-1] < high:
        ticks.append(round(ticks[-1] + step, 10))
    return ticks


@dataclass(frozen=True)
class Point:
    """One value at category ``x``; ``low``/``high`` draw the spread band; ``title`` is the hover text."""

    x: int
    y: float
    title: str
    low: float | None = None
    high: float | None = None
    href: str | None = None


@dataclass
class Series:
    name: str
    colour: str
    points: list[Point] = field(default_factory=list)


def _fmt(value: float) -> str:
    return f"{value:.1f}".rstrip("0").rstrip(".") if value == value else "nan"


def _tick_label(value: float) -> str:
    return f"{value:g}"


class _Frame:
    """The plotting area: category x axis, linear y axis."""

    def __init__(self, labels: Sequence[str], y_ticks: Sequence[float]) -> None:
        self.labels = list(labels)
        self.y_min, self.y_max = y_ticks[0], y_ticks[-1]
        self.y_ticks = list(y_ticks)
        self.plot_w = WIDTH - LEFT - RIGHT
        self.plot_h = HEIGHT - TOP - BOTTOM

    def x(self, index: int) -> float:
        step = self.plot_w / max(len(self.labels), 1)
        return LEFT + step * (index + 0.5)

    @property
    def band(self) -> float:
        return self.plot_w / max(len(self.labels), 1)

    def y(self, value: float) -> float:
        span = (self.y_max - self.y_min) or 1.0
        clipped = min(max(value, self.y_min), self.y_max)
        return TOP + self.plot_h * (1 - (clipped - self.y_min) / span)

    def axes(self, title: str, x_title: str, y_title: str, tick_format: Callable[[float], str]) -> list[str]:
        parts = [
            f'<text class="chart-title" x="{LEFT}" y="20">{escape(title)}</text>',
        ]
        for tick in self.y_ticks:
            y = _fmt(self.y(tick))
            parts.append(
                f'<line class="grid" x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y}" y2="{y}" stroke="#ddd"/>'
                f'<text class="tick" x="{LEFT - 6}" y="{y}" text-anchor="end" dominant-baseline="middle">'
                f"{escape(tick_format(tick))}</text>"
            )
        every = max(1, math.ceil(len(self.labels) / 8))
        for i, label in enumerate(self.labels):
            if i % every:
                continue
            parts.append(
                f'<text class="tick" x="{_fmt(self.x(i))}" y="{HEIGHT - BOTTOM + 16}" '
                f'text-anchor="middle">{escape(label)}</text>'
            )
        bottom = HEIGHT - BOTTOM
        parts.append(
            f'<line class="axis" x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{bottom}" y2="{bottom}" stroke="#555"/>'
            f'<line class="axis" x1="{LEFT}" x2="{LEFT}" y1="{TOP}" y2="{bottom}" stroke="#555"/>'
            f'<text class="axis-title" x="{LEFT + self.plot_w / 2:.1f}" y="{HEIGHT - 18}" '
            f'text-anchor="middle">{escape(x_title)}</text>'
            f'<text class="axis-title" x="14" y="{TOP + self.plot_h / 2:.1f}" text-anchor="middle" '
            f'transform="rotate(-90 14 {TOP + self.plot_h / 2:.1f})">{escape(y_title)}</text>'
        )
        return parts


def _svg(parts: list[str], title: str, css_class: str) -> Markup:
    body = "".join(parts)
    return Markup(
        f'<svg class="chart {css_class}" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
        f'xmlns="http://www.w3.org/2000/svg" preserveAspectRatio="xMidYMid meet">'
        f"<title>{escape(title)}</title>{body}</svg>"
    )


def _linked(inner: str, href: str | None) -> str:
    return f'<a href="{escape(href)}">{inner}</a>' if href else inner


@dataclass
class LineChart:
    """Lines over categories (time windows), one per series, with an optional low-high band per point."""

    title: str
    x_title: str
    y_title: str
    labels: Sequence[str]
    series: Sequence[Series]
    y_range: tuple[float, float] | None = None
    tick_format: Callable[[float], str] = _tick_label

    def render(self) -> Markup:
        values = [v for s in self.series for p in s.points for v in (p.y, p.low, p.high) if v is not None]
        low, high = self.y_range or (min(values, default=0.0), max(values, default=1.0))
        frame = _Frame(self.labels, nice_ticks(low, high))
        parts = frame.axes(self.title, self.x_title, self.y_title, self.tick_format)
        for series in self.series:
            points = sorted(series.points, key=lambda p: p.x)
            band = [p for p in points if p.low is not None and p.high is not None]
            if len(band) >= 2:
                upper = " ".join(f"{_fmt(frame.x(p.x))},{_fmt(frame.y(p.high or 0))}" for p in band)
                lower = " ".join(f"{_fmt(frame.x(p.x))},{_fmt(frame.y(p.low or 0))}" for p in reversed(band))
                parts.append(
                    f'<polygon class="band" points="{upper} {lower}" fill="{series.colour}" '
                    f'fill-opacity="0.15" stroke="none"/>'
                )
            elif len(band) == 1:  # one window: the spread as a bar
                p = band[0]
                x = _fmt(frame.x(p.x))
                parts.append(
                    f'<line class="band" x1="{x}" x2="{x}" y1="{_fmt(frame.y(p.low or 0))}" '
                    f'y2="{_fmt(frame.y(p.high or 0))}" stroke="{series.colour}" stroke-opacity="0.35" '
                    f'stroke-width="10"/>'
                )
            if len(points) >= 2:
                line = " ".join(f"{_fmt(frame.x(p.x))},{_fmt(frame.y(p.y))}" for p in points)
                parts.append(
                    f'<polyline class="line" points="{line}" fill="none" stroke="{series.colour}" '
                    f'stroke-width="2"/>'
                )
            for p in points:
                circle = (
                    f'<circle class="point" cx="{_fmt(frame.x(p.x))}" cy="{_fmt(frame.y(p.y))}" r="4.5" '
                    f'fill="{series.colour}" data-series="{escape(series.name)}">'
                    f"<title>{escape(p.title)}</title></circle>"
                )
                parts.append(_linked(circle, p.href))
        return _svg(parts, self.title, "line-chart")


@dataclass
class BarChart:
    """One bar per category."""

    title: str
    x_title: str
    y_title: str
    labels: Sequence[str]
    values: Sequence[float]
    titles: Sequence[str]
    hrefs: Sequence[str | None]
    colour: str = "#4C6A92"
    tick_format: Callable[[float], str] = _tick_label

    def render(self) -> Markup:
        frame = _Frame(self.labels, nice_ticks(0.0, max(self.values, default=1.0) or 1.0))
        parts = frame.axes(self.title, self.x_title, self.y_title, self.tick_format)
        width = max(frame.band * 0.7, 1.0)
        for i, (value, title, href) in enumerate(zip(self.values, self.titles, self.hrefs, strict=True)):
            top = frame.y(value)
            rect = (
                f'<rect class="bar" x="{_fmt(frame.x(i) - width / 2)}" y="{_fmt(top)}" width="{_fmt(width)}" '
                f'height="{_fmt(HEIGHT - BOTTOM - top)}" fill="{self.colour}"><title>{escape(title)}</title></rect>'
            )
            parts.append(_linked(rect, href))
        return _svg(parts, self.title, "bar-chart")
