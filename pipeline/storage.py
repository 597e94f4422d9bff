"""Object storage access for every stage: one place that turns a URI into an fsspec filesystem.

Any fsspec URI works (``s3://``, ``gs://``, ``file://``, plain local paths). For S3-compatible
servers (SeaweedFS, MinIO, moto) the endpoint comes from an explicit argument or, failing that,
from ``GLCIC_S3_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``. Credentials are
never passed through here: s3fs reads the usual AWS variables and profiles itself, so they never
end up in a config file, a manifest or a log line.
"""

from __future__ import annotations

import os
import posixpath
import random
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from typing import TypeVar

import fsspec

ENDPOINT_ENV_VARS = ("GLCIC_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
# S3 client tuning, read in every process that opens a filesystem (Ray workers inherit it).
S3_CONNECT_TIMEOUT_ENV = "GLCIC_S3_CONNECT_TIMEOUT_S"
S3_READ_TIMEOUT_ENV = "GLCIC_S3_READ_TIMEOUT_S"

# The one retry layer (``with_retries``): botocore and s3fs make one attempt each, so these are the
# attempts a request gets, and the worst case is theirs alone (RELIABILITY.md, "Retries").
DATA_RETRIES = {"attempts": 7, "base_delay": 0.5, "max_delay": 8.0}  # images, masks, listings, checkpoints
PREFLIGHT_RETRIES = {
    "attempts": 2,
    "base_delay": 0.5,
    "max_delay": 0.5,
}  # the CLI's checks: answer in seconds

T = TypeVar("T")


class UnsafeKeyError(ValueError):
    """A relative key that would escape its prefix (``..``, absolute paths, empty segments)."""


# scheme://user:password@ in a URL (an endpoint, an HTTP input): never printed, logged or stored.
_URL_CREDENTIALS = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/@\s:]*:[^/@\s]*@")


def redact(text: str) -> str:
    """``text`` with the ``user:password@`` of every URL in it replaced by ``***@``: what any
    print, log line, config file, manifest or job metadata shows of a URI or endpoint."""
    return _URL_CREDENTIALS.sub(r"\g<scheme>***@", text) if isinstance(text, str) and "@" in text else text


def endpoint_url_from_env() -> str | None:
    for name in ENDPOINT_ENV_VARS:
        value = os.environ.get(name)
        if value:
            return value
    return None


def protocol_of(uri: str) -> str:
    return uri.split("://", 1)[0] if "://" in uri else "file"


def _env_float(name: str, default: float) -> float:
    value = os.environ.get(name)
    if not value:
        return default
    try:
        parsed = float(value)
    except ValueError:
        raise ValueError(f"{name} must be a number of seconds, not {value!r}") from None
    if parsed <= 0:
        raise ValueError(f"{name} must be positive, not {value!r}")
    return parsed


def storage_options_for(uri: str, endpoint_url: str | None = None, *, fail_fast: bool = False) -> dict:
    """fsspec storage options for ``uri``; only S3 needs any (its endpoint and timeouts).

    Neither botocore nor s3fs retries (one attempt each): ``with_retries`` is the one layer, so a
    request's attempts are its caller's, not three layers multiplied. ``fail_fast``: shorter
    timeouts, for a client-side check that must answer in seconds.
    """
    if protocol_of(uri) in ("s3", "s3a"):
        endpoint = endpoint_url or endpoint_url_from_env()
        opts: dict = {}
        if endpoint:
            opts["client_kwargs"] = {"endpoint_url": endpoint}
        # A frozen or partitioned server accepts connections and then never answers: the timeouts
        # turn that into an error with_retries retries instead of a request that hangs.
        opts["config_kwargs"] = {
            "retries": {"total_max_attempts": 1, "mode": "standard"},
            "connect_timeout": 5 if fail_fast else _env_float(S3_CONNECT_TIMEOUT_ENV, 10.0),
            "read_timeout": 15 if fail_fast else _env_float(S3_READ_TIMEOUT_ENV, 30.0),
        }
        return opts
    return {}


