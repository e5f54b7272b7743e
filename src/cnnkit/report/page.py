"""The HTML page itself: escaping, inline PNG images, tables, sections and the style sheet.

Everything a page needs is inside it: images are ``data:image/png;base64`` URIs, the
style sheet is in a ``<style>`` element, there is no script. The layout is one column
at most 72 rem wide; wide images and tables scale down or scroll inside their own box,
so the page reads at 1280 px and at phone width.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Iterable, Sequence
from typing import Any

from matplotlib.figure import Figure

STYLE = """\
:root { color-scheme: light; }
body { font: 16px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
  color: #222; background: #fff; margin: 0; padding: 1rem; }
main { max-width: 72rem; margin: 0 auto; }
h1 { font-size: 1.6rem; margin: 0.2rem 0 0.4rem; }
h2 { font-size: 1.25rem; margin: 2rem 0 0.2rem; border-bottom: 1px solid #ccc; }
h3 { font-size: 1.05rem; margin: 1.2rem 0 0.3rem; }
p.guide { color: #555; font-style: italic; margin: 0 0 0.8rem; }
img { max-width: 100%; height: auto; display: block; margin: 0.4rem 0; }
.scroll { overflow-x: auto; max-width: 100%; }
table { border-collapse: collapse; font-size: 0.9rem; margin: 0.4rem 0; }
th, td { border: 1px solid #ddd; padding: 0.2rem 0.5rem; text-align: left; }
td.n, th.n { text-align: right; font-variant-numeric: tabular-nums; }
pre { font-size: 0.8rem; background: #f6f6f6; padding: 0.6rem; overflow-x: auto; }
.big { font-size: 1.4rem; font-weight: bold; }
@media (max-width: 40rem) { body { padding: 0.5rem; font-size: 15px; }
  table { font-size: 0.8rem; } }
"""


def escape(value: Any) -> str:
    """``value`` as text safe inside an element or a quoted attribute."""
    return html.escape(str(value), quote=True)


def png_bytes(fig: Figure, *, dpi: float | None = None) -> bytes:
    """``fig`` rendered to PNG in memory (at its own DPI unless ``dpi`` is given)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def image(fig: Figure, alt: str, *, dpi: float | None = None) -> str:
    """An ``<img>`` holding ``fig`` as an inline PNG, with ``alt`` text."""
    data = base64.b64encode(png_bytes(fig, dpi=dpi)).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{escape(alt)}">'


def png_image(data: bytes, alt: str) -> str:
    """An ``<img>`` holding PNG file contents ``data`` inline."""
    encoded = base64.b64encode(data).decode("ascii")
    return f'<img src="data:image/png;base64,{encoded}" alt="{escape(alt)}">'


def table(header: Sequence[str], rows: Iterable[Sequence[Any]], numeric: Sequence[bool]) -> str:
    """A ``<table>``; columns where ``numeric`` is true are right-aligned."""

    def cells(tag: str, values: Sequence[Any]) -> str:
        return "".join(
            f"<{tag}{' class=n' if n else ''}>{escape(v)}</{tag}>"
            for v, n in zip(values, numeric, strict=True)
        )

    body = "".join(f"<tr>{cells('td', row)}</tr>" for row in rows)
    return (
        f'<div class="scroll"><table><thead><tr>{cells("th", header)}</tr></thead>'
        f"<tbody>{body}</tbody></table></div>"
    )


def pre(text: str) -> str:
    return f"<pre>{escape(text)}</pre>"


def section(title: str, guide: str, *parts: str) -> str:
    """A ``<section>`` with its ``<h2>`` heading and a one-line reading guide."""
    return (
        f"<section><h2>{escape(title)}</h2>"
        f'<p class="guide">{escape(guide)}</p>{"".join(parts)}</section>'
    )


def document(title: str, subtitle: str, sections: Iterable[str]) -> str:
    """The whole page."""
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)}</title><style>{STYLE}</style></head>"
        f"<body><main><h1>{escape(title)}</h1><p>{escape(subtitle)}</p>"
        f"{''.join(sections)}</main></body></html>\n"
    )
