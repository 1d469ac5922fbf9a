"""``ctsearch search``: the k most similar slices in an index, as a table or JSON."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ctsearch import storage
from ctsearch.cli.common import (
    JSON_OPT,
    SALT_OPT,
    check_faiss_wheels,
    emit_json,
    handle_errors,
    result_stream,
    say,
)


def register(app: typer.Typer) -> None:
    app.command("search")(search_cmd)


@handle_errors
def search_cmd(
    index_dir: str = typer.Argument(..., help="Index directory (or s3:// URI) written by `ctsearch index`."),
    query: str = typer.Argument(
        ..., help="A NIfTI file or DICOM series folder, or a row of the index as volume_id:slice_index."
    ),
    slice_: Optional[int] = typer.Option(
        None, "--slice", help="Slice of a file/folder QUERY (0 = most inferior; default: the middle slice)."
    ),
    k: int = typer.Option(
        5, "-k", "--k", min=1, help="Number of results (more than the index holds: all of them)."
    ),
    patient: Optional[str] = typer.Option(
        None,
        help="Only return slices of this patient id (on a pseudonymised index: the pseudonym, or the original id with --id-salt-file).",
    ),
    exclude_patient: Optional[str] = typer.Option(
        None,
        help="Never return slices of this patient id (e.g. the query's own; pseudonym or original id as for --patient).",
    ),
    cross_exam: bool = typer.Option(
        False,
        "--cross-exam",
        help="Instead: the query's anatomy in each other examination of its patient: the query exam's "
        "stretch around the slice aligned with the other exam along z, returning the matched slice, "
        "a run of slices around it (inferior to superior) and a confidence. Copies of the query's scan "
        "(same pixels) are not offered.",
    ),
    per_exam: int = typer.Option(
        5, min=1, help="Length of the run of slices per examination with --cross-exam."
    ),
    device: str = typer.Option("cpu", help="cpu (FAISS) or cuda (exact search with torch on the GPU)."),
    nprobe: Optional[int] = typer.Option(
        None, help="IVF lists probed in IVF-PQ shards (default: stored per shard)."
    ),
    id_salt_file: Optional[Path] = SALT_OPT,
    json_out: bool = JSON_OPT,
) -> None:
    """Find the slices most similar to QUERY (cosine similarity of the index's embeddings)."""
    check_faiss_wheels()
    from ctsearch.errors import CTSearchInputError
    from ctsearch.ids import load_salt
    from ctsearch.index import Index
    from ctsearch.index.format import HIT_COLUMNS
    from ctsearch.query import embed_query, embed_series

    id_salt = load_salt(id_salt_file)
    index = Index.open(index_dir, device=device)
    patient, exclude_patient = (
        index.patient_key(patient, id_salt),
        index.patient_key(exclude_patient, id_salt),
    )
    vector, qmeta = embed_query(index, query, slice_, id_salt)
    if cross_exam:
        from ctsearch.crossexam import cross_exam as run

        if not qmeta.get("patient_id") and index.ids.get("pseudonymised") and id_salt is None:
            raise CTSearchInputError(
                query,
                "the index's ids are pseudonymised; --cross-exam with a file query needs "
                "--id-salt-file to hash the query's patient id (or query a row volume_id:slice)",
            )
        if not qmeta.get("patient_id"):
            raise CTSearchInputError(query, "has no patient id; --cross-exam needs one")
        if per_exam < 1:
            raise CTSearchInputError(None, "--per-exam must be at least 1")
        res = run(
            index,
            vector,
            qmeta["patient_id"],
            exclude_volume=qmeta.get("volume_id"),
            per_exam=per_exam,
            query_slice=qmeta.get("slice_index"),
            query_hash=qmeta.get("pixel_hash"),
            series=(lambda: embed_series(index, query)) if storage.exists(query) else None,
        )
        if json_out:
            emit_json({"query": {k: qmeta.get(k) for k in HIT_COLUMNS if k in qmeta}, **res})
        else:
            _print_exams(qmeta, res)
        return
    if k > len(index):
        say(f"-k {k} is more than the index's {len(index)} slices: returning all of them")
    res = index.search(vector, k=k, patient=patient, exclude_patient=exclude_patient, nprobe=nprobe)
    hits = [{key: h.get(key) for key in HIT_COLUMNS} for h in res.hits[0]]
    if json_out:
        emit_json(hits)
        return
    _print_hits(qmeta, hits)


def _print_hits(qmeta: dict, hits: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(
        title=f"query {qmeta.get('volume_id')}:{qmeta.get('slice_index')} (patient {qmeta.get('patient_id')})"
    )
    for col in ("rank", "score", "patient", "volume", "slice", "z mm", "path"):
        t.add_column(col, justify="right" if col in ("rank", "score", "slice", "z mm") else "left")
    for h in hits:
        t.add_row(
            str(h["rank"]),
            f"{h['score']:.4f}",
            str(h["patient_id"]),
            str(h["volume_id"]),
            str(h["slice_index"]),
            "" if h["z_mm"] is None else f"{h['z_mm']:.1f}",  # unknown in an index built without positions
            str(h["path"]),
        )
    Console(file=result_stream()).print(t)


def _print_exams(qmeta: dict, res: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(file=result_stream())
    title = (
        f"query {qmeta.get('volume_id')}:{qmeta.get('slice_index')} at z {qmeta.get('z_mm', float('nan')):.1f} mm, "
        f"patient {qmeta.get('patient_id')}"
    )
    if res["message"]:  # one exam only: say so rather than print an empty table
        console.print(f"{title}: {res['message']}.", soft_wrap=True, markup=False)
        return
    t = Table(title=f"{title}: the same anatomy in the other examinations")
    for col in (
        "exam date",
        "volume",
        "best slice",
        "z mm",
        "score",
        "confidence",
        "run by z (slice@z:score)",
    ):
        t.add_column(col, overflow="fold")
    for e in res["exams"]:
        b = e["best"]
        ms = " ".join(f"{m['slice_index']}@{m['z_mm']:.0f}:{m['score']:.3f}" for m in e["matches"])
        volume = str(e["volume_id"]) + (f" (= {', '.join(e['copies'])})" if e["copies"] else "")
        t.add_row(
            str(e["exam_date"] or ""),
            volume,
            str(b["slice_index"]),
            f"{b['z_mm']:.1f}",
            f"{b['score']:.4f}",
            f"{e['confidence']:.2f}",
            ms,
        )
    console.print(t)
    if res["copies_of_query"]:
        console.print(
            f"not shown: {', '.join(res['copies_of_query'])}, a copy of the query's own scan (same pixels)",
            soft_wrap=True,
            markup=False,
        )
