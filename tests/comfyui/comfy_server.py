"""A real ComfyUI server on 127.0.0.1 for the end-to-end and browser tests (and the benchmark):
a throw-away base folder with the node pack copied into custom_nodes (as ComfyUI-Manager does),
model folders given through --extra-model-paths-config, the tiny models in place."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
PACK_NAME = "comfyui-qwenclip"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_tiny_models(dest: Path) -> dict:
    out = dest / "tiny"
    if not (out / "adapter" / "qwenclip.json").is_file():
        r = subprocess.run(
            [os.environ["QWENCLIP_DEV_BIN"], "tiny", "--out", str(out)], capture_output=True, text=True
        )
        if r.returncode != 0:
            raise RuntimeError(f"qwenclip-dev tiny failed ({r.returncode}): {r.stdout}{r.stderr}")
    return {"model": out / "model", "adapter": out / "adapter"}


class ComfyServer:
    def __init__(self, base: Path, comfy: str | None = None, extra_env: dict | None = None):
        self.base = Path(base)
        self.comfy = Path(comfy or os.environ["QWENCLIP_COMFYUI"])
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.log_path = self.base / "server.log"
        self.client_id = uuid.uuid4().hex
        self.extra_env = extra_env or {}

    # -- folders ----------------------------------------------------------------------------
    def prepare(self, placeholders: dict | None = None) -> None:
        """Folders, the pack (linked), the test node, tiny models, and empty placeholders named
        like the models the shipped workflows reference (validation only checks names)."""
        b = self.base
        for d in (
            "custom_nodes",
            "models/checkpoints",
            "models/text_encoders",
            "models/qwenclip",
            "models/loras",
            "models/embeddings",
            "models/diffusion_models",
            "input",
            "output",
            "user",
            "temp",
        ):
            (b / d).mkdir(parents=True, exist_ok=True)
        # the pack goes in the way ComfyUI-Manager installs it: its files in custom_nodes (what
        # a clone of the pack holds); its requirements.txt (the qwenclip wheel) were installed
        # into this Python by .ci/comfyui.sh, so nothing of the checkout is used at run time
        shutil.copytree(
            ROOT / "plugin",
            b / "custom_nodes" / "comfyui-qwenclip",
            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
            dirs_exist_ok=True,
        )
        tiny = make_tiny_models(b)
        shutil.copytree(tiny["model"], b / "models/text_encoders/qwen3-tiny", dirs_exist_ok=True)
        shutil.copytree(tiny["adapter"], b / "models/qwenclip/tiny", dirs_exist_ok=True)
        gguf = b / "models/text_encoders/qwen3-tiny-q8_0.gguf"
        if not gguf.is_file():  # the quantized base, as an artist would drop it in
            subprocess.run(
                [
                    os.environ["QWENCLIP_BIN"],
                    "quantize",
                    "--model",
                    str(tiny["model"]),
                    "--type",
                    "q8_0",
                    "--out",
                    str(gguf),
                ],
                check=True,
                capture_output=True,
            )
        ph = placeholders or {}
        for ckpt in ph.get("checkpoints", []):
            (b / "models/checkpoints" / ckpt).write_bytes(b"")
        for lora in ph.get("loras", []):
            (b / "models/loras" / lora).write_bytes(b"")
        for name in ph.get("adapters", []):
            d = b / "models/qwenclip" / name
            d.mkdir(parents=True, exist_ok=True)
            (d / "qwenclip.json").write_text("{}")
        hf_home = self.extra_env.get("HF_HOME")
        for repo in ph.get("hub", []) if hf_home else []:
            # as if the hub model had been downloaded: the loader lists cached ids as they are
            cached = Path(hf_home) / "hub" / f"models--{repo.replace('/', '--')}"
            snap = cached / "snapshots" / "placeholder"
            snap.mkdir(parents=True, exist_ok=True)
            (cached / "refs").mkdir(exist_ok=True)
            (cached / "refs" / "main").write_text("placeholder")
            for f in ("config.json", "tokenizer.json", "model.safetensors"):
                (snap / f).write_bytes(b"")
        (b / "extra_model_paths.yaml").write_text(
            "qwenclip_tests:\n"
            f"  base_path: {b}\n"
            "  custom_nodes: custom_nodes\n"
            "  checkpoints: models/checkpoints\n"
            "  text_encoders: models/text_encoders\n"
            "  qwenclip: models/qwenclip\n"
            "  loras: models/loras\n"
            "  embeddings: models/embeddings\n"
            "  diffusion_models: models/diffusion_models\n"
        )

    # -- process ----------------------------------------------------------------------------
    def start(self, timeout: float = 180) -> None:
        b = self.base
        cmd = [
            sys.executable,
            str(self.comfy / "main.py"),
            "--cpu",
            "--listen",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--disable-auto-launch",
            "--disable-api-nodes",
            "--extra-model-paths-config",
            str(b / "extra_model_paths.yaml"),
            "--output-directory",
            str(b / "output"),
            "--input-directory",
            str(b / "input"),
            "--user-directory",
            str(b / "user"),
            "--temp-directory",
            str(b / "temp"),
            "--database-url",
            "sqlite:///:memory:",
        ]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", **self.extra_env}
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            cmd,
            cwd=str(self.comfy),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        t0 = time.time()
        while time.time() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            try:
                self.get("/object_info/KSampler", timeout=5)
                self.startup_s = time.time() - t0
                return
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
        raise TimeoutError(f"ComfyUI did not answer in {timeout} s:\n{self.log()[-4000:]}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        if getattr(self, "_log", None):
            self._log.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # -- HTTP -------------------------------------------------------------------------------
    def request(self, method: str, path: str, body=None, timeout: float = 30):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            self.url + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                raw = r.read()
                if not raw:
                    return r.status, None
                try:
                    return r.status, json.loads(raw)
                except ValueError:
                    return r.status, raw.decode(errors="replace")
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                return e.code, json.loads(raw)
            except ValueError:
                return e.code, raw.decode(errors="replace")

    def get(self, path: str, timeout: float = 30):
        status, body = self.request("GET", path, timeout=timeout)
        if status != 200:
            raise RuntimeError(f"GET {path}: {status} {body}")
        return body

    def post(self, path: str, body) -> tuple[int, object]:
        return self.request("POST", path, body)

    def queue(self, prompt: dict) -> str:
        status, body = self.post("/prompt", {"prompt": prompt, "client_id": self.client_id})
        if status != 200:
            raise AssertionError(
                f"/prompt refused the workflow ({status}): {json.dumps(body, indent=1)[:4000]}"
            )
        return body["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 300) -> dict:
        """The history entry once the prompt finished (success, error or interrupt)."""
        t0 = time.time()
        while time.time() - t0 < timeout:
            hist = self.get(f"/history/{prompt_id}")
            entry = hist.get(prompt_id) if hist else None
            if (
                entry
                and entry.get("status", {}).get("completed") is not None
                and (entry["status"].get("completed") or entry["status"].get("status_str") == "error")
            ):
                return entry
            time.sleep(0.3)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout} s:\n{self.log()[-3000:]}")

    def run(self, prompt: dict, timeout: float = 300) -> dict:
        entry = self.wait(self.queue(prompt), timeout)
        if entry["status"].get("status_str") != "success":
            raise AssertionError(
                f"workflow failed: {json.dumps(entry['status'], indent=1)[:4000]}\n{self.log()[-3000:]}"
            )
        return entry
