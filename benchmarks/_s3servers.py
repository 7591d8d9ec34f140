"""S3 servers for the benchmarks, by name: ``--server moto`` (a mock) or ``--server rgw`` (Ceph's RADOS Gateway).

    parser = argparse.ArgumentParser(); add_server_option(parser)
    with s3_server(args.server) as server:          # or: server, stop = start(args.server)
        url, options = fresh_store(server)          # a new bucket: "s3://<bucket>/kv" and storage_options

The servers run on 127.0.0.1 on free ports and take the same credentials
(``testing``), which are also put in the AWS environment variables for code that
reads them there. moto needs the ``bench`` extra; RGW needs Ceph's Debian packages
(``apt-get install radosgw ceph-mon ceph-osd``, see ``kvstore.testing.rgw``).
Tables should name ``server.name`` beside every S3 figure.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from kvstore.testing.s3servers import SERVER_NAMES, S3Server, start_s3_server

__all__ = ["SERVER_NAMES", "S3Server", "add_server_option", "add_transport_option", "fresh_store", "s3_server", "start"]


def add_server_option(parser: argparse.ArgumentParser, default: str = "moto") -> None:
    parser.add_argument(
        "--server", choices=SERVER_NAMES, default=default, help=f"the S3 server to run against (default {default})"
    )


def add_transport_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--transport",
        choices=("botocore", "crt"),
        default="botocore",
        help="how kvstore's S3 object bytes travel: storage_options['transport'] (default botocore)",
    )


@contextlib.contextmanager
def s3_server(name: str) -> Iterator[S3Server]:
    """Start the server ``name`` for the block, with its credentials in the AWS environment variables."""
    with start_s3_server(name) as server:
        os.environ.update(
            AWS_ACCESS_KEY_ID=server.key, AWS_SECRET_ACCESS_KEY=server.secret, AWS_DEFAULT_REGION=server.region
        )
        yield server


def start(name: str) -> tuple[S3Server, Callable[[], None]]:
    """``s3_server`` without a ``with`` block: the server and the function that stops it."""
    stack = contextlib.ExitStack()
    server = stack.enter_context(s3_server(name))
    return server, stack.close


def fresh_store(server: S3Server, prefix: str = "bench", transport: str = "botocore") -> tuple[str, dict[str, Any]]:
    """A new bucket on ``server``: the URL of a store in it and its ``storage_options`` (with ``transport``)."""
    bucket = f"{prefix}-{uuid.uuid4().hex[:12]}"
    client = server.client()
    client.create_bucket(Bucket=bucket)
    client.close()
    return f"s3://{bucket}/kv", {**server.storage_options(), "transport": transport}
