"""The embedded Ray of `raymerge run` listens on 127.0.0.1 only: every listening TCP socket of
the command's process tree (driver, GCS, raylet, agents, workers) is watched while it runs; it
starts no dashboard / API server or autoscaler monitor process."""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
import time

import pytest
import yaml

pytestmark = pytest.mark.integration


def _listen_addresses() -> dict[str, ipaddress._BaseAddress]:
    """socket inode -> local address of every listening TCP socket on the machine."""
    out = {}
    for table, v6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
        with open(table) as f:
            for line in list(f)[1:]:
                fields = line.split()
                if fields[3] != "0A":  # LISTEN
                    continue
                raw = bytes.fromhex(fields[1].split(":")[0])
                if v6:  # four little-endian 32-bit words
                    addr = ipaddress.IPv6Address(b"".join(raw[i:i + 4][::-1]
                                                          for i in range(0, 16, 4)))
                else:
                    addr = ipaddress.IPv4Address(raw[::-1])
                out[fields[9]] = addr
    return out


def _tree_pids(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            children.setdefault(ppid, []).append(int(entry))
    pids, todo = [], [root]
    while todo:
        pids.append(todo.pop())
        todo.extend(children.get(pids[-1], []))
    return pids


def _socket_inodes(pids: list[int]) -> set[str]:
    inodes = set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:["):
                    inodes.add(link[8:-1])
        except OSError:
            continue
    return inodes


def _is_loopback(addr: ipaddress._BaseAddress) -> bool:
    mapped = getattr(addr, "ipv4_mapped", None)
    return addr.is_loopback or (mapped is not None and mapped.is_loopback)


def test_embedded_ray_listens_on_loopback_only(llama_family, tmp_path):
    job = {"sources": [{"name": "a", "uri": llama_family["ft1"]},
                       {"name": "b", "uri": llama_family["ft2"]}],
           "merge": {"method": "linear"}, "output": {"uri": str(tmp_path / "out")}}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}
    proc = subprocess.Popen([sys.executable, "-c",
                             "from orchestrator.cli import main; raise SystemExit(main())",
                             "run", str(tmp_path / "job.yaml"), "--quiet"],
                            env=env, start_new_session=True)
    seen, commands = {}, set()
    while proc.poll() is None:
        listening = _listen_addresses()
        pids = _tree_pids(proc.pid)
        seen.update({i: listening[i] for i in _socket_inodes(pids) if i in listening})
        for pid in pids:
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    commands.add(f.read().replace(b"\0", b" ").decode(errors="replace"))
            except OSError:
                continue
        time.sleep(0.05)
    assert proc.returncode == 0
    assert len(seen) >= 3  # GCS, raylet, agents: the watch did see Ray's services
    assert all(_is_loopback(a) for a in seen.values()), sorted(map(str, seen.values()))
    assert any("raylet" in c for c in commands)  # the watch did see Ray's processes
    assert not [c for c in commands if "dashboard/dashboard.py" in c
                or "autoscaler/_private/monitor.py" in c]


def test_services_are_skipped_only_inside_the_embedded_start():
    from ray._private.node import Node

    from orchestrator.engine.executor import _lean_head

    starts = Node.start_api_server, Node.start_monitor
    with _lean_head():
        assert Node.start_api_server is not starts[0] and Node.start_monitor is not starts[1]
    assert (Node.start_api_server, Node.start_monitor) == starts
