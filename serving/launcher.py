"""Start a real tritonserver from the nvidia-pytriton wheel (no Docker), wait for readiness, stop.

What it takes care of (see README "Serving" and "Environments"):
- the python backend stub for this interpreter's X.Y is put into a private backends folder;
- this interpreter's libpython comes first on LD_LIBRARY_PATH (the stub otherwise loads
  Debian's libpython3.11 under a pyenv 3.11 stdlib and dies);
- this venv's bin is first on PATH so the stub imports this venv's packages;
- HTTP and gRPC bind to loopback unless told otherwise;
- it refuses to start when the serving bundle's manifest does not match its files.
"""

from __future__ import annotations

import functools
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from shoprec import bundles
from shoprec.config import REPO_ROOT, ServeConfig
from shoprec.contract import ENSEMBLE, default_instances
from shoprec.errors import UserError
from shoprec.manifest import verify_tree

from .command import apply_batching, apply_instance_counts, check_tls_files, python_stub_counts, tritonserver_command

log = logging.getLogger("shoprec.serve")


class LaunchError(UserError, RuntimeError):
    """The server cannot start or stopped on its own: one line naming the port, file or log."""


def pytriton_root() -> Path:
    try:
        import pytriton
    except ImportError as exc:
        raise LaunchError("nvidia-pytriton is not installed: `make setup` installs it") from exc
    return Path(pytriton.__file__).parent / "tritonserver"


def backends_dir(work: Path) -> Path:
    """A backends folder whose python backend has the stub matching this interpreter."""
    src = pytriton_root()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = src / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise LaunchError(f"no python backend stub for Python {version} in {stub.parent.parent}")
    dst = work / "backends" / "python"
    dst.mkdir(parents=True, exist_ok=True)
    for f in (src / "backends" / "python").iterdir():
        if f.is_file() and not (dst / f.name).exists():
            shutil.copy2(f, dst / f.name)
    if not (dst / stub.name).exists():
        shutil.copy2(stub, dst / stub.name)
    return work / "backends"


def check_ports_free(address: str, ports: dict[str, int]) -> None:
    """Refuse ports another process holds: otherwise that process could answer the readiness probe
    while this server fails to bind, and the caller would talk to the wrong server."""
    host = "0.0.0.0" if address in ("", "0.0.0.0") else address
    for name, port in ports.items():
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError as exc:
                raise LaunchError(f"{name} port {port} on {address} is in use ({exc.strerror}); stop the other server "
                                  f"or pass --{name}-port") from exc


def wait_until_ready(http_url: str, process: subprocess.Popen, timeout_s: float, poll_s: float = 0.3) -> None:
    """Poll `http_url`'s KServe readiness endpoint until 200; LaunchError if `process` exits first or time runs out."""
    wait_for_url(f"http://{http_url}/v2/health/ready", process, timeout_s, poll_s)


