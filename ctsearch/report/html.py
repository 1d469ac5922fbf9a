"""The one self-contained HTML page of ``ctsearch report``: tables, inline-SVG curves, figures.

It reads the files the other steps wrote (run folders, index, explain folders, evaluation JSON)
and never imports Ray or a plotting library (docs/report.md). The page holds its PNGs as data
URIs and its CSS inline, so it opens offline and can be mailed as one file.

Example:
    >>> svg = line_chart_svg({"loss": [(1, 0.5), (2, 0.25)]}, "loss", "epoch", "loss")
    >>> svg.startswith("<svg")
    True
"""

from __future__ import annotations

import base64
import json
import math
import os
import time
from dataclasses import dataclass, field
from html import escape
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from ctsearch import __version__
from ctsearch.errors import CTSearchInputError
from ctsearch.metrics import percent_cell, shared_patients_phrase, shown_metrics
from ctsearch.store import read_json, read_jsonl, read_run_settings

# ---------------------------------------------------------------------------------------------
# The HTML report: one self-contained page (inline CSS, inline SVG charts, PNGs as data URIs).


@dataclass
class ReportInputs:
    """What a report is made of; every part is optional (a missing one becomes a note on the page)."""

    runs: list[Path] = field(default_factory=list)
    index: Path | None = None
    explain: list[Path] = field(default_factory=list)
    evaluation: Path | None = None
    prepared: Path | None = None
    table: Path | None = None  # ctsearch reproduce's table.json: Table 1 with intervals and verdicts


_PARTS_HELP = (
    "is not a demo folder, run directory (config.json / metrics.jsonl), index directory (index.json), "
    "explain folder (maps.npz / explain.json), prepared dataset (manifest.parquet), evaluation JSON "
    "(evaluate --out) or table.json (reproduce)"
)


