"""Where ctsearch's files live: a local folder or an object-store URI, behind one seam.

Every path a command takes may be a local path or a URI that ``pyarrow.fs`` resolves
(``s3://bucket/key``, ``gs://``, ``hdfs://``, ``file://``). A location is resolved here, once, to
a filesystem and a path in it; nothing else in ctsearch parses URIs or talks to a store.

- **Local paths** behave exactly as before: atomic temp + rename, ``flock`` locks, memory maps.
- **Object stores** have no rename and no locks. A whole-object PUT is atomic, so single files are
  written in one PUT; folders a job reads whole (a run, a slice dataset, an index) are mirrored into
  a local cache (:func:`mirror`); folders a job writes are written into a staging folder and
  uploaded file by file when the job succeeds (:func:`output_folder`). Concurrency is handled
  with conditional writes (:func:`put_if`: S3's ``If-None-Match`` / ``If-Match``) and a writer's
  :class:`Lease` with a stated expiry. Only ``s3://`` offers conditional writes here; other
  schemes can be read and written, but not used for an index that several writers share.

Credentials and endpoints come from the standard environment of the store's SDK (for S3:
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_PROFILE``,
``AWS_DEFAULT_REGION``, ``AWS_ENDPOINT_URL``, instance roles); ctsearch never writes them
anywhere. docs/cluster.md, "Object storage".

Example:
    >>> import tempfile
    >>> d = tempfile.mkdtemp()
    >>> write_bytes(join(d, "a", "b.txt"), b"hi")
    >>> read_bytes(join(d, "a", "b.txt")), is_remote(d), is_remote("s3://bucket/run")
    (b'hi', False, True)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

import pyarrow.fs as pafs

from ctsearch.errors import CTSearchInputError

CACHE_ENV = "CTSEARCH_CACHE"  # where remote folders are mirrored; default ~/.cache/ctsearch
CAS_SCHEMES = ("s3",)  # schemes with conditional writes (put_if, Lease)


def is_remote(location: str | os.PathLike) -> bool:
    """True for a URI of a store other than the local filesystem (``file://`` is local)."""
    s = os.fspath(location)
    return "://" in s and not s.startswith("file://")


def scheme(location: str | os.PathLike) -> str:
    s = os.fspath(location)
    return s.split("://", 1)[0].lower() if "://" in s else "file"


def _local(location: str | os.PathLike) -> str:
    s = os.fspath(location)
    return s[len("file://") :] if s.startswith("file://") else s


def _filesystem(root_uri: str) -> pafs.FileSystem:
    return _filesystem_for(root_uri, *_credentials_key())


def _credentials_key() -> tuple:
    """What identifies the credentials in force (a digest, not the secret), so that a changed
    environment gets a new client."""
    env = os.environ
    secret = hashlib.sha256(env.get("AWS_SECRET_ACCESS_KEY", "").encode()).hexdigest()[:16]
    return env.get("AWS_ACCESS_KEY_ID"), secret, _endpoint(), env.get("AWS_PROFILE")


def _endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


@lru_cache(maxsize=16)
def _filesystem_for(root_uri: str, key_id, secret_digest, endpoint, profile) -> pafs.FileSystem:
    env = os.environ
    try:
        if root_uri.startswith("s3://") and key_id and env.get("AWS_SECRET_ACCESS_KEY"):
            # Keys from the environment, given explicitly: the filesystem object then carries them
            # when Ray ships it to a worker whose environment has none (it is never logged).
            region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
            return pafs.S3FileSystem(
                access_key=key_id,
                secret_key=env["AWS_SECRET_ACCESS_KEY"],
                session_token=env.get("AWS_SESSION_TOKEN"),
                endpoint_override=endpoint,
                region=region or pafs.resolve_s3_region(root_uri[len("s3://") :]),
            )
        fs, _ = pafs.FileSystem.from_uri(root_uri)  # the SDK's own chain: profile, instance role
    except (ValueError, OSError) as e:  # pyarrow.ArrowInvalid is a ValueError
        raise CTSearchInputError(root_uri, f"cannot open this storage location ({_why(e)})") from None
    return fs


def resolve(location: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path in it) for a local path or URI; one filesystem object per bucket.

    Example:
        >>> fs, path = resolve("/tmp/x")
        >>> type(fs).__name__, path
        ('LocalFileSystem', '/tmp/x')
    """
    if not is_remote(location):
        return pafs.LocalFileSystem(), os.path.abspath(_local(location))
    s = os.fspath(location)
    sch, rest = s.split("://", 1)
    bucket = rest.split("/", 1)[0]
    if not bucket:
        raise CTSearchInputError(s, "a storage URI needs a bucket: scheme://bucket/path")
    root = f"{sch.lower()}://{bucket}"
    fs = _ADOPTED.get(root) or _filesystem(root)
    return fs, rest.rstrip("/")


_ADOPTED: dict[str, pafs.FileSystem] = {}


def adopt(fss: dict[str, pafs.FileSystem] | None) -> None:
    """Use these filesystems (from :func:`filesystems`, resolved on the driver) for their stores in
    this process from now on: what a Ray worker calls first, so that everything it reads through
    this module uses the driver's endpoint and keys, whatever the worker's own environment."""
    _ADOPTED.update(fss or {})


def absolute(location: str | os.PathLike) -> str:
    """A local path made absolute (for another process or node); a URI as it is."""
    return os.fspath(location) if is_remote(location) else os.path.abspath(_local(location))


def join(location: str | os.PathLike, *parts: str) -> str:
    """``location`` / parts, for local paths and URIs alike."""
    s = os.fspath(location)
    if not is_remote(s):
        return os.path.join(_local(s), *parts)
    return "/".join([s.rstrip("/"), *(p.strip("/") for p in parts)])


def name(location: str | os.PathLike) -> str:
    return os.fspath(location).rstrip("/").rsplit("/", 1)[-1]


def _why(e: BaseException) -> str:
    text = " ".join(str(e).split())
    low = text.lower()
    denied = (
        "access_denied",
        "accessdenied",
        "forbidden",
        "403",
        "signature",
        "invalidaccesskeyid",
        "invalid_access_key",
    )
    if any(m in low for m in denied):
        return "access denied: check the credentials in AWS_ACCESS_KEY_ID / AWS_PROFILE and the bucket policy"
    if "nosuchbucket" in low or "bucket" in low and "not found" in low or "does not exist" in low:
        return "no such bucket"
    if "connect" in low or "curl" in low or "timed out" in low or "resolve" in low:
        return f"the storage endpoint cannot be reached ({text[:160]})"
    return text[:200] or type(e).__name__


def storage_error(location: str | os.PathLike, e: BaseException, doing: str) -> CTSearchInputError:
    """A store's exception as the one-line error naming ``location`` (never a credential)."""
    return CTSearchInputError(location, f"cannot {doing} ({_why(e)})")


def info(location: str | os.PathLike) -> pafs.FileInfo:
    fs, path = resolve(location)
    try:
        return fs.get_file_info(path)
    except OSError as e:
        raise storage_error(location, e, "look this up") from None


def exists(location: str | os.PathLike) -> bool:
    return info(location).type != pafs.FileType.NotFound


def is_file(location: str | os.PathLike) -> bool:
    return info(location).type == pafs.FileType.File


def is_dir(location: str | os.PathLike) -> bool:
    """A folder; on an object store, any key prefix with objects under it."""
    return info(location).type == pafs.FileType.Directory


def read_bytes(location: str | os.PathLike) -> bytes:
    """A whole file. FileNotFoundError if there is none; a missing bucket is a one-line error."""
    if not is_remote(location):
        return Path(_local(location)).read_bytes()
    fs, path = resolve(location)
    try:
        with fs.open_input_stream(path, compression=None) as f:
            return f.read()
    except OSError as e:
        low = str(e).lower()
        if not isinstance(e, FileNotFoundError) and "not found" not in low and "nosuchkey" not in low:
            raise storage_error(location, e, "read this object") from None
    bucket = path.split("/", 1)[0]
    if fs.get_file_info(bucket).type == pafs.FileType.NotFound:
        raise CTSearchInputError(location, f"no such bucket: {bucket}")
    raise FileNotFoundError(2, "No such file or directory", os.fspath(location))


def write_bytes(location: str | os.PathLike, data: bytes) -> None:
    """Write a whole file so that no reader ever sees part of it: temp + rename on a local disk,
    one PUT (atomic per object) on a store."""
    if not is_remote(location):
        from ctsearch.store import atomic_write_bytes

        atomic_write_bytes(data, _local(location))
        return
    fs, path = resolve(location)
    try:
        with fs.open_output_stream(path, compression=None) as f:
            f.write(data)
    except OSError as e:
        raise storage_error(location, e, "write this object") from None


def read_json(location: str | os.PathLike, what: str) -> dict:
    """A JSON object; a missing or unreadable one, or another JSON value, is a one-line error naming ``what``."""
    try:
        obj = json.loads(read_bytes(location))
    except (OSError, ValueError) as e:
        raise CTSearchInputError(location, f"is not a readable {what} ({_why(e)})") from None
    if not isinstance(obj, dict):
        raise CTSearchInputError(location, f"is not a {what} (expected a JSON object)")
    return obj


def list_files(location: str | os.PathLike) -> dict[str, int]:
    """{path relative to ``location``: size} of every file under a folder (recursive); {} if absent."""
    return {n: size for n, (size, _) in list_file_stats(location).items()}


def delete(location: str | os.PathLike) -> None:
    """Delete one file; a missing one is not an error."""
    if not is_remote(location):
        Path(_local(location)).unlink(missing_ok=True)
        return
    fs, path = resolve(location)
    try:
        fs.delete_file(path)
    except OSError as e:
        low = str(e).lower()
        if not any(m in low for m in ("not found", "nosuchkey", "does not exist", "no such file")):
            raise storage_error(location, e, "delete this object") from None


def upload(local: str | os.PathLike, location: str | os.PathLike, names: list[str] | None = None) -> None:
    """Copy files from a local folder to ``location`` (all of them, or ``names`` relative to it)."""
    src = Path(local)
    names = names if names is not None else [str(p.relative_to(src)) for p in src.rglob("*") if p.is_file()]
    for n in sorted(names):
        write_bytes(join(location, n), (src / n).read_bytes())


def download(location: str | os.PathLike, local: str | os.PathLike, names: list[str] | None = None) -> Path:
    """Copy the files under ``location`` (or ``names`` relative to it) into the local folder ``local``."""
    dst = Path(local)
    for n in sorted(names if names is not None else list_files(location)):
        target = dst / n
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.part")
        tmp.write_bytes(read_bytes(join(location, n)))
        os.replace(tmp, target)
    return dst


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "ctsearch")


