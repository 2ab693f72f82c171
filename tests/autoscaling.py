"""Ray's own autoscaler on one machine: ``ray.cluster_utils.AutoscalingCluster`` (worker nodes are
local processes the fake_multinode provider starts on demand), made safe for a shared machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_ID
from ray.cluster_utils import AutoscalingCluster

from tests.conftest import free_port


class LocalAutoscalingCluster(AutoscalingCluster):
    """AutoscalingCluster with three changes: the base config the wheel lacks
    (autoscaler/_private/fake_multi_node/example.yaml) is given here, and the provider named as an
    external one so the autoscaler's monitor needs no defaults file either; the head listens on a free
    port in its own temp dir; and start/shutdown never run ``ray stop --force``, which would stop
    every Ray on the machine: shutdown ends the processes of this cluster's temp dir, by pid."""

    def __init__(
        self, temp_dir: Path, head_resources: dict, worker_node_types: dict, *, v2: bool = True, monitor: bool = True
    ) -> None:
        self.port = free_port()
        self.temp_dir = Path(temp_dir)
        self.v2 = v2
        # monitor False: a head with no autoscaler and no monitor, as KubeRay starts one whose
        # autoscaler runs beside it (here: never).
        self.monitor = monitor
        super().__init__(head_resources, worker_node_types, autoscaler_v2=v2)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _generate_config(self, head_resources, worker_node_types, autoscaler_v2=False, **config_kwargs):
        return {
            "cluster_name": "fake_multinode",
            "max_workers": sum(t["max_workers"] for t in worker_node_types.values()),
            # "external" with the fake provider's class: the same provider, without the defaults file
            # (fake_multi_node/example.yaml) that the wheel lacks and the autoscaler's monitor reads.
            "provider": {
                "type": "external",
                "module": "ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider",
                "use_node_id_as_ip": True,
                "disable_node_updaters": True,
                "disable_launch_config_check": True,
                "gcs_address": f"127.0.0.1:{self.port}",
                "launch_multiple": True,
                "head_node_id": FAKE_HEAD_NODE_ID,
            },
            "available_node_types": {
                **worker_node_types,
                "ray.head.default": {"resources": dict(head_resources), "node_config": {}, "max_workers": 0},
            },
            "head_node_type": "ray.head.default",
            "auth": {},
            "upscaling_speed": 1.0,
            "idle_timeout_minutes": 5,
            "docker": {},
            "initialization_commands": [],
            "setup_commands": [],
            "head_setup_commands": [],
            "worker_setup_commands": [],
            "head_start_ray_commands": [],
            "worker_start_ray_commands": [],
            "file_mounts": {},
            "cluster_synced_files": [],
            "file_mounts_sync_continuously": False,
            "rsync_exclude": [],
            "rsync_filter": [],
            **config_kwargs,
        }

    def start(self, _system_config=None, override_env=None) -> None:
        self.temp_dir.mkdir(parents=True, exist_ok=True)
        config = self.temp_dir / "autoscaling.json"
        config.write_text(json.dumps(self._config))
        head = dict(self._head_resources)
        cmd = [str(Path(sys.executable).with_name("ray")), "start", "--head", f"--port={self.port}"]
        cmd += [f"--temp-dir={self.temp_dir}"]
        cmd += [f"--autoscaling-config={config}" if self.monitor else "--no-monitor"]
        cmd += [f"--num-cpus={head.pop('CPU', 0)}", "--include-dashboard=false"]
        cmd += [f"--dashboard-agent-listen-port={free_port()}", "--disable-usage-stats"]
        if head:
            cmd.append(f"--resources={json.dumps(head)}")
        env = {**os.environ, "AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_FAKE_CLUSTER": "1"}
        # Autoscaler v2 by default, as KubeRay's autoscalerOptions.version v2 runs it (or v1, the
        # monitor). Neither publishes node maxima in the GCS (pipeline.dag.cluster.cluster_ceiling).
        env.update({"RAY_enable_autoscaler_v2": "1" if self.v2 else "0", "RAY_CLOUD_INSTANCE_ID": FAKE_HEAD_NODE_ID})
        env.update({"RAY_OVERRIDE_NODE_ID_FOR_TESTING": FAKE_HEAD_NODE_ID, "RAY_TMPDIR": str(self.temp_dir)})
        env.update(override_env or {})
        env.pop("RAY_ADDRESS", None)
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
        if proc.returncode:
            raise RuntimeError(f"ray start failed: {proc.stdout[-2000:]}{proc.stderr[-2000:]}")

    def shutdown(self) -> None:
        """End this cluster's processes (those whose command line names its temp dir or port), by pid."""
        marks = (str(self.temp_dir), f"127.0.0.1:{self.port}", f"--gcs_server_port={self.port}")
        mine = []
        for proc in psutil.process_iter(["pid", "cmdline"]):
            line = " ".join(proc.info["cmdline"] or [])
            if proc.pid != os.getpid() and any(m in line for m in marks):
                mine.append(proc)
        for proc in mine:
            for child in proc.children(recursive=True):
                child.terminate()
            proc.terminate()
        _, alive = psutil.wait_procs(mine, timeout=20)
        for proc in alive:
            proc.kill()


def wait_for(predicate, timeout: float, step: float = 1.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    raise TimeoutError("condition not met in time")
