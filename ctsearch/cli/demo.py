"""``ctsearch demo``: the whole pipeline on a synthetic archive, as the command lines a user would type.

Each step runs the real command in this process and prints it first, so the demo doubles as a
walk-through: copy any printed line to repeat that step by hand.
"""

from __future__ import annotations

import shlex
import time
from pathlib import Path

import typer

from ctsearch.backbones import TRAINABLE
from ctsearch.cli.common import err_console, handle_errors
from ctsearch.errors import CTSearchInputError


def _run(app: typer.Typer, argv: list[str]) -> None:
    # Printed whole (no rule, no ellipsis) so any step can be copied and rerun by hand.
    err_console.print(
        f"\n$ ctsearch {shlex.join(argv)}", style="bold", soft_wrap=True, highlight=False, markup=False
    )
    t0 = time.perf_counter()
    try:
        app(argv, prog_name="ctsearch", standalone_mode=False)
    except SystemExit as e:  # a command that exits non-zero stops the demo there
        if e.code not in (0, None):
            raise CTSearchInputError(None, f"demo step failed: ctsearch {shlex.join(argv)}") from None
    err_console.print(f"[dim]({time.perf_counter() - t0:.1f} s)[/dim]")


def demo_steps(
    out: Path, volumes: int, size: int, epochs: int, backbone: str, seed: int, masks: int, seeds: int = 1
) -> list[list[str]]:
    """The demo's command lines, in order (tests check the plan without running it)."""
    train_patients = max(2, round(volumes * 0.75))
    exams = 2
    archive, prepared, runs, index = out / "archive", out / "prepared", out / "runs", out / "index"
    query_case = (
        train_patients * exams
    )  # first exam of the first test patient (cases are numbered patient by patient)
    query = archive / "nifti" / "imagesTr" / f"liver_{query_case}.nii.gz"
    # The settings docs/synthetic.md measured on this archive: a random init with unit residual BN
    # (a fair untrained baseline), every slice of the train volumes for SimSiam (no labels needed),
    # crops no smaller than half the slice at 64 px, and each HU window stretched to [0, 1].
    common_train = [
        "--backbone",
        backbone,
        "--image-size",
        str(size),
        "--init",
        "random",
        "--no-zero-init-residual",
        "--train-slices",
        "all",
        "--crop-scale",
        "0.5",
        "--rescale",
        "own",
        "--base-lr",
        "0.5",
        "--epochs",
        str(epochs),
        "--batch-size",
        "32",
        "--eval-every",
        "10",
    ]
    s = str
    return [
        [
            "synth",
            s(archive),
            "--volumes",
            s(volumes),
            "--exams",
            s(exams),
            "--size",
            s(size),
            "--format",
            "both",
            "--seed",
            s(seed),
        ],
        [
            "prepare",
            s(archive / "nifti"),
            s(prepared),
            "--protocol",
            "decathlon",
            "--train-volumes",
            s(train_patients * exams),
            "--train-all-slices",
            "--seed",
            s(seed),
        ],
        # Table 1 as one job: HU-clipping and standard SimSiam and the untrained encoder for each
        # training seed (Ray Tune trials into OUT/runs/<config>-s<seed>), evaluated with RR and
        # cross-exam retrieval, with intervals and verdicts (OUT/table.md, OUT/evaluation.json).
        [
            "reproduce",
            s(prepared),
            s(out),
            "--configs",
            "clinical,standard,none",
            "--seeds",
            s(seeds),
            *common_train,
            "--relax-masks",
            s(masks),
            "--crossexam",
        ],
        ["index", s(archive / "dicom"), "--model", s(runs / "clinical-s0"), "--out", s(index)],
        ["search", s(index), s(query), "-k", "5", "--exclude-patient", f"synth-{train_patients:04d}"],
        ["search", s(index), s(query), "--cross-exam"],
        [
            "explain",
            s(index),
            s(query),
            "-k",
            "3",
            "--exclude-patient",
            f"synth-{train_patients:04d}",
            "--masks",
            s(masks),
            "--out",
            s(out / "explain"),
        ],
        ["report", s(out), "--out", s(out / "report.html")],
    ]


def register(app: typer.Typer) -> None:
    @app.command("demo")
    @handle_errors
    def demo_cmd(
        out: Path = typer.Argument(Path("demo-out"), help="Folder for everything the demo makes."),
        volumes: int = typer.Option(16, "--volumes", help="Synthetic patients (two examinations each)."),
        size: int = typer.Option(
            64, "--size", help="Slice size in pixels (synthetic archive and model input)."
        ),
        epochs: int = typer.Option(30, "--epochs", help="SimSiam epochs per run."),
        backbone: str = typer.Option("tiny", "--backbone", help=" | ".join(TRAINABLE) + "."),
        seed: int = typer.Option(0, "--seed", help="Seed of the archive and the slice choice."),
        seeds: int = typer.Option(
            1, "--seeds", min=1, help="Training seeds per configuration (0..N-1; each adds two trainings)."
        ),
        masks: int = typer.Option(
            1000, "--masks", help="RELAX masks per explained slice (the paper uses 3000)."
        ),
    ) -> None:
        """Synthesise an archive, prepare it, reproduce Table 1 (HU-clipping and standard SimSiam, untrained), index, search, explain, report."""
        if volumes < 4:
            raise CTSearchInputError(
                None, "--volumes must be at least 4 (train and test patients are needed)"
            )
        t0 = time.perf_counter()
        for argv in demo_steps(out, volumes, size, epochs, backbone, seed, masks, seeds):
            _run(app, argv)
        err_console.print("\ndemo finished", style="bold green")
        err_console.print(
            f"{time.perf_counter() - t0:.0f} s. Everything is under {out}/: archive/ (NIfTI + DICOM), prepared/ "
            "(manifest, slice splits), runs/ (SimSiam runs and the untrained encoder, per seed), table.md and "
            "table.json (Table 1 with intervals and verdicts, printed above), evaluation.json, index/ (parquet + "
            "FAISS), explain/ (RELAX overlays)."
        )
        err_console.print(
            f"Open the report: {out / 'report.html'}",
            style="bold",
            soft_wrap=True,
            highlight=False,
            markup=False,
        )
