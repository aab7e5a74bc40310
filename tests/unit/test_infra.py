"""infra/: every manifest an overlay renders validates against the JSON schemas the project
writes for the fields it uses (a typo fails), rendering matches `kubectl kustomize` where
kubectl is installed, and the pieces agree with each other and with the job config schema."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess

import jsonschema
import pytest
import yaml

from orchestrator.config.schema import config_from_dict

INFRA = os.path.join(os.path.dirname(__file__), "..", "..", "infra")
K8S = os.path.join(INFRA, "k8s")
OVERLAYS = {"cluster": {"ConfigMap", "RayCluster"}, "merge-once": {"ConfigMap", "RayJob"},
            "periodic": {"ConfigMap", "RayCronJob"},
            "cronjob-fallback": {"ConfigMap", "ServiceAccount", "Role", "RoleBinding",
                                 "CronJob"}}


def schema(kind: str) -> dict:
    with open(os.path.join(INFRA, "schemas", f"{kind}.schema.json")) as f:
        return json.load(f)


def render(folder: str) -> list[dict]:
    """What kustomize renders for kustomizations that only list resources."""
    with open(os.path.join(folder, "kustomization.yaml")) as f:
        kustomization = yaml.safe_load(f)
    jsonschema.validate(kustomization, schema("Kustomization"))
    docs = []
    for entry in kustomization["resources"]:
        path = os.path.normpath(os.path.join(folder, entry))
        if os.path.isdir(path):
            docs += render(path)
        else:
            with open(path) as f:
                docs += [d for d in yaml.safe_load_all(f) if d]
    return docs


def by_kind(docs: list[dict]) -> dict[str, dict]:
    return {d["kind"]: d for d in docs}


@pytest.mark.parametrize("overlay", list(OVERLAYS))
def test_overlay_manifests_validate(overlay):
    docs = render(os.path.join(K8S, "overlays", overlay))
    assert {d["kind"] for d in docs} == OVERLAYS[overlay]
    for doc in docs:
        jsonschema.validate(doc, schema(doc["kind"]))
    if shutil.which("kubectl"):
        out = subprocess.run(["kubectl", "kustomize", os.path.join(K8S, "overlays", overlay)],
                             capture_output=True, text=True, timeout=60, check=True).stdout
        key = lambda d: (d["kind"], d["metadata"]["name"])  # noqa: E731
        assert sorted(yaml.safe_load_all(out), key=key) == sorted(docs, key=key)


def test_typos_fail_validation():
    job = by_kind(render(os.path.join(K8S, "overlays", "merge-once")))["RayJob"]
    for path, typo in ((["spec"], "shutdownAfterJobFinish"),
                       (["spec", "rayClusterSpec", "headGroupSpec"], "rayStartParam"),
                       (["spec", "rayClusterSpec", "headGroupSpec", "template", "spec",
                         "containers", 0], "imagee")):
        bad = copy.deepcopy(job)
        node = bad
        for part in path:
            node = node[part]
        node[typo] = node.pop("image") if typo == "imagee" else True
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema("RayJob"))


def test_pieces_agree():
    """The job config is a valid raymerge config that connects to the cluster it runs on; every
    way of running it runs the same RayJob spec, mounting that config where the entry point
    reads it; the fallback's service account may create RayJobs and nothing else."""
    base = by_kind(render(os.path.join(K8S, "base")))["ConfigMap"]
    cfg = config_from_dict(yaml.safe_load(base["data"]["job.yaml"]))
    assert cfg.runtime.address == "auto"
    once = by_kind(render(os.path.join(K8S, "overlays", "merge-once")))["RayJob"]["spec"]
    assert once["entrypoint"] == "raymerge run /config/job.yaml"
    head = once["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    assert head["containers"][0]["volumeMounts"][0]["mountPath"] == "/config"
    assert head["volumes"][0]["configMap"]["name"] == base["metadata"]["name"]
    cron = by_kind(render(os.path.join(K8S, "overlays", "periodic")))["RayCronJob"]["spec"]
    assert cron["jobTemplate"] == {k: v for k, v in once.items()
                                   if k != "ttlSecondsAfterFinished"}
    fallback = render(os.path.join(K8S, "overlays", "cronjob-fallback"))
    template = next(d for d in fallback if d["metadata"]["name"] == "raymerge-rayjob-template")
    tick = yaml.safe_load(template["data"]["rayjob.yaml"])
    jsonschema.validate(tick, schema("RayJob"))
    assert tick["spec"] == once and "generateName" in tick["metadata"]
    kinds = by_kind(fallback)
    assert kinds["Role"]["rules"] == [{"apiGroups": ["ray.io"], "resources": ["rayjobs"],
                                       "verbs": ["create", "get", "list"]}]
    pod = kinds["CronJob"]["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == kinds["ServiceAccount"]["metadata"]["name"]
    assert kinds["CronJob"]["spec"]["concurrencyPolicy"] == "Forbid"


def test_image_and_local_scripts():
    """The Dockerfile installs the CPU torch pin and copies every package pyproject builds; the
    local scripts parse and bind 127.0.0.1."""
    with open(os.path.join(INFRA, "Dockerfile")) as f:
        dockerfile = f.read()
    assert "torch==2.13.0" in dockerfile
    for package in ("orchestrator", "workers"):
        assert f"COPY {package} {package}" in dockerfile
    for script in ("start-cluster.sh", "stop-cluster.sh"):
        path = os.path.join(INFRA, "local", script)
        subprocess.run(["bash", "-n", path], check=True)
        assert os.access(path, os.X_OK)
    with open(os.path.join(INFRA, "local", "start-cluster.sh")) as f:
        start = f.read()
    assert "0.0.0.0" not in start and start.count("127.0.0.1") >= 3


def test_rendered_schedules_validate_and_match_the_periodic_overlay(tmp_path, capsys):
    """`raymerge schedule FILE --render k8s`: a ConfigMap holding the schedules and their jobs
    (which load again from the mounted folder) and one RayCronJob per schedule that ticks it
    once, on the periodic overlay's cluster; on_change schedules tick every poll_interval."""
    from orchestrator.cli import main
    from orchestrator.ops.schedule import load_schedules

    path = os.path.join(INFRA, "..", "configs", "schedules", "schedules.yaml")
    assert main(["schedule", path, "--render", "k8s", "--namespace", "merges"]) == 0
    docs = list(yaml.safe_load_all(capsys.readouterr().out))
    for doc in docs:
        jsonschema.validate(doc, schema(doc["kind"]))
        assert doc["metadata"]["namespace"] == "merges"
    config_map, nightly, opcm = docs
    for name, text in config_map["data"].items():
        (tmp_path / name).write_text(text)
    mounted = load_schedules(str(tmp_path / "schedules.yaml"))
    assert [s.name for s in mounted.schedules] == ["nightly-ties", "continual-opcm"]
    assert nightly["spec"]["schedule"] == "0 3 * * *"
    assert opcm["spec"]["schedule"] == "*/10 * * * *"
    assert nightly["spec"]["jobTemplate"]["entrypoint"] == (
        "raymerge schedule /config/schedules.yaml --once --only nightly-ties")
    periodic = by_kind(render(os.path.join(K8S, "overlays", "periodic")))["RayCronJob"]
    want = copy.deepcopy(periodic["spec"]["jobTemplate"]["rayClusterSpec"])
    want["headGroupSpec"]["template"]["spec"]["volumes"][0]["configMap"]["name"] = (
        config_map["metadata"]["name"])
    assert nightly["spec"]["jobTemplate"]["rayClusterSpec"] == want


@pytest.mark.parametrize("minutes, line", [(1, "*/1 * * * *"), (10, "*/10 * * * *"),
                                           (60, "*/60 * * * *"), (120, "0 */2 * * *"),
                                           (360, "0 */6 * * *"), (1440, "0 */24 * * *")])
def test_poll_intervals_render_as_cron_lines_that_fire_that_often(minutes, line):
    """A poll_interval becomes a cron line only where cron can say it: `*/120` minutes fires
    hourly (cron's minute steps restart every hour), so two hours is `0 */2 * * *`."""
    from orchestrator.ops.cron import parse
    from orchestrator.ops.k8s import poll_cron

    assert poll_cron(minutes * 60) == line
    parse(line)


@pytest.mark.parametrize("minutes", [45, 90, 300, 2880])
def test_poll_intervals_no_cron_line_says_are_refused(minutes):
    from orchestrator.errors import ConfigError
    from orchestrator.ops.k8s import poll_cron

    with pytest.raises(ConfigError, match=f"poll_interval: {minutes} minutes is no cron"):
        poll_cron(minutes * 60)


def test_schedule_help_names_a_file_that_exists(capsys):
    from orchestrator.cli import main

    with pytest.raises(SystemExit):
        main(["schedule", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    named = re.search(r"see (\S+\.yaml)", text)[1]
    assert os.path.exists(os.path.join(INFRA, "..", named)), named
