"""Fixtures of the S3 client tests: a fault proxy in front of the server under test, RGW's HTTPS endpoint."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from kvstore.testing.faultproxy import FaultProxy
from kvstore.testing.s3servers import S3Server


@pytest.fixture
def proxy(s3_server: S3Server) -> Iterator[FaultProxy]:
    """A fault proxy in front of the S3 server under test (no faults until some are injected)."""
    with FaultProxy(int(s3_server.endpoint.rsplit(":", 1)[1])) as p:
        yield p


@pytest.fixture
def rgw_https(rgw_server: S3Server) -> S3Server:
    """The session's RGW, which also serves HTTPS with a self-signed certificate (its CA file is known)."""
    assert rgw_server.https_endpoint
    assert rgw_server.ca_file
    return rgw_server
