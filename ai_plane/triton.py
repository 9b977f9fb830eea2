"""Our own Triton Inference Server: the `tritonserver` binary that the
`nvidia-pytriton` wheel ships, serving a plain model repository of
Python-backend models (LightGBM inside), on the CPU.

Measured on the 2-core development machine (see ai_plane/README.md): the plain
repository answers a sequential call in about 1 ms, PyTriton's proxy path
(which adds a ZeroMQ hop to a Python callback) in about 2.8 ms, so the plane
serves the plain repository. PyTriton's Python package is used only to find
the binary, its libraries and the Python backend stub.

Models are loaded in explicit model-control mode: a new version is written
into the repository, the model's config names the versions to serve, and a
`load` request makes Triton switch without a restart.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

from triplane.runtime.config import AiTritonConfig
from triplane.runtime.lifetime import die_with_parent
from triplane.runtime.net import free_port

log = logging.getLogger("triplane.ai.triton")

MODEL_PY = Path(__file__).parent / "triton_backend" / "model.py"


class TritonUnavailable(RuntimeError):
    """tritonserver is not installed here or did not start."""


@dataclass(frozen=True)
class TritonDist:
    binary: Path
    python_backend: Path
    stub: Path
    libs: Path


def find_dist() -> TritonDist:
    """Locates the binary and libraries inside the installed nvidia-pytriton."""
    # Found without importing PyTriton (which pulls its proxy's dependencies).
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise TritonUnavailable("nvidia-pytriton is not installed")
    root = Path(next(iter(spec.submodule_search_locations)))
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    dist = TritonDist(
        binary=root / "tritonserver" / "bin" / "tritonserver",
        python_backend=root / "tritonserver" / "backends" / "python",
        stub=root
        / "tritonserver"
        / "python_backend_stubs"
        / version
        / "triton_python_backend_stub",
        libs=root.parent / "nvidia_pytriton.libs",
    )
    for path in (dist.binary, dist.python_backend, dist.stub):
        if not path.exists():
            raise TritonUnavailable(f"missing {path}")
    return dist


def model_config(name: str, versions: list[int], n_features: int, config: AiTritonConfig) -> str:
    """config.pbtxt: dynamic batching with a small queue delay, and a queue
    policy that rejects requests that waited past their timeout."""
    listed = ", ".join(str(v) for v in sorted(versions, reverse=True))
    return f"""name: "{name}"
backend: "python"
max_batch_size: {config.max_batch_size}
version_policy: {{ specific: {{ versions: [ {listed} ] }} }}
input [ {{ name: "FEATURES" data_type: TYPE_FP32 dims: [ {n_features} ] }} ]
output [
  {{ name: "SCORE" data_type: TYPE_FP32 dims: [ 1 ] }},
  {{ name: "CONTRIB" data_type: TYPE_FP32 dims: [ {n_features + 1} ] }}
]
dynamic_batching {{
  max_queue_delay_microseconds: {config.max_queue_delay_us}
  default_queue_policy {{
    timeout_action: REJECT
    default_timeout_microseconds: {config.queue_timeout_us}
    allow_timeout_override: true
    max_queue_size: {config.max_queue_size}
  }}
}}
instance_group [ {{ count: {config.instance_count} kind: KIND_CPU }} ]
"""


def model_config_json(
    name: str, versions: list[int], n_features: int, config: AiTritonConfig
) -> str:
    """The same configuration as JSON, the form a load request with files takes."""
    return json.dumps(
        {
            "name": name,
            "backend": "python",
            "max_batch_size": config.max_batch_size,
            "version_policy": {"specific": {"versions": sorted(versions, reverse=True)}},
            "input": [{"name": "FEATURES", "data_type": "TYPE_FP32", "dims": [n_features]}],
            "output": [
                {"name": "SCORE", "data_type": "TYPE_FP32", "dims": [1]},
                {"name": "CONTRIB", "data_type": "TYPE_FP32", "dims": [n_features + 1]},
            ],
            "dynamic_batching": {
                "max_queue_delay_microseconds": config.max_queue_delay_us,
                "default_queue_policy": {
                    "timeout_action": "REJECT",
                    "default_timeout_microseconds": config.queue_timeout_us,
                    "allow_timeout_override": True,
                    "max_queue_size": config.max_queue_size,
                },
            },
            "instance_group": [{"count": config.instance_count, "kind": "KIND_CPU"}],
        }
    )


class ModelRepository:
    """A plain Triton model repository on disk."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def write_version(self, name: str, version: int, booster_text: str) -> None:
        directory = self.root / name / str(version)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "model.txt").write_text(booster_text)
        shutil.copyfile(MODEL_PY, directory / "model.py")

    def write_config(
        self, name: str, versions: list[int], n_features: int, config: AiTritonConfig
    ) -> None:
        path = self.root / name / "config.pbtxt"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(model_config(name, versions, n_features, config))
        os.replace(tmp, path)

    def models(self) -> list[str]:
        return sorted(p.parent.name for p in self.root.glob("*/config.pbtxt"))