def wait_for_url(url: str, process: subprocess.Popen, timeout_s: float, poll_s: float = 0.3) -> None:
    """Poll `url` until it answers 200; LaunchError if `process` exits first or time runs out."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if process.poll() is not None:
            raise LaunchError(f"exited with {process.returncode} before it was ready")
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(poll_s)
    raise LaunchError(f"not ready after {timeout_s:.0f}s")


def process_group(pgid: int) -> list[tuple[int, list[str], list[bytes]]]:
    """(pid, /proc stat fields after the command name, argv) of every process in a process group; a zombie's
    argv is [b""]."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
            fields = text[text.rindex(")") + 2 :].split()
            if int(fields[2]) != pgid:
                continue
            argv = (stat.parent / "cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):  # gone meanwhile
            continue
        out.append((int(stat.parent.name), fields, argv))
    return out


def _kill_group(pgid: int, timeout_s: float) -> None:
    """SIGTERM (and SIGCONT, so that a stopped stub gets it) to a process group, SIGKILL to what is left after timeout_s."""
    for sig in (signal.SIGTERM, signal.SIGCONT):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
    deadline = time.time() + timeout_s
    while time.time() < deadline and any(f[0] != "Z" for _, f, _ in process_group(pgid)):
        time.sleep(0.1)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    deadline = time.time() + 5.0  # its ports are free once the kernel has reaped it
    while time.time() < deadline and any(f[0] != "Z" for _, f, _ in process_group(pgid)):
        time.sleep(0.05)


def stop_orphans(artifacts: Path, timeout_s: float = 8.0) -> list[str]:
    """Stop the tritonservers (and their stubs) left running on these artifacts by a `shoprec serve` that is gone
    (killed with SIGKILL, or its machine's OOM killer): they hold ports, memory and CPU, and serve a version no
    deploy can switch any more. A server is recognised by its record (ARTIFACTS/triton/servers/PORT.json): the
    serve process it names is dead, and the process group it names is a tritonserver serving the record's
    repository. A record whose tritonserver is not found here (already gone, or another pid namespace) is left
    alone. Returns one line per server stopped."""
    from .versions import _read_record

    stopped = []
    folder = bundles.servers_dir(artifacts)
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        record = _read_record(path)
        if not isinstance(record, dict) or not record.get("triton_pid") or bundles.pid_alive(int(record.get("pid") or 0)):
            continue
        pgid, repo = int(record["triton_pid"]), str(record.get("repository", ""))
        leader = [argv for pid, fields, argv in process_group(pgid) if pid == pgid and fields[0] != "Z"]
        flag = b"--model-repository="
        if not (leader and leader[0][0].endswith(b"tritonserver") and repo
                and any(a.startswith(flag) and Path(a[len(flag):].decode(errors="replace")).resolve() == Path(repo)
                        for a in leader[0])):
            continue
        _kill_group(pgid, timeout_s)
        path.unlink(missing_ok=True)
        Path(record.get("admin_key_path") or "/nonexistent").unlink(missing_ok=True)
        shutil.rmtree(repo, ignore_errors=True)
        stopped.append(f"stopped tritonserver pid {pgid} (gRPC {record.get('grpc', '?')}), left running by a "
                       f"`shoprec serve` that is gone (pid {record.get('pid')})")
    return stopped


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """n distinct free loopback ports: the sockets stay bound until all are chosen (one at a time, the kernel may
    hand the same port out twice)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def server_env(artifacts: Path, config_path: Path | None = None, online_url: str | None = None,
               versioned: bool = False) -> dict:
    env = dict(os.environ)
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    # the wheel's bundled libraries (auditwheel): the copied stub no longer finds them by RPATH
    wheel_libs = [str(p) for p in pytriton_root().parent.parent.glob("nvidia_pytriton*.libs")]
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libdir, *wheel_libs, env.get("LD_LIBRARY_PATH", "")) if p)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    env["SHOPREC_ARTIFACTS"] = str(artifacts)
    if versioned:  # each step loads bundles/<its model version> (serving/versions.py)
        env["SHOPREC_BUNDLES"] = str(bundles.bundles_root(Path(artifacts) / "serving").resolve())
    else:
        env.pop("SHOPREC_BUNDLES", None)
    env.pop("SHOPREC_BUNDLE", None)  # the container entrypoint's; here the steps read artifacts/serving or bundles/
    if config_path is not None:  # the steps read their serve-time settings from the same file
        env["SHOPREC_CONFIG"] = str(Path(config_path).resolve())
    # the steps read live user state from here; "none": the export's snapshot only
    env["SHOPREC_ONLINE_STORE"] = online_url or "none"
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _tls(cfg: ServeConfig) -> tuple[str, str, str] | None:
    try:
        return check_tls_files(cfg.grpc_tls_cert, cfg.grpc_tls_key, cfg.grpc_tls_client_ca)
    except ValueError as exc:
        raise LaunchError(str(exc)) from None


def _grpc_front(cfg: ServeConfig) -> bool:
    value = str(cfg.grpc_front).lower()
    if value == "auto":
        return cfg.address not in ("127.0.0.1", "localhost", "::1")
    if value in ("true", "false"):
        return value == "true"
    raise LaunchError(f"serve.grpc_front must be auto, true or false, got {cfg.grpc_front!r}")


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity: a container's cpuset), not the host's count."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@dataclass
class TritonServer:
    """A running tritonserver process. Use as a context manager, or call start()/stop()."""

    repository: Path
    artifacts: Path
    http_port: int
    grpc_port: int
    metrics_port: int
    address: str = "127.0.0.1"
    log_path: Path | None = None
    config_path: Path | None = None
    ready_timeout_s: float = 120.0
    online_store: str = "none"  # "private" (start a redis-server), "none", or a Redis URL
    online_max_memory_mb: int = 1024
    process: subprocess.Popen | None = None
    redis: object = None  # the private RedisServer (serving/online.py) while it runs
    online_url: str | None = None
    grpc_tls: tuple[str, str, str] | None = None  # (certificate, key, client CA or ""): gRPC over TLS
    http_front: bool = True  # HTTP through the validating front (serving/http_front.py); Triton's own on a private port
    triton_http_port: int = 0  # Triton's HTTP port: a private loopback one behind the front, else http_port
    grpc_front: bool = False  # gRPC through the size-capping front (serving/grpc_front.py); Triton's own on a private port
    grpc_max_message_mb: float = 1.0
    triton_grpc_port: int = 0
    grpc_proxy: object = None  # the GrpcFront while it runs
    front: object = None  # the HttpFront while it runs
    instances: dict = field(default_factory=dict)  # serve.instances: {model: instance count} in the served repository
    prefer_first_instance: bool = True  # serve.prefer_first_instance: Triton's rate limiter orders free instances
    batching: dict = field(default_factory=dict)  # serve.batching: {model: dynamic batcher settings} in the served repository
    response_cache_mb: int = 0  # Triton's local response cache for the cacheable steps (contract.Step.cacheable); 0: off
    canary_interval_s: float = 0.0  # the step doctor (serving/canary.py); 0: off
    canary_timeout_s: float = 5.0
    doctor: object = None  # the StepDoctor while it runs
    # numbered bundles (serving/versions.py): Triton serves a private copy of `repository` whose step versions are
    # bundle versions, and `shoprec deploy` / `rollback` switch them live; off: `repository` as it is, the steps
    # read artifacts/serving (a probe repository, tests of the launcher itself)
    versioned: bool = False
    swap_drain_s: float = 1.0
    served: object = None  # the ServedRepository while it runs

    @classmethod
    def from_config(cls, cfg: ServeConfig, artifacts: Path, profile: str = "cpu", ephemeral_ports: bool = False, log_path=None,
                    config_path: Path | None = None):
        ports = tuple(free_ports(3)) if ephemeral_ports else (cfg.http_port, cfg.grpc_port, cfg.metrics_port)
        return cls(REPO_ROOT / "model_repository" / profile, Path(artifacts), *ports, address=cfg.address, log_path=log_path,
                   config_path=config_path, ready_timeout_s=cfg.ready_timeout_s, online_store=cfg.online_store,
                   online_max_memory_mb=cfg.online_max_memory_mb, canary_interval_s=cfg.canary_interval_s,
                   grpc_tls=_tls(cfg), http_front=cfg.http_front, grpc_front=_grpc_front(cfg),
                   grpc_max_message_mb=cfg.grpc_max_message_mb, response_cache_mb=cfg.response_cache_mb,
                   instances={**default_instances(profile, usable_cores()), **cfg.instances},
                   prefer_first_instance=cfg.prefer_first_instance, batching=dict(cfg.batching),
                   canary_timeout_s=cfg.canary_timeout_s, versioned=True, swap_drain_s=cfg.swap_drain_s)

    @property
    def _host(self) -> str:  # where a client on this machine reaches it
        return "127.0.0.1" if self.address in ("", "0.0.0.0") else self.address

    @property
    def http_url(self) -> str:
        """The HTTP endpoint clients use (the validating front, when on)."""
        return f"{self._host}:{self.http_port}"

    @property
    def triton_http_url(self) -> str:
        """tritonserver's own HTTP endpoint (loopback only behind the front): readiness, the canary, reloads."""
        return f"127.0.0.1:{self.triton_http_port}" if self.http_front else self.http_url

    @property
    def grpc_url(self) -> str:
        return f"{self._host}:{self.grpc_port}"

    @property
    def model_repository(self) -> Path:
        """The folder Triton serves: the versioned copy while it runs, else `repository` itself."""
        return self.served.root if self.served is not None else self.repository

    @property
    def record_path(self) -> Path:
        return bundles.servers_dir(self.artifacts) / f"{self.grpc_port}.json"

    def command(self, backends: Path) -> list[str]:
        return tritonserver_command(str(pytriton_root() / "bin" / "tritonserver"), self.model_repository, backend_directory=backends,
                                    http_address="127.0.0.1" if self.http_front else self.address,
                                    http_port=self.triton_http_port if self.http_front else self.http_port,
                                    grpc_address="127.0.0.1" if self.grpc_front else self.address,
                                    grpc_port=self.triton_grpc_port if self.grpc_front else self.grpc_port,
                                    metrics_address=self.address, metrics_port=self.metrics_port,
                                    admin_key=self.admin_key, grpc_tls=None if self.grpc_front else self.grpc_tls,
                                    response_cache_mb=self.response_cache_mb, cache_directory=pytriton_root() / "caches",
                                    rate_limit=self.prefer_first_instance)

    @property
    def admin_key_path(self) -> Path:
        return self.artifacts / "triton" / f"admin_key.{self.grpc_port}"

    @functools.cached_property
    def admin_key(self) -> str:
        """The key Triton's admin APIs (model repository, shared memory, trace, logging) require in the
        `shoprec-admin-key` header: $SHOPREC_ADMIN_KEY, else a fresh random one per start, readable by this user
        only in `admin_key_path` (one file per server: several may serve the same artifacts)."""
        key = os.environ.get("SHOPREC_ADMIN_KEY") or secrets.token_urlsafe(24)
        path = self.admin_key_path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(key + "\n")
        return key

    def start(self, timeout_s: float | None = None) -> TritonServer:
        timeout_s = self.ready_timeout_s if timeout_s is None else timeout_s
        bundle = self.artifacts / "serving"
        version = bundles.current_version(bundle) if self.versioned else None  # read the link once: an export may
        if self.versioned and version is None:                                  # move it while this starts
            raise LaunchError(f"{bundle}: a bundle from before numbered versions; run `shoprec export` again")
        verify_tree(bundles.version_dir(bundle, version) if version is not None else bundle)  # as export wrote it
        if self.versioned:
            for line in stop_orphans(self.artifacts):
                log.warning("%s", line)
        check_ports_free(self.address, {"http": self.http_port, "grpc": self.grpc_port, "metrics": self.metrics_port})
        public = (self.http_port, self.grpc_port, self.metrics_port)
        if self.http_front and not self.triton_http_port:
            while self.triton_http_port in (0, *public):
                self.triton_http_port = free_port()
        if self.grpc_front and not self.triton_grpc_port:
            while self.triton_grpc_port in (0, *public, self.triton_http_port):
                self.triton_grpc_port = free_port()
        work = self.artifacts / "triton"
        if self.versioned:
            from .versions import ServedRepository

            self.served = ServedRepository.create(self.repository, work / f"repository.{self.grpc_port}", version)
        if self.instances or self.batching:
            if not self.versioned:
                raise LaunchError("serve.instances and serve.batching need the numbered bundles' served repository "
                                  "(versioned)")
            try:
                if self.instances:
                    log.info("instances: %s", apply_instance_counts(self.served.root, self.instances,
                                                                    self.prefer_first_instance))
                if self.batching:
                    log.info("batching: %s", apply_batching(self.served.root, self.batching))
            except ValueError as exc:
                raise LaunchError(str(exc)) from None
        cmd = self.command(backends_dir(work))
        self._lifecycle = threading.Lock()  # a restart by the step doctor replaces self.process under it
        self._halt = threading.Event()  # set by stop(): a restart in flight must not start a new server
        try:  # whatever ends the start (not ready, a signal, Ctrl-C) stops the processes it started
            self._start_online_store()
            self._launch(cmd, timeout_s, mode="w")
            if self.http_front:
                from .http_front import HttpFront

                self.front = HttpFront(self.address, self.http_port, self.triton_http_url).start()
            if self.grpc_front:
                from .grpc_front import GrpcFront

                self.grpc_proxy = GrpcFront(self.address, self.grpc_port, f"127.0.0.1:{self.triton_grpc_port}",
                                            self.grpc_max_message_mb, self.grpc_tls).start()
            if self.canary_interval_s > 0:
                from .canary import StepDoctor

                repo = self.model_repository
                steps = sorted(p.name for p in repo.iterdir() if (p / "config.pbtxt").is_file() and p.name != ENSEMBLE)
                self.doctor = StepDoctor(self.triton_http_url, steps, self.admin_key, self.canary_interval_s, self.canary_timeout_s,
                                         restart=self._restart, alive=lambda: self.process.poll() is None,
                                         stub_pids=self.stub_pids, stubs=python_stub_counts(repo),
                                         lock=(lambda: self.served.lock(timeout_s=None)) if self.served else None).start()
            if self.served is not None:
                self._write_record()
        except BaseException:
            self.stop()
            raise
        return self

    def _write_record(self) -> None:
        """What `shoprec deploy` needs to switch this server's version (shoprec/bundles.py, serving/versions.py)."""
        from .versions import write_record

        write_record(self.artifacts, self.grpc_port, {
            "pid": os.getpid(), "triton_pid": self.process.pid, "grpc_port": self.grpc_port, "grpc": self.grpc_url, "http": self.http_url,
            "triton_http": self.triton_http_url, "admin_key_path": str(self.admin_key_path.resolve()),
            "repository": str(self.served.root.resolve()), "template": str(Path(self.repository).resolve()),
            "history": [self.served.served()], "swap_drain_s": self.swap_drain_s})

    def served_version(self) -> int | None:
        """The bundle version the ensemble pins (None when the repository is not versioned)."""
        return self.served.served() if self.served is not None else None

    def deploy(self, version: int | None = None, rollback: bool = False, log=None) -> dict:
        """Switch this server to bundle `version` (default: the newest export) or back (serving/versions.py)."""
        from .versions import deploy

        return deploy(self.artifacts, version, self.grpc_port, self.swap_drain_s, rollback, log=log or (lambda m: None))

    def stub_pids(self, model: str) -> list[int]:
        """The python-backend stubs of `model` (instances named model_<i>_<j>) in the server's process group."""
        prefix = f"{model}_".encode()
        return [pid for pid, _, argv in process_group(self.process.pid)
                if argv[0].endswith(b"triton_python_backend_stub")
                and any(a.startswith(prefix) and a[len(prefix):].replace(b"_", b"").isdigit() for a in argv)]

    def _launch(self, cmd: list[str], timeout_s: float, mode: str) -> None:
        log_name = self.log_path or self.artifacts / "triton" / "server.log"
        with open(log_name, mode) as server_log:  # the child keeps its own copy of the descriptor
            self.process = subprocess.Popen(cmd, env=server_env(self.artifacts, self.config_path, self.online_url,
                                                                self.served is not None),
                                            stdout=server_log, stderr=subprocess.STDOUT, start_new_session=True)
        self._wait_ready(timeout_s, str(log_name))

    def _restart(self) -> None:
        """Stop tritonserver and its stubs and start it again on the same ports (the step doctor's last resort)."""
        with self._lifecycle:
            if self._halt.is_set():
                return
            self._kill_server()
            if self._halt.is_set():
                return
            try:
                self._launch(self.command(backends_dir(self.artifacts / "triton")), self.ready_timeout_s, mode="a")
                if self.served is not None:  # the record names the new process group (stop_orphans)
                    from .versions import _update_record

                    _update_record(self.record_path, triton_pid=self.process.pid)
            except LaunchError as exc:
                log.error("restart failed: %s", exc)

    def _start_online_store(self) -> None:
        from .online import RedisServer, ping

        if self.online_store == "none":
            self.online_url = None
        elif self.online_store == "private":
            self.redis = RedisServer(self.artifacts / "online", self.online_max_memory_mb).start()
            self.online_url = self.redis.url
            self._stopping = threading.Event()
            threading.Thread(target=self._supervise_online_store, name="online-store", daemon=True).start()
        elif self.online_store.startswith(("redis://", "rediss://", "unix://")):
            self.online_url = self.online_store
            if not ping(self.online_url, timeout_s=2.0):  # it may come up later: requests are served degraded until then
                log.warning("online store %s does not answer; serving from the snapshot (degraded) until it does",
                            self.online_url)
        else:
            raise LaunchError(f"online store must be private, none or redis://HOST:PORT/DB, got {self.online_store!r}")

    def _wait_ready(self, timeout_s: float, log_name: str) -> None:
        try:
            wait_until_ready(self.triton_http_url, self.process, timeout_s)
        except LaunchError as err:
            tail = Path(log_name).read_text()[-3000:] if self.process.poll() is not None else ""
            raise LaunchError(f"tritonserver: {err}; log: {log_name}" + (f"\n{tail}" if tail else "")) from None

    def wait(self, poll_s: float = 1.0) -> None:
        """Block while the server runs; LaunchError when it stops on its own (it never does while healthy;
        a restart by the step doctor is not a stop)."""
        while True:
            with self._lifecycle:
                if self.process.poll() is not None:
                    break
            time.sleep(poll_s)
        server_log = self.log_path or self.artifacts / "triton" / "server.log"
        raise LaunchError(f"tritonserver stopped on its own with exit code {self.process.returncode}; log: {server_log}")

    def _supervise_online_store(self, poll_s: float = 0.5) -> None:
        """Restart the private redis-server when it dies (its append-only file brings the live state back);
        requests are served from the snapshot, marked degraded, meanwhile."""
        while not self._stopping.wait(poll_s):
            if self.redis.alive():
                continue
            log.warning("the private redis-server stopped (%s); restarting it",
                        f"exit code {self.redis.process.returncode}" if self.redis.process is not None
                        else "started by another server, which is gone")
            try:
                self.redis.start()
            except LaunchError as exc:
                log.warning("%s", exc)

    def stop(self, timeout_s: float = 8.0) -> None:
        if getattr(self, "_halt", None) is not None:
            self._halt.set()
        if self.doctor is not None:
            self.doctor.stop()
        if self.front is not None:
            self.front.stop()
        if self.grpc_proxy is not None:
            self.grpc_proxy.stop()
        lock = getattr(self, "_lifecycle", None)
        held = lock.acquire(timeout=self.ready_timeout_s + 10) if lock is not None else False  # a restart in flight ends first
        try:
            self._kill_server(timeout_s)
        finally:
            if held:
                lock.release()
        if self.redis is not None:
            self._stopping.set()
            self.redis.stop()
        if "admin_key" in self.__dict__:  # this start wrote the key file: the key dies with the server
            self.admin_key_path.unlink(missing_ok=True)
        if self.served is not None:  # after a switch in flight (its lock), so that it ends in one line, not midway
            try:
                with self.served.lock(timeout_s=30):
                    self.record_path.unlink(missing_ok=True)
                    shutil.rmtree(self.served.root, ignore_errors=True)
            except Exception:  # noqa: BLE001 - a stop always cleans up
                self.record_path.unlink(missing_ok=True)
                shutil.rmtree(self.served.root, ignore_errors=True)
            self.served = None

    def _kill_server(self, timeout_s: float = 8.0) -> None:
        """SIGTERM to the server and its stubs (one process group; SIGCONT wakes a stopped stub so that it gets
        it), SIGKILL to whatever is left after timeout_s, and to any stub that outlived the server."""
        if self.process is None:
            return
        group = self.process.pid
        if self.process.poll() is None:
            for sig in (signal.SIGTERM, signal.SIGCONT):
                os.killpg(group, sig)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("tritonserver did not stop within %.0fs of SIGTERM; killing it", timeout_s)
        try:
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:  # the group is gone: nothing outlived the server
            pass
        self.process.wait()

    def __enter__(self):
        return self.start() if self.process is None else self

    def __exit__(self, *exc):
        self.stop()
