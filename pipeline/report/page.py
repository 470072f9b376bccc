"""The models page as HTML: a static report of several models, or the Airflow plugin's pages.

Everything a page needs is in it (styles, and Plotly's script inline in the
static report or from the plugin's own route), so it opens with no network.
Every value shown is escaped; the views it renders carry no storage options.

Example::

    from tf_export_pipeline.report.page import report_html
    open("models.html", "w").write(report_html([view]))
"""

from __future__ import annotations

import datetime as dt
import html
import re
from collections.abc import Callable

from tf_export_pipeline import __version__
from tf_export_pipeline.report.plots import drawing_script, human_bytes, model_plots, plotly_js

# A link to the Airflow run a record names (the plugin gives one; the static report has none).
RunLink = Callable[[dict], "str | None"]

STYLE = """
body{font:14px/1.45 -apple-system,'Segoe UI',Roboto,'DejaVu Sans',sans-serif;margin:0;color:#202124;background:#fff}
header.page{background:#202124;color:#fff;padding:10px 20px}
header.page h1{font-size:18px;margin:0}
header.page .sub{color:#bdc1c6;font-size:12px}
main{padding:8px 20px 30px}
nav.toc a{margin-right:14px}
section.model{border:1px solid #dadce0;border-radius:8px;padding:12px 16px;margin:14px 0}
section.model h2{margin:0 0 4px;font-size:17px}
.meta{color:#5f6368;font-size:12px;word-break:break-all}
.chip{display:inline-block;border-radius:10px;padding:1px 9px;margin:0 6px 0 0;font-size:12px;color:#fff;
background:#1a73e8}
.chip.stable{background:#1e8e3e}.chip.canary{background:#e37400}.chip.rollback{background:#5f6368}
.error{color:#b3261e}
div.banner{background:#fce8e6;border:1px solid #f4c7c3;border-radius:6px;padding:8px 10px;margin:8px 0}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(300px,1fr));gap:8px}
.grid>div{min-width:0;overflow:hidden}
.plot.empty{color:#80868b;font-size:12px;border:1px dashed #dadce0;border-radius:6px;padding:8px}
table{border-collapse:collapse;width:100%;margin:6px 0 10px;font-size:13px}
th,td{text-align:left;padding:3px 8px;border-bottom:1px solid #eee;vertical-align:top}
th{color:#5f6368;font-weight:600}
td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.serving td{background:#e6f4ea}
.status{font-weight:600}.status.failed{color:#b3261e}.status.published{color:#1e8e3e}
.status.gated,.status.skipped,.status.no_new_checkpoint{color:#5f6368}
h3{font-size:14px;margin:12px 0 2px}
"""


def _e(value) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _key(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "-", name)