def _is_table(path: Path) -> bool:
    """A JSON file written by ``ctsearch reproduce`` (OUT/table.json): rows and paired comparisons."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False  # not readable as JSON: the evaluation reader names the problem
    return isinstance(data, dict) and "comparisons" in data and "rows" in data


def _kind(path: Path) -> str | None:
    """Which report part a path is, from the files it holds (None: not one)."""
    if path.is_file():
        if path.suffix != ".json":
            return None
        return "table" if _is_table(path) else "evaluation"
    if (path / "index.json").is_file():
        return "index"
    if (path / "config.json").is_file() or (path / "metrics.jsonl").is_file():
        return "run"
    if (path / "maps.npz").is_file() or (path / "explain.json").is_file():
        return "explain"
    if (path / "manifest.parquet").is_file():
        return "prepared"
    if any(
        (path / p).exists() for p in ("runs", "index", "explain", "prepared", "evaluation.json", "table.json")
    ):
        return "demo"
    return None


def collect_inputs(paths: list[str | os.PathLike]) -> ReportInputs:
    """Sort PATHS into report parts by what each holds; a demo folder gives all of its parts.

    Example:
        >>> collect_inputs([])
        ReportInputs(runs=[], index=None, explain=[], evaluation=None, prepared=None, table=None)
    """
    parts = ReportInputs()

    def add(kind: str, p: Path) -> None:
        if kind == "run":
            parts.runs.append(p)
        elif kind == "explain":
            parts.explain.append(p)
        else:
            if getattr(parts, kind) is not None:
                raise CTSearchInputError(
                    p, f"a second {kind} ({getattr(parts, kind)} is one already); give one"
                )
            setattr(parts, kind, p)

    for raw in paths:
        p = Path(raw)
        if not p.exists():
            raise CTSearchInputError(p, "does not exist")
        kind = _kind(p)
        if kind is None:
            raise CTSearchInputError(p, _PARTS_HELP)
        if kind != "demo":
            add(kind, p)
            continue
        runs = p / "runs"
        for r in sorted(runs.iterdir()) if runs.is_dir() else []:
            if _kind(r) == "run":
                add("run", r)
        for name, kind in (
            ("index", "index"),
            ("explain", "explain"),
            ("prepared", "prepared"),
            ("evaluation.json", "evaluation"),
            ("table.json", "table"),
        ):
            if (p / name).exists() and _kind(p / name) == kind:
                add(kind, p / name)
    return parts


# --- inline SVG charts ------------------------------------------------------------------------

_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e")


def _ticks(lo: float, hi: float, n: int = 5, min_step: float = 0.0) -> list[float]:
    """About n round tick values covering [lo, hi], at least min_step apart."""
    if not hi > lo:
        lo, hi = lo - 0.5, hi + 0.5
    raw = max((hi - lo) / n, min_step)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw * (1 - 1e-9))
    start, end = math.floor(lo / step + 1e-9) * step, math.ceil(hi / step - 1e-9) * step
    return [start + i * step for i in range(int(round((end - start) / step)) + 1)]


def _num(v: float) -> str:
    return f"{round(v, 9):g}"


def line_chart_svg(
    series: dict[str, list[tuple[float, float]]],
    title: str,
    x_label: str,
    y_label: str,
    width: int = 460,
    height: int = 260,
) -> str:
    """Lines with markers as an inline <svg> (hover a marker for its value); series = name -> [(x, y)].

    Example:
        >>> svg = line_chart_svg({"loss": [(1, -0.5), (2, -0.8)]}, "loss", "epoch", "loss")
        >>> svg.startswith("<svg") and "polyline" in svg
        True
    """
    pts = [
        (float(x), float(y))
        for s in series.values()
        for x, y in s
        if y is not None and math.isfinite(float(y))
    ]
    left, right, top, bottom = 58, 12, 46, 42
    w, h = width - left - right, height - top - bottom
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        f'role="img" aria-label="{escape(title)}" class="chart">',
        f'<text x="{width / 2}" y="18" text-anchor="middle" class="title">{escape(title)}</text>',
    ]
    if not pts:
        out.append(
            f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle">no values recorded</text></svg>'
        )
        return "\n".join(out)
    integer_x = all(x == int(x) for x, _ in pts)  # epochs: no ticks between them
    xt = _ticks(min(p[0] for p in pts), max(p[0] for p in pts), 6, min_step=1.0 if integer_x else 0.0)
    yt = _ticks(min(p[1] for p in pts), max(p[1] for p in pts), 5)
    sx = lambda x: left + (x - xt[0]) / (xt[-1] - xt[0]) * w  # noqa: E731
    sy = lambda y: top + h - (y - yt[0]) / (yt[-1] - yt[0]) * h  # noqa: E731
    for y in yt:
        out.append(
            f'<line x1="{left}" x2="{left + w}" y1="{sy(y):.1f}" y2="{sy(y):.1f}" class="grid"/>'
            f'<text x="{left - 6}" y="{sy(y) + 4:.1f}" text-anchor="end">{_num(y)}</text>'
        )
    for x in xt:
        out.append(f'<text x="{sx(x):.1f}" y="{top + h + 16}" text-anchor="middle">{_num(x)}</text>')
    out.append(f'<rect x="{left}" y="{top}" width="{w}" height="{h}" class="frame"/>')
    out.append(f'<text x="{left + w / 2}" y="{height - 6}" text-anchor="middle">{escape(x_label)}</text>')
    out.append(
        f'<text transform="translate(14 {top + h / 2}) rotate(-90)" text-anchor="middle">{escape(y_label)}</text>'
    )
    for i, (name, s) in enumerate(series.items()):
        colour = _COLOURS[i % len(_COLOURS)]
        xy = [(float(x), float(y)) for x, y in s if y is not None and math.isfinite(float(y))]
        if len(xy) > 1:
            line = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in xy)
            out.append(f'<polyline points="{line}" fill="none" stroke="{colour}" stroke-width="2"/>')
        for x, y in xy:
            out.append(
                f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{colour}">'
                f"<title>{escape(name)}: {x_label} {_num(x)}, {_num(round(y, 4))}</title></circle>"
            )
        # The legend sits in the top margin, one entry after the other, so it never hides a line.
        lx = left + 150 * i
        out.append(
            f'<rect x="{lx}" y="{top - 17}" width="10" height="10" fill="{colour}"/>'
            f'<text x="{lx + 14}" y="{top - 8}">{escape(name)}</text>'
        )
    out.append("</svg>")
    return "\n".join(out)


# --- sections -----------------------------------------------------------------------------------


def png_data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _img(data: bytes, alt: str, css: str) -> str:
    return f'<img src="{png_data_uri(data)}" alt="{escape(alt)}" class="{css}">'


def _table(header: list[str], rows: list[list[object]], css: str = "") -> str:
    head = "".join(f"<th>{escape(str(c))}</th>" for c in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{escape('' if c is None else str(c))}</td>" for c in r) + "</tr>" for r in rows
    )
    return f'<table class="{css}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _facts(pairs: list[tuple[str, object]]) -> str:
    """The pairs whose value is known as a key/value list (laid out in columns by the CSS)."""
    items = "".join(f"<dt>{escape(k)}</dt><dd>{escape(str(v))}</dd>" for k, v in pairs if v not in (None, ""))
    return f'<dl class="facts">{items}</dl>'


def _read_evaluation(path: Path) -> dict:
    res = read_json(path, "evaluation result")
    if not isinstance(res.get("rows"), list) or "k" not in res:
        raise CTSearchInputError(
            path, "is not an evaluation result (no 'rows' and 'k'; write one with ctsearch evaluate --out)"
        )
    return res


def _read_table(path: Path) -> dict:
    table = read_json(path, "reproduce table")
    if (
        not isinstance(table.get("rows"), list)
        or not isinstance(table.get("comparisons"), list)
        or "k" not in table
    ):
        raise CTSearchInputError(
            path,
            "is not a reproduce table (no 'rows', 'comparisons' and 'k'; ctsearch reproduce writes OUT/table.json)",
        )
    return table


def _legend(k: int, masks, extra: str = "") -> str:
    return f"""
