"""``ctsearch serve``: the search service (Ray Serve): HTTP JSON API + a web page to browse similar cases."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Optional

import typer

from ctsearch import storage
from ctsearch.cli.common import ADDRESS_OPT, QUIET_OPT, SALT_OPT, check_faiss_wheels, handle_errors, say
from ctsearch.errors import CTSearchInputError

MIN_TOKEN_CHARS = 16


def register(app: typer.Typer) -> None:
    app.command("serve")(serve_cmd)


def read_token(path: Path) -> str:
    """The bearer token in ``path`` (one trailing newline dropped), at least 16 characters.

    A file, never the command line: a command line ends up in shell history and `ps`.
    """
    try:
        token = path.read_text(encoding="utf-8").rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as e:
        raise CTSearchInputError(path, f"cannot read the token file ({type(e).__name__})") from None
    if len(token) < MIN_TOKEN_CHARS or any(c.isspace() for c in token):
        raise CTSearchInputError(
            path,
            f"the token must be at least {MIN_TOKEN_CHARS} characters without spaces "
            "(e.g. openssl rand -hex 32 > FILE)",
        )
    return token


@handle_errors
def serve_cmd(
    index_dir: str = typer.Argument(..., help="Index directory (or s3:// URI) written by `ctsearch index`."),
    host: str = typer.Option(
        "127.0.0.1",
        "--host",
        help="Address to listen on. Anything but loopback (127.0.0.1, ::1, localhost) needs --token-file.",
    ),
    port: int = typer.Option(8000, "--port", help="TCP port of the HTTP API and the page."),
    replicas: int = typer.Option(
        1, "--replicas", help="Replicas of the front (model + HTTP) and of each shard group."
    ),
    max_replicas: Optional[int] = typer.Option(
        None,
        "--max-replicas",
        help="Autoscale between --replicas and this many replicas on ongoing requests (default: fixed --replicas).",
    ),
    shards_per_replica: int = typer.Option(
        0,
        "--shards-per-replica",
        help="Spread the index: groups of this many shards, one deployment each, merged by the front (0 = every front replica holds all shards).",
    ),
    cpus_per_replica: float = typer.Option(
        1.0, "--cpus-per-replica", help="Ray CPUs reserved per replica (fractions allowed)."
    ),
    token_file: Optional[Path] = typer.Option(
        None,
        "--token-file",
        help="File holding the bearer token clients must send (Authorization: Bearer TOKEN); required off loopback.",
    ),
    max_upload_mb: int = typer.Option(
        512, "--max-upload-mb", help="Largest uploaded query file, in MiB (413 above)."
    ),
    id_salt_file: Optional[Path] = SALT_OPT,
    address: Optional[str] = ADDRESS_OPT,
    quiet: bool = QUIET_OPT,
) -> None:
    """Serve INDEX_DIR over HTTP until Ctrl-C or SIGTERM: search, cross-exam, RELAX, thumbnails, and a web page.

    Example: ctsearch serve demo-out/index  (then open http://127.0.0.1:8000/)
    """
    from ctsearch.ids import load_salt

    token = read_token(token_file) if token_file is not None else None
    from ctsearch.serve.api import token_digest
    from ctsearch.serve.deploy import ServeOptions

    options = ServeOptions(
        index_dir=storage.absolute(index_dir),
        host=host,
        port=port,
        replicas=replicas,
        max_replicas=max_replicas,
        shards_per_replica=shards_per_replica,
        cpus_per_replica=cpus_per_replica,
        token_sha256=token_digest(token) if token else None,
        id_salt=load_salt(id_salt_file),
        max_upload_mb=max_upload_mb,
    )
    options.check()
    check_faiss_wheels()
    from ctsearch.index import Index

    Index.open(index_dir)  # not an index: one line now, not a failed replica later
    run_until_stopped(options, address, quiet)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def run_until_stopped(options, address: str | None, quiet: bool) -> None:
    """Start Ray (embedded unless ``address``) and the service; block until SIGINT/SIGTERM, then take both down."""
    import ray

    from ctsearch.jobs.runtime import cluster_address, start_ray
    from ctsearch.serve import deploy

    on_cluster = cluster_address(address) is not None or ray.is_initialized()
    if not on_cluster:
        deploy.check_port_free(options.host, options.port)
    started_ray = not ray.is_initialized()
    try:
        say(f"starting ctsearch serve for {options.index_dir} ...", quiet)
        start_ray(address, quiet=True)
        # SIGTERM (systemd, docker stop, kill) takes the same clean way out as Ctrl-C; set after
        # ray.init, whose crash handler would otherwise abort the process on SIGTERM.
        signal.signal(signal.SIGTERM, _interrupt)
        serve_was_running = on_cluster and deploy.serve_running()
        try:
            url = deploy.start(options)
            auth = "; clients send Authorization: Bearer TOKEN" if options.token_sha256 else ""
            say(f"ctsearch serve: {url} (page and API{auth}). Ctrl-C or SIGTERM stops it.", False)
            while True:
                time.sleep(1)
        except KeyboardInterrupt:
            say("stopping ...", quiet)
        finally:
            # Serve's proxy holds the port: shut Serve down unless it was there before us.
            deploy.stop(shutdown_serve=not serve_was_running)
    finally:
        if started_ray and ray.is_initialized():
            ray.shutdown()
    say("stopped", quiet)
