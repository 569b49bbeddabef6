"""The private online store `shoprec serve` runs beside Triton: a real redis-server (Debian's package)
on a unix socket under ARTIFACTS/online (loopback TCP when the path is too long for a socket), its
append-only file in the same folder, so live user state survives a restart. Memory is capped
(`serve.online_max_memory_mb`) with `noeviction`: a full instance refuses writes, which `shoprec events`
reports, rather than drop some user's live actions and leave their state and actions out of step (keys
expire `serve.online_ttl_days` after a user's last event, which frees memory). An existing Redis is used
instead with `--online-store redis://host:port/db`. A second server on the same artifacts shares the
running instance (the one that started it stops it). ARTIFACTS/online/owner names the process that
looks after it; an instance whose owner is gone (killed without stopping it) is adopted by the server
that finds it, which then restarts it when it dies and stops it on exit.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from shoprec.bundles import pid_alive

from .launcher import LaunchError, free_port


def ping(url: str, timeout_s: float = 0.5) -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s).ping())
    except (redis.RedisError, OSError):
        return False


def owner(data_dir: Path) -> int | None:
    """The pid of the process looking after the private store in `data_dir` (its `owner` file), None if unknown."""
    try:
        return int((Path(data_dir) / "owner").read_text().strip())
    except (OSError, ValueError):
        return None


@dataclass
class RedisServer:
    data_dir: Path
    max_memory_mb: int = 1024
    process: subprocess.Popen | None = None
    url: str | None = None
    adopted_pid: int | None = None  # an instance left by a server that is gone, now looked after by this one

    def start(self, timeout_s: float = 15.0) -> "RedisServer":
        binary = shutil.which("redis-server")
        if binary is None:
            raise LaunchError("redis-server is not installed: `make setup` installs Debian's redis-server (needs root), "
                              "or serve with --online-store none (snapshot only) or --online-store redis://HOST:PORT/DB")
        self.data_dir = Path(self.data_dir).resolve()  # redis-server reads --logfile after it moves into --dir
        self.data_dir.mkdir(parents=True, exist_ok=True)
        sock = self.data_dir / "redis.sock"
        if len(str(sock)) < 100:  # the kernel's limit on a socket path is 108 bytes
            if sock.exists() and ping(f"unix://{sock}"):  # another server on these artifacts runs one: share it
                self.url, self.process = f"unix://{sock}", None
                self.alive()  # adopts it if the server that started it is gone
                return self
            listen = ["--port", "0", "--unixsocket", str(sock), "--unixsocketperm", "700"]
            self.url = f"unix://{sock}"
        else:
            port = free_port()
            listen = ["--port", str(port), "--bind", "127.0.0.1"]
            self.url = f"redis://127.0.0.1:{port}/0"
        log = self.data_dir / "redis.log"
        cmd = [binary, *listen, "--dir", str(self.data_dir), "--logfile", str(log), "--daemonize", "no",
               "--appendonly", "yes", "--appendfsync", "everysec", "--save", "",
               "--maxmemory", f"{self.max_memory_mb}mb", "--maxmemory-policy", "noeviction"]
        self.process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if self.process.poll() is not None:
                tail = log.read_text()[-1500:] if log.exists() else ""
                raise LaunchError(f"redis-server exited with {self.process.returncode} before it was ready; log: {log}\n{tail}")
            if ping(self.url):
                (self.data_dir / "owner").write_text(f"{os.getpid()}\n")
                (self.data_dir / "url").write_text(self.url + "\n")  # `shoprec events` finds the store here
                self.adopted_pid = None
                return self
            time.sleep(0.05)
        self.stop()
        raise LaunchError(f"redis-server not ready after {timeout_s:.0f}s; log: {log}")

    def alive(self) -> bool:
        """Running, or shared with a live server that looks after it. A shared instance whose owner is gone is
        adopted here when it still answers; False means it must be started again."""
        if self.process is not None:
            return self.process.poll() is None
        if self.adopted_pid is not None:
            return pid_alive(self.adopted_pid)
        started_by = owner(self.data_dir)
        if started_by is not None and pid_alive(started_by):
            return True
        if not ping(self.url):
            return False
        import redis

        try:
            pid = int(redis.Redis.from_url(self.url, socket_timeout=1.0).info("server")["process_id"])
        except (redis.RedisError, OSError, KeyError, ValueError):
            return True  # it answers; adopted at the next look
        self.adopted_pid = pid
        (self.data_dir / "owner").write_text(f"{os.getpid()}\n")
        return True

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.adopted_pid is not None and pid_alive(self.adopted_pid):
            (self.data_dir / "url").unlink(missing_ok=True)
            os.kill(self.adopted_pid, signal.SIGTERM)  # not a child: wait for it to be gone
            deadline = time.time() + timeout_s
            while pid_alive(self.adopted_pid) and time.time() < deadline:
                time.sleep(0.05)
            if pid_alive(self.adopted_pid):
                os.kill(self.adopted_pid, signal.SIGKILL)
            return
        if self.process is None or self.process.poll() is not None:  # shared, or already gone
            return
        (self.data_dir / "url").unlink(missing_ok=True)
        self.process.send_signal(signal.SIGTERM)  # redis flushes its append-only file and exits
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