<dl class="legend">
<dt>MAP@{k}</dt><dd>Mean average precision of the top {k}: for each query, the share of relevant slices among
the first 1, 2, ..., {k} results, averaged; then averaged over all queries. 100 means every one of the
{k} most similar slices shows the same finding as the query.</dd>
<dt>ACC ({k}-NN)</dt><dd>How often a majority vote of the {k} most similar training slices gives the query's
own label (liver / no liver): a measure of how well the representation separates the two.</dd>
<dt>RR</dt><dd>Relevance-rank accuracy of the RELAX importance maps ({escape(str(masks))} masks per slice) on the
liver slices: of the M most important pixels, where M is the liver's area, the share that lies inside the
liver. Higher means the model looks at the liver; "n/a" when it was not measured.</dd>
<dt>±</dt><dd>Sample standard deviation over the runs of one row (none when a row has one run).</dd>{extra}
</dl>"""


def _ci(stat: dict | None, decimals: int) -> str:
    ci = (stat or {}).get("ci")
    if not ci or any(v is None or not math.isfinite(v) for v in ci):
        return ""
    return f"[{100 * ci[0]:.{decimals}f}, {100 * ci[1]:.{decimals}f}]"


def table_section(table: dict) -> str:
    """``ctsearch reproduce``'s Table 1: mean ± std over seeds with 95% intervals, the verdicts, every run."""
    from ctsearch.metrics import METRICS

    k = int(table["k"])
    keys = table.get("compared") or ["map", "acc"]
    shown = [m for m in shown_metrics() if m.key in keys or table.get("relax_masks")]
    header = ["pretraining", "seeds"]
    for m in shown:
        header += [m.report_header.format(k=k)] + (["95% CI"] if m.key in keys else [])
    rows = []
    for r in table["rows"]:
        cells = [r.get("name"), r.get("seeds")]
        for m in shown:
            cells.append(percent_cell(r.get(m.key), m.decimals))
            if m.key in keys:
                cells.append(_ci(r.get(m.key), m.decimals))
        rows.append(cells)
    verdicts = "".join(f"<li>{escape(str(c.get('verdict')))}</li>" for c in table["comparisons"])
    verdicts = (
        f'<ul class="verdicts">{verdicts}</ul>'
        if verdicts
        else '<p class="note">One configuration: nothing to compare.</p>'
    )
    if table.get("no_verdict"):
        verdicts += f'<p class="note">{escape(str(table["no_verdict"]))}</p>'
    by_key = {m.key: m for m in METRICS}
    run_rows = []
    for r in table.get("runs", []):
        cells = [Path(str(r.get("run"))).name]
        for key in keys:
            stat = r.get(key) or {}
            value = stat.get("value")
            shown_value = (
                "n/a"
                if value is None or not math.isfinite(value)
                else f"{100 * value:.{by_key[key].decimals}f}"
            )
            cells.append(f"{shown_value} {_ci(stat, by_key[key].decimals)}".strip())
        run_rows.append(cells)
    runs = _table(
        ["run", *(f"{by_key[key].report_header.format(k=k)} (95% CI)" for key in keys)], run_rows, "results"
    )
    units = (
        f"{table.get('queries')} test queries of {table['patients']} patients (whole patients resampled)"
        if table.get("patients")
        else f"{table.get('queries')} test queries"
    )
    if table.get("rr_queries") is not None:
        units += f"; RR over the {table['rr_queries']} liver slices scored in every run"
    return f"""
<p>Every configuration was trained with {escape(str(table.get("seeds")))} seed(s) by <code>ctsearch reproduce</code>
(one Ray Tune trial per configuration and seed) and evaluated on the same test queries. Each value is the
mean over seeds ± its sample standard deviation; the 95% interval comes from a bootstrap
({escape(str(table.get("n_boot")))} resamples) over seeds and {escape(units)}.</p>
{_table(header, rows, "results")}
<p>Is each difference between two configurations real or noise? Paired over the same seeds and queries:</p>
{verdicts}
<details><summary>Every run</summary>{runs}</details>"""