def cache_dir(location: str | os.PathLike) -> Path:
    """The local folder that mirrors a remote ``location`` (one per URI, named after it)."""
    s = os.fspath(location).rstrip("/")
    key = hashlib.sha256(s.encode()).hexdigest()[:16]
    return cache_root() / f"{name(s)[:40]}-{key}"


# ----------------------------------------------------------------------------- conditional writes


def require_conditional_writes(location: str | os.PathLike) -> None:
    if scheme(location) not in CAS_SCHEMES:
        raise CTSearchInputError(
            location,
            f"{scheme(location)}:// has no conditional writes here; a shared index needs s3:// or a local folder",
        )


def _s3_client():
    return _s3_client_for(*_credentials_key())


@lru_cache(maxsize=4)
def _s3_client_for(key_id, secret_digest, endpoint, profile):
    import boto3  # only for the conditional requests pyarrow does not expose

    # A session of its own: boto3's default session keeps the credentials it first found.
    return boto3.session.Session().client("s3", endpoint_url=endpoint)


def _bucket_key(location: str | os.PathLike) -> tuple[str, str]:
    rest = os.fspath(location).split("://", 1)[1]
    bucket, _, key = rest.partition("/")
    return bucket, key


def get_versioned(location: str | os.PathLike) -> tuple[bytes | None, str | None]:
    """(bytes, version tag) of an object, or (None, None) when there is none. The tag is what
    :func:`put_if` compares against (S3: the ETag)."""
    require_conditional_writes(location)
    import botocore.exceptions

    bucket, key = _bucket_key(location)
    try:
        r = _s3_client().get_object(Bucket=bucket, Key=key)
        return r["Body"].read(), r["ETag"]
    except botocore.exceptions.ClientError as e:
        if e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
            return None, None
        raise storage_error(location, e, "read this object") from None
    except botocore.exceptions.BotoCoreError as e:
        raise storage_error(location, e, "read this object") from None


