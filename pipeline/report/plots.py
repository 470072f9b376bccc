"""The models page's plots, drawn by Plotly in the browser from figures built here.

Four per model: the versions on a time line (published at, against the
checkpoint's step; the marker's area is the SavedModel's size; labels written
beside their versions), and, per version, the export's duration, the
SavedModel's size and the latency ratio the gate measured against its
reference version (1.0: as fast). A figure is a ``<div>`` and the script that
draws it; Plotly's own script is loaded once per page (:func:`plotly_js`).

Example::

    from tf_export_pipeline.report.plots import model_plots, plotly_js
    html = "<script>" + plotly_js() + "</script>" + "".join(model_plots(view, "ranker"))
"""

from __future__ import annotations

import datetime as dt
import functools
import json
from typing import Any

SMALL_HEIGHT = 220
TIMELINE_HEIGHT = 300
COLOURS = {"stable": "#1e8e3e", "canary": "#e37400"}
PLAIN = "#1a73e8"
_CONFIG = {"displayModeBar": False, "responsive": True}


@functools.lru_cache(maxsize=1)
def plotly_js() -> str:
    """Plotly's whole script (plotly.js, minified), as the ``plotly`` package ships it: no network needed."""
    from plotly.offline import get_plotlyjs

    return get_plotlyjs()


def _when(ts: float | None) -> str | None:
    if ts is None:
        return None
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def human_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _layout(title: str, height: int, **extra: Any) -> dict:
    return {"title": {"text": title, "font": {"size": 13}, "x": 0.01}, "height": height,
            "margin": {"l": 55, "r": 15, "t": 32, "b": 40}, "template": "none", "showlegend": False,
            "paper_bgcolor": "rgba(0,0,0,0)", "plot_bgcolor": "#fafafa",
            "xaxis": {"gridcolor": "#e0e0e0"}, "yaxis": {"gridcolor": "#e0e0e0", "zeroline": False}, **extra}


def _colour(row: dict) -> str:
    for label in ("stable", "canary"):
        if label in row.get("labels", []):
            return COLOURS[label]
    return PLAIN


def timeline(versions: list[dict]) -> dict:
    """The versions at the time each was published, at the height of its checkpoint's step."""
    rows = [v for v in versions if v.get("published_at") is not None]
    biggest = max((v["bytes"] or 0 for v in rows), default=0) or 1
    hover = [f"version {v['version']}<br>{v.get('checkpoint_name') or v.get('checkpoint') or '?'} (step "
             f"{v.get('step')})<br>{human_bytes(v.get('bytes'))}<br>published {_when(v['published_at'])} UTC"
             + (f"<br>labels: {', '.join(v['labels'])}" if v.get("labels") else "") for v in rows]
    trace = {"type": "scatter", "mode": "markers+text", "x": [_when(v["published_at"]) for v in rows],
             "y": [v.get("step") for v in rows], "text": [" ".join(v.get("labels") or []) for v in rows],
             "textposition": "top center", "hovertext": hover, "hoverinfo": "text",
             "marker": {"size": [10 + 20 * ((v["bytes"] or 0) / biggest) ** 0.5 for v in rows],
                        "color": [_colour(v) for v in rows], "line": {"width": 1, "color": "#fff"}},
             "customdata": [v["version"] for v in rows]}
    layout = _layout("Versions: published at, checkpoint step (marker area: size)", TIMELINE_HEIGHT,
                     yaxis={"title": {"text": "step"}, "gridcolor": "#e0e0e0"})
    layout["margin"]["t"] = 50  # room for the labels written above the highest versions
    return {"data": [trace], "layout": layout}


def per_version(versions: list[dict], key: str, title: str, unit: str, reference: float | None = None) -> dict:
    """One bar per version of ``key`` (a version without the figure has no bar)."""
    rows = [v for v in versions if v.get(key) is not None]
    values = [v[key] / 1048576 if unit == "MiB" else v[key] for v in rows]
    trace = {"type": "bar", "x": [str(v["version"]) for v in rows], "y": values,
             "marker": {"color": [_colour(v) for v in rows]},
             "hovertemplate": "version %{x}: %{y:.3g} " + unit + "<extra></extra>"}
    layout = _layout(title, SMALL_HEIGHT, xaxis={"type": "category", "title": {"text": "version"}},
                     yaxis={"title": {"text": unit}, "gridcolor": "#e0e0e0"})
    if reference is not None:
        layout["shapes"] = [{"type": "line", "xref": "paper", "x0": 0, "x1": 1, "y0": reference, "y1": reference,
                             "line": {"dash": "dot", "color": "#5f6368", "width": 1}}]
    return {"data": [trace], "layout": layout}


def figures(view: dict) -> list[tuple[str, dict]]:
    """(kind, figure) of every plot of a model's view."""
    versions = view.get("versions") or []
    return [
        ("timeline", timeline(versions)),
        ("export_seconds", per_version(versions, "export_seconds", "Export duration", "s")),
        ("bytes", per_version(versions, "bytes", "SavedModel size", "MiB")),
        ("latency_ratio", per_version(versions, "latency_ratio", "Latency ratio against the reference", "x",
                                      reference=1.0)),
    ]


def model_plots(view: dict, key: str) -> tuple[list[str], dict[str, str]]:
    """The plots of a model: their ``<div>``s, and each figure as JSON by the id of its ``<div>`` (for
    :func:`drawing_script`); ``key`` makes the ids unique in a page."""
    import plotly.graph_objects as go

    divs, drawn = [], {}
    for kind, figure in figures(view):
        div_id = f"plot-{key}-{kind}"
        if not any(trace.get("x") for trace in figure["data"]):
            divs.append(f'<div class="plot empty" id="{div_id}" data-plot="{kind}">'
                        f'<p>{figure["layout"]["title"]["text"]}: not measured yet</p></div>')
            continue
        divs.append(f'<div class="plot" id="{div_id}" data-plot="{kind}"></div>')
        drawn[div_id] = go.Figure(figure).to_json()  # checked against Plotly's schema here, not in the browser
    return divs, drawn


def drawing_script(drawn: dict[str, str]) -> str:
    """One script that draws every figure once the page is laid out (so each takes its box's width)."""
    figures_js = "{" + ",".join(f"{json.dumps(k)}:{v}" for k, v in drawn.items()) + "}"
    return ("<script>(function(){var figs=" + figures_js.replace("</", "<\\/") + ";var config=" + json.dumps(_CONFIG)
            + ";function draw(){for(var id in figs){Plotly.newPlot(id,figs[id].data,figs[id].layout,config);}"
            "document.body.setAttribute('data-plots-drawn',String(Object.keys(figs).length));}"
            "if(document.readyState==='loading'){document.addEventListener('DOMContentLoaded',draw);}else{draw();}"
            "})();</script>")