def evaluation_section(path: Path | None, table_path: Path | None = None) -> str:
    """The Table-1-shaped comparison, with what it means: from ``ctsearch reproduce``'s table.json
    (intervals and verdicts) when given, else from ``ctsearch evaluate --out FILE.json``."""
    res = _read_evaluation(path) if path is not None else None
    table = _read_table(table_path) if table_path is not None else None
    intro = ""
    if res is not None:
        intro = f"""
<p>{escape(str(res.get("queries", "?")))} test slices were each used as a query against the
{escape(str(res.get("database", "?")))} slices of the training patients ({escape(str(res.get("liver_queries", "?")))}
of the queries show liver). A retrieved slice counts as relevant when it agrees with the query on
whether liver is visible. {escape(shared_patients_phrase(res.get("shared_patients")).capitalize())}.</p>"""
    if table is not None:
        k = int(table["k"])
        extra = """
<dt>95% CI</dt><dd>Where the mean would likely lie with other test patients and other training seeds: a
bootstrap that redraws seeds and whole test patients (a patient's slices are not independent).</dd>
<dt>verdict</dt><dd>A minus B on the same queries and seeds, its 95% interval, and p of a sign-flip
permutation test that flips whole patients. A direction is claimed only when the interval excludes 0
and p &lt; 0.05; otherwise "no detectable difference".</dd>"""
        return intro + table_section(table) + _legend(k, table.get("relax_masks"), extra)
    k = int(res["k"])
    shown = shown_metrics()
    rows = [
        [r.get("name"), r.get("n"), *(percent_cell(r.get(m.key), m.decimals) for m in shown)]
        for r in res["rows"]
    ]
    table_html = _table(
        ["pretraining", "runs", *(m.report_header.format(k=k) for m in shown)], rows, "results"
    )
    return intro + table_html + _legend(k, res.get("relax_masks"))