def _num(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def labels_html(view: dict) -> str:
    chips = [f'<span class="chip {_e(label)}" data-label="{_e(label)}" data-version="{_e(v)}">{_e(label)} &rarr; '
             f'{_e(v)}</span>' for label, v in sorted((view.get("labels") or {}).items())]
    if view.get("rollback_to") is not None:
        chips.append(f'<span class="chip rollback" data-rollback="{_e(view["rollback_to"])}">rollback &rarr; '
                     f'{_e(view["rollback_to"])}</span>')
    if view.get("served") is not None:
        chips.append(f'<span class="chip" data-served="{_e(view["served"])}">served: {_e(view["served"])}</span>')
    return "".join(chips) or '<span class="meta">no labels</span>'


def versions_table(view: dict) -> str:
    rows = []
    for v in reversed(view.get("versions") or []):
        labels = "".join(f'<span class="chip {_e(lb)}">{_e(lb)}</span>' for lb in v.get("labels") or [])
        rows.append(
            f'<tr class="version{" serving" if v.get("serving") else ""}" data-version="{_e(v["version"])}">'
            f'<td>{_e(v["version"])}</td><td>{_e(when(v.get("published_at")))}</td>'
            f'<td title="{_e(v.get("checkpoint"))}">{_e(v.get("checkpoint_name") or v.get("checkpoint") or "-")}</td>'
            f'<td class="num">{_e(v.get("step"))}</td><td class="num">{_e(human_bytes(v.get("bytes")))}</td>'
            f'<td class="num">{_num(v.get("export_seconds"), ".1f")}</td>'
            f'<td class="num">{_num(v.get("size_ratio"), ".2f")}</td>'
            f'<td class="num">{_num(v.get("latency_ratio"), ".2f")}</td>'
            f'<td>{labels}{"" if v.get("whole", True) else " <span class=error>not whole</span>"}</td>'
            f'<td class="meta">{_e(v.get("run") or "-")}</td></tr>')
    if not rows:
        return '<p class="meta">no published versions</p>'
    return ('<table class="versions"><thead><tr><th>version</th><th>published</th><th>checkpoint</th><th>step</th>'
            '<th>size</th><th>export s</th><th>size ratio</th><th>latency ratio</th><th>labels</th><th>made by</th>'
            '</tr></thead><tbody>' + "".join(rows) + "</tbody></table>")


def runs_table(view: dict, run_link: RunLink | None = None) -> str:
    rows = []
    for r in view.get("runs") or []:
        link = run_link(r) if run_link else None
        made = f'<a href="{_e(link)}">{_e(r.get("run"))}</a>' if link else _e(r.get("run") or "-")
        versions = ", ".join(str(v) for v in r.get("versions") or []) or "-"
        rows.append(
            f'<tr class="run" data-status="{_e(r.get("status"))}"><td>{_e(when(r.get("at")))}</td>'
            f'<td class="status {_e(r.get("status"))}">{_e(r.get("status"))}</td><td>{_e(r.get("stage") or "-")}</td>'
            f'<td title="{_e(r.get("checkpoint"))}">{_e(_tail(r.get("checkpoint")))}</td>'
            f'<td class="num">{_e(r.get("step") if r.get("step") is not None else "-")}</td><td>{_e(versions)}</td>'
            f'<td class="error run-error">{_e(r.get("error") or "")}</td><td class="meta">{made}</td></tr>')
    if not rows:
        return '<p class="meta">no runs recorded yet</p>'
    return ('<table class="runs"><thead><tr><th>when</th><th>outcome</th><th>stage</th><th>checkpoint</th>'
            '<th>step</th><th>versions</th><th>error</th><th>run</th></tr></thead><tbody>' + "".join(rows)
            + "</tbody></table>")


def _tail(path: str | None) -> str:
    return "-" if not path else path.rstrip("/").rsplit("/", 1)[-1]


def changes_table(view: dict) -> str:
    rows = []
    for c in view.get("label_changes") or []:
        moved = "; ".join(f"{_e(k)}: {_e(a if a is not None else '-')} &rarr; {_e(b if b is not None else '-')}"
                          for k, (a, b) in (c.get("labels") or {}).items())
        rows.append(f'<tr><td>{_e(when(c.get("at")))}</td><td>{_e(c.get("command"))}</td><td>{_e(c.get("phase"))}'
                    f'</td><td>{moved or "-"}</td><td>{_e(c.get("versions_after"))}</td></tr>')
    if not rows:
        return ""
    return ('<h3>Label changes</h3><table class="changes"><thead><tr><th>when</th><th>command</th><th>phase</th>'
            '<th>labels</th><th>listed after</th></tr></thead><tbody>' + "".join(rows) + "</tbody></table>")


def model_section(view: dict, run_link: RunLink | None = None,
                  heading_link: str | None = None) -> tuple[str, dict[str, str]]:
    """A model's section, and its figures by the id of their ``<div>`` (see :func:`drawing_script`)."""
    name = view["model"]
    key = _key(name)
    title = f'<a href="{_e(heading_link)}">{_e(name)}</a>' if heading_link else _e(name)
    serving = view.get("serving") or {}
    meta = [f"export base {_e(view.get('export_base') or '-')}", f"config {_e(view.get('config') or '-')}"]
    if serving:
        meta.append(f"TF Serving model {_e(serving.get('model_name'))}, policy {_e(serving.get('policy'))}")
    parts = [f'<section class="model" id="model-{key}" data-model="{_e(name)}">', f"<h2>{title}</h2>",
             f'<div class="meta">{" &middot; ".join(meta)}</div>']
    if view.get("error"):
        parts.append(f'<div class="banner error model-error" data-error="model">{_e(view["error"])}</div>')
    for part, message in sorted((view.get("errors") or {}).items()):
        parts.append(f'<div class="banner error" data-error="{_e(part)}">{_e(part)}: {_e(message)}</div>')
    drawn: dict[str, str] = {}
    if not view.get("error"):
        parts.append(f'<div class="labels">{labels_html(view)}</div>')
        plots, drawn = model_plots(view, key)
        parts.append(plots[0])
        parts.append('<div class="grid">' + "".join(plots[1:]) + "</div>")
        parts.append("<h3>Versions</h3>" + versions_table(view))
    parts.append("<h3>Last runs</h3>" + runs_table(view, run_link))
    parts.append(changes_table(view))
    parts.append("</section>")
    return "\n".join(parts), drawn


def _document(title: str, body: str, script: str, subtitle: str, drawn: dict[str, str] | None = None) -> str:
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{STYLE}</style>{script}'
            f'</head><body><header class="page"><h1>{_e(title)}</h1><div class="sub">{subtitle}</div></header>'
            f"<main>{body}</main>{drawing_script(drawn) if drawn else ''}</body></html>")


