"""A real S3 HTTP endpoint (moto server on 127.0.0.1, started here) as source and sink."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest
import yaml

from orchestrator import run_job
from orchestrator.cli import main
from orchestrator.errors import StorageError
from tests.conftest import CREDENTIALS, tiny_llama, upload
from workers.io.s3 import PART_SIZE, S3Store

pytestmark = pytest.mark.integration

def job(sources, base, out, **extra):
    return {"base": {"name": "base", "uri": base},
            "sources": [{"name": f"ft{i}", "uri": u} for i, u in enumerate(sources)],
            "merge": {"method": "ties", "params": {"density": 0.3}},
            "output": {"uri": out, "shard_size": "12KB"},
            # the session's Ray started before the S3 credentials were set, as a Ray the
            # user started: its workers get them only when forwarded
            "runtime": {"num_workers": 2, "forward_credentials": True}, **extra}


def shard_digests(manifest):
    return {s["file"]: s["sha256"] for s in manifest["shards"]}


def test_s3_source_and_sink_equal_local_run(s3, llama_family, ray_session, tmp_path):
    """Inputs read by range requests from S3 and shards streamed to S3 give the same bytes as
    the local-folder run; the manifest records ETags; verify works on the S3 output."""
    s3.create_bucket(Bucket="models")
    s3.create_bucket(Bucket="merged")
    uris = {k: upload(s3, "models", v, f"llama/{k}") for k, v in llama_family.items()}
    local = run_job(job([llama_family[k] for k in ("ft1", "ft2", "ft3")],
                        llama_family["base"], str(tmp_path / "local")))
    remote = run_job(job([uris[k] for k in ("ft1", "ft2", "ft3")], uris["base"],
                         "s3://merged/ties/v1"))
    assert shard_digests(remote.manifest) == shard_digests(local.manifest)
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket="merged")["Contents"]}
    assert "ties/v1/raymerge-manifest.json" in keys and "ties/v1/config.json" in keys
    assert "ties/v1/raymerge-progress.json" not in keys
    pins = remote.manifest["sources"][0]["pins"]
    assert all(p["etag"] and p["header_sha256"] for p in pins.values())
    assert "testing" not in json.dumps(remote.manifest)  # no credential in the manifest
    assert main(["verify", "s3://merged/ties/v1"]) == 0
    assert run_job(job([uris[k] for k in ("ft1", "ft2", "ft3")], uris["base"],
                       "s3://merged/ties/v1")).skipped


def test_cli_on_its_own_embedded_ray_reads_and_writes_s3(s3, llama_family, tmp_path):
    """``raymerge run`` in a fresh process starts its own Ray, whose workers get the S3
    settings from the environment they inherit (no runtime_env): same bytes as in-process."""
    s3.create_bucket(Bucket="cli")
    uris = {k: upload(s3, "cli", llama_family[k], k) for k in ("base", "ft1", "ft2")}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job([uris["ft1"], uris["ft2"]], uris["base"], "s3://cli/out")))
    proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", "run", str(path),
                           "--quiet"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    local = run_job(job([uris["ft1"], uris["ft2"]], uris["base"], str(tmp_path / "local"),
                        runtime={"executor": "local"}))
    manifest = json.loads(s3.get_object(Bucket="cli", Key="out/raymerge-manifest.json")["Body"]
                          .read())
    assert shard_digests(manifest) == shard_digests(local.manifest)


def test_big_shards_are_streamed_in_multipart_uploads(s3, ray_session, tmp_path):
    """A shard larger than the part size goes up as several parts (its ETag says how many)."""
    s3.create_bucket(Bucket="big")
    size = dict(vocab_size=8192, hidden_size=256, intermediate_size=256, num_hidden_layers=1,
                num_attention_heads=4, num_key_value_heads=4, shard_size="100MB")
    base = tiny_llama(str(tmp_path / "base"), **size)
    ft = tiny_llama(str(tmp_path / "ft"), seed=1, base=base, **size)
    doc = {"base": {"name": "base", "uri": base}, "sources": [{"name": "ft", "uri": ft}],
           "merge": {"method": "task_arithmetic", "params": {"scale": 0.5}},
           "output": {"uri": "s3://big/out", "shard_size": "40MB"},
           "runtime": {"forward_credentials": True}}
    result = run_job(doc)
    (shard,) = result.manifest["shards"]
    assert shard["bytes"] > 2 * PART_SIZE
    etag = s3.head_object(Bucket="big", Key=f"out/{shard['file']}")["ETag"].strip('"')
    assert etag.endswith(f"-{-(-shard['bytes'] // PART_SIZE)}"), etag
    local = run_job({**doc, "output": {"uri": str(tmp_path / "local"), "shard_size": "40MB"}})
    assert shard_digests(local.manifest) == shard_digests(result.manifest)


def test_missing_bucket_key_and_changed_object(s3, llama_family, tmp_path):
    s3.create_bucket(Bucket="src")
    base = upload(s3, "src", llama_family["base"], "base")
    with pytest.raises(StorageError, match="bucket 'nope' does not exist"):
        run_job(job([base], "s3://nope/base", str(tmp_path / "o")))
    with pytest.raises(StorageError, match="s3://src/missing.*has no .safetensors files"):
        run_job(job(["s3://src/missing"], base, str(tmp_path / "o")))
    with pytest.raises(StorageError, match="s3://absent-bucket/x: bucket 'absent-bucket' does"):
        run_job(job([base], base, "s3://absent-bucket/x"))

    store = S3Store("src", "base")
    name = "config.json"
    pinned = S3Store("src", "base", pins={name: store.pin(name)})
    assert pinned.read_range(name, 0, 5) == store.read_range(name, 0, 5)
    s3.put_object(Bucket="src", Key=f"base/{name}", Body=b'{"changed": true}')
    with pytest.raises(StorageError, match="changed after it was indexed"):
        pinned.read_range(name, 0, 5)


def test_access_denied_fails_fast_with_a_clear_message(tmp_path):
    """Against an S3 endpoint that checks credentials, unknown keys are refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                               str(port)], env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.2)
        env = {**os.environ, **CREDENTIALS, "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{port}"}
        start = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", "plan",
                               str(write_job(tmp_path))], env=env, capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 1
        assert "access denied (InvalidAccessKeyId)" in proc.stderr, proc.stderr
        assert "testing" not in proc.stderr  # the key id is not echoed
        assert time.monotonic() - start < 30
    finally:
        server.terminate()
        server.wait()


