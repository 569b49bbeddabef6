"""Numbered serving bundles: export adds a version, a live server switches between them.

Layout under the artifacts folder:
  bundles/<N>/             one export each (N = 1, 2, ...), never written again once renamed into place
  bundles/.tmp-<N>-<pid>/  an export in progress; renamed to bundles/<N> when complete (atomic)
  serving -> bundles/<N>   the newest export: what offline stages, `evaluate` and a starting server read
  triton/servers/<port>.json
                           one per running `shoprec serve` (its gRPC port): the version it serves and
                           the versions it served before (`rollback`), its private Triton HTTP address,
                           its runtime model repository (serving/versions.py writes these)

A server never reads `serving` after it started: its steps load bundles/<N> by their Triton model
version (serving/versions.py), so a new export cannot change what is being served; `shoprec deploy`
does. Export keeps the newest `serve.keep_versions` bundles and every version a live server serves or
could roll back to. Standard library only.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
from pathlib import Path

from .errors import UserError

BUNDLES = "bundles"


class BundleError(UserError, RuntimeError):
    """A bundle version is missing, or the serving link is not a version."""


def bundles_root(serving: Path) -> Path:
    """The versions folder: beside `serving`, or wherever `serving` links into (a link to another artifacts
    folder's bundles/<N> serves from that folder's versions)."""
    serving = Path(serving)
    if serving.is_symlink():
        target = Path(os.readlink(serving))
        target = target if target.is_absolute() else serving.parent / target
        if target.parent.name == BUNDLES:
            return target.parent
    return serving.parent / BUNDLES


def versions(serving: Path) -> list[int]:
    """The complete versions on disk, oldest first."""
    root = bundles_root(serving)
    if not root.is_dir():
        return []
    return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit() and p.is_dir())


def current_version(serving: Path) -> int | None:
    """The version `serving` links to; None for a plain folder (an export from before versions) or nothing."""
    serving = Path(serving)
    if not serving.is_symlink():
        return None
    target = Path(os.readlink(serving))
    if target.parent.name != BUNDLES or not target.name.isdigit():
        raise BundleError(f"{serving}: links to {target}, not to a {BUNDLES}/<N> version")
    return int(target.name)


def version_dir(serving: Path, version: int) -> Path:
    path = bundles_root(serving) / str(int(version))
    if not path.is_dir():
        have = versions(serving)
        raise BundleError(f"{path}: no bundle version {version}; on disk: {have or 'none'}")
    return path


@contextlib.contextmanager
def _locked(root: Path):
    """Numbers are taken and links moved by one export at a time (a lock file beside the versions)."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _in_progress(root: Path) -> set[int]:
    """Version numbers that exports still running have reserved; the folders of exports that died are removed."""
    taken = set()
    for tmp in root.glob(".tmp-*-*"):
        _, number, pid = tmp.name.split("-", 2)
        if number.isdigit() and pid.isdigit() and pid_alive(int(pid)):
            taken.add(int(number))
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return taken


def reserve(serving: Path) -> tuple[int, Path]:
    """The next version number and an empty temporary folder to write it into (renamed by `publish`). Exports that
    run at the same time get different numbers."""
    root = bundles_root(serving)
    with _locked(root):
        version = max(set(versions(serving)) | _in_progress(root), default=0) + 1
        tmp = root / f".tmp-{version}-{os.getpid()}"
        tmp.mkdir()
    return version, tmp


def publish(tmp: Path, serving: Path, version: int, keep: int = 3) -> Path:
    """Rename the finished `tmp` to bundles/<version> and point `serving` at it (unless a newer export already took
    the link), both atomic; then drop old versions beyond the newest `keep`, except those a live server serves,
    can roll back to or is switching to."""
    serving = Path(serving)
    root = bundles_root(serving)
    final = root / str(version)
    with _locked(root):
        os.rename(tmp, final)
        current = current_version(serving) if serving.is_symlink() else None
        if current is None or version > current:
            link = serving.with_name(f".{serving.name}.link-{os.getpid()}")
            link.unlink(missing_ok=True)
            os.symlink(Path(BUNDLES) / str(version), link)
            if serving.is_dir() and not serving.is_symlink():  # an export from before versions: no server can use it
                shutil.rmtree(serving)
            os.replace(link, serving)
        prune(serving, keep)
    return final


def prune(serving: Path, keep: int) -> list[int]:
    """Remove versions older than the newest `keep` that neither `serving` nor a live server needs; the removed."""
    have = versions(serving)
    needed = set(have[-max(keep, 1):]) | in_use(serving.parent)
    current = current_version(serving)
    if current is not None:
        needed.add(current)
    removed = []
    for v in have:
        if v not in needed:
            shutil.rmtree(bundles_root(serving) / str(v), ignore_errors=True)
            removed.append(v)
    return removed


# --- live servers ---------------------------------------------------------------------------------------


def servers_dir(artifacts: Path) -> Path:
    return Path(artifacts) / "triton" / "servers"


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def live_servers(artifacts: Path) -> list[dict]:
    """The records of running `shoprec serve` processes on these artifacts (stale records are ignored)."""
    out = []
    folder = servers_dir(artifacts)
    if not folder.is_dir():
        return out
    for path in sorted(folder.glob("*.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and pid_alive(int(record.get("pid", 0) or 0)):
            out.append({**record, "record": str(path)})
    return out


def in_use(artifacts: Path) -> set[int]:
    """Versions a live server serves, can roll back to (the last two of its history) or is switching to."""
    used: set[int] = set()
    for record in live_servers(artifacts):
        used.update(int(v) for v in record.get("history", [])[-2:])
        if record.get("pending") is not None:
            used.add(int(record["pending"]))
    return used


def served_bundle(artifacts: Path) -> Path:
    """The bundle live events belong to: the version the one live server serves, else `serving` (the newest
    export, which a starting server serves)."""
    serving = Path(artifacts) / "serving"
    served = {int(r["history"][-1]) for r in live_servers(artifacts) if r.get("history")}
    if len(served) == 1:
        return version_dir(serving, served.pop())
    return serving