def _inline(js: str) -> str:
    # "</script" inside the bundle would end the element early.
    return "<script>" + js.replace("</script", "<\\/script") + "</script>"


def report_html(views: list[dict], generated_at: float | None = None) -> str:
    """One self-contained page of every model in ``views`` (Plotly's script inline)."""
    import time

    toc = " ".join(f'<a href="#model-{_key(v["model"])}">{_e(v["model"])}</a>' for v in views)
    sections, drawn = [], {}
    for view in views:
        section, figures = model_section(view)
        sections.append(section)
        drawn.update(figures)
    body = f'<nav class="toc">{toc}</nav>' + "".join(sections)
    subtitle = (f"{len(views)} model(s) &middot; written {_e(when(generated_at or time.time()))} by "
                f"tf-export {_e(__version__)}")
    return _document("TF export: models", body, _inline(plotly_js()), subtitle, drawn)


def model_page(view: dict, plotly_src: str, index_href: str, run_link: RunLink | None = None) -> str:
    """The plugin's page of one model (Plotly's script from ``plotly_src``)."""
    section, drawn = model_section(view, run_link)
    body = f'<p><a href="{_e(index_href)}">&larr; all models</a></p>' + section
    subtitle = f"read {_e(when(view.get('read_at')))} in {_e(view.get('read_seconds'))} s"
    return _document(f"TF export: {view['model']}", body, f'<script src="{_e(plotly_src)}"></script>', subtitle,
                     drawn)


def index_page(views: list[dict], model_href: Callable[[str], str], api_href: str) -> str:
    """The plugin's list of models: what each serves, its labels and its last run."""
    rows = []
    for v in views:
        last = (v.get("runs") or [{}])[0]
        status = last.get("status")
        rows.append(
            f'<tr class="model-row" data-model="{_e(v["model"])}"><td><a href="{_e(model_href(v["model"]))}">'
            f'{_e(v["model"])}</a></td><td class="num">{_e(v.get("served") if v.get("served") is not None else "-")}'
            f'</td><td>{labels_html(v) if not v.get("error") else ""}</td>'
            f'<td class="num">{len(v.get("versions") or [])}</td>'
            f'<td class="status {_e(status)}">{_e(status or "-")} {_e(when(last.get("at")) if last else "")}</td>'
            f'<td class="error">{_e(v.get("error") or last.get("error") or "")}</td></tr>')
    body = ('<table class="models"><thead><tr><th>model</th><th>served</th><th>labels</th><th>versions</th>'
            '<th>last run</th><th>error</th></tr></thead><tbody>' + "".join(rows) + "</tbody></table>"
            if rows else '<p class="meta">no model configs in the config folder</p>')
    body += f'<p class="meta">The same as JSON: <a href="{_e(api_href)}">{_e(api_href)}</a></p>'
    return _document("TF export: models", body, "", f"{len(views)} model(s)")
