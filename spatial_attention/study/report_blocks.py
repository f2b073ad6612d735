"""The report's blocks (headings, paragraphs, tables, figures) and their two renderings: one self-contained HTML
file in which every number names its file and field, and Markdown."""
from __future__ import annotations

import base64
import html
import json
import re
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Num:
    """A number as one file holds it: ``file`` (relative to the study folder), the keys ``path`` into its JSON,
    and ``op`` "len" for the number of entries there; ``missing``: what is shown where there is none."""
    value: float | int | None
    file: str
    path: tuple
    fmt: str
    op: str = ""
    missing: str = "n/a"

    def text(self) -> str:
        return self.missing if self.value is None else format(self.value, self.fmt)


@dataclass(frozen=True)
class Link:
    """A link to a heading of the report itself (never out of it)."""
    label: str
    anchor: str

    def text(self) -> str:
        return self.label


@dataclass
class Heading:
    level: int
    text: str
    anchor: str = ""


@dataclass
class Para:
    parts: list


@dataclass
class Bullets:
    items: list  # each a list of parts


@dataclass
class Table:
    header: list[str]
    rows: list  # each a list of cells, each a list of parts


@dataclass
class Figures:
    figures: list  # (caption, path relative to the study folder)


@dataclass
class Pre:
    lines: list[str]


STYLE = """body{font-family:sans-serif;max-width:1400px;margin:1em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0;font-size:90%}th,td{border:1px solid #ccc;padding:3px 6px;
vertical-align:top;text-align:left}th{background:#f3f3f3}.num{white-space:nowrap}
.figs{display:flex;flex-wrap:wrap;gap:10px}figure{margin:0;max-width:560px}img{max-width:100%}
figcaption{font-size:80%;color:#555}pre{background:#f6f6f6;padding:.5em;overflow-x:auto}"""


def _bold(text: str) -> str:
    """Escaped text, **x** in bold."""
    return re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", html.escape(text))


def _html_parts(parts: list) -> str:
    out = []
    for part in parts:
        if isinstance(part, Num):
            where = f"{part.file}: {'/'.join(map(str, part.path))}" + (f" ({part.op})" if part.op else "")
            out.append(f'<span class="num" data-file="{html.escape(part.file)}" '
                       f"data-path='{html.escape(json.dumps(list(part.path)))}' data-op=\"{part.op}\" "
                       f'data-value="{html.escape(json.dumps(part.value))}" title="{html.escape(where)}">'
                       f"{html.escape(part.text())}</span>")
        elif isinstance(part, Link):
            out.append(f'<a href="#{part.anchor}">{html.escape(part.label)}</a>')
        elif hasattr(part, "text"):  # a reading's verdict (report_readings.Verdict)
            out.append(f"<b>{html.escape(part.text())}</b>")
        else:
            out.append(_bold(str(part)))
    return "".join(out)


def _md_parts(parts: list) -> str:
    shown = (p.text() if hasattr(p, "text") else str(p) for p in parts)
    return "".join(shown).replace("|", "\\|")


def render_html(out: Path, title: str, blocks: list) -> str:
    body = [f"<h1>{html.escape(title)}</h1>"]
    for block in blocks:
        if isinstance(block, Heading):
            anchor = f' id="{block.anchor}"' if block.anchor else ""
            body.append(f"<h{block.level}{anchor}>{html.escape(block.text)}</h{block.level}>")
        elif isinstance(block, Para):
            body.append(f"<p>{_html_parts(block.parts)}</p>")
        elif isinstance(block, Bullets):
            body.append("<ul>" + "".join(f"<li>{_html_parts(item)}</li>" for item in block.items) + "</ul>")
        elif isinstance(block, Table):
            head = "".join(f"<th>{html.escape(h)}</th>" for h in block.header)
            rows = "".join("<tr>" + "".join(f"<td>{_html_parts(cell)}</td>" for cell in row) + "</tr>"
                           for row in block.rows)
            body.append(f"<table><tr>{head}</tr>{rows}</table>")
        elif isinstance(block, Figures):
            figures = []
            for caption, rel in block.figures:
                data = base64.b64encode((out / rel).read_bytes()).decode("ascii")
                figures.append(f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
                               f"<figcaption>{html.escape(caption)}</figcaption></figure>")
            body.append(f'<div class="figs">{"".join(figures)}</div>')
        elif isinstance(block, Pre):
            body.append(f"<pre>{html.escape(chr(10).join(block.lines))}</pre>")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{STYLE}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def render_markdown(title: str, blocks: list) -> str:
    lines = [f"# {title}", ""]
    for block in blocks:
        if isinstance(block, Heading):
            lines += ["#" * block.level + " " + block.text, ""]
        elif isinstance(block, Para):
            lines += [_md_parts(block.parts), ""]
        elif isinstance(block, Bullets):
            lines += [f"- {_md_parts(item)}" for item in block.items] + [""]
        elif isinstance(block, Table):
            lines += ["| " + " | ".join(block.header) + " |", "|" + " --- |" * len(block.header)]
            lines += ["| " + " | ".join(_md_parts(cell) for cell in row) + " |" for row in block.rows] + [""]
        elif isinstance(block, Figures):
            lines += [f"![{caption}](../{rel})" for caption, rel in block.figures] + [""]
        elif isinstance(block, Pre):
            lines += ["```", *block.lines, "```", ""]
    return "\n".join(lines)
