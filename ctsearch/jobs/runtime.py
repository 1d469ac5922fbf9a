"""Starting Ray: embedded by default, a cluster when an address is given."""

from __future__ import annotations

import logging
import os

import ray
import ray.data


def start_ray(address: str | None = None, num_cpus: int | None = None, quiet: bool = True) -> None:
    """Connect to ``address`` (or $RAY_ADDRESS); with neither, start Ray in this process.

    Already-initialised Ray (tests, notebooks) is left as it is. Ray Data's own progress bars and
    INFO logs are switched off: the CLI draws one progress bar per job, and the Ray logs stay in
    the session's log folder (``--debug`` or ``quiet=False`` shows them).
    """
    if not ray.is_initialized():
        if quiet:
            # The driver's C++ core logs harmless ERROR lines (e.g. about actor constructor
            # arguments, ray#53727) to stderr; real failures still reach us as Python exceptions.
            os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
        address = address or os.environ.get("RAY_ADDRESS") or None
        if address:
            ray.init(address=address, log_to_driver=not quiet)
        else:
            # Local runs: no dashboard (nothing to connect to from a laptop job), and quiet logs.
            ray.init(
                num_cpus=num_cpus,
                include_dashboard=False,
                log_to_driver=not quiet,
                configure_logging=True,
                logging_level="ERROR" if quiet else "INFO",
            )
    logging.getLogger("ray.data").setLevel(logging.ERROR if quiet else logging.INFO)
    ray.data.DataContext.get_current().enable_progress_bars = not quiet


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