def put_if(location: str | os.PathLike, data: bytes, tag: str | None) -> str | None:
    """Write ``data`` only if the object is still at version ``tag`` (None: only if there is no
    object). Returns the new tag, or None when another writer got there first."""
    require_conditional_writes(location)
    import botocore.exceptions

    bucket, key = _bucket_key(location)
    cond = {"IfNoneMatch": "*"} if tag is None else {"IfMatch": tag}
    try:
        return _s3_client().put_object(Bucket=bucket, Key=key, Body=data, **cond)["ETag"]
    except botocore.exceptions.ClientError as e:
        code = e.response.get("Error", {}).get("Code")
        if code in ("PreconditionFailed", "ConditionalRequestConflict", "412", "409"):
            return None
        raise storage_error(location, e, "write this object") from None
    except botocore.exceptions.BotoCoreError as e:
        raise storage_error(location, e, "write this object") from None


class Lease:
    """One writer at a time for a remote folder: an object ``ROOT/.lease`` naming its holder and
    an expiry, taken and renewed with conditional writes. Replaces ``flock`` where the store has none.

    The holder renews it every ``ttl / 3`` seconds from a background thread; a lease whose holder
    died is free once expired, or at once when the holder was a process on this host that no
    longer exists. ``lost`` turns True if a renewal finds the lease taken over (the holder was
    stalled past the expiry): its next commit is then refused by the commit's own conditional write.
    """

    FILE = ".lease"

    def __init__(self, root: str, job: str, ttl: float = 60.0):
        self.location, self.job, self.ttl = join(root, self.FILE), job, float(ttl)
        self.holder = f"pid {os.getpid()} on {socket.gethostname()}"
        self.token = uuid.uuid4().hex
        self.tag: str | None = None
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _body(self) -> bytes:
        return json.dumps(
            {
                "holder": self.holder,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "token": self.token,
                "expires": time.time() + self.ttl,
            }
        ).encode()

    def acquire(self) -> Lease:
        tag = put_if(self.location, self._body(), None)
        if tag is None:
            data, old = get_versioned(self.location)
            current = _parse_lease(data)
            if data is not None and not _free(current):
                until = time.strftime("%H:%M:%S", time.localtime(current.get("expires", 0)))
                raise CTSearchInputError(
                    self.location.rsplit("/", 1)[0],
                    f"another {self.job} is writing to this folder ({current.get('holder', 'unknown')}, "
                    f"lease until {until}); wait for it to finish or choose another output folder",
                )
            tag = put_if(self.location, self._body(), old)  # take over: only one of several can
            if tag is None:
                raise CTSearchInputError(
                    self.location.rsplit("/", 1)[0], f"another {self.job} took this folder over just now"
                )
        self.tag = tag
        self._thread = threading.Thread(target=self._renew, name="ctsearch-lease", daemon=True)
        self._thread.start()
        return self

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                tag = put_if(self.location, self._body(), self.tag)
            except CTSearchInputError:
                continue  # the store is unreachable for a moment: try again before the expiry
            if tag is None:
                self.lost = True
                return
            self.tag = tag

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self.tag is not None and not self.lost:
            data, tag = get_versioned(self.location)
            if tag == self.tag and _parse_lease(data).get("token") == self.token:
                delete(self.location)
        self.tag = None


