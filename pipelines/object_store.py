"""Objects in S3-compatible storage (AWS S3, GCS's S3 API, Ceph RGW, MinIO), for packs
(``data.root=s3://bucket/prefix``) and checkpoints (``run.checkpoint_dir=s3://...``).

Credentials and endpoint come the standard AWS way, read by boto3 itself and never by us:
``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``), ``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY`` (/ ``AWS_SESSION_TOKEN``), ``AWS_PROFILE``, ``AWS_DEFAULT_REGION``,
an instance role. They never reach a config, a log line or an error message.

Transient failures are retried twice over: boto3's own ``standard`` retry mode (timeouts,
connection errors, 5xx, throttling such as ``SlowDown``; ``AWS_MAX_ATTEMPTS``, default 5 here,
with its exponential backoff), and a body cut off mid-object (which boto3 does not retry: the
answer had started) is requested again here. What still fails is an ``ObjectStoreError``, an
``OSError`` whose errno says what kind (EIO: transient, retried by ``read_guard.Retrying`` like
a parallel file system's hiccup; ENOENT: no such object; EACCES: credentials or permission)
and whose message is one line naming the URL and what failed.

boto3 is imported on first use: nothing that only reads local data needs it.
"""
from __future__ import annotations

import errno
import hashlib
import logging
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)

SCHEME = "s3"
_URL = re.compile(r"^s3://([^/]+)/?(.*)$", re.IGNORECASE)
MAX_POOL = 128              # connections per process: read-ahead keeps this many reads in flight
BODY_TRIES = 4              # a body cut off mid-object is requested again, this many tries in all
_CHUNK = 8 << 20


class ObjectStoreError(OSError):
    """An object store operation that failed for good, in one line naming the URL."""


class NoSuchBucket(ObjectStoreError):
    """ENOENT for the bucket itself (not one missing object: the location is wrong)."""


def no_such_object(error: BaseException) -> bool:
    """Whether ``error`` says that one object is missing (ENOENT), its bucket being there."""
    return (isinstance(error, ObjectStoreError) and error.errno == errno.ENOENT
            and not isinstance(error, NoSuchBucket))


ENOPKG = getattr(errno, "ENOPKG", errno.ENOSYS)


@dataclass(frozen=True)
class Url:
    bucket: str
    key: str                # no leading slash; "" for the bucket itself

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key}"

    def join(self, *parts: str) -> "Url":
        key = "/".join(p.strip("/") for p in (self.key, *parts) if p.strip("/"))
        return Url(self.bucket, key)

    @property
    def prefix(self) -> str:
        """The key as a folder: ``key/`` (or ``""`` for the whole bucket)."""
        return self.key.rstrip("/") + "/" if self.key.strip("/") else ""


def is_url(location) -> bool:
    return location is not None and _URL.match(str(location)) is not None


def parse(url) -> Url:
    match = _URL.match(str(url))
    if match is None:
        raise ValueError(f"{url}: not an s3://bucket/key URL")
    return Url(match.group(1), match.group(2))


# ---------------------------------------------------------------- the client
_clients: dict[int, object] = {}
_clients_lock = threading.Lock()


def _after_fork_in_child() -> None:
    """A forked child (a DataLoader worker) starts with a fresh lock and no client: the lock may
    have been held by a thread of the parent (the background checkpoint writer uploading, the
    shard cache's downloader) that does not exist here, and a connection pool must not be
    shared across a fork."""
    global _clients_lock
    _clients_lock = threading.Lock()
    _clients.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def client(url=None):
    """This process's S3 client (boto3 clients are thread-safe; a forked DataLoader worker makes
    its own: a connection pool must not be shared across a fork). Without boto3 (the ``s3``
    extra), an ``ObjectStoreError`` in one line naming ``url``."""
    pid = os.getpid()
    found = _clients.get(pid)          # lock-free: the common case, a client made already
    if found is not None:
        return found
    with _clients_lock:
        found = _clients.get(pid)
        if found is None:
            try:
                import boto3
                from botocore.config import Config
            except ImportError:
                raise ObjectStoreError(ENOPKG, f"{url or 's3:// URLs'} needs boto3: pip install "
                                               f"'wrn-large[s3]'") from None
            found = _clients[pid] = boto3.session.Session().client("s3", config=Config(
                max_pool_connections=MAX_POOL,
                retries={"mode": os.environ.get("AWS_RETRY_MODE", "standard"),
                         "max_attempts": int(os.environ.get("AWS_MAX_ATTEMPTS", "5"))},
                connect_timeout=10, read_timeout=30))
        return found


def endpoint() -> str:
    """Where the client sends its requests (for messages; never holds a credential)."""
    try:
        return client().meta.endpoint_url
    except Exception:  # noqa: BLE001 - only ever used in a message
        return "the default AWS endpoint"


