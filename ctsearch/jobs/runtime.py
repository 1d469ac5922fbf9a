"""Starting Ray: embedded by default, a cluster when an address is given."""

from __future__ import annotations

import os

import ray


def start_ray(address: str | None = None, num_cpus: int | None = None, quiet: bool = True) -> None:
    """Connect to ``address`` (or $RAY_ADDRESS); with neither, start Ray in this process.

    Already-initialised Ray (tests, notebooks) is left as it is.
    """
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        ray.init(address=address, log_to_driver=not quiet)
        return
    # Local runs: no dashboard (nothing to connect to from a laptop job), and quiet logs.
    ray.init(
        num_cpus=num_cpus,
        include_dashboard=False,
        log_to_driver=not quiet,
        configure_logging=True,
        logging_level="ERROR" if quiet else "INFO",
    )
