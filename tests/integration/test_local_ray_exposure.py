"""A local Ray started by our scripts listens on loopback only and keeps Ray's token authentication on.

The Ray instance runs in a child process with a clean environment (no ``RAY_AUTH_MODE``, its own HOME for
the generated token) so that nothing the test session set can make it pass. The child lists the listening
sockets of itself and every process below it (GCS, raylet, dashboard and agents, workers) while a task
runs, and asks the dashboard which authentication mode the cluster is in.
"""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
pytest.importorskip("ray")
psutil = pytest.importorskip("psutil")

REPO_ROOT = Path(__file__).resolve().parents[2]

_CHILD = r"""
import json, sys, tempfile, urllib.request
import psutil, ray
from orchestrator import ray_cluster

ray_cluster.init_ray(address=None, num_cpus=1, include_dashboard=True, object_store_memory=100 * 2**20,
                     temp_dir=tempfile.mkdtemp(prefix="ray", dir="/tmp"), log_to_driver=False)

@ray.remote
def ping():
    return 1

ray.get(ping.remote())
me = psutil.Process()
pids = {me.pid} | {p.pid for p in me.children(recursive=True)}
listening = sorted({(c.laddr.ip, c.laddr.port, psutil.Process(c.pid).name())
                    for c in psutil.net_connections(kind="inet")
                    if c.status == psutil.CONN_LISTEN and c.pid in pids})
dashboard = ray._private.worker._global_node.webui_url
with urllib.request.urlopen("http://" + dashboard + "/api/authentication_mode", timeout=20) as r:
    mode = json.load(r)["authentication_mode"]
ray.shutdown()
print(json.dumps({"listening": listening, "auth_mode": mode, "processes": len(pids)}))
"""


def _is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback


def test_local_ray_binds_loopback_only_with_token_auth() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS"))}
    env["HOME"] = tempfile.mkdtemp(prefix="home")  # Ray writes its generated token under ~/.ray
    env["PYTHONPATH"] = str(REPO_ROOT)
    proc = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, timeout=240,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["processes"] >= 3 and len(out["listening"]) >= 3, out  # GCS, raylet, dashboard at least
    exposed = [row for row in out["listening"] if not _is_loopback(row[0])]
    assert not exposed, f"listening beyond loopback: {exposed}"
    assert out["auth_mode"] == "token"
