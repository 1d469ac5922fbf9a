"""Ray cluster addresses as given on the command line: parsed without importing Ray.

The CLI checks ``--address`` while parsing options (a typo is a usage error before Ray, torch or
an output folder); ``ctsearch.jobs.runtime`` connects to what this accepts.

Example:
    >>> parse_address("ray://head.example:10001")
    ('ray', 'head.example', 10001)
"""

from __future__ import annotations

import re

from ctsearch.errors import CTSearchInputError

# ray:// addresses without a port mean the Ray Client server's default port.
DEFAULT_CLIENT_PORT = 10001
_ADDRESS = re.compile(
    r"^(?:(?P<scheme>ray)://)?(?P<host>\[[0-9a-fA-F:]+\]|[A-Za-z0-9_.\-]+)(?::(?P<port>\d{1,5}))?$"
)


def parse_address(address: str) -> tuple[str, str, int]:
    """``HOST:PORT`` or ``ray://HOST[:PORT]`` -> (kind "gcs" | "ray", host, port); bad -> one-line error."""
    m = _ADDRESS.match(address.strip())
    if not m or (m["scheme"] is None and m["port"] is None):
        raise CTSearchInputError(
            None, f"--address {address!r} is not a Ray address: give HOST:PORT (a cluster's GCS, e.g. "
                  "head:6379) or ray://HOST:PORT (Ray Client, e.g. ray://head:10001)",
        )  # fmt: skip
    port = int(m["port"]) if m["port"] else DEFAULT_CLIENT_PORT
    if not 0 < port < 65536:
        raise CTSearchInputError(None, f"--address {address!r}: port {port} is out of range")
    return ("ray" if m["scheme"] else "gcs"), m["host"], port
