"""The HTML study report is one self-contained, well-formed file that escapes what the data put in it."""

from __future__ import annotations

import base64
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
from PIL import Image

from engine.study.html import render_html


class _Collect(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.tags: list[str] = []
        self.urls: list[str] = []
        self.unbalanced: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.urls += [v or "" for k, v in attrs if k in ("src", "href")]
        if tag not in ("meta", "img", "br", "hr", "link", "input"):
            self.stack.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if not self.stack or self.stack.pop() != tag:
            self.unbalanced.append(tag)


def test_report_embeds_figures_renders_tables_and_escapes_data(tmp_path: Path) -> None:
    figure = tmp_path / "iou.png"
    Image.fromarray(np.zeros((4, 6), np.uint8)).save(figure)
    markdown = (
        "# Drift study\n\n| class | IoU |\n|---|---|\n| <script>alert(1)</script> | 0.5 |\n\n"
        "Reversal: **no** (p = 0.4)\n"
    )
    page = render_html(markdown, title="Study <of> demo", figures={"IoU per architecture": figure})
    parsed = _Collect()
    parsed.feed(page)
    assert parsed.unbalanced == [] and parsed.stack == []
    assert "table" in parsed.tags and "img" in parsed.tags and "script" not in parsed.tags
    assert "&lt;script&gt;" in page and "<title>Study &lt;of&gt; demo</title>" in page
    assert parsed.urls and all(u.startswith("data:image/png;base64,") for u in parsed.urls)
    embedded = base64.b64decode(parsed.urls[0].removeprefix("data:image/png;base64,"))
    assert embedded == figure.read_bytes()
