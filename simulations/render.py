"""Rendering the report's blocks: Markdown for a repository or a notebook, and one
self-contained HTML page (plots embedded as base64 PNG, the configuration collapsed).

:mod:`simulations.report` decides what the report says, as a list of blocks; this module
only decides how each block looks, so ``report.md`` and ``report.html`` say the same.
"""

from __future__ import annotations

import base64
import dataclasses
import html
from collections.abc import Sequence
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class Heading:
    text: str
    level: int = 2


@dataclasses.dataclass(frozen=True)
class Paragraph:
    text: str


@dataclasses.dataclass(frozen=True)
class Bullets:
    items: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Table:
    head: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]


@dataclasses.dataclass(frozen=True)
class Plot:
    file: str  # beside the report


@dataclasses.dataclass(frozen=True)
class Config:
    params: tuple[tuple[str, str], ...]


Block = Heading | Paragraph | Bullets | Table | Plot | Config


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def to_markdown(blocks: Sequence[Block]) -> str:
    """GitHub-flavoured Markdown; plots as links to the PNGs beside the file, the
    configuration left to ``config.json``."""
    out: list[str] = []
    for b in blocks:
        if isinstance(b, Heading):
            out += [f"{'#' * b.level} {b.text}", ""]
        elif isinstance(b, Paragraph):
            out += [b.text, ""]
        elif isinstance(b, Bullets):
            out += [f"- {item}" for item in b.items] + [""]
        elif isinstance(b, Table):
            out.append("| " + " | ".join(_md_cell(c) for c in b.head) + " |")
            out.append("|" + "|".join("---" if i == 0 else "---:"
                                      for i in range(len(b.head))) + "|")
            out += ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in b.rows]
            out.append("")
        elif isinstance(b, Plot):
            out += [f"![{b.file}]({b.file})", ""]
        elif isinstance(b, Config):
            out += ["The resolved configuration is in `config.json`; every key with its "
                    "value in effect is in `report.html`.", ""]
    return "\n".join(out).rstrip("\n") + "\n"


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 70em; color: #222;
       padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.7em; }
th { background: #f3f3f3; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
tbody tr:nth-child(even) { background: #fafafa; }
figure { margin: 1.2em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #666; font-size: 0.85em; }
details summary { cursor: pointer; }
"""


def _cell(text: str, header: bool = False) -> str:
    tag = "th" if header else "td"
    attrs = ' class="num"' if not header and _is_number(text) else ""
    return f"<{tag}{attrs}>{html.escape(text)}</{tag}>"


def _is_number(text: str) -> bool:
    head = text.split(" ")[0].rstrip("%")
    try:
        float(head)
    except ValueError:
        return text == "-"
    return True


def _html_table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["<table>", "<thead><tr>" + "".join(_cell(c, True) for c in head) + "</tr></thead>",
             "<tbody>"]
    lines += ["<tr>" + "".join(_cell(c) for c in r) + "</tr>" for r in rows]
    return "\n".join([*lines, "</tbody>", "</table>"])


def to_html(blocks: Sequence[Block], folder: Path) -> str:
    """One self-contained page: the plots in ``folder`` embedded as base64 PNG."""
    title = next((b.text for b in blocks if isinstance(b, Heading) and b.level == 1),
                 "fedecay report")
    body: list[str] = []
    for b in blocks:
        if isinstance(b, Heading):
            body.append(f"<h{b.level}>{html.escape(b.text)}</h{b.level}>")
        elif isinstance(b, Paragraph):
            body.append(f"<p>{html.escape(b.text)}</p>")
        elif isinstance(b, Bullets):
            body.append("<ul>" + "".join(f"<li>{html.escape(i)}</li>" for i in b.items)
                        + "</ul>")
        elif isinstance(b, Table):
            body.append(_html_table(b.head, b.rows))
        elif isinstance(b, Plot):
            data = base64.b64encode((folder / b.file).read_bytes()).decode("ascii")
            body.append(f'<figure><img alt="{html.escape(b.file)}" '
                        f'src="data:image/png;base64,{data}"><figcaption>'
                        f"{html.escape(b.file)}</figcaption></figure>")
        elif isinstance(b, Config):
            body.append(f"<details><summary>{len(b.params)} keys (also in config.json)"
                        "</summary>\n" + _html_table(["key", "value"], b.params)
                        + "\n</details>")
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
            + "\n".join(body) + "\n</body>\n</html>\n")
