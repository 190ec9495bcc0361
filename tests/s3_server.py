"""A real S3-protocol server on 127.0.0.1 for the tests and bench/s3_arrays.py: moto's
standalone server (pip install 'mlarch[test-services]'), started and stopped by its user,
never the network. Its clients get the standard AWS settings (AWS_ENDPOINT_URL, keys,
region) and no shared config or credentials files of the machine."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

KEY_ID, SECRET = "testing", "testing"  # moto accepts any key unless authentication is switched on


def environment(endpoint: str, folder: Path, key_id: str = KEY_ID, secret: str = SECRET) -> dict[str, str]:
    """AWS_* settings pointing at `endpoint`, isolated from ~/.aws (config files in `folder`)."""
    return {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": key_id, "AWS_SECRET_ACCESS_KEY": secret,
            "AWS_REGION": "us-east-1", "AWS_CONFIG_FILE": str(folder / "aws-config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(folder / "aws-credentials")}


AWS_NAMES = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
             "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE", "AWS_DEFAULT_PROFILE",
             "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE")


@contextmanager
def threaded():
    """moto's ThreadedMotoServer in this process on a free port: yields its endpoint URL."""
    from moto import backends
    from moto.server import ThreadedMotoServer

    # moto lists its own package folder on every request (~10 ms of its ~25): the list is the
    # same each time, so it is taken once while this server runs (its answers are unchanged)
    listing = backends.list_of_moto_modules
    modules = tuple(listing())
    backends.list_of_moto_modules = lambda: modules
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()
        backends.list_of_moto_modules = listing


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def process():
    """moto's server in a process of its own (as a real S3 server would be: not sharing this
    process's interpreter lock): yields its endpoint URL; stopped (that pid only) afterwards."""
    port = free_port()
    child = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    break
            except OSError:
                if child.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("moto's server did not start") from None
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        child.terminate()
        try:
            child.wait(timeout=10)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def make_bucket(endpoint: str, bucket: str, env: dict[str, str]) -> None:
    """Create `bucket` on the server (boto3 comes with moto)."""
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1")
    client.create_bucket(Bucket=bucket)


def closed_port_url() -> str:
    """An http URL on 127.0.0.1 where nothing listens (connection refused at once)."""
    return f"http://127.0.0.1:{free_port()}"


def apply(env: dict[str, str]) -> dict[str, str | None]:
    """Set `env` (and unset the other AWS_* names) in os.environ; returns what to restore."""
    saved = {name: os.environ.get(name) for name in set(AWS_NAMES) | set(env)}
    for name in AWS_NAMES:
        os.environ.pop(name, None)
    os.environ.update(env)
    return saved


def restore(saved: dict[str, str | None]) -> None:
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@contextmanager
def bucket_session(folder: Path, bucket: str):
    """A threaded server with `bucket`, its AWS_* settings applied to os.environ (restored
    afterwards): yields {"endpoint", "env", "fs"}, fs an s3fs client of its own."""
    import s3fs

    with threaded() as endpoint:
        env = environment(endpoint, folder)
        saved = apply(env)
        try:
            make_bucket(endpoint, bucket, env)
            fs = s3fs.S3FileSystem(key=env["AWS_ACCESS_KEY_ID"], secret=env["AWS_SECRET_ACCESS_KEY"],
                                   client_kwargs={"endpoint_url": endpoint, "region_name": "us-east-1"},
                                   skip_instance_cache=True, use_listings_cache=False)
            yield {"endpoint": endpoint, "env": env, "fs": fs}
        finally:
            restore(saved)
