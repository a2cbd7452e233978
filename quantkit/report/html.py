"""report.html: one self-contained page (inline CSS, plots embedded as base64 PNG, no script) for people who open
it in a browser from a CI artifact.

The page is rendered from report.md's text, so it carries every section report.md carries, by construction:
a section added to the Markdown report can no longer be missing from the HTML one. Only the small Markdown
subset that :func:`quantkit.report.markdown.render_markdown` writes is understood (headings, pipe tables,
bullet lists, images, paragraphs, ``code``, **bold**, _emphasis_). The layout fits a 1400-px-wide window:
tables wrap long names instead of widening the page, and images scale down to the text width.
"""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

from quantkit.report.markdown import render_markdown

CSS = """
*{box-sizing:border-box}
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:76rem;color:#1d232a;
line-height:1.45;padding:0 1rem;overflow-wrap:anywhere}
h1{font-size:1.6rem;margin-bottom:.2rem}h2{font-size:1.2rem;margin-top:2rem;border-bottom:1px solid #d8dee4}
table{border-collapse:collapse;margin:.6rem 0;font-size:.85rem;max-width:100%}
td,th{border:1px solid #d8dee4;padding:.25rem .5rem;text-align:left;vertical-align:top;overflow-wrap:anywhere;
word-break:break-word}th{background:#f3f5f7}td.num{text-align:right;font-variant-numeric:tabular-nums;
white-space:nowrap}
.int8{color:#0b6e4f;font-weight:600}.fp16,.fp32{color:#a15c00;font-weight:600}
.bad{color:#b42318;font-weight:700}.good{color:#0b6e4f;font-weight:700}
img{max-width:100%;height:auto;border:1px solid #d8dee4}
code{background:#f3f5f7;padding:0 .2rem;border-radius:3px;overflow-wrap:anywhere;word-break:break-all}
li{margin:.15rem 0}
"""

_NUMERIC = re.compile(r"^[-+−]?(\d[\d,]*(\.\d+)?|\.\d+)( ?(%|dB|ms|MiB|KiB|B))?$")
_IMAGE = re.compile(r"^!\[(?P<alt>[^\]]*)\]\((?P<file>[^)\s]+)\)$")


def _inline(text: str) -> str:
    """Escape ``text`` and render the Markdown inline marks report.md uses: `code`, **bold**, _emphasis_."""
    out = []
    for k, part in enumerate(re.split(r"(`[^`]*`)", text)):
        if k % 2:  # a code span: taken literally
            out.append(f"<code>{html.escape(part[1:-1])}</code>")
            continue
        part = html.escape(part)
        part = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", part)
        part = re.sub(r"(?<![\w])_(\S(?:.*?\S)?)_(?![\w])", r"<i>\1</i>", part)
        part = re.sub(r"\b(PASSED)\b", r"<span class='good'>\1</span>", part)
        part = re.sub(r"\b(FAILED|NOT met)\b", r"<span class='bad'>\1</span>", part)
        out.append(part)
    return "".join(out)


def _cells(line: str) -> list[str]:
    body = line.strip()
    body = body[1:] if body.startswith("|") else body
    body = body[:-1] if body.endswith("|") else body
    cells, cur, in_code = [], [], False
    for ch in body:  # a | inside a code span is not a cell border
        if ch == "`":
            in_code = not in_code
        if ch == "|" and not in_code:
            cells.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
    cells.append("".join(cur).strip())
    return cells


def _cell(text: str, tag: str) -> str:
    if tag == "td" and text.lower() in ("int8", "fp16", "fp32"):
        return f"<td><span class='{text.lower()}'>{html.escape(text.upper())}</span></td>"
    cls = " class='num'" if tag == "td" and _NUMERIC.match(text) else ""
    return f"<{tag}{cls}>{_inline(text)}</{tag}>"


def _table(lines: list[str]) -> str:
    head = _cells(lines[0])
    rows = [_cells(x) for x in lines[2:]] if len(lines) > 1 and set(lines[1].replace("|", "").strip()) <= set("-: ") \
        else [_cells(x) for x in lines[1:]]
    out = ["<table>"]
    if any(head):
        out.append("<tr>" + "".join(_cell(h, "th") for h in head) + "</tr>")
    out += ["<tr>" + "".join(_cell(c, "td") for c in r) + "</tr>" for r in rows]
    return "".join(out) + "</table>"


def _image(alt: str, name: str, folder: Path | None) -> str:
    path = folder / name if folder is not None else None
    if path is None or "/" in name or not path.is_file():
        return f"<p><i>{html.escape(alt)}: {html.escape(name)} (not written)</i></p>"
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<p><img alt="{html.escape(alt)}" data-file="{html.escape(name)}" src="data:image/png;base64,{data}"></p>'


def markdown_to_html(md: str, folder: Path | None = None) -> str:
    """The body HTML of report.md's text; images named in it are read from ``folder`` and embedded."""
    out: list[str] = []
    lines = md.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if not line.strip():
            i += 1
        elif line.startswith("#"):
            level = min(len(line) - len(line.lstrip("#")), 6)
            out.append(f"<h{level}>{_inline(line[level:].strip())}</h{level}>")
            i += 1
        elif line.lstrip().startswith("|"):
            j = i
            while j < len(lines) and lines[j].lstrip().startswith("|"):
                j += 1
            out.append(_table(lines[i:j]))
            i = j
        elif line.startswith("- "):
            j = i
            while j < len(lines) and lines[j].startswith("- "):
                j += 1
            out.append("<ul>" + "".join(f"<li>{_inline(x[2:])}</li>" for x in lines[i:j]) + "</ul>")
            i = j
        elif _IMAGE.match(line.strip()):
            m = _IMAGE.match(line.strip())
            out.append(_image(m["alt"], m["file"], folder))
            i += 1
        else:
            j = i
            while j < len(lines) and lines[j].strip() and not lines[j].startswith(("#", "|", "- ")):
                j += 1
            out.append("<p>" + " ".join(_inline(x.strip()) for x in lines[i:j]) + "</p>")
            i = j
    return "\n".join(out)


def render_html(report: dict, folder: Path | None = None) -> str:
    """Render the report as one HTML page; PNGs listed in ``report["plots"]`` are read from ``folder`` and
    embedded. The content is report.md's (:func:`quantkit.report.markdown.render_markdown`)."""
    title = html.escape(str(report["model"]["name"]))
    return ("<!doctype html><html><head><meta charset='utf-8'>"
            "<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>quantkit report — {title}</title><style>{CSS}</style></head><body>\n"
            f"<p><i>quantkit {html.escape(str(report.get('quantkit_version', '')))}</i></p>\n"
            + markdown_to_html(render_markdown(report), folder) + "\n</body></html>\n")
