"""sha256 manifests: written when a stage exports files, checked before anything loads them.

Several artifacts (NVTabular's workflow.pkl, torch checkpoints) execute code when loaded, so a
loader must know the bytes are the ones this project wrote. Every loader goes through
`verified_path` or `verify_manifest`; a mismatch raises `ArtifactError` naming the file.
"""

from __future__ import annotations

import hashlib
import json
import platform
import time
from pathlib import Path

from .errors import UserError

MANIFEST_NAME = "manifest.json"


class ArtifactError(UserError, RuntimeError):
    """An artifact is missing, or its bytes differ from the manifest written at export."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _package_versions(names: tuple[str, ...]) -> dict[str, str]:
    from importlib import metadata

    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def write_manifest(
    directory: str | Path,
    extra: dict | None = None,
    packages: tuple[str, ...] = ("numpy", "pandas", "nvtabular", "merlin-core", "torch", "onnx", "onnxruntime", "faiss-cpu"),
) -> Path:
    """Hash every file under `directory` (except the manifest) and write manifest.json."""
    directory = Path(directory)
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST_NAME):
        rel = path.relative_to(directory).as_posix()
        files[rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    manifest = {
        "created_unix": int(time.time()),
        "python": platform.python_version(),
        "versions": _package_versions(packages),
        "files": files,
        **(extra or {}),
    }
    out = directory / MANIFEST_NAME
    out.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return out


def read_manifest(directory: str | Path) -> dict:
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        raise ArtifactError(f"{path}: no manifest; re-run the stage that writes {Path(directory).name}/")
    return json.loads(path.read_text())


def verify_manifest(directory: str | Path, only: list[str] | None = None) -> dict:
    """Check listed files (default: all) against the manifest; return the manifest."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    names = only if only is not None else list(manifest["files"])
    for rel in names:
        entry = manifest["files"].get(rel)
        if entry is None:
            raise ArtifactError(f"{directory / rel}: not listed in {directory / MANIFEST_NAME}")
        path = directory / rel
        if not path.is_file():
            raise ArtifactError(f"{path}: listed in the manifest but missing")
        actual = sha256_file(path)
        if actual != entry["sha256"]:
            raise ArtifactError(
                f"{path}: sha256 {actual[:12]}… does not match the manifest ({entry['sha256'][:12]}…); "
                "the file changed after export - refusing to load it"
            )
    return manifest


def verified_path(directory: str | Path, rel: str) -> Path:
    """Path of one artifact after checking its checksum."""
    verify_manifest(directory, [rel])
    return Path(directory) / rel


def verify_tree(directory: str | Path) -> list[str]:
    """Verify every file listed under a manifest and that no unlisted file was added. Returns names."""
    directory = Path(directory)
    manifest = verify_manifest(directory)
    present = {
        p.relative_to(directory).as_posix()
        for p in directory.rglob("*")
        if p.is_file() and p.name != MANIFEST_NAME and "__pycache__" not in p.parts
    }
    extra = sorted(present - set(manifest["files"]))
    if extra:
        raise ArtifactError(f"{directory}: files not in the manifest: {extra[:5]}")
    return sorted(manifest["files"])
