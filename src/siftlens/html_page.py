"""The one page shell of every HTML output (report, compare, spurious, flag): self-contained pages, figures
embedded as PNG data URIs, tables with fixed decimals, skipped inputs listed with their reasons."""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Iterable

import pandas as pd

CSS = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;color:#222}
table{border-collapse:collapse;font-size:12px}td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}
th{background:#f3f3f3}img{max-width:100%}.note{color:#555;font-size:13px}code{background:#f5f5f5}"""


def png_data_uri(fig, dpi: int = 110) -> str:
    """A matplotlib figure as a PNG data URI (the figure is closed)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def table_html(df: pd.DataFrame, decimals: int | None = 3) -> str:
    """A table without the index, floats to ``decimals`` places (None: pandas' own formatting)."""
    fmt = None if decimals is None else (lambda v: f"{v:.{decimals}f}")
    return df.to_html(index=False, float_format=fmt, border=0)


def skipped_html(skipped: list[dict], heading: str = "Skipped", limit: int | None = None) -> str:
    """The skipped inputs with their reasons (each reason names its file); empty when none was skipped."""
    if not skipped:
        return ""
    items = "".join(f"<li>{html.escape(s['reason'])}</li>" for s in skipped[:limit])
    return f"<h2>{heading} ({len(skipped)})</h2><ul>{items}</ul>"


def html_page(title: str, parts: Iterable[str]) -> str:
    """A complete page: ``title`` in the head, ``parts`` (HTML fragments) as the body."""
    return (f"<!doctype html><html><head><meta charset=utf-8><title>{html.escape(title)}</title><style>{CSS}</style>"
            f"</head><body>{''.join(parts)}</body></html>")
