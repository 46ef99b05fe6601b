"""A dependency-free horizontal bar chart as SVG, so every benchmark leaves a picture behind."""

from __future__ import annotations

from collections.abc import Mapping
from html import escape


def bar_chart(title: str, values: Mapping[str, float], *, baseline: float | None = None, unit: str = "") -> str:
    width, bar_h, gap, left = 900, 28, 14, 420
    top = 50
    height = top + len(values) * (bar_h + gap) + 30
    peak = max(values.values()) or 1.0
    rows = []
    for i, (label, value) in enumerate(values.items()):
        y = top + i * (bar_h + gap)
        w = (width - left - 140) * value / peak
        ratio = f"  ({value / baseline:.2f}x)" if baseline else ""
        rows.append(
            f'<text x="{left - 10}" y="{y + bar_h * 0.68}" text-anchor="end">{escape(label)}</text>'
            f'<rect x="{left}" y="{y}" width="{w:.1f}" height="{bar_h}" fill="#3b82f6"/>'
            f'<text x="{left + w + 8:.1f}" y="{y + bar_h * 0.68}">{value:,.0f}{unit}{ratio}</text>'
        )
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'font-family="sans-serif" font-size="13"><rect width="100%" height="100%" fill="white"/>'
        f'<text x="20" y="28" font-size="16" font-weight="bold">{escape(title)}</text>{"".join(rows)}</svg>\n'
    )
