"""Storage in an S3 bucket (AWS S3 or any S3-compatible server: MinIO, Ceph, R2, rclone ``serve s3``…).

boto3 is synchronous; every call runs on a small thread pool owned by the backend, so a unit read never
waits behind unrelated ``asyncio.to_thread`` work. Large objects move as several ranged GETs (reads) or a
multipart upload (writes) of ``part_size`` bytes with up to ``max_concurrency`` requests in flight.

Credentials come from the arguments, else ``profile_name``, else boto3's standard chain
(``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_SESSION_TOKEN``, ``AWS_PROFILE``, config files,
instance roles). The endpoint comes from ``endpoint_url``, else ``AWS_ENDPOINT_URL_S3`` /
``AWS_ENDPOINT_URL`` (boto3 reads those itself), else AWS.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, TypeVar

from ..exceptions import AuthenticationError, ConfigurationError, InvalidKeyError, KeyNotFoundError, StorageError
from .base import OnPiece, StorageBackend, normalize_key, whole_piece

log = logging.getLogger(__name__)

T = TypeVar("T")

MiB = 1 << 20
_MIN_UPLOAD_PART = 5 * MiB  # S3's minimum multipart part size (all parts but the last)
_MAX_PARTS = 10_000  # S3's maximum number of parts in one multipart upload

_AUTH_CODES = {
    "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken", "TokenRefreshRequired",
    "InvalidClientTokenId", "UnrecognizedClientException", "AuthorizationHeaderMalformed", "AccessDenied",
    "AllAccessDisabled", "InvalidSecurity", "403", "Forbidden",
}
_MISSING_KEY_CODES = {"NoSuchKey", "404", "NotFound"}
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")


def _check_args(bucket_name: Any, max_concurrency: int, part_size: int, key_id: str | None, secret: str | None) -> None:
    if not bucket_name or not isinstance(bucket_name, str) or "/" in bucket_name:
        raise ConfigurationError(f"invalid S3 bucket name {bucket_name!r}")
    if max_concurrency < 1:
        raise ConfigurationError(f"max_concurrency must be >= 1, got {max_concurrency}")
    if part_size < 64 * 1024:
        raise ConfigurationError(f"part_size must be at least 64 KiB, got {part_size}")
    if (key_id is None) != (secret is None):
        raise ConfigurationError("pass both aws_access_key_id and aws_secret_access_key, or neither")


def _make_client(location: str, endpoint_url: str | None, max_concurrency: int, connect_timeout: float,
                 read_timeout: float, max_attempts: int, **session_kw: Any) -> Any:
    """A boto3 S3 client; ``session_kw`` are ``boto3.session.Session``'s credential/profile/region arguments."""
    import boto3
    import botocore.exceptions
    from botocore.config import Config

    try:
        session = boto3.session.Session(**session_kw)
    except botocore.exceptions.ProfileNotFound as exc:
        raise ConfigurationError(
            f"AWS profile {session_kw.get('profile_name')!r} not found in ~/.aws/config or ~/.aws/credentials"
        ) from exc
    config = Config(
        s3={"addressing_style": "path"},
        # S3-compatible servers do not all implement the newer default CRC checksums (ranged GETs fail).
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        retries={"max_attempts": max_attempts, "mode": "standard"},
        max_pool_connections=max(10, 2 * max_concurrency),
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
    )
    try:
        # endpoint_url=None lets boto3 apply AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL / config-file endpoints.
        return session.client("s3", endpoint_url=endpoint_url, config=config,
                              region_name=session.region_name or "us-east-1")
    except (botocore.exceptions.BotoCoreError, ValueError) as exc:
        raise ConfigurationError(f"cannot configure the S3 client for {location}: {exc}") from exc


