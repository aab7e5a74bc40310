"""`output.push_to_hub` against a minimal hub server on 127.0.0.1 that speaks the part of the
Hub HTTP API huggingface_hub's upload_folder uses (create repo, model card metadata check,
preupload, commit of regular files), storing every committed file so the test can compare it
with the output folder."""

from __future__ import annotations

import base64
import hashlib
import http.server
import json
import os
import subprocess
import sys
import threading

import pytest
import yaml

pytestmark = pytest.mark.integration


class FakeHub:
    def __init__(self):
        hub = self
        self.files: dict[str, bytes] = {}
        self.commits: list[str] = []
        self.validated = 0

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _reply(self, doc, status=200):
                body = json.dumps(doc).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):
                data = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                path = self.path.split("?")[0]
                if path == "/api/repos/create":
                    name = json.loads(data)
                    self._reply({"url": f"{hub.url}/{name['organization']}/{name['name']}"
                                 if name.get("organization") else f"{hub.url}/{name['name']}"})
                elif path == "/api/validate-yaml":  # the model card's front matter
                    try:
                        card = json.loads(data)["content"]
                        meta = yaml.safe_load(card.split("---\n")[1])
                        ok = isinstance(meta, dict) and "raymerge" in meta.get("tags", [])
                    except yaml.YAMLError:
                        ok = False
                    hub.validated += 1
                    self._reply({"errors": [] if ok else [{"message": "bad"}],
                                 "warnings": []}, 200 if ok else 400)
                elif "/preupload/" in path:
                    files = json.loads(data)["files"]
                    self._reply({"files": [{"path": f["path"], "uploadMode": "regular",
                                            "shouldIgnore": False} for f in files]})
                elif "/commit/" in path:
                    repo = path[len("/api/models/"):path.index("/commit/")]
                    for line in data.decode().splitlines():
                        item = json.loads(line)
                        if item["key"] == "header":
                            hub.commits.append(item["value"]["summary"])
                        elif item["key"] == "file":
                            hub.files[item["value"]["path"]] = base64.b64decode(
                                item["value"]["content"])
                    oid = hashlib.sha1(data).hexdigest()
                    self._reply({"commitUrl": f"{hub.url}/{repo}/commit/{oid}",
                                 "commitOid": oid})
                else:
                    self._reply({"error": f"not faked: {path}"}, 404)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def test_finished_output_is_pushed_as_one_commit(llama_family, tmp_path):
    hub = FakeHub()
    doc = {"base": {"name": "base", "uri": llama_family["base"]},
           "sources": [{"name": "ft1", "uri": llama_family["ft1"]}],
           "merge": {"method": "task_arithmetic", "params": {"scale": 0.5}},
           "output": {"uri": str(tmp_path / "out"), "push_to_hub": "my-org/merged"},
           "runtime": {"executor": "local"}}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(doc))
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_TOKEN": "hf_fake_token_for_tests",
           "HF_HUB_DISABLE_XET": "1"}
    proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", "run",
                           str(tmp_path / "job.yaml")], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"pushed to {hub.url}/my-org/merged/commit/" in proc.stderr
    assert "hf_fake_token_for_tests" not in proc.stdout + proc.stderr
    local = {f: (tmp_path / "out" / f).read_bytes() for f in os.listdir(tmp_path / "out")}
    assert hub.files == local and "raymerge-manifest.json" in hub.files
    assert hub.validated >= 1 and len(hub.commits) == 1
    assert hub.commits[0].startswith("raymerge task_arithmetic merge")