def _parse_lease(data: bytes | None) -> dict:
    try:
        d = json.loads(data or b"{}")
    except ValueError:
        return {}
    return d if isinstance(d, dict) else {}


def _free(lease: dict) -> bool:
    """An expired lease, an unreadable one, or one held by a process of this host that is gone."""
    try:
        if float(lease["expires"]) < time.time():
            return True
        if lease.get("host") == socket.gethostname():
            os.kill(int(lease["pid"]), 0)
            return False
    except ProcessLookupError:
        return True
    except PermissionError:  # the process exists, under another user
        return False
    except (KeyError, TypeError, ValueError):
        return True
    return False


# ----------------------------------------------------------------------------- objects read by tasks
#
# A Ray task that reads an archive's volume is handed the URI and the filesystem object resolved on
# the driver (``filesystems``: {store root: pyarrow filesystem}, which pickles with its endpoint,
# region and the keys it was given, see _filesystem_for), fetches the object's bytes into a
# node-local temp folder (:func:`local_copy`) and decodes them there.


def store_root(location: str | os.PathLike) -> str:
    """``scheme://bucket`` of a URI (the key of a ``filesystems`` dict); "" for a local path."""
    if not is_remote(location):
        return ""
    sch, rest = os.fspath(location).split("://", 1)
    return f"{sch.lower()}://{rest.split('/', 1)[0]}"