def failure(url, action: str, error: Exception) -> ObjectStoreError:
    """``error`` (boto3's or botocore's) as one line: ``{action} s3://...: what failed``."""
    from botocore import exceptions as bx

    code, status = None, None
    if isinstance(error, bx.ClientError):
        code = error.response.get("Error", {}).get("Code")
        status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    where = f"{action} {url}"
    if isinstance(error, (bx.NoCredentialsError, bx.PartialCredentialsError)):
        return ObjectStoreError(errno.EACCES, f"{where}: no AWS credentials (set AWS_ACCESS_KEY_ID "
                                              f"and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE)")
    if code in ("NoSuchBucket",):
        return NoSuchBucket(errno.ENOENT, f"{where}: the bucket {parse(url).bucket} does not "
                                              f"exist at {endpoint()}")
    if code in ("NoSuchKey", "404", "NotFound"):
        return ObjectStoreError(errno.ENOENT, f"{where}: no such object")
    if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken",
                "InvalidToken", "TokenRefreshRequired"):
        return ObjectStoreError(errno.EACCES, f"{where}: the credentials were refused ({code})")
    if code in ("AccessDenied", "AllAccessDisabled", "403") or status == 403:
        return ObjectStoreError(errno.EACCES, f"{where}: access denied ({code or status})")
    if code == "PreconditionFailed" or status == 412:
        return ObjectStoreError(errno.EEXIST, f"{where}: the object exists already")
    if code == "NotImplemented" or status == 501:   # older MinIO/Ceph: no If-None-Match
        what = ("the store does not support conditional writes (If-None-Match: *), so one job "
                "per prefix cannot be enforced" if action == "conditional write" else
                f"the store does not implement this request ({code or status})")
        return ObjectStoreError(errno.EOPNOTSUPP, f"{where}: {what}")
    if isinstance(error, bx.EndpointConnectionError):
        return ObjectStoreError(errno.EIO, f"{where}: cannot reach {endpoint()}")
    detail = f"{code} (HTTP {status})" if code else f"{type(error).__name__}: {error}"
    return ObjectStoreError(errno.EIO, f"{where}: {detail}")


def _errors():
    try:
        from botocore import exceptions as bx
    except ImportError:     # no boto3: client() said so, nothing of botocore's to catch
        return ()
    return (bx.BotoCoreError, bx.ClientError)


def _body_errors():
    """What a body cut off mid-object raises while it is read."""
    try:
        import urllib3.exceptions as ux
        from botocore import exceptions as bx
    except ImportError:
        return ()
    return (bx.IncompleteReadError, bx.ResponseStreamingError, bx.ReadTimeoutError,
            bx.ConnectionClosedError, ux.ProtocolError, ux.ReadTimeoutError, ConnectionError)


# ---------------------------------------------------------------- reading
def read(url, offset: int | None = None, size: int | None = None) -> bytes:
    """The object's bytes (``size`` bytes from ``offset``, one range request, if given). A body
    cut off before its end is requested again (``BODY_TRIES``); a short answer is an error."""
    u = parse(url)
    if size == 0 and offset is not None:   # no range names zero bytes (the server would send all)
        return b""
    extra = {} if offset is None else {"Range": f"bytes={offset}-{offset + size - 1}"}
    last = None
    for _ in range(BODY_TRIES):
        try:
            answer = client(url).get_object(Bucket=u.bucket, Key=u.key, **extra)
        except _errors() as e:
            raise failure(url, "read", e) from None
        try:
            data = answer["Body"].read()
        except _body_errors() as e:
            last = e
            continue
        if size is not None and len(data) != size:
            last = EOFError(f"{len(data)} of {size} bytes")
            continue
        return data
    raise ObjectStoreError(errno.EIO, f"read {url}: the answer was cut off {BODY_TRIES} times "
                                      f"({type(last).__name__}: {last})")


def size_of(url) -> int | None:
    """The object's size in bytes, or None if there is no such object."""
    u = parse(url)
    try:
        return client(url).head_object(Bucket=u.bucket, Key=u.key)["ContentLength"]
    except _errors() as e:
        error = failure(url, "look up", e)
        if no_such_object(error):
            return None
        raise error from None


def recorded_sha256(url) -> str | None:
    """The SHA-256 that ``upload`` recorded in the object's metadata (checked then against the
    bytes read back), or None; an ``ObjectStoreError`` (ENOENT) if there is no such object."""
    u = parse(url)
    try:
        answer = client(url).head_object(Bucket=u.bucket, Key=u.key)
    except _errors() as e:
        raise failure(url, "look up", e) from None
    return answer.get("Metadata", {}).get("sha256")


