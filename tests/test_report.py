"""`ctsearch report`: the page holds every section it has inputs for, notes the others, and is self-contained."""

from __future__ import annotations

import io
import json
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from ctsearch.cli.main import app
from ctsearch.errors import CTSearchInputError
from ctsearch.report import collect_inputs, grid, line_chart_svg, png_bytes, slice_rgb
from ctsearch.store import atomic_write_json, atomic_write_table, errors_table

VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}
NASTY = "<script>alert(1)</script>&"


class Page(HTMLParser):
    """Tags, attributes and text of a page; raises on a closing tag that does not match the open one."""

    def __init__(self, text: str):
        super().__init__()
        self.tags: list[str] = []
        self.attrs: list[tuple[str, str, str]] = []
        self.text: list[str] = []
        self.stack: list[str] = []
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs += [(tag, k, v or "") for k, v in attrs]
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs += [(tag, k, v or "") for k, v in attrs]

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, (
            f"</{tag}> closes <{self.stack[-1] if self.stack else None}>"
        )
        self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


def parse_page(path: Path) -> Page:
    """Parse a report and check it is balanced and self-contained (no external src/href)."""
    page = Page(path.read_text(encoding="utf-8"))
    assert page.stack == [], f"unclosed tags {page.stack}"
    for tag, name, value in page.attrs:
        if name in ("src", "href", "xlink:href"):
            assert value.startswith(("data:", "#")), f"<{tag} {name}={value[:60]!r}> is not self-contained"
    assert "script" not in page.tags and "link" not in page.tags
    return page