class S3Backend(StorageBackend):
    """Chunked models in ``s3://bucket_name/prefix/…``.

    Args:
        bucket_name: the bucket (it must exist; this backend never creates buckets).
        prefix: a folder inside the bucket every key is stored under.
        aws_access_key_id, aws_secret_access_key, aws_session_token: explicit credentials.
        profile_name: a profile from ``~/.aws/credentials`` / ``~/.aws/config``.
        region_name: the bucket's region (default: boto3's, else ``us-east-1``).
        endpoint_url: an S3-compatible endpoint (default: ``AWS_ENDPOINT_URL[_S3]`` or AWS).
        max_concurrency: requests in flight per backend (thread pool size).
        part_size: bytes per ranged GET and per multipart-upload part (uploads use at least 5 MiB).
        connect_timeout, read_timeout: seconds, per request.
        max_attempts: total attempts per request (boto3 "standard" retry mode: 5xx, throttling, resets).

    Attributes:
        stats: request counters (``get_requests``, ``get_bytes``, ``put_requests``, ``put_bytes``,
            ``head_requests``, ``list_requests``, ``delete_requests``, ``errors``) for metrics.

    Raises:
        ConfigurationError: bad arguments or an unknown profile.
    """

    def __init__(
        self,
        bucket_name: str,
        prefix: str = "",
        aws_access_key_id: str | None = None,
        aws_secret_access_key: str | None = None,
        aws_session_token: str | None = None,
        profile_name: str | None = None,
        region_name: str | None = None,
        endpoint_url: str | None = None,
        *,
        max_concurrency: int = 8,
        part_size: int = 8 * MiB,
        connect_timeout: float = 10.0,
        read_timeout: float = 60.0,
        max_attempts: int = 3,
    ) -> None:
        try:
            import botocore.exceptions
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise ConfigurationError("S3Backend needs boto3: pip install 'surfing-weights[s3]'") from exc
        _check_args(bucket_name, max_concurrency, part_size, aws_access_key_id, aws_secret_access_key)
        prefix = (prefix or "").strip("/")
        if prefix:
            prefix = normalize_key(prefix)
        self.bucket_name = bucket_name
        self.prefix = prefix
        self.max_concurrency = max_concurrency
        self.part_size = part_size
        self.location = f"s3://{bucket_name}/{prefix}".rstrip("/")
        self.stats: dict[str, int] = dict.fromkeys(
            ("get_requests", "get_bytes", "put_requests", "put_bytes", "head_requests", "list_requests",
             "delete_requests", "errors"), 0)
        self._stats_lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None
        self._executor_lock = threading.Lock()
        self._bucket_ok = False
        self._client = _make_client(
            self.location, endpoint_url, max_concurrency, connect_timeout, read_timeout, max_attempts,
            aws_access_key_id=aws_access_key_id, aws_secret_access_key=aws_secret_access_key,
            aws_session_token=aws_session_token, profile_name=profile_name, region_name=region_name,
        )
        self.endpoint_url: str = self._client.meta.endpoint_url
        self._ClientError = botocore.exceptions.ClientError
        self._NoCredentials = (botocore.exceptions.NoCredentialsError, botocore.exceptions.PartialCredentialsError)
        self._BotoError = botocore.exceptions.BotoCoreError

    # ------------------------------------------------------------------------------------------ helpers
    def _key(self, key: str) -> str:
        key = normalize_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _count(self, **deltas: int) -> None:
        with self._stats_lock:
            for name, d in deltas.items():
                self.stats[name] += d

    def _pool(self) -> ThreadPoolExecutor:
        with self._executor_lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(self.max_concurrency, thread_name_prefix="surfing-s3")
            return self._executor

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool(), fn, *args)

    def _error(self, exc: BaseException, op: str, key: str | None) -> Exception:
        """Translate a boto3 exception into the library's tree (``stats["errors"]`` counts all but missing keys)."""
        err = self._translate(exc, op, key)
        if not isinstance(err, KeyNotFoundError):
            self._count(errors=1)
        return err

    def _translate(self, exc: BaseException, op: str, key: str | None) -> Exception:
        where = f"{self.location}/{key}" if key is not None else self.location
        if isinstance(exc, self._NoCredentials):
            return AuthenticationError(
                f"no usable AWS credentials for {where}: pass aws_access_key_id/aws_secret_access_key "
                "(--s3-access-key/--s3-secret-key), a profile (--s3-profile), or set AWS_ACCESS_KEY_ID and "
                f"AWS_SECRET_ACCESS_KEY ({exc})"
            )
        if isinstance(exc, self._ClientError):
            err = exc.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            msg = err.get("Message") or code
            if code == "NoSuchBucket":
                return StorageError(
                    f"S3 bucket {self.bucket_name!r} does not exist at {self.endpoint_url}: create it or fix the bucket name"
                )
            if code in _AUTH_CODES or status == 403:
                return AuthenticationError(
                    f"S3 refused {op} on {where} ({code or status}: {msg}): the credentials are wrong, expired, or "
                    "not allowed to access this bucket; check the access key, secret key / session token or profile"
                )
            if code in _MISSING_KEY_CODES or status == 404:
                return KeyNotFoundError(f"{key!r} not found in {self.location}")
            return StorageError(f"S3 {op} on {where} failed ({code or status}: {msg})")
        if isinstance(exc, self._BotoError):
            return StorageError(f"S3 {op} on {where} failed: cannot talk to {self.endpoint_url}: {exc}")
        return StorageError(f"S3 {op} on {where} failed: {exc}")

    def _check_bucket(self) -> None:
        """HEAD answers 404 for a missing bucket and a missing key alike; tell them apart once."""
        if self._bucket_ok:
            return
        try:
            self._client.head_bucket(Bucket=self.bucket_name)
        except self._ClientError as exc:
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if status == 404 or exc.response.get("Error", {}).get("Code") in ("NoSuchBucket", "404"):
                exc.response.setdefault("Error", {})["Code"] = "NoSuchBucket"
            raise self._error(exc, "HeadBucket", None) from exc
        self._bucket_ok = True

    # --------------------------------------------------------------------------------- sync primitives
    def _get_into(self, full: str, key: str, start: int, view: memoryview) -> tuple[int, int | None]:
        """GET ``len(view)`` bytes from ``start`` into ``view``. Returns (bytes written, object size or None).

        Past the end of the object the result is (0, None).
        """
        if not len(view):
            return 0, None
        rng = f"bytes={start}-{start + len(view) - 1}"
        try:
            resp = self._client.get_object(Bucket=self.bucket_name, Key=full, Range=rng)
        except self._ClientError as exc:
            self._count(get_requests=1)
            if exc.response.get("Error", {}).get("Code") == "InvalidRange":
                return 0, None
            raise self._error(exc, "GetObject", key) from exc
        except (self._BotoError, *self._NoCredentials) as exc:
            raise self._error(exc, "GetObject", key) from exc
        total: int | None = None
        m = _CONTENT_RANGE.match(resp.get("ContentRange") or "")
        if m and m.group(3) != "*":
            total = int(m.group(3))
        body = resp["Body"]
        got = 0
        try:
            while got < len(view):
                n = body.readinto(view[got:])
                if not n:
                    break
                got += n
        except self._BotoError as exc:
            raise self._error(exc, "GetObject", key) from exc
        finally:
            body.close()
        if total is None and not m:
            # The server ignored Range and sent the whole object from 0 (allowed by HTTP).
            total = resp.get("ContentLength")
            if start:
                raise StorageError(f"{self.endpoint_url} ignored the Range header for {self.location}/{key}")
        self._count(get_requests=1, get_bytes=got)
        return got, total

    def _head(self, full: str, key: str) -> dict[str, Any]:
        self._count(head_requests=1)
        try:
            return self._client.head_object(Bucket=self.bucket_name, Key=full)
        except self._ClientError as exc:
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if status == 404:
                self._check_bucket()
            raise self._error(exc, "HeadObject", key) from exc
        except (self._BotoError, *self._NoCredentials) as exc:
            raise self._error(exc, "HeadObject", key) from exc

    def _call(self, op: str, key: str | None, fn: Callable[..., T], **kw: Any) -> T:
        try:
            return fn(**kw)
        except (self._ClientError, self._BotoError, *self._NoCredentials) as exc:
            raise self._error(exc, op, key) from exc

    def _put(self, full: str, key: str, data: bytes | bytearray | memoryview) -> None:
        self._count(put_requests=1, put_bytes=len(data))
        self._call("PutObject", key, self._client.put_object, Bucket=self.bucket_name, Key=full, Body=bytes(data))

    def _list_sync(self, full_prefix: str, strip: int) -> list[str]:
        out: list[str] = []
        token: str | None = None
        while True:
            kw: dict[str, Any] = {"Bucket": self.bucket_name, "Prefix": full_prefix}
            if token:
                kw["ContinuationToken"] = token
            self._count(list_requests=1)
            resp = self._call("ListObjectsV2", full_prefix or None, self._client.list_objects_v2, **kw)
            out.extend(obj["Key"][strip:] for obj in resp.get("Contents", ()))
            token = resp.get("NextContinuationToken")
            if not resp.get("IsTruncated") or not token:
                break
        return sorted(k for k in out if k and not k.endswith("/"))

    # ------------------------------------------------------------------------------------ async reads
    async def _read_parts(self, full: str, key: str, view: memoryview, start: int, first: int, total: int | None) -> int:
        """Fill ``view`` (already holding ``first`` bytes from ``start``) with concurrent ranged GETs."""
        want = len(view) if total is None else max(0, min(len(view), total - start))
        if first >= want:
            return min(first, want)
        ranges = [(off, min(self.part_size, want - off)) for off in range(first, want, self.part_size)]
        results = await asyncio.gather(
            *(self._run(self._get_into, full, key, start + off, view[off : off + n]) for off, n in ranges)
        )
        got = first
        for (off, n), (m, _) in zip(ranges, results):
            if m != n:  # the object changed size under us, or a short read
                raise StorageError(
                    f"short read of {self.location}/{key} at byte {start + off}: got {m} of {n} bytes "
                    "(was the object replaced while being read?)"
                )
            got += m
        return got

    async def read_into(self, key: str, buf: bytearray | memoryview, *, offset: int = 0,
                        on_piece: OnPiece | None = None) -> int:
        """Fill ``buf`` from byte ``offset`` of the object with up to ``max_concurrency`` ranged GETs; ``on_piece``
        sees the bytes once all are in (the parts land out of order). Returns the number of bytes written (fewer
        than ``len(buf)`` at the end of the object). Raises KeyNotFoundError, AuthenticationError, StorageError."""
        if offset < 0:
            raise StorageError(f"negative offset {offset}")
        full = self._key(key)
        view = memoryview(buf).cast("B")
        if not len(view):
            return 0
        first_len = min(self.part_size, len(view))
        got, total = await self._run(self._get_into, full, key, offset, view[:first_len])
        if got < first_len:
            if got == 0 and total is None:
                await self._run(self._head, full, key)  # InvalidRange: past the end, or an empty object
        else:
            got = await self._read_parts(full, key, view, offset, got, total)
        await whole_piece(on_piece, view, got)
        return got

    async def load(self, key: str) -> bytes:
        """The whole object; objects larger than ``part_size`` arrive as concurrent ranged GETs."""
        full = self._key(key)
        first = bytearray(self.part_size)
        got, total = await self._run(self._get_into, full, key, 0, memoryview(first))
        if got == 0 and total is None:
            await self._run(self._head, full, key)  # raises KeyNotFoundError; otherwise the object is empty
            return b""
        if total is None or total <= got:
            return bytes(first[:got])
        buf = bytearray(total)
        buf[:got] = memoryview(first)[:got]
        del first
        n = await self._read_parts(full, key, memoryview(buf), 0, got, total)
        if n != total:
            raise StorageError(f"short read of {self.location}/{key}: {n} of {total} bytes")
        return bytes(buf)

    async def read_range(self, key: str, start: int, length: int) -> bytes:
        if length <= 0:
            return b""
        buf = bytearray(length)
        n = await self.read_into(key, buf, offset=start)
        return bytes(buf) if n == length else bytes(buf[:n])

    async def size(self, key: str) -> int:
        head = await self._run(self._head, self._key(key), key)
        return int(head["ContentLength"])

    async def exists(self, key: str) -> bool:
        try:
            await self._run(self._head, self._key(key), key)
        except KeyNotFoundError:
            return False
        return True

    async def list(self, prefix: str = "") -> list[str]:
        """Keys (relative to this backend's prefix) that start with ``prefix``, sorted."""
        if prefix.startswith("/") or "\\" in prefix or ".." in prefix.split("/"):
            raise InvalidKeyError(f"invalid list prefix {prefix!r}")
        base = f"{self.prefix}/" if self.prefix else ""
        return await self._run(self._list_sync, base + prefix, len(base))

    # ----------------------------------------------------------------------------------------- writes
    async def save(self, key: str, data: bytes | bytearray | memoryview) -> None:
        """Write the object. Above ``part_size`` it is a multipart upload with concurrent parts.

        S3 makes a PUT or a completed multipart upload visible atomically, so readers never see a partial
        object. A failed multipart upload is aborted.
        """
        full = self._key(key)
        view = memoryview(data).cast("B")
        part = max(self.part_size, _MIN_UPLOAD_PART, -(-len(view) // _MAX_PARTS))
        if len(view) <= part:
            await self._run(self._put, full, key, view)
            return
        self._count(put_requests=1)
        created = await self._run(lambda: self._call(
            "CreateMultipartUpload", key, self._client.create_multipart_upload, Bucket=self.bucket_name, Key=full))
        upload_id = created["UploadId"]

        def upload(number: int, off: int) -> dict[str, Any]:
            chunk = bytes(view[off : off + part])
            self._count(put_requests=1, put_bytes=len(chunk))
            resp = self._call("UploadPart", key, self._client.upload_part, Bucket=self.bucket_name, Key=full,
                              UploadId=upload_id, PartNumber=number, Body=chunk)
            return {"PartNumber": number, "ETag": resp["ETag"]}

        try:
            parts = await asyncio.gather(
                *(self._run(upload, i + 1, off) for i, off in enumerate(range(0, len(view), part)))
            )
            self._count(put_requests=1)
            await self._run(lambda: self._call(
                "CompleteMultipartUpload", key, self._client.complete_multipart_upload, Bucket=self.bucket_name,
                Key=full, UploadId=upload_id, MultipartUpload={"Parts": list(parts)}))
        except BaseException:
            try:
                await self._run(lambda: self._client.abort_multipart_upload(
                    Bucket=self.bucket_name, Key=full, UploadId=upload_id))
            except Exception as exc:  # the original error matters more
                log.warning("could not abort multipart upload of %s/%s: %s", self.location, key, exc)
            raise

    async def delete(self, key: str) -> None:
        full = self._key(key)
        self._count(delete_requests=1)
        await self._run(lambda: self._call("DeleteObject", key, self._client.delete_object,
                                           Bucket=self.bucket_name, Key=full))

    async def check(self) -> None:
        """Verify that the bucket exists and the credentials work (one HEAD request).

        Raises:
            AuthenticationError: the credentials are missing or wrong.
            StorageError: the bucket does not exist or the endpoint cannot be reached.
        """
        self._bucket_ok = False
        await self._run(self._check_bucket)

    async def close(self) -> None:
        with self._executor_lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False)

    def __repr__(self) -> str:
        return f"S3Backend({self.location!r}, endpoint_url={self.endpoint_url!r})"