def write_job(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job(["s3://any/ft"], "s3://any/base", str(tmp_path / "o"))))
    return path


class FlakyProxy:
    """An HTTP proxy in front of moto that answers the first requests with 503 SlowDown and
    drops one connection without an answer, then forwards everything: S3 throttling and a
    dropped connection, for real, on 127.0.0.1."""

    def __init__(self, target: str, failures: int):
        import http.client
        import http.server
        import threading
        from urllib.parse import urlparse

        upstream = urlparse(target)
        proxy = self
        self.injected = 0
        self.failures = failures

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _handle(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if proxy.injected < proxy.failures:
                    proxy.injected += 1
                    if proxy.injected == proxy.failures:  # the last failure: drop the line
                        self.close_connection = True
                        self.connection.close()
                        return
                    msg = b"<Error><Code>SlowDown</Code><Message>slow down</Message></Error>"
                    self.send_response(503)
                    self.send_header("Content-Length", str(len(msg)))
                    self.end_headers()
                    self.wfile.write(msg)
                    return
                conn = http.client.HTTPConnection(upstream.hostname, upstream.port)
                conn.request(self.command, self.path, body, dict(self.headers))
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                length = resp.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()


def test_throttling_and_dropped_connections_are_retried(s3, llama_family, tmp_path,
                                                        monkeypatch):
    """Reads through an endpoint that throttles and drops a connection still succeed (with
    backoff) and give the same bytes."""
    s3.create_bucket(Bucket="flaky")
    uris = {k: upload(s3, "flaky", llama_family[k], k) for k in ("base", "ft1")}
    proxy = FlakyProxy(os.environ["AWS_ENDPOINT_URL_S3"], failures=4)
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", proxy.url)
        doc = job([uris["ft1"]], uris["base"], str(tmp_path / "flaky"))
        doc["runtime"] = {"executor": "local"}
        result = run_job(doc)
    finally:
        proxy.close()
    assert proxy.injected == 4
    local = job([llama_family["ft1"]], llama_family["base"], str(tmp_path / "local"))
    local["runtime"] = {"executor": "local"}
    assert shard_digests(result.manifest) == shard_digests(run_job(local).manifest)


def test_unsafe_keys_of_the_reference_never_become_paths(s3, llama_family, tmp_path):
    """Issue 23 item 9: objects of the reference whose keys are no safe relative name (``..``,
    ``//``) or no model metadata are not copied; the merge does not fail after its work."""
    s3.create_bucket(Bucket="odd")
    base = upload(s3, "odd", llama_family["base"], "base")
    ft = upload(s3, "odd", llama_family["ft1"], "ft1")
    for key in ("base/x/../notes.json", "base//config.json", "base/../escape.json"):
        s3.put_object(Bucket="odd", Key=key, Body=b'{"secret": true}')
    result = run_job(job([ft], base, str(tmp_path / "out"), runtime={"executor": "local"}))
    names = sorted(os.listdir(result.output))
    assert "config.json" in names and not any("notes" in n or "escape" in n for n in names)
    assert json.loads((tmp_path / "out" / "config.json").read_text()).get("secret") is None
