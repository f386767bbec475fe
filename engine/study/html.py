"""The study report as one self-contained HTML file: the Markdown summary rendered to HTML (markdown-it-py,
raw HTML in the text escaped, so a class name cannot inject markup) with every figure embedded as a PNG data
URI. It opens offline, from an e-mail or a hospital share, with nothing to fetch."""

from __future__ import annotations

import base64
from collections.abc import Mapping
from pathlib import Path

from jinja2 import Environment, select_autoescape
from markdown_it import MarkdownIt
from markupsafe import Markup

__all__ = ["render_html"]

_TEMPLATE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{ title }}</title>
<style>
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1b1f24; margin: 0 auto;
       max-width: 1100px; padding: 24px; }
h1, h2, h3 { line-height: 1.25; }
h2 { border-bottom: 1px solid #d0d7de; padding-bottom: 4px; margin-top: 2em; }
table { border-collapse: collapse; margin: 12px 0; font-size: 13px; display: block; overflow-x: auto; }
th, td { border: 1px solid #d0d7de; padding: 4px 8px; text-align: left; white-space: nowrap; }
th { background: #f6f8fa; }
tr:nth-child(even) td { background: #fbfcfd; }
code { background: #f6f8fa; padding: 1px 4px; border-radius: 3px; }
figure { margin: 24px 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #d0d7de; }
figcaption { color: #57606a; font-size: 13px; }
</style>
</head>
<body>
{{ body }}
{% if figures %}<h2>Figures</h2>
{% for name, uri in figures %}<figure><img alt="{{ name }}" src="{{ uri }}"><figcaption>{{ name }}</figcaption></figure>
{% endfor %}{% endif %}
</body>
</html>
"""


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def render_html(markdown: str, *, title: str, figures: Mapping[str, Path] | None = None) -> str:
    """One HTML document: ``markdown`` rendered (tables included), then each figure (name -> PNG file)
    embedded in the page."""
    body = MarkdownIt("commonmark", {"html": False}).enable("table").render(markdown)
    env = Environment(autoescape=select_autoescape(default=True, default_for_string=True))
    template = env.from_string(_TEMPLATE)
    embedded = [(name, _data_uri(path)) for name, path in (figures or {}).items()]
    return template.render(title=title, body=Markup(body), figures=embedded)
