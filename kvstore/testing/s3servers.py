"""S3 servers on 127.0.0.1 by name, for tests and benchmarks: ``moto`` (a mock) or ``rgw`` (Ceph's RADOS Gateway).

    with start_s3_server("rgw") as server:
        store = await kvstore.open("s3://bucket/kv", storage_options=server.storage_options())

Both accept the same credentials (``testing``/``testing``, region ``us-east-1``),
so code that takes them from the AWS environment variables works with either.
moto needs the ``test`` extra (``moto[s3]``, flask); RGW needs Ceph's Debian
packages (see ``kvstore.testing.rgw``).
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kvstore.testing.rgw import RadosGateway

__all__ = ["SERVER_NAMES", "S3Server", "rgw_server", "start_s3_server"]

SERVER_NAMES = ("moto", "rgw")


@dataclass(frozen=True, slots=True)
class S3Server:
    """How to reach a running S3 server: its endpoints and the S3 user's credentials."""

    name: str
    endpoint: str
    key: str = "testing"
    secret: str = "testing"
    region: str = "us-east-1"
    https_endpoint: str | None = None
    """HTTPS with a self-signed certificate (RGW only); ``ca_file`` verifies it."""
    ca_file: str | None = None

    def storage_options(self, endpoint: str | None = None) -> dict[str, Any]:
        """kvstore/s3fs ``storage_options`` for this server (``endpoint``: e.g. a proxy in front of it)."""
        options: dict[str, Any] = {
            "endpoint_url": endpoint or self.endpoint,
            "key": self.key,
            "secret": self.secret,
            "client_kwargs": {"region_name": self.region},
        }
        if endpoint is not None and endpoint == self.https_endpoint:
            options["client_kwargs"]["verify"] = self.ca_file
        return options

    def client(self) -> Any:
        """A plain boto3 S3 client (for set-up and inspection), over HTTP."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.key,
            aws_secret_access_key=self.secret,
            region_name=self.region,
            config=Config(request_checksum_calculation="when_required"),
        )


@contextlib.contextmanager
def start_s3_server(name: str) -> Iterator[S3Server]:
    """Start the server called ``name`` (``moto`` or ``rgw``) on free ports; it stops when the block ends."""
    if name == "moto":
        with _moto() as server:
            yield server
    elif name == "rgw":
        from kvstore.testing.rgw import RadosGateway

        with RadosGateway() as rgw:
            yield rgw_server(rgw)
    else:
        raise ValueError(f"unknown S3 server {name!r}: one of {', '.join(SERVER_NAMES)}")


def rgw_server(rgw: RadosGateway) -> S3Server:
    """How to reach a started ``RadosGateway`` as its first S3 user."""
    return S3Server(
        "rgw", rgw.endpoint, rgw.access_key, rgw.secret_key, https_endpoint=rgw.https_endpoint, ca_file=rgw.ca_file
    )


_MOTO_CHILD = """
import logging, sys
from moto.server import ThreadedMotoServer
logging.getLogger("werkzeug").setLevel(logging.WARNING)
server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
print("%s:%d" % server.get_host_and_port(), flush=True)
sys.stdin.read()  # until the parent closes our stdin (or dies)
server.stop()
"""


@contextlib.contextmanager
def _moto() -> Iterator[S3Server]:
    """moto's server in a child process of its own, as any S3 server is.

    In a thread of the caller's process it would share one GIL with the client:
    every request's server work would stall the client's event loop, which makes
    request-heavy code look slower than it is against a real server.
    """
    child = subprocess.Popen(
        [sys.executable, "-c", _MOTO_CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert child.stdin is not None
    assert child.stdout is not None
    try:
        address = child.stdout.readline().strip()
        if not address:
            raise RuntimeError(f"moto's server did not start (exit status {child.wait(timeout=30)})")
        yield S3Server("moto", f"http://{address}")
    finally:
        child.stdin.close()
        try:
            child.wait(timeout=10)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
