"""Line charts of a run's numbers over its steps, as SVG a browser shows inline (the validation page)."""

from __future__ import annotations

import html
import math

WIDTH, HEIGHT, PAD = 320, 150, 36


def _label(value: float) -> str:
    return f"{value:.4g}"


def line_chart(title: str, points: list[tuple[int, float]], marked: int | None = None, note: str = "") -> str:
    """An SVG chart of ``points`` (step, value), the step ``marked`` drawn as a dashed line with ``note``.

    Non-finite values are left out. The y axis spans the values (a flat series gets a small band around it).
    """
    points = sorted((s, v) for s, v in points if v is not None and math.isfinite(v))
    head = f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" class="chart">'
    title_el = f'<text x="{PAD}" y="14" font-size="12">{html.escape(title)}</text>'
    if not points:
        return f'{head}{title_el}<text x="{PAD}" y="{HEIGHT // 2}" font-size="11">no values yet</text></svg>'
    steps, values = [s for s, _ in points], [v for _, v in points]
    x0, x1 = min(steps), max(steps)
    y0, y1 = min(values), max(values)
    if y1 - y0 < 1e-12:
        y0, y1 = y0 - 0.5 * (abs(y0) or 1) * 0.1, y1 + 0.5 * (abs(y1) or 1) * 0.1
    span_x, span_y = (x1 - x0) or 1, y1 - y0
    left, right, top, bottom = PAD + 10, WIDTH - 10, 22, HEIGHT - 22

    def x(step: float) -> float:
        return left + (step - x0) / span_x * (right - left)

    def y(value: float) -> float:
        return bottom - (value - y0) / span_y * (bottom - top)

    path = " ".join(f"{x(s):.1f},{y(v):.1f}" for s, v in points)
    parts = [
        head,
        title_el,
        f'<line x1="{left}" y1="{bottom}" x2="{right}" y2="{bottom}" stroke="#999"/>',
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{bottom}" stroke="#999"/>',
        f'<text x="{left - 4}" y="{top + 4}" font-size="10" text-anchor="end">{_label(y1)}</text>',
        f'<text x="{left - 4}" y="{bottom}" font-size="10" text-anchor="end">{_label(y0)}</text>',
        f'<text x="{left}" y="{HEIGHT - 6}" font-size="10">{x0}</text>',
        f'<text x="{right}" y="{HEIGHT - 6}" font-size="10" text-anchor="end">step {x1}</text>',
        f'<polyline fill="none" stroke="#1f77b4" stroke-width="1.5" points="{path}"/>',
    ]
    parts += [f'<circle cx="{x(s):.1f}" cy="{y(v):.1f}" r="2" fill="#1f77b4"/>' for s, v in points]
    if marked is not None and x0 <= marked <= x1:
        parts.append(
            f'<line class="marked" x1="{x(marked):.1f}" y1="{top}" x2="{x(marked):.1f}" y2="{bottom}" '
            f'stroke="#d62728" stroke-dasharray="4 3"/>'
        )
        parts.append(
            f'<text x="{min(x(marked) + 3, right - 60):.1f}" y="{top + 10}" font-size="10" fill="#d62728">'
            f"{html.escape(note or f'step {marked}')}</text>"
        )
    return "".join(parts) + "</svg>"
