"""``raymerge schedule FILE --render k8s``: a schedules file as KubeRay manifests.

One ConfigMap carries the schedules file and every job file; each schedule becomes a RayCronJob
whose job runs one tick of that schedule (``raymerge schedule ... --once --only NAME``) on a
fresh Ray cluster. The output's lock still keeps overlapping ticks apart. ``on_change``
schedules tick every ``poll_interval``, which a cron line can say exactly only for minutes
dividing an hour or hours dividing a day (``*/120`` minutes would fire hourly).
"""

from __future__ import annotations

import math

import yaml

from orchestrator.errors import ConfigError
from orchestrator.ops.schedule import ScheduleFile

CONFIG_MAP = "raymerge-schedules"
MOUNT = "/config"


def _container(name: str, image: str, cpu: str, memory: str) -> dict:
    limits = {"cpu": cpu, "memory": memory}
    return {"name": name, "image": image,
            "resources": {"requests": dict(limits), "limits": dict(limits)}}


def _cluster(image: str, workers: int, worker_cpus: int, worker_memory: str) -> dict:
    """The cluster of infra/k8s/overlays/periodic: the entry point runs on the head, which
    mounts the schedules; workers only merge."""
    head = _container("ray-head", image, "2", "4Gi")
    head["volumeMounts"] = [{"name": "job-config", "mountPath": MOUNT}]
    return {
        "rayVersion": "2.60.0",
        "headGroupSpec": {
            "rayStartParams": {"num-cpus": "0"},
            "template": {"spec": {"containers": [head], "volumes": [
                {"name": "job-config", "configMap": {"name": CONFIG_MAP}}]}},
        },
        "workerGroupSpecs": [{
            "groupName": "mergers", "replicas": workers, "minReplicas": workers,
            "maxReplicas": workers, "rayStartParams": {},
            "template": {"spec": {"containers": [_container("ray-worker", image,
                                                            str(worker_cpus), worker_memory)]}},
        }],
    }


def poll_cron(seconds: float) -> str:
    """The cron line that fires every ``seconds`` (rounded up to whole minutes), or a
    ConfigError when no cron line does."""
    minutes = max(1, math.ceil(seconds / 60))
    if 60 % minutes == 0:
        return f"*/{minutes} * * * *"
    if minutes % 60 == 0 and 24 % (minutes // 60) == 0:
        return f"0 */{minutes // 60} * * *"
    raise ConfigError(f"poll_interval: {minutes} minutes is no cron schedule (cron steps restart "
                      "every hour and every day, so */N minutes with N not dividing 60 fires "
                      "unevenly); for --render k8s use minutes dividing 60 or hours dividing "
                      "24, or give the schedule a cron line")


def render(file: ScheduleFile, *, image: str = "raymerge:0.1.0", namespace: str | None = None,
           workers: int = 4, worker_cpus: int = 4, worker_memory: str = "16Gi") -> str:
    """Multi-document YAML: the ConfigMap, then one RayCronJob per schedule."""
    with open(file.path) as f:
        doc = yaml.safe_load(f)
    data = {}
    for entry, schedule in zip(doc["schedules"], file.schedules):
        key = f"{schedule.name}.job.yaml"
        with open(schedule.job) as f:
            data[key] = f.read()
        entry["job"] = key  # relative to the mounted schedules file
    data["schedules.yaml"] = yaml.safe_dump(doc, sort_keys=False)
    meta = {"namespace": namespace} if namespace else {}
    docs = [{"apiVersion": "v1", "kind": "ConfigMap",
             "metadata": {"name": CONFIG_MAP, **meta}, "data": data}]
    for s in file.schedules:
        when = poll_cron(file.poll_interval) if s.on_change else s.cron.fields
        docs.append({
            "apiVersion": "ray.io/v1", "kind": "RayCronJob",
            "metadata": {"name": f"raymerge-{s.name}", **meta,
                         "labels": {"app.kubernetes.io/name": "raymerge",
                                    "raymerge/schedule": s.name}},
            "spec": {
                "schedule": when, "timeZone": "Etc/UTC", "suspend": False,
                "jobTemplate": {
                    "entrypoint": (f"raymerge schedule {MOUNT}/schedules.yaml --once "
                                   f"--only {s.name}"),
                    "shutdownAfterJobFinishes": True,
                    "activeDeadlineSeconds": 86400,
                    "backoffLimit": 0,  # the next tick retries (and resumes) instead
                    "rayClusterSpec": _cluster(image, workers, worker_cpus, worker_memory),
                },
            },
        })
    return yaml.safe_dump_all(docs, sort_keys=False)
