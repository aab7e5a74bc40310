"""A bare Ray cluster: nodes with Ray and raymerge's dependencies but not raymerge itself.
raymerge's packages travel with the job (runtime_env py_modules), and a dependency a node lacks
is one clear error naming the node and the package."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys

import pytest
import yaml

from orchestrator.cli import main
from tests.conftest import upload
from tests.integration import cluster

pytestmark = pytest.mark.integration

# Imported by every Python process of the cluster: raymerge's editable install is not found
# (its finder is dropped), and the modules named in HIDE_MODULES fail to import.
SITECUSTOMIZE = """
import os, sys
sys.meta_path[:] = [f for f in sys.meta_path
                    if not getattr(f, "__module__", "").startswith("__editable__")]
sys.path_hooks[:] = [h for h in sys.path_hooks
                     if not getattr(h, "__module__", "").startswith("__editable__")]
sys.path_importer_cache.clear()
HIDDEN = set(filter(None, os.environ.get("HIDE_MODULES", "").split(",")))

class Hide:
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name.split(".")[0] in HIDDEN:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, Hide)
"""


def _bare_env(tmp_path, token: str, hide: str = "") -> dict:
    site = tmp_path / "bare-site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return {**os.environ, "PYTHONPATH": str(site), "HIDE_MODULES": hide,
            "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}


def _job(tmp_path, s3, llama_family, bucket: str) -> str:
    s3.create_bucket(Bucket=bucket)
    doc = {"base": {"name": "base", "uri": upload(s3, bucket, llama_family["base"], "base")},
           "sources": [{"name": n, "uri": upload(s3, bucket, llama_family[n], n)}
                       for n in ("ft1", "ft2")],
           "merge": {"method": "ties", "params": {"density": 0.5}},
           "output": {"uri": f"s3://{bucket}/merged", "shard_size": "12KB"}}
    path = tmp_path / f"{bucket}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return str(path)


def test_submit_to_a_cluster_without_raymerge(llama_family, tmp_path, tmp_path_factory, s3):
    """The cluster's Python cannot import raymerge; `submit --wait` of an S3 job succeeds
    (its packages shipped with the job, its entry point `python -m`, not a console script),
    and the output verifies and equals the same merge run here."""
    token = secrets.token_hex(16)
    env = _bare_env(tmp_path, token)
    temp = str(tmp_path_factory.mktemp("bare"))
    bare = subprocess.run([sys.executable, "-c", "import orchestrator"], env=env, cwd=temp,
                          capture_output=True, text=True)
    assert bare.returncode != 0 and "No module named 'orchestrator'" in bare.stderr
    job = _job(tmp_path, s3, llama_family, "bare")
    with cluster.ray_head(temp, "--num-cpus=2", env=env, cwd=temp) as (address, _):
        proc = subprocess.run(
            [sys.executable, "-m", "orchestrator.cli", "submit", job, "--address", address,
             "--wait"], capture_output=True, text=True, timeout=600, cwd=tmp_path,
            env={**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert main(["verify", "s3://bare/merged"]) == 0
    here = tmp_path / "here"
    assert main(["run", job, str(here), "runtime.executor=local"]) == 0
    manifest = yaml.safe_load(s3.get_object(Bucket="bare", Key="merged/raymerge-manifest.json")
                              ["Body"].read())
    local = yaml.safe_load((here / "raymerge-manifest.json").read_text())
    assert [s["sha256"] for s in manifest["shards"]] == [s["sha256"] for s in local["shards"]]


def test_a_missing_dependency_names_the_node_and_the_package(llama_family, tmp_path,
                                                             tmp_path_factory, s3):
    """The same bare cluster without POT: the job fails before any work, naming the node, the
    package and the version raymerge needs."""
    token = secrets.token_hex(16)
    env = _bare_env(tmp_path, token, hide="ot")
    temp = str(tmp_path_factory.mktemp("nopot"))
    job = _job(tmp_path, s3, llama_family, "nopot")
    with cluster.ray_head(temp, "--num-cpus=1", env=env, cwd=temp) as (_, gcs):
        proc = subprocess.run(
            [sys.executable, "-m", "orchestrator.cli", "run", job, f"runtime.address={gcs}"],
            capture_output=True, text=True, timeout=600, cwd=tmp_path,
            env={**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token})
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "the cluster cannot run raymerge's tasks" in proc.stderr
    assert "node 127.0.0.1" in proc.stderr and "POT is not installed (raymerge needs POT>=0.9)" \
        in proc.stderr, proc.stderr[-3000:]
    written = [o["Key"] for o in s3.list_objects_v2(Bucket="nopot", Prefix="merged/")
               .get("Contents", [])]
    assert written == ["merged/.raymerge-lock"], written  # released; no shard, no manifest
