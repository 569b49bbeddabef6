"""The tritonserver command line: one builder for the local launcher (serving/launcher.py) and the
container entrypoint (docker/entrypoint.py). Standard library only."""

from __future__ import annotations

from pathlib import Path


def tritonserver_command(binary: str, repository: Path | str, *, http_address: str, http_port: int, grpc_address: str,
                         grpc_port: int, metrics_address: str, metrics_port: int, backend_directory: Path | str | None = None,
                         extra: tuple[str, ...] | list[str] = ()) -> list[str]:
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
        "--log-verbose=0",
    ]
    return cmd + list(extra)
