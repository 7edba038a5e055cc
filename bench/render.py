"""A report's blocks rendered three ways: Markdown, one self-contained HTML page, and LaTeX tables."""

from __future__ import annotations

import base64
import html
import re

NONE = "—"  # a number that does not exist for the row (no interval, not a likelihood, never logged)
# (kind, content); kind: h1 h2 h3 p ul table (caption, text frame) img (alt, path, caption)
Blocks = list[tuple[str, object]]


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]+")  # newlines too: they would end a table row or a paragraph
_LINK_BRACKET = re.compile(r"\](?=[(\[:])")  # the ] of [text](url), [text][ref] and a [ref]: url definition


def _md(text: object) -> str:
    # Run data may hold markup: escaped like HTML, since Markdown renderers pass raw HTML through; links and
    # images made inert (an image would load from wherever it names); control characters (a terminal's
    # escape sequences, when the file is printed) replaced by a space.
    text = html.escape(_CONTROL.sub(" ", str(text)), quote=False).replace("|", "\\|")
    return _LINK_BRACKET.sub(r"\\]", text)


def render_markdown(blocks: Blocks) -> str:
    out = []
    for kind, content in blocks:
        if kind in ("h1", "h2", "h3"):
            out.append("#" * int(kind[1]) + " " + _md(content))
        elif kind == "p":
            out.append(_md(content))
        elif kind == "ul":
            out.append("\n".join(f"- {_md(item)}" for item in content))
        elif kind == "table":
            caption, df = content
            df = df.rename(columns=_md).map(_md)
            out.append(f"*{_md(caption)}*\n\n" + df.to_markdown(index=False, disable_numparse=True))
        elif kind == "img":
            alt, path, caption = content
            out.append(f"![{_md(alt)}]({path.name})\n\n{_md(caption)}")
    return "\n\n".join(out) + "\n"


CSS = """
body { font-family: system-ui, sans-serif; max-width: 1400px; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; font-size: 12px; margin: 0.3em 0 1.2em; }
caption { caption-side: top; text-align: left; font-style: italic; padding-bottom: 0.3em; }
th, td { border: 1px solid #ccc; padding: 2px 6px; white-space: nowrap; text-align: left; background: #fff; }
thead th { background: #eef; } tbody th { font-weight: normal; } tr:nth-child(even) > * { background: #f8f8f8; }
.num { text-align: right; font-variant-numeric: tabular-nums; }
th[scope="row"], th.rowhead { position: sticky; left: 0; z-index: 1; box-shadow: inset -1px 0 #999; }
.scroll { overflow-x: auto; }
img { max-width: 100%; border: 1px solid #ddd; } figure { margin: 1em 0; }
"""
# A number as the tables show it: -123.5 ± 2.8, 0.81×, 0%, 1.2e+03, ∞, 3/3
_NUMBER = re.compile(r"[-+−]?(∞|\d[\d,]*(\.\d*)?(e[-+]?\d+)?)( ± \S+)?[×%]?(/\d+)?")


def _is_numeric(column) -> bool:
    """Every cell a number or —: the column is right-aligned, its digits under each other."""
    cells = [str(v) for v in column if str(v) not in (NONE, "", "nan", "None")]
    return bool(cells) and all(_NUMBER.fullmatch(c) for c in cells)


def _html_table(caption: str, df) -> str:
    """A table with its caption, column headers and one row header per row (the family where there is
    one, else the first column: it stays in view as a wide table scrolls), numbers right-aligned."""
    e = html.escape
    row_header = list(df.columns).index("family") if "family" in df.columns else 0
    numeric = [_is_numeric(df.iloc[:, i]) for i in range(df.shape[1])]

    def classes(i: int, header: bool) -> str:  # the row header's column header stays in view with it
        names = ["num"] * numeric[i] + ["rowhead"] * (header and i == row_header)
        return f' class="{" ".join(names)}"' if names else ""

    def cell(i: int, value) -> str:
        text = NONE if value is None or str(value) in ("nan", "None") else str(value)
        tag, scope = ("th", ' scope="row"') if i == row_header else ("td", "")
        return f"<{tag}{scope}{classes(i, False)}>{e(text)}</{tag}>"

    head = "".join(f'<th scope="col"{classes(i, True)}>{e(str(c))}</th>' for i, c in enumerate(df.columns))
    body = "".join("<tr>" + "".join(cell(i, v) for i, v in enumerate(row)) + "</tr>"
                   for row in df.itertuples(index=False))
    return (f"<div class=\"scroll\"><table><caption>{e(caption)}</caption><thead><tr>{head}</tr></thead>"
            f"<tbody>{body}</tbody></table></div>")


def render_html(blocks: Blocks, title: str) -> str:
    """A self-contained page: no external resource, plots as data: URIs, every string escaped."""
    e = html.escape
    head = (f"<head><meta charset=\"utf-8\"><meta name=\"viewport\" content=\"width=device-width, "
            f"initial-scale=1\"><title>{e(title)}</title><style>{CSS}</style></head>")
    out = [f"<!DOCTYPE html>\n<html lang=\"en\">{head}<body>"]
    for kind, content in blocks:
        if kind in ("h1", "h2", "h3", "p"):
            out.append(f"<{kind}>{e(str(content))}</{kind}>")
        elif kind == "ul":
            out.append("<ul>" + "".join(f"<li>{e(str(item))}</li>" for item in content) + "</ul>")
        elif kind == "table":
            out.append(_html_table(*content))
        elif kind == "img":
            alt, path, caption = content
            uri = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
            out.append(f"<figure><img alt=\"{e(alt)}\" src=\"{uri}\"><figcaption>{e(caption)}</figcaption></figure>")
    return "\n".join(out) + "\n</body></html>\n"


_LATEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
          "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def render_latex(blocks: Blocks) -> str:
    """Every table of the report as a booktabs `table` (Styler.to_latex), data escaped for LaTeX."""
    out = ["% vaebench report tables: \\usepackage{booktabs}; compile with a UTF-8 engine (lualatex, xelatex)"]
    for kind, content in blocks:
        if kind != "table":
            continue
        caption, df = content
        df = df.map(lambda v: _CONTROL.sub(" ", v) if isinstance(v, str) else v)
        styler = df.style.hide(axis="index").format(escape="latex").format_index(escape="latex", axis="columns")
        caption = "".join(_LATEX.get(ch, ch) for ch in _CONTROL.sub(" ", caption))
        tex = styler.to_latex(caption=caption, hrules=True, position="htbp", position_float="centering")
        for symbol, command in (("±", r"$\pm$"), ("—", "---"), ("∞", r"$\infty$"), ("×", r"$\times$")):
            tex = tex.replace(symbol, command)
        out.append(tex)
    return "\n".join(out)
