"""``ctsearch serve`` on Ray Serve: a front deployment (HTTP, model) and optional shard-group deployments.

Without ``shards_per_replica`` the front replicas hold every shard themselves. With it, the
index's shards are cut into consecutive groups, each group is a deployment of its own (replicas
of different groups may land on different nodes), and the front asks all groups and merges
their top-k exactly (``ctsearch.serve.shards``). Both scale with ``replicas`` or, with
``max_replicas``, with Serve's autoscaling on ongoing requests.

Example:
    >>> opts = ServeOptions(index_dir="idx", port=8123)
    >>> opts.url
    'http://127.0.0.1:8123/'
    >>> start(opts)     # doctest: +SKIP
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass, field, replace

from ray import serve

from ctsearch import storage
from ctsearch.errors import CTSearchInputError
from ctsearch.serve.shards import ShardGroup, group_shards

APP_NAME = "ctsearch"


@dataclass
class ServeOptions:
    """Everything ``ctsearch serve`` takes, validated by :meth:`check`."""

    index_dir: str
    host: str = "127.0.0.1"
    port: int = 8000
    replicas: int = 1
    max_replicas: int | None = None  # > replicas: autoscale between the two
    shards_per_replica: int = 0  # 0: every front replica holds all shards
    cpus_per_replica: float = 1.0
    token_sha256: str | None = None
    id_salt: bytes | None = None
    max_upload_mb: int = 512
    cached_volumes: int = 8
    # {store root: filesystem} resolved on the driver (build): replicas read an index or source
    # volumes in a store with them, whatever endpoint and keys their node's environment has.
    filesystems: dict | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def check(self) -> None:
        """Refuse unsafe or impossible settings with a one-line error, before Ray starts."""
        if not is_loopback(self.host) and not self.token_sha256:
            raise CTSearchInputError(
                None,
                f"--host {self.host} is not a loopback address: the service holds patient images, "
                "so it needs --token-file (clients then send Authorization: Bearer TOKEN)",
            )
        if not 1 <= self.port <= 65535:
            raise CTSearchInputError(None, f"--port must be 1..65535, got {self.port}")
        if self.replicas < 1:
            raise CTSearchInputError(None, f"--replicas must be >= 1, got {self.replicas}")
        if self.max_replicas is not None and self.max_replicas < self.replicas:
            raise CTSearchInputError(
                None, f"--max-replicas ({self.max_replicas}) must be >= --replicas ({self.replicas})"
            )
        if self.shards_per_replica < 0:
            raise CTSearchInputError(
                None, f"--shards-per-replica must be >= 0, got {self.shards_per_replica}"
            )
        if not 0 < self.cpus_per_replica <= 64:
            raise CTSearchInputError(
                None, f"--cpus-per-replica must be in (0, 64], got {self.cpus_per_replica}"
            )
        if not 1 <= self.max_upload_mb <= 16384:
            raise CTSearchInputError(None, f"--max-upload-mb must be 1..16384, got {self.max_upload_mb}")

    def scaling(self) -> dict:
        """Deployment options for the replica count: fixed, or autoscaled between replicas and max_replicas."""
        base = {"ray_actor_options": {"num_cpus": self.cpus_per_replica}, "max_ongoing_requests": 8}
        if self.max_replicas is None or self.max_replicas == self.replicas:
            return {**base, "num_replicas": self.replicas}
        return {
            **base,
            "autoscaling_config": {
                "min_replicas": self.replicas,
                "max_replicas": self.max_replicas,
                "target_ongoing_requests": 2,
            },
        }


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses (127.0.0.0/8, ::1).

    >>> is_loopback("127.0.0.1"), is_loopback("localhost"), is_loopback("0.0.0.0"), is_loopback("::1")
    (True, True, False, True)
    """
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_port_free(host: str, port: int) -> None:
    """A one-line error when something already listens on host:port (Serve would fail obscurely)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise CTSearchInputError(
                None, f"cannot listen on {host}:{port} ({e.strerror}); choose another --port"
            ) from None


def _quiet_torch(cpus: float) -> None:
    import torch

    torch.set_num_threads(max(1, int(cpus)))


@serve.deployment
class ShardGroupDeployment:
    """One group of shards, loaded once per replica; the front calls its methods by handle."""

    def __init__(self, index_dir: str, names: list[str], cpus: float = 1.0, filesystems: dict | None = None):
        _quiet_torch(cpus)
        storage.adopt(filesystems)
        self.group = ShardGroup(index_dir, names)

    def lookup(self, volume_id, slice_index):
        return self.group.lookup(volume_id, slice_index)

    def search(self, vectors, k, patient=None, exclude_patient=None):
        return self.group.search(vectors, k, patient, exclude_patient)

    def patient_volumes(self, patient_id):
        return self.group.patient_volumes(patient_id)

    def catalogue(self):
        return self.group.catalogue()

    def slice_z(self, volume_id):
        return self.group.slice_z(volume_id)


class RemoteGroup:
    """A shard group deployment, called like a LocalGroup."""

    def __init__(self, handle):
        self.handle = handle

    async def call(self, method: str, *args):
        return await getattr(self.handle, method).remote(*args)


@serve.deployment
@serve.ingress()
class Front:
    """The ingress: HTTP API + page, the model, and either all shards or handles to the groups."""

    def __init__(self, options: ServeOptions, group_handles: list | None = None):
        from ctsearch.serve.service import LocalGroup, SearchService

        _quiet_torch(options.cpus_per_replica)
        storage.adopt(options.filesystems)
        logging.getLogger("ray.serve.ctsearch").setLevel(logging.INFO)
        groups = (
            [RemoteGroup(h) for h in group_handles]
            if group_handles
            else [LocalGroup(ShardGroup(options.index_dir))]
        )
        self.options = options
        self.service = SearchService(
            options.index_dir,
            groups,
            id_salt=options.id_salt,
            max_upload_bytes=options.max_upload_mb << 20,
            cached_volumes=options.cached_volumes,
        )

    def __serve_build_asgi_app__(self):
        from ctsearch.serve.api import build_app

        return build_app(self.service, self.options.token_sha256)


def build(options: ServeOptions):
    """The Serve application for ``options``: Front, bound to its shard-group deployments if any."""
    from ctsearch.index import Index

    index = Index.open(options.index_dir)  # a wrong folder is a one-line error before any replica starts
    names = [s.name for s in index.shards]
    options = replace(options, filesystems=storage.filesystems([options.index_dir, *index.source_stores()]))
    scaling = options.scaling()
    if options.shards_per_replica < 1:
        return Front.options(name="front", **scaling).bind(options)
    handles = [
        ShardGroupDeployment.options(name=f"shards-{g}", **scaling).bind(
            options.index_dir, group, options.cpus_per_replica, options.filesystems
        )
        for g, group in enumerate(group_shards(names, options.shards_per_replica))
    ]
    return Front.options(name="front", **scaling).bind(options, handles)


def start(options: ServeOptions) -> str:
    """Deploy on the connected Ray cluster and return the URL once every replica is up.

    Serve's HTTP proxy runs on the head node only and listens on ``options.host:port``; access
    logs are off (query strings hold ids), the service logs method, path, status and time.
    """
    options.check()
    app = build(options)
    serve.start(
        proxy_location="HeadOnly",
        http_options={"host": options.host, "port": options.port},
        logging_config={"enable_access_log": False},
    )
    serve.run(app, name=APP_NAME, route_prefix="/", logging_config={"enable_access_log": False})
    return options.url


def stop(shutdown_serve: bool = True) -> None:
    """Remove the application; with ``shutdown_serve`` also Serve's controller and proxy (frees the port)."""
    from ray.serve.exceptions import RayServeException

    try:
        serve.delete(APP_NAME)
    except RayServeException:  # Serve never started (start failed early): nothing to remove
        pass
    finally:
        if shutdown_serve:
            serve.shutdown()


def serve_running() -> bool:
    """Whether Serve already runs on the connected cluster (then ``ctsearch serve`` leaves it running at exit)."""
    try:
        st = serve.status()
        return bool(st.applications) or bool(st.proxies)
    except Exception:  # noqa: BLE001 - no controller: Serve is not running
        return False