def _environment(dist: TritonDist) -> dict[str, str]:
    env = dict(os.environ)
    # The Python stub embeds this interpreter's libpython; the stub's Python
    # must see this environment's packages (numpy, lightgbm).
    libdir = str(sysconfig.get_config_var("LIBDIR") or "")
    extra = [str(dist.libs), libdir]
    env["LD_LIBRARY_PATH"] = ":".join([*extra, env.get("LD_LIBRARY_PATH", "")]).strip(":")
    site = [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    env["PYTHONPATH"] = ":".join([*dict.fromkeys(site), env.get("PYTHONPATH", "")]).strip(":")
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    return env


def _prepare_backends(dist: TritonDist, work_dir: Path) -> Path:
    """A backend directory with the Python backend and the stub for this
    interpreter's version (links, not copies: nothing large is duplicated)."""
    backends = work_dir / "backends"
    python = backends / "python"
    python.mkdir(parents=True, exist_ok=True)
    for source in [*dist.python_backend.iterdir(), dist.stub]:
        if source.name == "__pycache__":
            continue
        target = python / source.name
        if target.is_symlink() or target.exists():
            target.unlink()
        target.symlink_to(source)
    return backends


class TritonProcess:
    """One tritonserver child process: gRPC (model control) and HTTP (inference)
    on loopback, explicit model control."""

    def __init__(self, repository: ModelRepository, work_dir: Path, config: AiTritonConfig) -> None:
        self.repository = repository
        self.work_dir = work_dir
        self.config = config
        self.grpc_port = 0
        self.http_port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = work_dir / "tritonserver.log"

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        """Its HTTP endpoint (inference; see triton_http.py)."""
        return f"127.0.0.1:{self.http_port}"

    def start(self) -> str:
        """Starts the server with every model in the repository; returns its
        gRPC address once live and every model is ready."""
        self.spawn()
        self.wait_ready()
        return self.url

    def spawn(self) -> None:
        """Starts the process (call from a long-lived thread: the server is
        told to die with the thread that started it, so a plane killed with
        SIGKILL never leaves a tritonserver behind)."""
        dist = find_dist()
        self.work_dir.mkdir(parents=True, exist_ok=True)
        backends = _prepare_backends(dist, self.work_dir)
        self.grpc_port = free_port()
        self.http_port = free_port()
        shm_prefix = f"triplane_{os.getpid()}_{secrets.token_hex(3)}_"
        args = [
            str(dist.binary),
            f"--model-repository={self.repository.root}",
            f"--backend-directory={backends}",
            "--model-control-mode=explicit",
            *[f"--load-model={name}" for name in self.repository.models()],
            f"--grpc-port={self.grpc_port}",
            "--grpc-address=127.0.0.1",
            # HTTP serves inference (cheaper per call than gRPC from Python);
            # gRPC serves model control and the benchmark's raw calls.
            "--allow-http=true",
            f"--http-port={self.http_port}",
            "--http-address=127.0.0.1",
            "--allow-metrics=false",
            "--allow-gpu-metrics=false",
            "--exit-timeout-secs=2",
            "--log-verbose=0",
            f"--backend-config=python,shm-region-prefix-name={shm_prefix}",
            "--backend-config=python,shm-default-byte-size=4194304",
            "--backend-config=python,shm-growth-byte-size=1048576",
        ]
        with self.log_path.open("ab") as log_file:
            self.process = subprocess.Popen(
                args,
                env=_environment(dist),
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=die_with_parent(),
            )

    def wait_ready(self) -> None:
        """Blocks until live with every model ready; stops the server on failure."""
        try:
            self._wait_ready(self.repository.models())
        except BaseException:
            self.stop()
            raise
        log.info("tritonserver ready", extra={"url": self.url, "pid": self.pid})

    def _wait_ready(self, models: list[str]) -> None:
        import tritonclient.grpc as triton_grpc

        deadline = time.monotonic() + self.config.startup_timeout_s
        client = triton_grpc.InferenceServerClient(self.url)
        try:
            while time.monotonic() < deadline:
                assert self.process is not None
                if self.process.poll() is not None:
                    raise TritonUnavailable(
                        f"tritonserver exited with {self.process.returncode}; see {self.log_path}"
                    )
                with contextlib.suppress(Exception):
                    if client.is_server_live() and all(client.is_model_ready(m) for m in models):
                        return
                time.sleep(0.1)
        finally:
            client.close()
        raise TritonUnavailable(f"tritonserver not ready in time; see {self.log_path}")

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after stop_timeout_s; also resumes a stopped
        (SIGSTOPped) server first so it can exit."""
        process = self.process
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGCONT)
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=self.config.stop_timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=self.config.stop_timeout_s)
        # The Python stubs are in the same process group; make sure none is left.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)

    def kill(self) -> None:
        """Fault injection: the server dies at once."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=5)

    def pause(self) -> None:
        """Fault injection: the server stops answering (but keeps its sockets).
        Returns once every thread of the server is stopped: SIGSTOP only
        marks the stop, and a thread busy on a loaded machine takes it when
        it next runs, so a call made right after the signal could still be
        answered."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGSTOP)
        tasks = Path(f"/proc/{self.process.pid}/task")
        deadline = time.monotonic() + PAUSE_TIMEOUT_S
        while time.monotonic() < deadline:
            if all(_thread_stopped(task) for task in tasks.iterdir()):
                return
            time.sleep(0.005)
        raise RuntimeError(
            f"tritonserver {self.process.pid} did not stop within {PAUSE_TIMEOUT_S} s"
        )

    def resume(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGCONT)


# How long pause() waits for every thread of the server to be stopped.
PAUSE_TIMEOUT_S = 5.0


def _thread_stopped(task: Path) -> bool:
    """Whether a thread (/proc/<pid>/task/<tid>) is stopped ('T') or gone."""
    try:
        stat = (task / "stat").read_text()
    except OSError:
        return True
    # The state follows the command name, which is in parentheses and may
    # itself hold spaces or parentheses.
    return stat[stat.rindex(")") + 2 :].startswith("T")