def filesystem(
    uri: str, endpoint_url: str | None = None, *, fail_fast: bool = False, cached: bool = True
) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return ``(fs, path)`` for ``uri``; ``path`` has no protocol and no trailing slash.

    ``cached=False``: a private instance without a listings cache, for readers that must see
    objects written since their last listing.
    """
    options = storage_options_for(uri, endpoint_url, fail_fast=fail_fast)
    if not cached:
        options["skip_instance_cache"] = True
        if protocol_of(uri) in ("s3", "s3a"):
            options["use_listings_cache"] = False
    fs, path = fsspec.core.url_to_fs(uri, **options)
    if hasattr(fs, "retries") and protocol_of(uri) in ("s3", "s3a"):
        fs.retries = 1  # s3fs's own loop (a class attribute, no option): one attempt, with_retries decides
    return fs, path.rstrip("/") if path not in ("/", "") else path


def protocol_problem(uri: str) -> str:
    """Why ``uri``'s protocol cannot be used here: "" (it can), "unknown", or the import error of
    the package it needs (``gs://`` without gcsfs)."""
    try:
        fsspec.get_filesystem_class(protocol_of(uri))
    except ValueError:
        return "unknown"
    except ImportError as e:
        return " ".join(str(e).split())
    return ""


def holds_objects(uri: str, endpoint_url: str | None = None) -> bool:
    """Whether ``uri`` is an object (a list file) or a prefix with at least one object under it,
    asked failing fast (a client-side check). One small request on S3 (``MaxKeys=1``): an input
    prefix may hold millions of objects. A brace pattern: its first brace's folder."""
    if is_brace_pattern(uri):
        uri = keys_root(uri)
    fs, path = filesystem(uri, endpoint_url, fail_fast=True)

    def ask() -> bool:
        if hasattr(fs, "call_s3") and hasattr(fs, "split_path"):
            bucket, key, _ = fs.split_path(path)
            prefix = f"{key.rstrip('/')}/" if key else ""
            listed = fs.call_s3("list_objects_v2", Bucket=bucket, Prefix=prefix, MaxKeys=1)
            return bool(listed.get("KeyCount")) or fs.isfile(path)
        if fs.isfile(path):
            return True
        return fs.isdir(path) and next(iter(fs.find(path, withdirs=False)), None) is not None

    try:
        return with_retries(ask, **PREFLIGHT_RETRIES)
    except (FileNotFoundError, NotADirectoryError):
        return False


def full_uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """The URI of ``path`` on ``fs`` (``s3://bucket/key`` or a local path)."""
    proto = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
    if proto in ("file", "local"):
        return path
    return f"{proto}://{path}"


# Names of one protocol: s3fs answers to s3 and s3a, gcsfs to gs and gcs.
_SAME_PROTOCOL = {"s3a": "s3", "gcs": "gs", "local": "file"}


def location(uri: str) -> tuple[str, tuple[str, ...]]:
    """``(protocol, path segments)`` of ``uri``, normalised for comparing places: ``s3a://`` is
    ``s3://``, trailing and repeated slashes go, and a local path is absolute with its links
    resolved (``file://`` stripped), so two spellings of one folder compare equal."""
    protocol = _SAME_PROTOCOL.get(protocol_of(uri), protocol_of(uri))
    path = uri.split("://", 1)[1] if "://" in uri else uri
    if protocol == "file":
        path = os.path.realpath(os.path.expanduser(path))
    return protocol, tuple(part for part in path.split("/") if part)


LIST_FILE_SUFFIXES = (".txt", ".lst", ".list")  # an input that is a list of keys, not a prefix


def is_brace_pattern(uri: str) -> bool:
    """``shards/{00000..00099}.tar``: names expanded as the ``braceexpand`` package does."""
    start = uri.find("{")
    return start >= 0 and uri.find("}", start) > start


def keys_root(images: str) -> str:
    """The place an input's keys are relative to: the prefix itself, a list file's folder, or the
    folder of a brace pattern's first brace."""
    if is_brace_pattern(images):
        head = images[: images.find("{")]
        return head.rsplit("/", 1)[0] if "/" in head else "."
    if images.lower().endswith(LIST_FILE_SUFFIXES):
        stripped = images.rstrip("/")
        return stripped.rsplit("/", 1)[0] if "/" in stripped else "."
    return images


def overlaps(a: str, b: str) -> bool:
    """Whether ``a`` and ``b`` are the same place or one lies inside the other, segment by segment:
    ``data`` and ``data_completed`` do not overlap; ``s3://b/x/`` and ``s3a://b/x/y`` do."""
    (proto_a, parts_a), (proto_b, parts_b) = location(a), location(b)
    shorter = min(len(parts_a), len(parts_b))
    return proto_a == proto_b and parts_a[:shorter] == parts_b[:shorter]


def safe_relative_key(key: str) -> str:
    """Normalise a relative key and refuse any that would escape the prefix it is joined to.

    Spaces and unicode are kept as they are (object stores and local file systems both accept
    them); ``..`` segments, absolute keys, backslashes and NUL bytes are refused.
    """
    if not key or "\x00" in key or "\\" in key:
        raise UnsafeKeyError(f"unsafe object key {key!r}")
    if key.startswith("/"):
        raise UnsafeKeyError(f"object key {key!r} is absolute")
    parts = key.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise UnsafeKeyError(f"object key {key!r} has an empty, '.' or '..' segment")
    return key


def join_key(prefix: str, key: str) -> str:
    """``prefix/key`` after checking ``key`` cannot leave ``prefix``."""
    key = safe_relative_key(key)
    joined = posixpath.join(prefix.rstrip("/"), key) if prefix else key
    if prefix and not joined.startswith(prefix.rstrip("/") + "/"):
        raise UnsafeKeyError(f"object key {key!r} escapes prefix {prefix!r}")
    return joined


def relative_key(prefix: str, path: str) -> str:
    prefix = prefix.rstrip("/")
    if prefix and path.startswith(prefix + "/"):
        return path[len(prefix) + 1 :]
    if path == prefix:
        return posixpath.basename(path)
    raise UnsafeKeyError(f"{path!r} is not under {prefix!r}")


LIST_PAGE_KEYS = 1000  # S3's own page size: one request per page, whatever the store
KEY_ROW_BYTES = 256  # a listed row (key + URI), for sizing Ray Data blocks of keys
# Sorts after every key under a prefix ending in "/": where a listing resumes to skip a subtree.
_AFTER_SUBTREE = "\U0010ffff"


def _skipped_subtree(rel: str, root: str, exclude: tuple[str, ...]) -> str | None:
    """The subtree (a path relative to ``root``) that hides or excludes ``rel``, if any: a hidden
    folder (``.name/``, as our ``.glcic-tmp-*`` temporaries), or an excluded prefix."""
    parts = rel.split("/")
    for i, part in enumerate(parts[:-1]):
        if part.startswith("."):
            return "/".join(parts[: i + 1])
    for prefix in exclude:
        if prefix.startswith(root + "/"):
            sub = prefix[len(root) + 1 :]
            if rel.startswith(sub + "/"):
                return sub
    return None


def _visible(rel: str, root: str, exclude: tuple[str, ...]) -> bool:
    name = rel.rsplit("/", 1)[-1]
    return bool(name) and not name.startswith(".") and _skipped_subtree(rel, root, exclude) is None


def _s3_pages(fs, root: str, exclude: tuple[str, ...]) -> Iterator[list[str]]:
    """ListObjectsV2 page by page, straight from the client: s3fs's ``find``/``walk`` would keep
    every listed key in its directory cache. Keys come in UTF-8 order; a page that ends inside an
    excluded or hidden subtree resumes after that subtree instead of listing it."""
    bucket, _, key_prefix = root.partition("/")
    key_prefix = f"{key_prefix}/" if key_prefix else ""
    request: dict = {"Bucket": bucket, "Prefix": key_prefix, "MaxKeys": LIST_PAGE_KEYS}
    while True:
        reply = with_retries(lambda: fs.call_s3("list_objects_v2", **request))
        keys = [item["Key"] for item in reply.get("Contents", ())]
        page = []
        for key in keys:
            rel = key[len(key_prefix) :]
            if _visible(rel, root, exclude):
                page.append(f"{bucket}/{key}")
        if page:
            yield page
        if not reply.get("IsTruncated"):
            return
        last = keys[-1][len(key_prefix) :] if keys else ""
        subtree = _skipped_subtree(last, root, exclude) if last else None
        request.pop("ContinuationToken", None)
        request.pop("StartAfter", None)
        if subtree is not None:
            request["StartAfter"] = f"{key_prefix}{subtree}/{_AFTER_SUBTREE}"
        else:
            request["ContinuationToken"] = reply["NextContinuationToken"]


def _local_pages(root: str, exclude: tuple[str, ...]) -> Iterator[list[str]]:
    """``os.walk`` (names from ``scandir``, no ``stat`` per file), one sorted folder at a time."""
    excluded = set(exclude)
    page: list[str] = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(
            d for d in dirs if not d.startswith(".") and posixpath.join(folder, d) not in excluded
        )
        for name in sorted(files):
            if not name.startswith("."):
                page.append(posixpath.join(folder, name))
                if len(page) >= LIST_PAGE_KEYS:
                    yield page
                    page = []
    if page:
        yield page


def iter_object_pages(
    fs: fsspec.AbstractFileSystem, root: str, exclude: tuple[str, ...] = ()
) -> Iterator[list[str]]:
    """Pages of the full paths of every object under ``root``, holding one page at a time.

    ``exclude``: paths (on ``fs``) whose subtrees are not listed. Hidden files and folders (names
    starting with ``.``, e.g. our ``.glcic-tmp-*`` temporaries) are skipped. Order: keys sorted
    within each folder, so a key's siblings that extend it (``cat.jpg`` -> ``cat.jpg.png``) come
    after it with only keys that also extend it in between (what the listing's collision check
    relies on). S3 and local folders stream without any cache; other filesystems are walked
    with fsspec folder by folder, each folder's cache entry dropped once listed.
    """
    exclude = tuple(e.rstrip("/") for e in exclude)
    proto = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
    if proto in ("s3", "s3a") and hasattr(fs, "call_s3"):
        yield from _s3_pages(fs, root, exclude)
        return
    if proto in ("file", "local"):
        yield from _local_pages(root, exclude)
        return
    for folder, dirs, files in fs.walk(root):
        dirs[:] = sorted(
            d for d in dirs if not d.startswith(".") and posixpath.join(folder, d) not in exclude
        )
        paths = [posixpath.join(folder, name) for name in sorted(files) if not name.startswith(".")]
        fs.invalidate_cache(folder)
        for start in range(0, len(paths), LIST_PAGE_KEYS):
            yield paths[start : start + LIST_PAGE_KEYS]


def atomic_write_bytes(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Make ``path`` appear whole or not at all.

    A single S3/GCS PUT is already atomic: readers see the old object or the new one. On local
    (and other POSIX-like) file systems we write a hidden temporary beside the target and rename
    it over, which is atomic within one directory.
    """
    if _is_local(fs):
        _replace_locally(path, lambda tmp: _write_file(tmp, data))
        return
    fs.pipe_file(path, data)


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    proto = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
    return proto in ("file", "local")


def _write_file(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def _replace_locally(path: str, fill: Callable[[str], None]) -> None:
    """``fill`` a hidden temporary beside ``path``, then rename it over: atomic in one directory."""
    parent = posixpath.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = posixpath.join(parent, f".glcic-tmp-{uuid.uuid4().hex}")
    fill(tmp)
    os.replace(tmp, path)


# Parts of a multipart upload (S3 then uses one above twice this): a failed part resends only
# this much, and a shard of hundreds of MB never sits in memory whole.
UPLOAD_CHUNK_BYTES = 16 * 1024 * 1024


def atomic_put_file(fs: fsspec.AbstractFileSystem, local_path: str, path: str) -> None:
    """Upload the local file ``local_path`` to ``path``, appearing whole or not at all.

    Local targets: a hidden temporary beside the target, renamed over it. Object stores: straight
    to the final key, since a PUT or a multipart upload is visible only once complete (S3 has no
    rename, and copy + delete would double the bytes and leak temporaries); s3fs aborts a
    multipart upload that fails, and a lifecycle rule (README) cleans up one a crash leaves.
    """
    if _is_local(fs):
        _replace_locally(path, lambda tmp: shutil.copyfile(local_path, tmp))
        return
    proto = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
    options = {"chunksize": UPLOAD_CHUNK_BYTES} if proto in ("s3", "s3a") else {}
    fs.put_file(local_path, path, **options)


def read_bytes(fs: fsspec.AbstractFileSystem, path: str) -> bytes:
    return fs.cat_file(path)


def isfile(fs: fsspec.AbstractFileSystem, path: str) -> bool:
    """``fs.isfile`` through the retry layer (a HEAD on S3)."""
    return with_retries(lambda: fs.isfile(path))


def exists(fs: fsspec.AbstractFileSystem, path: str) -> bool:
    return with_retries(lambda: fs.exists(path))


def ls(fs: fsspec.AbstractFileSystem, path: str) -> list[str]:
    """The names directly under ``path`` (FileNotFoundError when there is no such folder)."""
    return with_retries(lambda: fs.ls(path, detail=False))


def transient_errors() -> tuple[type[BaseException], ...]:
    """What ``with_retries`` retries by default: OS-level errors, and botocore's connection and
    HTTP errors, which s3fs raises as they are (a refused connection while a server restarts is a
    ``botocore.exceptions.EndpointConnectionError``, no ``OSError``)."""
    import http.client

    # A body cut short (IncompleteRead) is no OSError either; s3fs's own loop, now one attempt,
    # used to retry it.
    errors: tuple[type[BaseException], ...] = (
        OSError,
        TimeoutError,
        ConnectionError,
        http.client.HTTPException,
    )
    try:
        from botocore.exceptions import ConnectionError as BotocoreConnectionError
        from botocore.exceptions import HTTPClientError
        from botocore.parsers import ResponseParserError  # throttling replies can be invalid XML
    except ImportError:  # no S3 support installed: nothing of botocore's can be raised
        return errors
    errors = (*errors, BotocoreConnectionError, HTTPClientError, ResponseParserError)
    try:
        from aiohttp import ClientPayloadError, ServerDisconnectedError
    except ImportError:  # s3fs without aiohttp: it cannot raise these
        return errors
    return (*errors, ClientPayloadError, ServerDisconnectedError)


def with_retries(
    fn: Callable[[], T],
    *,
    attempts: int = DATA_RETRIES["attempts"],
    base_delay: float = DATA_RETRIES["base_delay"],
    max_delay: float = DATA_RETRIES["max_delay"],
    retry_on: tuple[type[BaseException], ...] | None = None,
) -> T:
    """Call ``fn`` and retry transient storage errors with jittered exponential backoff: the one
    retry layer of object storage (the clients under it make one attempt each). The k-th retry
    waits ``min(max_delay, base_delay * 2**k)`` times a uniform factor in [0.5, 1].

    ``retry_on`` defaults to ``transient_errors()``. ``FileNotFoundError`` and
    ``PermissionError`` are not transient: they are raised at once.
    """
    retry_on = retry_on or transient_errors()
    for attempt in range(attempts):
        try:
            return fn()
        except (FileNotFoundError, PermissionError, IsADirectoryError):
            raise
        except retry_on:
            if attempt == attempts - 1:
                raise
            delay = min(max_delay, base_delay * (2**attempt))
            time.sleep(delay * (0.5 + random.random() / 2))
    raise AssertionError("unreachable")


def pyarrow_filesystem(uri: str, endpoint_url: str | None = None):
    """``(pyarrow filesystem, path)`` for libraries that take pyarrow filesystems (Ray Train's
    ``RunConfig(storage_filesystem=...)``, Ray Data readers).

    AWS S3 itself gets a native ``pyarrow.fs.S3FileSystem``. An S3-compatible endpoint (SeaweedFS,
    MinIO, ...) gets this module's s3fs filesystem wrapped for pyarrow instead: pyarrow's AWS SDK
    sends CRC checksums with every multipart part by default, which such servers reject as
    INVALID_ACCESS_KEY_ID unless every process sets AWS_REQUEST_CHECKSUM_CALCULATION=when_required.
    Either way credentials are left to the client's own AWS resolution (environment, profiles,
    instance roles), so they are never captured in the object that Ray pickles.
    """
    from pyarrow import fs as pafs

    proto = protocol_of(uri)
    if proto in ("s3", "s3a") and not (endpoint_url or endpoint_url_from_env()):
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        s3 = pafs.S3FileSystem(region=region) if region else pafs.S3FileSystem()
        return s3, uri.split("://", 1)[1].rstrip("/")
    if proto == "file":
        path = uri.split("://", 1)[1] if "://" in uri else uri
        return pafs.LocalFileSystem(), os.path.abspath(path)
    # Uncached: Ray Train decides whether a checkpoint path is a directory from listings, and a
    # cached listing from before the upload says it is not.
    fs, path = filesystem(uri, endpoint_url, cached=False)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path