def exists(url) -> bool:
    return size_of(url) is not None


def sha256_of(url) -> str:
    """The SHA-256 of the object's bytes as they read back (streamed: a multipart upload's ETag
    is no checksum of the bytes)."""
    u = parse(url)
    digest = hashlib.sha256()
    for _ in range(BODY_TRIES):
        try:
            body = client(url).get_object(Bucket=u.bucket, Key=u.key)["Body"]
        except _errors() as e:
            raise failure(url, "read", e) from None
        digest = hashlib.sha256()
        try:
            for chunk in body.iter_chunks(_CHUNK):
                digest.update(chunk)
            return digest.hexdigest()
        except _body_errors():
            continue
    raise ObjectStoreError(errno.EIO, f"read {url}: the answer was cut off {BODY_TRIES} times")


def download(url, path: str | os.PathLike) -> Path:
    """The object into the local file ``path`` (written to a temp name, then renamed)."""
    u, path = parse(url), Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.{threading.get_ident()}")
    try:
        client(url).download_file(u.bucket, u.key, str(tmp))
        os.replace(tmp, path)
    except _errors() as e:
        raise failure(url, "download", e) from None
    except ObjectStoreError:
        raise
    except OSError as e:     # the local file: no space, no permission
        raise ObjectStoreError(e.errno or errno.EIO, f"download {url} to {path}: "
                                                     f"{e.strerror or e}") from None
    except Exception as e:  # noqa: BLE001 - boto3's/s3transfer's RetriesExceededError and others
        raise transfer_failure(url, "download", e) from None
    finally:
        tmp.unlink(missing_ok=True)
    return path


def listing(url) -> Iterator[tuple[str, int]]:
    """(key relative to ``url`` as a folder, size) of every object under it, in key order."""
    u = parse(url)
    try:
        pages = client(url).get_paginator("list_objects_v2").paginate(Bucket=u.bucket,
                                                                     Prefix=u.prefix)
        for page in pages:
            for item in page.get("Contents", ()):
                yield item["Key"][len(u.prefix):], item["Size"]
    except _errors() as e:
        raise failure(url, "list", e) from None


# ---------------------------------------------------------------- writing
def write(url, data: bytes, if_absent: bool = False) -> None:
    """One object from bytes. ``if_absent``: a conditional put (``If-None-Match: *``) that fails
    with EEXIST where the object exists (two writers racing: exactly one wins)."""
    u = parse(url)
    extra = {"IfNoneMatch": "*"} if if_absent else {}
    try:
        client(url).put_object(Bucket=u.bucket, Key=u.key, Body=data, **extra)
    except _errors() as e:
        raise failure(url, "conditional write" if if_absent else "write", e) from None


def upload(path: str | os.PathLike, url, sha256: str | None = None) -> str:
    """The local file ``path`` as the object ``url`` (multipart where large), then read back and
    checked against the file's SHA-256 (computed before the upload where not given), which the
    object also carries as its metadata ``sha256`` (``recorded_sha256``). Returns that SHA-256;
    an ``ObjectStoreError`` if the object's bytes differ."""
    u = parse(url)
    expected = sha256 or file_sha256(path)
    try:
        client(url).upload_file(str(path), u.bucket, u.key,
                             ExtraArgs={"Metadata": {"sha256": expected}})
    except _errors() as e:
        raise failure(url, "upload", e) from None
    except ObjectStoreError:
        raise
    except Exception as e:  # noqa: BLE001 - s3transfer wraps boto's errors in its own
        raise transfer_failure(url, "upload", e) from None
    found = sha256_of(url)
    if found != expected:
        raise ObjectStoreError(errno.EIO, f"upload {url}: the object read back has SHA-256 "
                                          f"{found[:16]}..., the file {expected[:16]}...")
    return expected


def transfer_failure(url, action: str, error: Exception) -> ObjectStoreError:
    """An error of boto3's transfer manager (s3transfer wraps botocore's errors in its own:
    ``RetriesExceededError``, ``S3UploadFailedError``, ...) as one line, EIO unless the
    botocore error it wraps says otherwise."""
    cause = getattr(error, "last_exception", None) or error.__cause__ or error.__context__
    if isinstance(cause, _errors()):
        return failure(url, action, cause)
    detail = f"{type(error).__name__}: {error}".splitlines()[0] if str(error) else \
        type(error).__name__
    return ObjectStoreError(errno.EIO, f"{action} {url}: {detail}")


def delete(url) -> None:
    u = parse(url)
    try:
        client(url).delete_object(Bucket=u.bucket, Key=u.key)
    except _errors() as e:
        raise failure(url, "delete", e) from None


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
