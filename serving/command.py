"""The tritonserver command line: one builder for the local launcher (serving/launcher.py) and the
container entrypoint (docker/entrypoint.py). Standard library only."""

from __future__ import annotations

import os
import re
from pathlib import Path


# Triton APIs a client of the recommender never needs: loading/unloading models, registering shared memory,
# tracing and log settings. Triton answers them only to requests that carry ADMIN_HEADER with the server's
# admin key. Inference, health, metadata, statistics and model configs stay open (perf_analyzer and other
# Triton clients read the config before they send anything).
RESTRICTED_APIS = ("model-repository", "shared-memory", "trace", "logging")
ADMIN_HEADER = "shoprec-admin-key"


def tritonserver_command(binary: str, repository: Path | str, *, http_address: str, http_port: int, grpc_address: str,
                         grpc_port: int, metrics_address: str, metrics_port: int, backend_directory: Path | str | None = None,
                         admin_key: str | None = None, grpc_tls: tuple[str, str, str] | None = None,
                         response_cache_mb: int = 0, cache_directory: Path | str | None = None,
                         extra: tuple[str, ...] | list[str] = (), rate_limit: bool = True) -> list[str]:
    """admin_key: restrict RESTRICTED_APIS to requests carrying it (None: Triton's defaults, everything open).
    grpc_tls: (certificate, key, client CA or "") PEM paths: gRPC over TLS, mutual when a client CA is given.
    response_cache_mb: Triton's local response cache, used by the models whose config enables it (0: none);
    cache_directory: where its library lives (None: Triton's default, /opt/tritonserver/caches).
    rate_limit: Triton's rate limiter, which orders free instances by their groups' priorities
    (serve.prefer_first_instance)."""
    cmd = [binary, f"--model-repository={repository}"]
    if backend_directory is not None:
        cmd.append(f"--backend-directory={backend_directory}")
    cmd += [
        f"--http-address={http_address}", f"--http-port={http_port}",
        f"--grpc-address={grpc_address}", f"--grpc-port={grpc_port}",
        f"--metrics-address={metrics_address}", f"--metrics-port={metrics_port}",
        # configs are generated in full from the step graph (shoprec/contract.py): a mismatch must fail, not be patched
        "--disable-auto-complete-config",
        "--exit-on-error=true",
        # explicit model control, every model loaded at start: the step doctor (serving/canary.py) reloads a
        # step whose stub died; the model-repository API it uses stays behind the admin key
        "--model-control-mode=explicit", "--load-model=*",
        # a stop waits this long for in-flight requests (ms each) and for models to unload; an instance the
        # doctor replaced never finishes unloading (its stub is dead), so Triton's 30 s default would always run out
        "--exit-timeout-secs=5",
        "--log-verbose=0",
    ]
    if rate_limit:
        # without resources the rate limiter only orders the free instances, by apply_instance_counts' priorities: a
        # model's first instance while it is free, so requests at low load find warm caches
        cmd.append("--rate-limit=execution_count")
    if response_cache_mb < 0:
        raise ValueError(f"serve.response_cache_mb must be >= 0 (0: no cache), got {response_cache_mb}")
    if response_cache_mb:
        cmd.append(f"--cache-config=local,size={int(response_cache_mb) * 2**20}")
        if cache_directory is not None:
            cmd.append(f"--cache-directory={cache_directory}")
    if admin_key is not None:
        if not admin_key or not all(c.isalnum() or c in "-_" for c in admin_key):
            raise ValueError("the admin key must be letters, digits, - or _")
        apis = ",".join(RESTRICTED_APIS)
        cmd += [f"--grpc-restricted-protocol={apis}:{ADMIN_HEADER}={admin_key}",
                f"--http-restricted-api={apis}:{ADMIN_HEADER}={admin_key}"]
    if grpc_tls is not None and any(grpc_tls[:2]):
        cert, key, client_ca = grpc_tls
        cmd += ["--grpc-use-ssl=true", f"--grpc-server-cert={cert}", f"--grpc-server-key={key}"]
        if client_ca:
            cmd += ["--grpc-use-ssl-mutual=true", f"--grpc-root-cert={client_ca}"]
    return cmd + list(extra)