def filesystems(locations) -> dict[str, pafs.FileSystem]:
    """{store root: filesystem} for the remote ones among ``locations``, resolved here (on the
    driver) to be handed to tasks, which then need neither the driver's environment nor a resolve."""
    out: dict[str, pafs.FileSystem] = {}
    for loc in locations:
        root = store_root(loc)
        if root and root not in out:
            out[root] = resolve(loc)[0]
    return out


def resolve_in(
    location: str | os.PathLike, fss: dict[str, pafs.FileSystem] | None = None
) -> tuple[pafs.FileSystem, str]:
    """:func:`resolve`, taking the filesystem from ``fss`` (see :func:`filesystems`) when it holds
    the location's store."""
    root = store_root(location)
    if root and fss and root in fss:
        return fss[root], os.fspath(location).split("://", 1)[1].rstrip("/")
    return resolve(location)


def _not_found(e: OSError) -> bool:
    low = str(e).lower()
    return isinstance(e, FileNotFoundError) or any(
        m in low for m in ("not found", "nosuchkey", "does not exist", "no such file")
    )


def file_infos(
    location: str | os.PathLike, fss: dict[str, pafs.FileSystem] | None = None
) -> dict[str, pafs.FileInfo]:
    """{path relative to ``location``: FileInfo} of every file under a folder (recursive, one
    listing); {"": info} when ``location`` is a file; {} when there is nothing."""
    fs, root = resolve_in(location, fss)
    try:
        top = fs.get_file_info(root)
        if top.type == pafs.FileType.File:
            return {"": top}
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    except OSError as e:
        raise storage_error(location, e, "list this folder") from None
    n = len(root.rstrip("/")) + 1
    return {i.path[n:]: i for i in infos if i.type == pafs.FileType.File}


def fingerprint(
    location: str | os.PathLike, files=None, fss: dict[str, pafs.FileSystem] | None = None
) -> tuple[int, int]:
    """(total bytes, newest mtime_ns) of a file, of ``files`` or of every file under a folder:
    ``store.file_fingerprint`` on a local disk (unchanged), the store's sizes and modification
    times (S3: LastModified) for a URI, from one listing. What "unchanged since indexed" compares.

    Raises:
        FileNotFoundError: nothing there (or one of ``files`` is missing), as on a local disk.
    """
    if not is_remote(location):
        from ctsearch.store import file_fingerprint

        return file_fingerprint(_local(location), files)
    infos = file_infos(location, fss)
    if files is not None and len(files):
        base = os.fspath(location).rstrip("/") + "/"
        wanted = [os.fspath(f)[len(base) :] if os.fspath(f).startswith(base) else None for f in files]
        if any(w is None or w not in infos for w in wanted):
            raise FileNotFoundError(2, "No such file or directory", os.fspath(location))
        chosen = [infos[w] for w in wanted]
    else:
        chosen = list(infos.values())
    if not chosen:
        raise FileNotFoundError(2, "No such file or directory", os.fspath(location))
    size = sum(int(i.size or 0) for i in chosen)
    mtime = max(int(i.mtime_ns or 0) for i in chosen)
    return size, mtime


def read_range(
    location: str | os.PathLike, offset: int, length: int, fss: dict[str, pafs.FileSystem] | None = None
) -> bytes:
    """``length`` bytes of a file or object from ``offset`` (fewer at its end): one ranged GET on a store."""
    if not is_remote(location):
        with open(_local(location), "rb") as f:
            f.seek(offset)
            return f.read(length)
    fs, path = resolve_in(location, fss)
    try:
        with fs.open_input_file(path) as f:
            return f.read_at(length, offset)
    except OSError as e:
        if _not_found(e):
            raise FileNotFoundError(2, "No such file or directory", os.fspath(location)) from None
        raise storage_error(location, e, "read this object") from None