def crossexam_section(cross: dict) -> str:
    """``evaluate --crossexam``: plain top-k against the coherent method, and one example figure."""
    from ctsearch.report.figures import crossexam_figure, png_bytes

    pct = lambda v: "" if v is None else f"{100 * v:.1f}"  # noqa: E731
    num = lambda v, d=1: "" if v is None else f"{v:.{d}f}"  # noqa: E731
    k = cross.get("k", 5)
    rows = [
        [
            r["name"],
            f"plain top-{k}" if r["method"] == "plain" else "coherent (one z offset per exam)",
            num(r["mean_dz_mm"]),
            num(r["median_dz_mm"]),
            pct(r["within_thickness"]),
            num(r["rank_corr"], 2),
            pct(r["run_overlap"]),
        ]
        for r in cross["rows"]
    ]
    header = ["encoder", "method", "mean |Δz| (mm)", "median |Δz| (mm)", "within 1 slice (%)"]
    table = _table(header + ["rank corr. with z", "run overlap (%)"], rows, "results")
    ex = cross.get("example") or {}
    figure = '<p class="note">No example (its volumes could not be read).</p>'
    try:
        from ctsearch.io import read_volume

        q, o = ex["query"], ex["other"]
        img = crossexam_figure(read_volume(q["path"]).hu[q["slice_index"]], read_volume(o["path"]).hu, ex)
        figure = _img(
            png_bytes(img), "query, the matched run in the earlier exam, truth and plain top-k", "figure"
        )
        figure += f"""<p>Query: slice {q["slice_index"]} of {escape(str(q["volume_id"]))} (examination of
{escape(str(q.get("exam_date")))}, {-q["anatomical_mm"]:.0f} mm below the liver dome), looked up in
{escape(str(o["volume_id"]))} (examination of {escape(str(o.get("exam_date")))}) with {escape(str(ex.get("name")))}.
Top row: the query, then the run the coherent method returns along z, inferior to superior (confidence
{ex["coherent"]["confidence"]:.2f}). Bottom row: the slice at the true position, then plain top-{k} by
similarity. Captions: slice number and its distance from the true position (+ = superior).</p>"""
    except (KeyError, TypeError, OSError, CTSearchInputError) as e:
        figure = f'<p class="note">No example figure: {escape(str(e))}.</p>'
    return f"""
<p>As in the paper's case study: a slice of a new examination is looked up in the same patient's
other examination, which was scanned over another range, at another table position and slice
thickness. Every slice of the {escape(str(cross["patients"]))} test patients with two examinations
({escape(str(cross["queries"]))} queries in {escape(str(cross["exam_pairs"]))} ordered exam pairs) was a
query; the true position comes from the synthetic archive's anatomical frame.</p>
{table}
<dl class="legend">
<dt>|Δz|</dt><dd>How far the top slice lies from the true position along the body, in millimetres.</dd>
<dt>within 1 slice</dt><dd>Share of queries whose top slice is within one slice thickness of the other exam of the truth.</dd>
<dt>rank corr. with z</dt><dd>Spearman correlation of the {k} slices, in the order returned, with their order
along the body (1: returned in anatomical order; plain top-{k} returns them by similarity).</dd>
<dt>run overlap</dt><dd>Share of the {k} returned slices among the {k} slices nearest the true position.</dd>
<dt>plain top-{k}</dt><dd>The {k} slices of the other exam most similar to the query slice, chosen one by one.</dd>
<dt>coherent</dt><dd>The whole query exam laid onto the other exam at one z offset (where its slices agree
best); the slice at the query's position and the {k} slices around it (ctsearch search --cross-exam).</dd>
</dl>
{figure}"""


def run_section(run: Path) -> str:
    """One training run: its key settings and its curves (loss; MAP@5 and 5-NN accuracy over epochs)."""
    cfg, opts, model = read_run_settings(run)
    metrics = read_jsonl(run / "metrics.jsonl") if (run / "metrics.jsonl").is_file() else []
    window = lambda w: f"{w[0]} .. {w[1]} HU" if isinstance(w, list) and len(w) == 2 else None  # noqa: E731
    views = model.get("views", opts.get("views"))
    facts = _facts(
        [
            (
                "views",
                {
                    "clinical": "clinical (HU clipping: wide and narrow window)",
                    "standard": "standard SimSiam",
                }.get(views, views),
            ),
            ("backbone", model.get("backbone", opts.get("backbone"))),
            ("image size", model.get("image_size")),
            ("wide window", window(model.get("wide"))),
            ("narrow window", window(model.get("narrow"))),
            ("intensity rescale", model.get("rescale")),
            ("initialisation", opts.get("init")),
            (
                "epochs",
                f"{max((r['epoch'] for r in metrics), default=0)} done of {opts['epochs']}"
                if "epochs" in opts
                else None,
            ),
            ("batch size", opts.get("batch_size")),
            ("base lr", opts.get("base_lr")),
            ("lr (scaled)", cfg.get("lr")),
            ("schedule", opts.get("schedule")),
            ("training slices", opts.get("train_slices")),
            ("crop scale", opts.get("crop_scale")),
            ("seed", opts.get("seed")),
            ("dataset", cfg.get("dataset")),
        ]
    )
    loss = [(r["epoch"], r["loss"]) for r in metrics if r.get("loss") is not None]
    evals = [r for r in metrics if r.get("map_at_5") is not None]
    charts = []
    if loss:
        charts.append(
            line_chart_svg(
                {"SimSiam loss": loss}, "training loss per epoch (-1 is the minimum)", "epoch", "loss"
            )
        )
    if evals:
        charts.append(
            line_chart_svg(
                {
                    "MAP@5": [(r["epoch"], 100 * r["map_at_5"]) for r in evals],
                    "5-NN accuracy": [
                        (r["epoch"], 100 * r["knn_accuracy"])
                        for r in evals
                        if r.get("knn_accuracy") is not None
                    ],
                },
                "retrieval on the test split (epoch 0 = untrained)",
                "epoch",
                "percent",
            )
        )
    note = "" if metrics else '<p class="note">No metrics.jsonl in this run directory: no curves.</p>'
    if metrics and not evals:
        note = '<p class="note">No evaluation rows in metrics.jsonl (trained with --eval-every 0?): no retrieval curve.</p>'
    last = evals[-1] if evals else None
    summary = (
        (
            f"<p>Last evaluation (epoch {last['epoch']}): MAP@5 {100 * last['map_at_5']:.1f} %, 5-NN accuracy "
            f"{100 * last.get('knn_accuracy', float('nan')):.1f} %, embedding spread {last.get('embedding_std', float('nan')):.3f} "
            "(SimSiam's collapse monitor: near 0 means every slice gets the same representation).</p>"
        )
        if last
        else ""
    )
    return (
        f'<h3>{escape(run.name)}</h3><p class="path">{escape(str(run))}</p>{facts}'
        f'<div class="charts">{"".join(charts)}</div>{summary}{note}'
    )


