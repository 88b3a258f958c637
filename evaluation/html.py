"""Small HTML and Markdown pieces of the report's sections: number formatting, tables, thumbnails."""

from __future__ import annotations

import base64
import html
import io
import math
from typing import Any


def fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def html_table(rows: list[dict]) -> str:
    if not rows:
        return "<p>(no rows)</p>"
    names = list(dict.fromkeys(k for r in rows for k in r))
    head = "".join(f"<th>{html.escape(n)}</th>" for n in names)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(fmt(r.get(n)))}</td>" for n in names) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def table_markdown_simple(rows: list[dict]) -> str:
    names = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(names) + " |", "|" + "---|" * len(names)]
    lines += ["| " + " | ".join(fmt(r.get(n)) for n in names) + " |" for r in rows]
    return "\n".join(lines)


def thumbnail_b64(data: bytes, size: int = 96) -> str:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        image = image.convert("RGB")
        image.thumbnail((size, size))
        if max(image.size) < size:  # tiny models make 32-64 px images: show them at thumbnail size
            scale = size / max(image.size)
            image = image.resize((round(image.width * scale), round(image.height * scale)), Image.NEAREST)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


__all__ = ["fmt", "html_table", "table_markdown_simple", "thumbnail_b64"]