class LocalCopy:
    """Objects of a store copied into a node-local temp folder, at ``ROOT/<bucket>/<key>`` so that
    their folders keep their layout (a DICOM series, a NIfTI file beside its sidecar).

    :meth:`path` gives an object's local path, :meth:`uris` turns the local paths in a text (an
    error message) back into the URIs. Made by :func:`local_copy`, removed when its block ends.
    """

    def __init__(self, root: str, scheme_: str):
        self.root, self.scheme = root, scheme_

    def path(self, location: str | os.PathLike) -> str:
        return os.path.join(self.root, os.fspath(location).split("://", 1)[1].lstrip("/"))

    def uris(self, text: str | None) -> str | None:
        if text is None:
            return None
        return text.replace(self.root + os.sep, f"{self.scheme}://").replace(self.root, f"{self.scheme}://")


def fetch(
    locations,
    dest: LocalCopy,
    fss: dict[str, pafs.FileSystem] | None = None,
    threads: int = 8,
    missing_ok: bool = False,
) -> list[str]:
    """Copy whole objects into ``dest`` (``threads`` GETs at a time); returns their local paths.
    A missing object is skipped with ``missing_ok``, else a FileNotFoundError naming its URI."""
    from concurrent.futures import ThreadPoolExecutor

    def one(loc: str) -> str | None:
        target = dest.path(loc)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        fs, path = resolve_in(loc, fss)
        try:
            with fs.open_input_stream(path, compression=None) as src, open(target, "wb") as out:
                while chunk := src.read(1 << 22):
                    out.write(chunk)
        except OSError as e:
            with contextlib.suppress(OSError):
                os.unlink(target)
            if _not_found(e):
                if missing_ok:
                    return None
                raise FileNotFoundError(2, "No such file or directory", os.fspath(loc)) from None
            raise storage_error(loc, e, "read this object") from None
        return target

    locations = [os.fspath(x) for x in locations]
    if len(locations) <= 1 or threads <= 1:
        got = [one(x) for x in locations]
    else:
        with ThreadPoolExecutor(min(threads, len(locations))) as pool:
            got = list(pool.map(one, locations))
    return [g for g in got if g is not None]


@contextlib.contextmanager
def local_copy(prefix: str = "ctsearch-fetch-", scheme_: str = "s3") -> Iterator[LocalCopy]:
    """A fresh node-local temp folder for fetched objects (:class:`LocalCopy`), removed afterwards."""
    import shutil

    root = tempfile.mkdtemp(prefix=prefix)
    try:
        yield LocalCopy(root, scheme_)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def content_hash(
    location: str | os.PathLike, files=None, fss: dict[str, pafs.FileSystem] | None = None
) -> str:
    """``store.content_hash`` for a local path (unchanged) or a URI: the same sha256 over the same
    bytes and relative names, so a volume copied to a bucket keeps its hash (dedup across stores).
    Tasks that read the volume anyway hash their local copy instead of fetching twice."""
    from ctsearch.store import content_hash as local_hash

    if not is_remote(location):
        return local_hash(_local(location), files)
    loc = os.fspath(location).rstrip("/")
    with local_copy(scheme_=scheme(loc)) as copy:
        if files is not None and len(files):
            fetch(list(files), copy, fss)
            return local_hash(copy.path(loc), [copy.path(f) for f in files])
        infos = file_infos(loc, fss)
        if not infos:
            raise FileNotFoundError(2, "No such file or directory", loc)
        fetch([join(loc, n) if n else loc for n in infos], copy, fss)
        return local_hash(copy.path(loc))


# ----------------------------------------------------------------------------- what the commands use
# (added for the commands' URIs: synth, prepare's output, train, evaluate, explain, report)


def arrow_source(location: str | os.PathLike) -> tuple[str, pafs.FileSystem | None]:
    """(path, filesystem) to give a pyarrow or Ray Data reader, e.g.
    ``ray.data.read_parquet(path, filesystem=fs)``: a local path as given with None (the reader's
    own default, as before), a URI as its path in the store with the store's filesystem.

    Example:
        >>> arrow_source("/data/train.parquet")
        ('/data/train.parquet', None)
    """
    if not is_remote(location):
        return _local(location), None
    fs, path = resolve(location)
    return path, fs