def check_tls_files(cert: str, key: str, client_ca: str = "") -> tuple[str, str, str] | None:
    """None for plaintext; else the three paths, each checked readable. ValueError naming the setting."""
    if not cert and not key:
        if client_ca:
            raise ValueError("serve.grpc_tls_client_ca needs serve.grpc_tls_cert and serve.grpc_tls_key")
        return None
    if not (cert and key):
        raise ValueError("gRPC TLS needs both serve.grpc_tls_cert and serve.grpc_tls_key")
    for name, path in (("grpc_tls_cert", cert), ("grpc_tls_key", key), ("grpc_tls_client_ca", client_ca)):
        if not path:
            continue
        try:
            with open(path, "rb") as f:
                head = f.read(64)
        except OSError as exc:
            raise ValueError(f"serve.{name}: cannot read {path} ({exc.strerror})") from None
        if b"-----BEGIN" not in head:
            raise ValueError(f"serve.{name}: {path} is not a PEM file")
    return os.path.abspath(cert), os.path.abspath(key), os.path.abspath(client_ca) if client_ca else ""


MAX_INSTANCES = 8
# A model's CPU instances are preferred in order while they are free: each is its own instance group whose rate-limiter
# priority is a step to the power of its number (`instance_priorities`), and tritonserver runs its rate limiter
# (`tritonserver_command`), which hands a batch to the free instance with the fewest executions x priority: the
# first takes almost every batch while it is free (an instance that never ran scores 0, so each takes one early
# batch). Without it the instances take turns even at concurrency 1, and each request finds its stub's caches cold
# (docs/performance.md, Instances per model).
INSTANCE_PRIORITY_STEP = 1000
_GROUP = re.compile(r"instance_group \{\n((?:  [^\n]*\n)*)\}\n")  # a group's lines are indented, its brace is not
_COUNT = re.compile(r"^  count: (\d+)$", re.M)
_KIND = re.compile(r"^  kind: (\w+)$", re.M)


_BATCHING = re.compile(r"^dynamic_batching \{\n((?:  [^\n]*\n)*)\}\n", re.M)
_MAX_BATCH = re.compile(r"^max_batch_size: (\d+)$", re.M)
BATCHING_KEYS = ("preferred_batch_sizes", "max_queue_delay_us")
MAX_QUEUE_DELAY_US = 1_000_000


def apply_batching(repository: Path | str, settings: dict) -> dict[str, dict]:
    """Sets `serve.batching` ({model: {"preferred_batch_sizes": [...], "max_queue_delay_us": n}}) in a copy of a
    generated repository: the dynamic batcher of each named model (Triton sends a batch of the largest preferred size
    it can form at once, else waits up to the delay for more; [] and 0: whatever is queued, at once). A key left out
    keeps the step's declaration. ValueError naming the setting for an unknown model or key, sizes outside
    1..max_batch_size or not ascending, a delay outside 0..MAX_QUEUE_DELAY_US. Returns what it set."""
    repository = Path(repository)
    models = {p.parent.name: p for p in repository.glob("*/config.pbtxt")}
    done = {}
    for name, setting in sorted(settings.items()):
        where = f"serve.batching.{name}"
        path = models.get(name)
        text = path.read_text() if path is not None else ""
        block = _BATCHING.search(text)
        if block is None:  # the ensemble has no dynamic batcher
            raise ValueError(f"{where}: no model {name!r} with a dynamic batcher in {repository.name} "
                             f"(models: {sorted(m for m, p in models.items() if _BATCHING.search(p.read_text()))})")
        if not isinstance(setting, dict) or not setting or set(setting) - set(BATCHING_KEYS):
            raise ValueError(f"{where} must be a table of {list(BATCHING_KEYS)}, got {setting!r}")
        biggest = int(_MAX_BATCH.search(text).group(1))
        lines = block.group(1)
        if "preferred_batch_sizes" in setting:
            sizes = setting["preferred_batch_sizes"]
            if not isinstance(sizes, list) or any(isinstance(x, bool) or not isinstance(x, int) or not 1 <= x <= biggest
                                                  for x in sizes) or sizes != sorted(set(sizes)):
                raise ValueError(f"{where}.preferred_batch_sizes must be ascending integers in 1..{biggest} (the model's "
                                 f"max_batch_size), got {sizes!r}")
            lines = "".join(f"  preferred_batch_size: {x}\n" for x in sizes) + _strip(lines, "preferred_batch_size")
        if "max_queue_delay_us" in setting:
            delay = setting["max_queue_delay_us"]
            if isinstance(delay, bool) or not isinstance(delay, int) or not 0 <= delay <= MAX_QUEUE_DELAY_US:
                raise ValueError(f"{where}.max_queue_delay_us must be an integer in 0..{MAX_QUEUE_DELAY_US}, got {delay!r}")
            lines = _strip(lines, "max_queue_delay_microseconds") + (f"  max_queue_delay_microseconds: {delay}\n"
                                                                      if delay else "")
        path.write_text(text[: block.start()] + "dynamic_batching {\n" + lines + "}\n" + text[block.end():])
        done[name] = {k: setting[k] for k in BATCHING_KEYS if k in setting}
    return done


