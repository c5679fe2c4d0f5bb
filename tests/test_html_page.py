"""html_page.py: the page shell, PNG embedding, tables and skipped-input lists every HTML output shares."""

from __future__ import annotations

import base64

import pandas as pd

from siftlens.html_page import html_page, png_data_uri, skipped_html, table_html


def test_page_helpers():
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2, 1))
    ax.plot([0, 1], [1, 0])
    uri = png_data_uri(fig, dpi=50)
    png = base64.b64decode(uri.removeprefix("data:image/png;base64,"))
    assert uri.startswith("data:image/png;base64,") and png[:8] == b"\x89PNG\r\n\x1a\n"
    assert not plt.get_fignums()  # the figure is closed
    fig, ax = plt.subplots(figsize=(2, 1))
    ax.plot([0, 1], [1, 0])
    big = base64.b64decode(png_data_uri(fig, dpi=100).split(",", 1)[1])
    width = lambda b: int.from_bytes(b[16:20], "big")  # IHDR width  # noqa: E731
    assert width(big) > 1.5 * width(png)  # the page's dpi is honoured (report 110, spurious and flag 100)
    df = pd.DataFrame({"a": [0.123456], "b": ["x"]}, index=[7])
    assert "0.123</td>" in table_html(df) and "0.1235</td>" in table_html(df, 4) and ">7<" not in table_html(df)
    assert skipped_html([]) == ""
    s = skipped_html([{"path": "a", "reason": "a<b>.png: empty file"}] * 3, "Skipped inputs", limit=2)
    assert s.startswith("<h2>Skipped inputs (3)</h2>") and s.count("<li>") == 2 and "a&lt;b&gt;.png" in s
    page = html_page("run <1>", ["<p>x</p>", "<p>y</p>"])
    assert page.startswith("<!doctype html>") and "<title>run &lt;1&gt;</title>" in page
    assert page.endswith("<p>x</p><p>y</p></body></html>")