def _run_dir(root: Path, name: str, views: str) -> Path:
    run = root / "runs" / name
    run.mkdir(parents=True)
    atomic_write_json(
        {
            "options": {
                "views": views,
                "backbone": "tiny",
                "epochs": 3,
                "batch_size": 32,
                "base_lr": 0.5,
                "init": "random",
                "seed": 0,
            },
            "model": {
                "backbone": "tiny",
                "image_size": 64,
                "views": views,
                "rescale": "own",
                "wide": [-1000, 1000],
                "narrow": [-50, 250],
            },
            "lr": 0.0625,
            "dataset": "prepared",
        },
        run / "config.json",
    )
    rows = [{"epoch": 0, "map_at_5": 0.70, "knn_accuracy": 0.72, "embedding_std": 0.08}]
    rows += [{"epoch": e, "loss": -0.2 * e, "lr": 0.0625} for e in (1, 2)]
    rows += [{"epoch": 3, "loss": -0.7, "map_at_5": 0.81, "knn_accuracy": 0.84, "embedding_std": 0.07}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


def _explain_dir(root: Path) -> Path:
    out = root / "explain"
    out.mkdir(parents=True)
    meta = [
        {"volume_id": "vol-q", "patient_id": NASTY, "slice_index": 7, "z_mm": -12.5, "path": "/a/q.nii.gz"}
    ]
    meta += [
        {
            "rank": i + 1,
            "score": 0.9 - 0.1 * i,
            "volume_id": f"vol-{i}",
            "patient_id": f"p{i}",
            "exam_date": "20200101",
            "slice_index": i,
            "z_mm": float(i),
            "path": f"/a/{i}.nii.gz",
        }
        for i in range(2)
    ]
    maps = np.zeros((3, 8, 8), np.float32)
    buf = io.BytesIO()
    np.savez_compressed(
        buf,
        importance=maps,
        uncertainty=maps,
        pair_query_importance=maps[:2],
        pair_hit_importance=maps[:2],
        meta=np.asarray(json.dumps(meta)),
    )
    (out / "maps.npz").write_bytes(buf.getvalue())
    tile = slice_rgb(np.zeros((16, 16), np.int16), 16)
    (out / "explanation.png").write_bytes(png_bytes(grid([[tile, tile, tile]])))
    return out


def _index_dir(root: Path) -> Path:
    out = root / "index"
    out.mkdir(parents=True)
    atomic_write_json(
        {
            "rows": 512,
            "volumes": 8,
            "errors": 1,
            "shards": [{"name": "s0"}],
            "embedding_dim": 128,
            "model": {"config": {"backbone": "tiny", "views": "clinical"}},
        },
        out / "index.json",
    )
    atomic_write_table(
        errors_table([{"path": "/a/broken.dcm", "stage": "read", "error": "not a DICOM file"}]),
        out / "errors.parquet",
    )
    return out


def _evaluation(root: Path) -> Path:
    stat = lambda m, s: {"mean": m, "std": s, "values": []}  # noqa: E731
    res = {
        "k": 5,
        "relax_masks": 100,
        "queries": 10,
        "database": 30,
        "liver_queries": 4,
        "rows": [
            {
                "name": "random init + SimSiam (HU clipping), tiny",
                "n": 2,
                "map": stat(0.891, 0.013),
                "acc": stat(0.906, 0.014),
                "rr": stat(0.162, 0.031),
            },
            {
                "name": "random init (seed 0), tiny",
                "n": 1,
                "map": stat(0.794, None),
                "acc": stat(0.803, None),
                "rr": stat(float("nan"), None),
            },
        ],
    }
    atomic_write_json(res, root / "evaluation.json")
    return root / "evaluation.json"


@pytest.fixture
def demo_like(tmp_path):
    _run_dir(tmp_path, "hu-clipping", "clinical")
    _run_dir(tmp_path, "standard", "standard")
    _explain_dir(tmp_path)
    _index_dir(tmp_path)
    _evaluation(tmp_path)
    return tmp_path


def test_line_chart_is_valid_svg_with_one_marker_per_point():
    svg = line_chart_svg(
        {"a<b": [(0, 1.0), (5, 3.0), (10, float("nan"))], "c": [(5, 2.0)]}, "t & t", "epoch", "y"
    )
    root = ET.fromstring(svg)  # well-formed XML, so the escaping held
    ns = "{http://www.w3.org/2000/svg}"
    assert len(root.findall(f"{ns}circle")) == 3  # the NaN is left out
    assert len(root.findall(f"{ns}polyline")) == 1  # a one-point series gets a marker, no line
    assert "a&lt;b" in svg and "t &amp; t" in svg


def test_collect_inputs_expands_a_demo_folder(demo_like):
    parts = collect_inputs([demo_like])
    assert [p.name for p in parts.runs] == ["hu-clipping", "standard"]
    assert parts.index == demo_like / "index" and parts.explain == [demo_like / "explain"]
    assert parts.evaluation == demo_like / "evaluation.json" and parts.prepared is None


def test_collect_inputs_rejects_what_it_cannot_use(tmp_path, demo_like):
    with pytest.raises(CTSearchInputError, match="does not exist"):
        collect_inputs([tmp_path / "nope"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(CTSearchInputError, match="is not a demo folder, run directory"):
        collect_inputs([tmp_path / "empty"])
    with pytest.raises(CTSearchInputError, match="a second index"):
        collect_inputs([demo_like / "index", demo_like / "index"])


def test_report_of_demo_folder_holds_every_section(demo_like):
    result = CliRunner().invoke(app, ["report", str(demo_like), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["sections"] == ["evaluation", "training", "query", "archive"]
    assert summary["out"] == str(demo_like / "report.html")  # one demo folder: the page goes into it
    page = parse_page(demo_like / "report.html")
    text = " ".join(page.text)
    assert (
        "random init + SimSiam (HU clipping), tiny" in text
        and "89.1 ± 1.3" in text
        and "16.20 ± 3.10" in text
    )
    assert "79.4" in text and "n/a" in text  # one run: no ±; NaN RR: not measured
    assert page.tags.count("svg") == 4  # two charts per run
    pngs = [v for t, k, v in page.attrs if t == "img" and k == "src"]
    assert len(pngs) == 1 and pngs[0].startswith("data:image/png;base64,")
    assert NASTY in text and "script" not in page.tags  # the patient id is shown as text, escaped
    assert "not a DICOM file" in text and "-12.5 mm" in text
    assert "no index" not in text.lower()


def _reproduce_table(root: Path) -> Path:
    """A table.json as ``ctsearch reproduce`` writes it (summarise of fixed per-query scores)."""
    from test_reproduce import _evaluation as reproduce_evaluation

    from ctsearch.jobs.reproduce import ReproduceOptions, markdown, summarise

    grid = [(c, s) for c in ("clinical", "standard", "none") for s in (0, 1)]
    rng = np.random.default_rng(0)
    per_query = {}
    for c, s in grid:
        level = {"clinical": 0.9, "standard": 0.8, "none": 0.6}[c]
        scores = (rng.random((3, 40)) < level).astype(float).tolist()
        scores[2] = [v if i % 2 else None for i, v in enumerate(scores[2])]  # RR on every other slice
        per_query[f"{c}-s{s}"] = dict(zip(("map", "acc", "rr"), scores))
    patients = np.repeat(np.arange(10), 4)
    o = ReproduceOptions(seeds=2, relax_masks=100, n_boot=500)
    table = summarise(reproduce_evaluation(per_query, grid), grid, o, patients)
    table["markdown"] = markdown(table)
    atomic_write_json(table, root / "table.json")
    return root / "table.json"


def test_report_shows_reproduce_table_with_intervals_and_verdicts(tmp_path, demo_like):
    table = json.loads(_reproduce_table(demo_like).read_text())
    parts = collect_inputs([demo_like])
    assert parts.table == demo_like / "table.json" and parts.evaluation == demo_like / "evaluation.json"
    assert collect_inputs([demo_like / "table.json"]).table == demo_like / "table.json"  # a file alone too
    result = CliRunner().invoke(app, ["report", str(demo_like), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["sections"][0] == "evaluation"
    page = parse_page(demo_like / "report.html")
    text = " ".join(page.text)
    # reproduce's rows, with their intervals, replace evaluate's rows
    assert "no self-supervision" in text and "random init + SimSiam (HU clipping), tiny" not in text
    ths = [t for t in page.text if t.strip()]
    assert ths.count("95% CI") == 4  # MAP, ACC and RR each get an interval column; the legend says what it is
    clinical = table["rows"][0]
    low, high = clinical["map"]["ci"]
    assert f"[{100 * low:.1f}, {100 * high:.1f}]" in text
    assert f"[{100 * clinical['rr']['ci'][0]:.2f}, {100 * clinical['rr']['ci'][1]:.2f}]" in text
    assert len(table["comparisons"]) == 9  # 3 pairs x 3 metrics
    for c in table["comparisons"]:
        assert c["verdict"] in text
    assert page.tags.count("li") == 9 and "details" in page.tags  # every run's interval, folded
    assert "clinical-s1" in text and "10 patients" in text and "20 liver slices" in text
    assert table["no_verdict"] is None and "no difference can be claimed" not in text  # 10 patients suffice
    assert "40 test slices were each used as a query" not in text  # the intro is evaluation.json's
    assert "10 test slices were each used as a query" in text


def test_missing_parts_become_notes_not_errors(tmp_path, demo_like):
    out = tmp_path / "one-run.html"
    result = CliRunner().invoke(
        app, ["report", str(demo_like / "runs" / "standard"), "--out", str(out), "--json"]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["sections"] == ["training"]
    text = " ".join(parse_page(out).text)
    assert (
        "No evaluation result" in text
        and "No explain folder" in text
        and "No index or prepared dataset" in text
    )


def test_broken_inputs_are_one_line_errors(tmp_path, demo_like):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    result = CliRunner().invoke(app, ["report", str(bad), "--out", str(tmp_path / "r.html")])
    assert result.exit_code == 1
    assert f"{bad}: is not a readable evaluation result" in result.output
    (demo_like / "runs" / "standard" / "metrics.jsonl").write_text('{"epoch": 1}\n{oops\n')
    result = CliRunner().invoke(
        app, ["report", str(demo_like / "runs" / "standard"), "--out", str(tmp_path / "r.html")]
    )
    assert result.exit_code == 1 and "line 2 is not JSON" in result.output
    assert not (tmp_path / "r.html").exists()


def test_evaluate_out_feeds_the_report(tmp_path, slice_dataset):
    """The real chain: evaluate --out writes the JSON the report reads; prepare's folder gives the archive summary."""
    ev = tmp_path / "ev" / "evaluation.json"
    result = CliRunner().invoke(
        app,
        [
            "evaluate",
            str(slice_dataset),
            "--baseline",
            "random",
            "--backbone",
            "tiny",
            "--image-size",
            "32",
            "--relax-masks",
            "0",
            "--out",
            str(ev),
            "--quiet",
        ],
    )
    assert result.exit_code == 0, result.output
    assert json.loads(ev.read_text())["rows"][0]["name"] == "random init (seed 0), tiny"
    out = tmp_path / "r.html"
    result = CliRunner().invoke(app, ["report", str(ev), str(slice_dataset), "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["sections"] == ["evaluation", "archive"]
    text = " ".join(parse_page(out).text)
    assert "random init (seed 0), tiny" in text and "MAP@5 (%)" in text
    assert "from 6 patients (" in text  # train slices of the prepared dataset


def test_dataset_mode_explain_folder_shows_counts_and_liver_overlays_first(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "explanations" / "test"
    (folder / "overlays").mkdir(parents=True)
    atomic_write_json(
        {"split": "test", "model": "runs/a", "slices": 3, "errors": 0, "rr_mean": 0.4321, "rr_slices": 1},
        folder / "explain.json",
    )
    tile = slice_rgb(np.zeros((16, 16), np.int16), 16)
    rows = []
    for i, label in enumerate([0, 0, 1]):
        png = f"overlays/v_{i}.png"
        (folder / png).write_bytes(png_bytes(grid([[tile]])))
        rows.append(
            {"volume_id": "v", "slice_index": i, "label": label, "rr": 0.4321 if label else None, "png": png}
        )
    pq.write_table(pa.Table.from_pylist(rows), folder / "explanations.parquet")
    out = tmp_path / "r.html"
    result = CliRunner().invoke(app, ["report", str(folder), "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["sections"] == ["query"]
    page = parse_page(out)
    text = " ".join(page.text)
    assert "0.4321" in text
    captions = [v for t, k, v in page.attrs if t == "img" and k == "alt"]
    assert captions == [
        "v slice 2, RR 0.432",
        "v slice 0",
        "v slice 1",
    ]  # the liver slice, which has an RR, first


@pytest.mark.parametrize(
    "shared, says",
    [
        (None, "Whether train and test share patients was not recorded"),
        (0, "No patient is in both"),
        (3, "3 patients are in both"),
    ],
)
def test_evaluation_states_patient_overlap_only_as_measured(tmp_path, shared, says):
    from ctsearch.report.html import evaluation_section
    from ctsearch.store import read_json

    path = _evaluation(tmp_path)
    res = read_json(path, "evaluation result")
    if shared is not None:
        atomic_write_json({**res, "shared_patients": shared}, path)
    html = evaluation_section(path)
    assert says in html and "never appear" not in html