def _strip(lines: str, key: str) -> str:
    return "".join(line for line in lines.splitlines(keepends=True) if not line.startswith(f"  {key}:"))


def python_stub_counts(repository: Path | str) -> dict[str, int]:
    """{model: instances} of the python-backend models of a repository: the stub processes Triton runs for each."""
    out = {}
    for path in Path(repository).glob("*/config.pbtxt"):
        text = path.read_text()
        groups = _GROUP.findall(text)
        if groups and 'backend: "python"' in text:
            # a group without a count line has Triton's default, 1
            out[path.parent.name] = sum(int(m.group(1)) if (m := _COUNT.search(g)) else 1 for g in groups)
    return out


def instance_priorities(count: int) -> list[int]:
    """Rising rate-limiter priorities of `count` instances: 1, step, step^2, ... with step INSTANCE_PRIORITY_STEP,
    or less where the last would not fit Triton's uint32 (23 for 8 instances)."""
    step = INSTANCE_PRIORITY_STEP
    while count > 1 and step ** (count - 1) > 2**32 - 1:
        step -= 1
    return [step**i for i in range(count)]


def instance_groups(count: int, kind: str, prefer_first: bool = True) -> str:
    """The instance_group entries of `count` instances: CPU ones one group each, preferred in order
    (`instance_priorities`); a GPU group, or prefer_first off, as one group (a GPU group's count is per GPU)."""
    if kind != "KIND_CPU" or count == 1 or not prefer_first:
        return f"instance_group {{\n  count: {count}\n  kind: {kind}\n}}\n"
    return "".join(f"instance_group {{\n  count: 1\n  kind: {kind}\n  rate_limiter {{\n    priority: {p}\n  }}\n}}\n"
                   for p in instance_priorities(count))


def apply_instance_counts(repository: Path | str, counts: dict, prefer_first: bool = True) -> dict[str, int]:
    """Sets `serve.instances` ({model: count}) in a copy of a generated repository: each named model's
    instances (its stubs, or GPU instances, run that many batches at once; `instance_groups`). ValueError naming
    the setting for an unknown model, the ensemble, or a count outside 1..MAX_INSTANCES. Returns what it set."""
    repository = Path(repository)
    models = {p.parent.name: p for p in repository.glob("*/config.pbtxt")}
    done = {}
    for name, count in sorted(counts.items()):
        path = models.get(name)
        text = path.read_text() if path is not None else ""
        groups = list(_GROUP.finditer(text))
        if not groups:  # the ensemble has no instance group
            raise ValueError(f"serve.instances.{name}: no model {name!r} with instances in {repository.name} "
                             f"(models: {sorted(m for m, p in models.items() if _GROUP.search(p.read_text()))})")
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_INSTANCES:
            raise ValueError(f"serve.instances.{name} must be an integer in 1..{MAX_INSTANCES}, got {count!r}")
        kind = _KIND.search(groups[0].group(1))
        if kind is None:
            raise ValueError(f"serve.instances.{name}: {path} has an instance_group without a kind line")
        kind = kind.group(1)
        rest = _GROUP.sub("", text[groups[0].start():])
        path.write_text(text[: groups[0].start()] + instance_groups(count, kind, prefer_first) + rest)
        done[name] = count
    return done