def require_bucket(location: str | os.PathLike) -> None:
    """For a URI: a one-line error naming it when its bucket does not exist (or the store cannot
    be reached); checked before a job's work, so a typo in a bucket name costs nothing. Local
    paths: nothing."""
    if not is_remote(location):
        return
    fs, path = resolve(location)
    bucket = path.split("/", 1)[0]
    try:
        kind = fs.get_file_info(bucket).type
    except OSError as e:
        raise storage_error(location, e, "look this up") from None
    if kind == pafs.FileType.NotFound:
        raise CTSearchInputError(location, f"no such bucket ({bucket})")


def write_json(location: str | os.PathLike, obj) -> None:
    """``obj`` as indented JSON (values JSON cannot hold written as str), whole or not at all:
    ``store.atomic_write_json`` on a local disk, one PUT on a store."""
    if not is_remote(location):
        from ctsearch.store import atomic_write_json

        atomic_write_json(obj, _local(location))
        return
    write_bytes(location, json.dumps(obj, indent=2, default=str).encode())


def list_file_stats(location: str | os.PathLike) -> dict[str, tuple[int, int]]:
    """{path relative to ``location``: (size, mtime_ns)} of every file under a folder; {} if absent."""
    fs, root = resolve(location)
    try:
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    except OSError as e:
        raise storage_error(location, e, "list this folder") from None
    n = len(root.rstrip("/")) + 1
    return {
        i.path[n:]: (int(i.size or 0), int(i.mtime_ns or 0)) for i in infos if i.type == pafs.FileType.File
    }