def _fmt(v, spec: str = "") -> str:
    return "" if v is None else format(v, spec) if spec else str(v)


def query_section(folder: Path) -> str:
    """``explain`` of a query (maps.npz + explanation.png): the figure and a table of the retrieved slices."""
    try:
        with np.load(folder / "maps.npz", allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            has_pairs = "pair_query_importance" in z.files
    except (OSError, ValueError, KeyError) as e:
        raise CTSearchInputError(folder / "maps.npz", f"is not an explain result ({e})") from None
    q, hits = meta[0], meta[1:]
    figure = folder / "explanation.png"
    fig = (
        _img(figure.read_bytes(), "query, retrieved slices and RELAX maps", "figure")
        if figure.is_file()
        else '<p class="note">explanation.png is missing (explain ran with --no-png?).</p>'
    )
    rows = [
        [
            h.get("rank"),
            _fmt(h.get("score"), ".3f"),
            h.get("patient_id"),
            h.get("exam_date"),
            h.get("volume_id"),
            h.get("slice_index"),
            _fmt(h.get("z_mm"), ".1f"),
            "yes" if h.get("patient_id") == q.get("patient_id") else "no",
        ]
        for h in hits
    ]
    rows_text = (
        "Rows of the figure: the slices in the wide window (query first, then the hits by rank with their "
        "similarity); each slice's own RELAX importance map (red = the regions its representation depends on "
        "most, blue = least)"
    )
    if has_pairs:
        rows_text += (
            "; the query's map toward each hit (what in the query makes it similar to that hit); and each "
            "hit's map toward the query"
        )
    return f"""
<p>Query: patient {escape(str(q.get("patient_id")))}, volume {escape(str(q.get("volume_id")))}, slice
{escape(str(q.get("slice_index")))}{f", z = {q['z_mm']:.1f} mm" if q.get("z_mm") is not None else ""}{
        f", examination of {escape(str(q['exam_date']))}" if q.get("exam_date") else ""
    }
<span class="path">({escape(str(q.get("path")))})</span>.</p>
{fig}
<p>{escape(rows_text)}.</p>
{
        _table(
            [
                "rank",
                "similarity (cosine)",
                "patient",
                "exam date",
                "volume",
                "slice",
                "z (mm)",
                "same patient as query",
            ],
            rows,
        )
    }
<p class="path">{escape(str(folder))}</p>"""


def dataset_explain_section(folder: Path, max_figures: int = 6) -> str:
    """``explain --model`` of a split (explain.json + explanations.parquet): counts, mean RR, a few overlays."""
    s = read_json(folder / "explain.json", "explain summary")
    facts = _facts(
        [
            ("split", s.get("split")),
            ("model", s.get("model")),
            ("slices explained", s.get("slices")),
            ("errors", s.get("errors")),
            ("mean RR (liver slices)", _fmt(s.get("rr_mean"), ".4f")),
            ("liver slices with RR", s.get("rr_slices")),
            ("masks per slice (mean)", _fmt(s.get("masks_used_mean"), ".0f")),
        ]
    )
    figs = []
    table = folder / "explanations.parquet"
    if table.is_file():
        t = pq.read_table(table, columns=["volume_id", "slice_index", "label", "rr", "png"]).to_pylist()
        t.sort(key=lambda r: -int(r["label"] or 0))  # liver slices first: they have an RR to show
        for r in [r for r in t if r["png"] and (folder / r["png"]).is_file()][:max_figures]:
            cap = f"{r['volume_id']} slice {r['slice_index']}" + (
                f", RR {r['rr']:.3f}" if r["rr"] is not None else ""
            )
            figs.append(
                f"<figure>{_img((folder / r['png']).read_bytes(), cap, 'overlay')}<figcaption>{escape(cap)}</figcaption></figure>"
            )
    return f'<p class="path">{escape(str(folder))}</p>{facts}<div class="gallery">{"".join(figs)}</div>'


def _errors_table(path: Path, limit: int = 20) -> str:
    if not path.is_file():
        return ""
    rows = pq.read_table(path).to_pylist()
    if not rows:
        return f"<p>No errors recorded in {escape(str(path))}.</p>"
    more = f"<p>... and {len(rows) - limit} more in {escape(str(path))}.</p>" if len(rows) > limit else ""
    return (
        f"<p>{len(rows)} error(s) recorded in {escape(str(path))} (files that could not be read are listed, not skipped):</p>"
        + _table(
            ["path", "stage", "error"],
            [[r.get("path"), r.get("stage"), r.get("error")] for r in rows[:limit]],
        )
        + more
    )


def index_section(folder: Path) -> str:
    """The searchable archive: counts and model from index.json, and its errors table."""
    m = read_json(folder / "index.json", "index record")
    cfg = (m.get("model") or {}).get("config") or {}
    facts = _facts(
        [
            ("volumes (series)", m.get("volumes")),
            ("slices", m.get("rows")),
            ("errors", m.get("errors")),
            ("shards", len(m.get("shards", []))),
            ("model", f"{cfg.get('backbone')}, views {cfg.get('views')}" if cfg else None),
            ("embedding size", m.get("embedding_dim")),
            ("stored as", m.get("dtype")),
            ("similarity", m.get("metric")),
            ("created", m.get("created")),
            ("updated", m.get("updated")),
        ]
    )
    return f'<p class="path">{escape(str(folder))}</p>{facts}{_errors_table(folder / "errors.parquet")}'


def prepared_section(folder: Path) -> str:
    """The slice dataset of ``prepare``: volumes, errors and the train/test slices (with liver)."""
    facts = [("volumes", pq.read_metadata(folder / "manifest.parquet").num_rows)]
    for split in ("train", "test", "train_all"):
        f = folder / f"{split}.parquet"
        if f.is_file():
            labels = pq.read_table(f, columns=["label", "patient_id"])
            liver = int(np.sum(labels.column("label").to_numpy() == 1))
            patients = len(set(labels.column("patient_id").to_pylist()))
            facts.append(
                (
                    f"{split} slices",
                    f"{labels.num_rows} from {patients} patient{'s' * (patients != 1)} ({liver} with liver)",
                )
            )
    return (
        f'<p class="path">{escape(str(folder))}</p>{_facts(facts)}{_errors_table(folder / "errors.parquet")}'
    )


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;max-width:1120px;margin:2em auto;padding:0 1em;color:#222;line-height:1.45}
h1{margin-bottom:.2em} h2{border-bottom:2px solid #ddd;padding-bottom:.2em;margin-top:2em} h3{margin-bottom:.1em}
nav a{margin-right:1em} .meta,.path{color:#666;font-size:.85em} .note{color:#8a5a00;background:#fff6e0;padding:.3em .6em;border-radius:4px}
table{border-collapse:collapse;margin:.6em 0} th,td{border:1px solid #ccc;padding:.25em .6em;text-align:left;vertical-align:top}
thead th{background:#f2f2f2} table.results td:nth-child(n+2){text-align:right;font-variant-numeric:tabular-nums}
td{overflow-wrap:anywhere}
dl.facts{display:grid;grid-template-columns:repeat(2,max-content minmax(8em,max-content));gap:.15em 1em;margin:.6em 0;font-size:.92em}
dl.facts dt{font-weight:600;color:#444} dl.facts dd{margin:0} dl.legend dt{font-weight:600;margin-top:.4em} dl.legend dd{margin-left:1.5em}
.charts{display:flex;flex-wrap:wrap;gap:.5em}
svg.chart{background:#fff;border:1px solid #e3e3e3} svg.chart text{font-size:11px;fill:#333} svg.chart .title{font-size:12px;font-weight:600}
svg.chart .grid{stroke:#eee} svg.chart .frame{fill:none;stroke:#999}
img.figure{max-width:100%;height:auto;border:1px solid #ccc} .gallery{display:flex;flex-wrap:wrap;gap:.6em}
figure{margin:0} img.overlay{width:256px;height:auto} figcaption{font-size:.8em;color:#555}
ul.verdicts li{margin:.2em 0} details summary{cursor:pointer;color:#444}
"""

_SECTIONS = (
    ("evaluation", "Retrieval and explanation quality (Table 1)"),
    ("training", "Training runs"),
    ("query", "An example query, its most similar slices, and where the model looks"),
    ("crossexam", "The same anatomy in the patient's earlier examination"),
    ("archive", "Archive and index"),
)


def build_report(parts: ReportInputs, title: str = "ctsearch report") -> tuple[str, dict]:
    """The HTML page of PARTS and what it holds ({"sections": [...], "notes": [...]}).

    Example:
        >>> page, info = build_report(ReportInputs())
        >>> page.startswith("<!DOCTYPE html>"), info["sections"]
        (True, [])
    """
    body: dict[str, str] = {}
    notes: list[str] = []
    if parts.evaluation or parts.table:
        body["evaluation"] = evaluation_section(parts.evaluation, parts.table)
        cross = (
            read_json(parts.evaluation, "evaluation result").get("crossexam") if parts.evaluation else None
        )
        if cross:
            body["crossexam"] = crossexam_section(cross)
    else:
        notes.append(
            "No evaluation result: run ctsearch evaluate ... --out evaluation.json (or ctsearch reproduce) "
            "and pass the file."
        )
    if parts.runs:
        body["training"] = "\n".join(run_section(r) for r in parts.runs)
    else:
        notes.append("No training run directories given: no training curves.")
    shown = []
    for folder in parts.explain:
        if (folder / "maps.npz").is_file():
            shown.append(query_section(folder))
        elif (folder / "explain.json").is_file():
            shown.append(dataset_explain_section(folder))
    if shown:
        body["query"] = "\n".join(shown)
    else:
        notes.append("No explain folder: no query with its retrieved slices and RELAX maps.")
    archive = []
    if parts.index:
        archive.append("<h3>Index (what search looks in)</h3>" + index_section(parts.index))
    if parts.prepared:
        archive.append(
            "<h3>Prepared slice dataset (what training and evaluation use)</h3>"
            + prepared_section(parts.prepared)
        )
    if archive:
        body["archive"] = "\n".join(archive)
    else:
        notes.append("No index or prepared dataset: no archive summary.")
    nav = " ".join(f'<a href="#{key}">{escape(name)}</a>' for key, name in _SECTIONS if key in body)
    sections = "\n".join(
        f'<section id="{key}"><h2>{escape(name)}</h2>{body[key]}</section>'
        for key, name in _SECTIONS
        if key in body
    )
    note_html = "".join(f'<p class="note">{escape(n)}</p>' for n in notes)
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>
<style>{_CSS}</style></head>
<body>
<h1>{escape(title)}</h1>
<p class="meta">Made by ctsearch {escape(__version__)} on {escape(time.strftime("%Y-%m-%d %H:%M"))}. Content-based retrieval of CT
slices: a self-supervised (SimSiam) encoder turns every slice into a vector, and similar vectors are similar slices.</p>
<nav>{nav}</nav>
{note_html}
{sections}
</body></html>
"""
    return page, {"sections": [k for k, _ in _SECTIONS if k in body], "notes": notes}


def write_report(
    parts: ReportInputs,
    out: str | os.PathLike,
    title: str = "ctsearch report",
    aliases: dict[str, str] | None = None,
) -> dict:
    """Build the page and write it atomically to OUT (a local file or a URI); returns {"out", "sections", "notes", "bytes"}.

    ``aliases``: {local path: the name to show} for inputs read from local copies."""
    from ctsearch import storage

    page, info = build_report(parts, title)
    # Inputs read from local copies (a URI's files fetched from a store) are named as given.
    for local, given in sorted((aliases or {}).items(), key=lambda a: -len(a[0])):
        page = page.replace(escape(local), escape(given))
    data = page.encode("utf-8")
    storage.write_bytes(out, data)  # a local file via temp + rename, or one PUT to a URI
    return {"out": str(out), **info, "bytes": len(data)}
