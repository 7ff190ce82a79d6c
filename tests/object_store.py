"""An S3-compatible server for tests: moto in server mode on loopback (a real HTTP endpoint,
what boto3, s3fs and pyarrow's S3 filesystem all talk to), found through the standard AWS
variables, as a user points the jobs at MinIO or any other endpoint."""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def moto_s3(*buckets: str) -> Iterator[dict[str, str]]:
    """Start moto on a free loopback port, create `buckets`, point this process's AWS_*
    variables at it (fake credentials) and yield them (for subprocesses' environments);
    everything is restored after."""
    import s3fs
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    s3fs.S3FileSystem.clear_instance_cache()  # none bound to another server's endpoint
    try:
        fs = s3fs.S3FileSystem(skip_instance_cache=True)
        for bucket in buckets:
            fs.mkdir(bucket)
        yield env
    finally:
        server.stop()
        s3fs.S3FileSystem.clear_instance_cache()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