def _local_stats(folder: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for p in folder.rglob("*"):
        if p.is_file() and not p.name.endswith((".part", ".tmp")):
            st = p.stat()
            out[p.relative_to(folder).as_posix()] = (st.st_size, st.st_mtime_ns)
    return out


def cached_copy(
    location: str | os.PathLike,
    names: list[str] | None = None,
    exclude: tuple[str, ...] = (),
    into: str | os.PathLike | None = None,
) -> Path:
    """A local copy of a remote folder whose files are rewritten in place (a run's model.json and
    encoder, a dataset's parquet files): like :func:`mirror`, but a cached file is fetched again
    when its size *or* its modification time in the store changed (the copy keeps the store's
    mtime). A local ``location`` is returned as it is.

    ``names``: only these files (relative paths; copies of those gone from the store are removed).
    ``exclude``: leave out files and folders of these names, at any depth (e.g. ``("checkpoints",)``).
    ``into``: the local folder (default :func:`cache_dir`).
    """
    if not is_remote(location):
        return Path(_local(location))
    remote = {n: s for n, s in list_file_stats(location).items() if not set(n.split("/")) & set(exclude)}
    dst = Path(into) if into is not None else cache_dir(location)
    dst.mkdir(parents=True, exist_ok=True)
    if names is not None:
        for n in names:
            if n not in remote:
                (dst / n).unlink(missing_ok=True)
        remote = {n: remote[n] for n in names if n in remote}
    else:
        for n in set(_local_stats(dst)) - set(remote):
            (dst / n).unlink()
    have = _local_stats(dst)
    stale = sorted(n for n, s in remote.items() if have.get(n) != s)
    download(location, dst, stale)
    for n in stale:
        os.utime(dst / n, ns=(remote[n][1], remote[n][1]))
    return dst


def local_file(location: str | os.PathLike) -> Path:
    """A local path for one file: the file itself when local, else a fresh cached copy
    (:func:`cached_copy`); the path does not exist when there is no such object."""
    if not is_remote(location):
        return Path(_local(location))
    s = os.fspath(location).rstrip("/")
    parent, _, base = s.rpartition("/")
    return cached_copy(parent, [base]) / base


@contextlib.contextmanager
def staged_output(location: str | os.PathLike) -> Iterator[Path]:
    """A local folder to write a job's output into. Local ``location``: the folder itself, written
    in place. A URI: a staging folder whose files are uploaded, file by file, when the block ends
    without an exception (a failed job uploads nothing); the staging folder is removed either way."""
    if not is_remote(location):
        yield Path(_local(location))
        return
    import shutil

    stage = Path(tempfile.mkdtemp(prefix="ctsearch-stage-"))
    try:
        yield stage
        upload(stage, location)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


@contextlib.contextmanager
def writer_lock(location: str | os.PathLike, job: str, ttl: float = 60.0) -> Iterator[object]:
    """One writer at a time for a folder: ``store.lock_dir`` (flock) on a local disk, a
    :class:`Lease` on a store with conditional writes. ``job`` names the command for the message
    a second writer gets."""
    if not is_remote(location):
        from ctsearch.store import lock_dir

        with lock_dir(_local(location), job) as f:
            yield f
        return
    if scheme(location) not in CAS_SCHEMES:
        raise CTSearchInputError(
            location,
            f"{scheme(location)}:// has no conditional writes here, so {job} cannot hold this folder "
            "for one writer; use s3:// or a local folder",
        )
    lease = Lease(os.fspath(location).rstrip("/"), job, ttl).acquire()
    try:
        yield lease
    finally:
        lease.release()


class WorkFolder:
    """A local folder standing for ``location`` while a job on this machine reads and rewrites it
    (a resumable job's output: an explain folder, a reproduce folder).

    Local: the folder itself; :meth:`sync` does nothing. Remote: a fresh copy (:func:`cached_copy`, the
    lease object left out); :meth:`sync` uploads the files added or changed since the last sync
    and deletes from the store those removed here. A job syncs after each commit of its own, so a
    rerun resumes from the store; temp files (``*.tmp``, ``*.part``) are never uploaded.
    """

    def __init__(self, location: str | os.PathLike):
        self.location = os.fspath(location).rstrip("/")
        self.remote = is_remote(self.location)
        if not self.remote:
            self.path = Path(_local(self.location))
            return
        self.path = cached_copy(self.location, exclude=(Lease.FILE,))
        self._synced = _local_stats(self.path)

    def sync(self) -> None:
        if not self.remote:
            return
        now = _local_stats(self.path)
        for n in sorted(n for n, s in now.items() if self._synced.get(n) != s):
            write_bytes(join(self.location, n), (self.path / n).read_bytes())
        for n in sorted(set(self._synced) - set(now)):
            delete(join(self.location, n))
        self._synced = now


@contextlib.contextmanager
def work_folder(location: str | os.PathLike, job: str) -> Iterator[WorkFolder]:
    """:class:`WorkFolder` under :func:`writer_lock`; synced when the block ends, also on failure
    (what the job committed is kept for its rerun)."""
    with writer_lock(location, job):
        folder = WorkFolder(location)
        try:
            yield folder
        except BaseException:
            with contextlib.suppress(Exception):
                folder.sync()
            raise
        folder.sync()


def model_folder(location: str | os.PathLike) -> Path:
    """``store.require_model_dir`` for a local path or a run URI: a URI gives a fresh local copy of
    its model.json and encoder.safetensors (:func:`cached_copy`), checked the same way, a missing one
    being the same one-line error naming the URI. ``store`` stays free of URIs (it sits below
    this module)."""
    from ctsearch.config import ENCODER_FILE, MODEL_JSON
    from ctsearch.store import require_model_dir

    if not is_remote(location):
        return require_model_dir(location)
    loc = os.fspath(location).rstrip("/")
    if name(loc) == MODEL_JSON:
        loc = loc.rsplit("/", 1)[0]
    require_bucket(loc)
    local = cached_copy(loc, [MODEL_JSON, ENCODER_FILE])
    try:
        return require_model_dir(local)
    except CTSearchInputError as e:
        raise CTSearchInputError(loc, e.problem) from None


def dataset_split(dataset: str | os.PathLike, split: str) -> Path | str:
    """``store.split_path`` for a local folder or a dataset URI: the split's file (its URI for a
    URI), checked to be a slice dataset from its schema alone, with the same one-line errors."""
    import pyarrow.parquet as pq

    from ctsearch.store import SLICES_SCHEMA, read_parquet, split_path

    if not is_remote(dataset):
        return split_path(dataset, split)
    root = os.fspath(dataset).rstrip("/")
    path = join(root, f"{split}.parquet")
    require_bucket(root)
    if not is_dir(root):
        raise CTSearchInputError(
            root, "no such dataset folder (run `ctsearch prepare --protocol decathlon` first)"
        )
    if not is_file(path):
        raise CTSearchInputError(path, f"no {split} split in this dataset")
    where, fs = arrow_source(path)
    names = read_parquet(path, lambda _: pq.read_schema(where, filesystem=fs)).names
    missing = set(SLICES_SCHEMA.names) - set(names)
    if missing:
        raise CTSearchInputError(path, f"not a slice dataset: missing columns {sorted(missing)}")
    return path
