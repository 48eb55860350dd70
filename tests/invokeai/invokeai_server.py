"""A real InvokeAI server (`invokeai-web`) in a throw-away INVOKEAI_ROOT, driven over its API."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

PACK = Path(__file__).resolve().parents[2] / "integrations" / "invokeai" / "qwenclip_nodes"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class InvokeAIServer:
    def __init__(self, root: Path):
        self.root = root
        self.log_path = root / "server.log"
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def prepare(self) -> None:
        """INVOKEAI_ROOT with the node pack installed as a user would: a folder under nodes/."""
        shutil.copytree(PACK, self.root / "nodes" / PACK.name, ignore=shutil.ignore_patterns("__pycache__"))
        # CPU and float32 as on a machine without a GPU; no patchmatch build; "random" model
        # hashing, since hashing a real model is what installs spend their time on.
        (self.root / "invokeai.yaml").write_text(
            "schema_version: 4.0.3\n"
            "host: 127.0.0.1\n"
            f"port: {free_port()}\n"
            "device: cpu\n"
            "precision: float32\n"
            "patchmatch: false\n"
            "hashing_algorithm: random\n"
            "log_format: plain\n"
        )

    def start(self, timeout: float = 180) -> None:
        exe = Path(sys.executable).parent / "invokeai-web"
        env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(self.root / "hf_home"))
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [str(exe), "--root", str(self.root)], stdout=log, stderr=subprocess.STDOUT, env=env
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"invokeai-web exited with {self.proc.returncode}:\n{self.log()}")
            # InvokeAI moves to the next port when ours was taken meanwhile: its log says where.
            m = re.search(r"Invoke running on (http://127\.0\.0\.1:\d+)", self.log())
            if m:
                self.url = m.group(1)
                self.get("/api/v1/app/version")
                return
            time.sleep(0.5)
        raise TimeoutError(f"invokeai-web did not start in {timeout} s:\n{self.log()}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def get(self, path: str, **kw) -> requests.Response:
        r = requests.get(self.url + path, timeout=60, **kw)
        r.raise_for_status()
        return r

    def post(self, path: str, **kw) -> requests.Response:
        return requests.post(self.url + path, timeout=60, **kw)

    def install_model(self, path: Path, name: str, timeout: float = 120) -> dict:
        """Installs a model folder in place through the model manager; returns the install job."""
        r = self.post(
            "/api/v2/models/install", params={"source": str(path), "inplace": "true"}, json={"name": name}
        )
        assert r.status_code == 201, r.text
        job_id = r.json()["id"]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.get(f"/api/v2/models/install/{job_id}").json()
            if job["status"] in ("completed", "error", "cancelled"):
                return job
            time.sleep(0.5)
        raise TimeoutError(f"model install {job_id} still running after {timeout} s")

    def enqueue(self, graph: dict) -> requests.Response:
        return self.post("/api/v1/queue/default/enqueue_batch", json={"batch": {"graph": graph, "runs": 1}})

    def run(self, graph: dict, timeout: float = 300) -> dict:
        """Runs a graph through the session queue; returns the finished queue item."""
        r = self.enqueue(graph)
        assert r.status_code in (200, 201), r.text
        item_id = r.json()["item_ids"][0]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            item = self.get(f"/api/v1/queue/default/i/{item_id}").json()
            if item["status"] in ("completed", "failed", "canceled"):
                return item
            time.sleep(0.5)
        raise TimeoutError(f"queue item {item_id} still {item['status']} after {timeout} s")
