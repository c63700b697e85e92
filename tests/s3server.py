"""A local S3-compatible server for the tests: moto in server mode on 127.0.0.1.

Import the fixtures where they are needed (``from ..s3server import s3_server, s3_url``). Tests
that use them are skipped when ``moto[server]`` or ``s3fs`` is not installed (the ``test`` extra
brings both). Nothing here talks to a real endpoint: the environment that botocore/s3fs read
(``AWS_ENDPOINT_URL``, fake credentials, region) points at the local server for the whole session,
so that code under test, which only reads the environment, reaches the local server too.
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
import uuid

import pytest

_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    # Nothing from the developer's ~/.aws, and never the instance-metadata address (169.254.x)
    # that botocore tries when it finds no credentials.
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    "AWS_EC2_METADATA_DISABLED": "true",
}
# Variables that could send requests elsewhere or pick other credentials; cleared meanwhile.
_CLEARED = ("AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE",
            "AWS_DEFAULT_PROFILE", "AWS_REGION", "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS")
_COUNTER = itertools.count()


class S3Server:
    """A running moto server: its ``endpoint`` URL and a helper that makes buckets."""

    def __init__(self, endpoint: str):
        self.endpoint = endpoint
        self._shared: str | None = None

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id="testing", aws_secret_access_key="testing")

    def bucket(self, name: str | None = None) -> str:
        """Create bucket ``name`` (a fresh unique one if None) and return ``s3://name``."""
        name = name or f"gdn-test-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return f"s3://{name}"

    def shared_bucket(self) -> str:
        """One bucket for the whole session, made on first use."""
        if self._shared is None:
            self._shared = self.bucket()
        return self._shared

    def put(self, url: str, data: bytes = b"x") -> None:
        """Write one object at ``s3://bucket/key``, bypassing the code under test."""
        bucket, _, key = url.removeprefix("s3://").partition("/")
        self.client().put_object(Bucket=bucket, Key=key, Body=data)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    pytest.importorskip("s3fs")
    server_mod = pytest.importorskip("moto.server")
    pytest.importorskip("flask")  # moto's server mode needs it; plain ``moto`` lacks it

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # not a line per request
    # Port 0 lets the OS choose; moto 5.0.0 cannot tell which it chose, so there pick one first.
    known = hasattr(server_mod.ThreadedMotoServer, "get_host_and_port")
    port = 0 if known else _free_port()
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    if known:
        port = server.get_host_and_port()[1]
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in (*_ENV, *_CLEARED, "AWS_ENDPOINT_URL")}
    os.environ.update(_ENV, AWS_ENDPOINT_URL=endpoint)
    for key in _CLEARED:
        os.environ.pop(key, None)
    try:
        yield S3Server(endpoint)
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture()
def s3_url(s3_server) -> str:
    """A fresh, empty ``s3://bucket/prefix`` in a bucket shared by the session."""
    # No fixture of its own for the bucket: importers name only s3_server and s3_url.
    return f"{s3_server.shared_bucket()}/run-{next(_COUNTER)}-{uuid.uuid4().hex[:8]}"
