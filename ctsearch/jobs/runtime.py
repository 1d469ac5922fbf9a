"""Starting Ray: embedded by default, a cluster when an address is given.

Four ways in, one code path (docs/cluster.md):

- no address and no ``$RAY_ADDRESS``: Ray starts inside this process, on 127.0.0.1 only;
- ``HOST:PORT`` (or ``$RAY_ADDRESS``, as ``ray job submit`` sets it): this process is the driver,
  on a cluster node;
- ``ray://HOST:PORT``: Ray Client from outside the cluster. Ray Data and Ray Train need a driver
  inside the cluster, so ``run_job`` runs the job function there as one task, pinned to the head
  node, and relays its progress callbacks back here.

Example:
    >>> parse_address("ray://head.example:10001")
    ('ray', 'head.example', 10001)
    >>> parse_address("10.0.0.5:6379")
    ('gcs', '10.0.0.5', 6379)
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any, Callable

import ray
import ray.data

from ctsearch.errors import CTSearchInputError
from ctsearch.jobs.address import parse_address

# Bounds on how long a connection may take before it is reported as unreachable.
CONNECT_TIMEOUT_S = 10
CLIENT_ATTEMPTS = 3  # Ray Client connections tried before giving up (see _connect)


def cluster_address(address: str | None) -> str | None:
    """The cluster to use: ``address``, else ``$RAY_ADDRESS``; None (or "local") means embedded."""
    address = (address or os.environ.get("RAY_ADDRESS") or "").strip()
    if address in ("", "local"):
        return None
    if address != "auto":
        parse_address(address)
    return address


# Who hears what a job is doing before its progress starts (set by run_job; silent otherwise).
_status: Callable[[str], None] = lambda message: None


def announce(message: str) -> None:
    """Tell the person running the job what it is doing: Ray start-up, a resumed run. One line."""
    _status(message)


def start_ray(address: str | None = None, num_cpus: int | None = None, quiet: bool = True) -> None:
    """Connect to ``address`` (or $RAY_ADDRESS); with neither, start Ray in this process.

    Already-initialised Ray (tests, notebooks, a job running inside the cluster) is left as it is.
    Ray Data's own progress bars and INFO logs are switched off: the CLI draws one progress bar
    per job, and the Ray logs stay in the session's log folder (``--debug`` or ``quiet=False``
    shows them). Connection problems become one-line ``CTSearchInputError``s.
    """
    if not ray.is_initialized():
        where = cluster_address(address)
        announce(
            f"connecting to the Ray cluster at {where} ..."
            if where
            else "starting Ray on this machine (127.0.0.1 only) ..."
        )
        if quiet:
            # The driver's C++ core logs harmless ERROR lines (e.g. about actor constructor
            # arguments, ray#53727) to stderr; real failures still reach us as Python exceptions.
            os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
        address = cluster_address(address)
        if address:
            _connect(address, quiet)
        else:
            _loopback_only()
            # Local runs: no dashboard (nothing to connect to from a laptop job), and quiet logs.
            # address="local": without it Ray joins whatever cluster was last started on this
            # machine (`ray start`, /tmp/ray/ray_current_cluster) instead of starting its own.
            ray.init(
                address="local",
                num_cpus=num_cpus,
                include_dashboard=False,
                log_to_driver=not quiet,
                configure_logging=True,
                logging_level="ERROR" if quiet else "INFO",
            )
    logging.getLogger("ray.data").setLevel(logging.ERROR if quiet else logging.INFO)
    ray.data.DataContext.get_current().enable_progress_bars = not quiet


def _loopback_only() -> None:
    """Make an embedded Ray bind to and advertise 127.0.0.1 only.

    Ray's ports have no authentication of their own, and by default Ray advertises (and its
    gRPC servers listen on) the machine's network interface. Ray keeps every port on the
    loopback address where it believes multi-node clusters are off; that switch is read at import
    time, so both the environment (for the processes Ray starts) and the constant are set.
    """
    from ray._private import ray_constants

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False


def _connect(address: str, quiet: bool) -> None:
    kind = "auto" if address == "auto" else parse_address(address)[0]
    if kind == "ray":
        try:
            import grpc  # noqa: F401 - what `ray[client]` adds
        except ImportError:
            raise CTSearchInputError(
                None,
                f"--address {address}: Ray Client needs the `ray[client]` extra (pip install 'ray[client]')",
            ) from None
    if kind != "auto":
        _check_reachable(address)
    for attempt in range(1, CLIENT_ATTEMPTS + 1):
        try:
            if kind == "ray":
                ray.init(address=address)
            else:
                ray.init(address=address, log_to_driver=not quiet, logging_level="ERROR" if quiet else "INFO")
            break
        except Exception as e:  # noqa: BLE001 - every way a connection fails is the user's address problem
            # The Ray Client proxy starts one server process per client; on a loaded head that start
            # sometimes fails with nothing logged, and a second try succeeds.
            if kind == "ray" and attempt < CLIENT_ATTEMPTS and "client server failed" in str(e):
                ray.shutdown()
                time.sleep(2.0 * attempt)
                continue
            raise CTSearchInputError(
                None, f"cannot connect to the Ray cluster at {address}: {_reason(e)}"
            ) from None
    if kind == "gcs":
        _watch_head(address)


def _watch_head(address: str, every_s: float = 2.0, misses: int = 5) -> None:
    """Exit with one line when the head node goes away mid-job.

    A driver whose GCS disappears is ended by Ray's C++ core after a minute of retries, with
    exit code 1 and no message a user could act on. This watchdog notices first (``misses``
    failed connections in a row, ~10 s) and says what happened.
    """
    import sys

    def watch() -> None:
        failed = 0
        while True:
            time.sleep(every_s)
            if _unreachable(address, every_s) is None:
                failed = 0
            else:
                failed += 1
                if failed >= misses:
                    sys.__stderr__.write(
                        f"error: lost the Ray cluster at {address}: its head node stopped answering\n"
                    )
                    sys.__stderr__.flush()
                    os._exit(1)

    threading.Thread(target=watch, name="ctsearch-head-watchdog", daemon=True).start()


def _check_reachable(address: str) -> None:
    """Fail in seconds, not minutes, when nothing listens at the address (Ray retries for ~1 min+)."""
    if (e := _unreachable(address, CONNECT_TIMEOUT_S)) is not None:
        raise CTSearchInputError(None, f"cannot connect to the Ray cluster at {address}: {e.strerror or e}")


def _unreachable(address: str, timeout: float) -> OSError | None:
    """Why nothing accepts a TCP connection at the address, or None when something does."""
    import socket

    _, host, port = parse_address(address)
    try:
        socket.create_connection((host.strip("[]"), port), timeout=timeout).close()
    except OSError as e:
        return e
    return None


def _reason(e: BaseException) -> str:
    """One line out of whatever Ray raised: version mismatches, timeouts, refused connections."""
    text = " ".join(str(e).split())
    if "version" in text.lower() and "mismatch" in text.lower():
        return f"Ray or Python version mismatch between this machine and the cluster ({text[:300]})"
    return (text or type(e).__name__)[:400]


def is_client() -> bool:
    """True when this process talks to the cluster through Ray Client (a ``ray://`` address)."""
    from ray.util.client import ray as client_ray

    return client_ray.is_connected()


def run_job(
    fn: Callable[..., Any],
    *args,
    address: str | None = None,
    callbacks: tuple[str, ...] = (),
    status: Callable[[str], None] | None = None,
    **kwargs,
) -> Any:
    """Run ``fn(*args, address=address, **kwargs)``: here, or, through Ray Client, inside the cluster.

    With a cluster address the connection is made first, so a wrong address fails before any
    output folder exists. Through Ray Client (``ray://``), Ray Data and Ray Train cannot drive
    the job from outside the cluster: ``fn`` then runs as one task on the head node (all paths
    are the cluster's), and the keyword arguments named in ``callbacks`` (progress callbacks)
    are relayed back through a queue and called here with the same arguments. ``status(message)``
    hears what the job announces (``announce``): Ray start-up, which takes seconds (minutes on a
    busy cluster), and what a resumed job finds already done.
    """
    global _status
    outer, _status = _status, status or _status
    try:
        return _run_job(fn, args, address, callbacks, kwargs)
    finally:
        _status = outer


def _run_job(fn, args, address, callbacks, kwargs) -> Any:
    if cluster_address(address):  # a malformed address fails here, before anything else
        start_ray(address)
    if not (ray.is_initialized() and is_client()):
        return fn(*args, address=address, **kwargs)

    from ray.util.queue import Empty, Queue

    _quiet_closed_channels()

    local = {name: kwargs.pop(name) for name in callbacks if kwargs.get(name) is not None}
    queue = Queue(actor_options={"num_cpus": 0}) if local else None
    remote_kwargs = {**kwargs, **{name: _Relay(queue, name) for name in local}}
    ref = _remote_job.options(num_cpus=0, scheduling_strategy=_head_node_strategy()).remote(
        fn, args, {**remote_kwargs, "address": None}
    )

    def drain(block: bool) -> None:
        while queue is not None:
            try:
                name, call_args = queue.get(block=block, timeout=0.5) if block else queue.get_nowait()
            except Empty:
                return
            local[name](*call_args)

    try:
        while True:
            ready, _ = ray.wait([ref], timeout=0.5)
            drain(block=False)
            if ready:
                break
        return _unwrap(ref)
    except KeyboardInterrupt:
        ray.cancel(ref, force=True)
        raise
    except ConnectionError as e:
        raise CTSearchInputError(
            None, f"lost the Ray cluster at {cluster_address(address)}: {_reason(e)}"
        ) from None


def _quiet_closed_channels() -> None:
    """When the cluster goes away, grpc's connectivity thread dies with "Channel closed" and
    Python prints its traceback beside our one-line error; that thread's end is expected."""
    previous = threading.excepthook

    def hook(args) -> None:
        if isinstance(args.exc_value, ValueError) and "Channel closed" in str(args.exc_value):
            return
        previous(args)

    threading.excepthook = hook


@ray.remote(max_retries=0)
def _remote_job(fn, args, kwargs):
    return fn(*args, **kwargs)


class _Relay:
    """A progress callback that forwards its arguments to the Ray Client side."""

    def __init__(self, queue, name: str):
        self.queue, self.name = queue, name
        self.lock = threading.Lock()

    def __call__(self, *args) -> None:
        with self.lock:
            self.queue.put((self.name, args))

    def __reduce__(self):
        return (_Relay, (self.queue, self.name))


def _head_node_strategy():
    """Pin the job's driver task to the head node: it is where the driver's memory is provisioned
    (compaction holds the vectors it merges; deploy/ sizes the head for it)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    for node in ray.nodes():
        if node.get("Alive") and "node:__internal_head__" in node.get("Resources", {}):
            return NodeAffinitySchedulingStrategy(node_id=node["NodeID"], soft=True)
    return "DEFAULT"


def _unwrap(ref) -> Any:
    """The job's result; a user error raised inside the cluster comes back as itself."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        cause = e.cause if isinstance(getattr(e, "cause", None), BaseException) else None
        if isinstance(cause, CTSearchInputError):
            raise CTSearchInputError(cause.path, cause.problem) from None
        raise


def node_id() -> str:
    """The Ray node this code runs on (hex id), recorded by jobs to show where work ran; "" outside
    Ray (asking the runtime context there would connect to whatever cluster RAY_ADDRESS or
    /tmp/ray names, and wait for it when it is gone)."""
    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""


_SHARED: dict = {}


def shared_value(ref):
    """The value behind ``ref`` (a ``ray.put`` object ref passed in ``fn_kwargs``), fetched once
    per worker process: Ray Data does not resolve refs inside ``fn_kwargs``, and ``ray.get`` per
    batch would deserialise the same object again and again. A plain value is returned as is.
    """
    if not isinstance(ref, ray.ObjectRef):
        return ref
    key = ref.hex()
    if key not in _SHARED:
        _SHARED.clear()  # one job's value at a time: workers are reused across jobs
        _SHARED[key] = ray.get(ref)
    return _SHARED[key]
