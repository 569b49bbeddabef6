"""sha256 manifests: written when a stage exports files, checked before anything loads them.

Several artifacts (NVTabular's workflow.pkl, torch checkpoints) execute code when loaded, so a
loader must know the bytes are the ones this project wrote. Every loader goes through
`verified_path` or `verify_manifest`; a mismatch raises `ArtifactError` naming the file.

Signed manifests. A checksum alone does not stop someone who can write the bundle: they change a
file and re-hash the manifest. With a signing key, `write_manifest` adds an HMAC-SHA256 of the
manifest, and every reader that has the key refuses a manifest without a valid one. The key lives
outside the artifacts: `$SHOPREC_SIGNING_KEY` (the secret itself) or `$SHOPREC_SIGNING_KEY_FILE`
(a file holding it; a Kubernetes Secret). The manifest records only the key's id (the first 12 hex
of its sha256), so that a reader can say which key signed it. Without a key nothing is signed or
checked, as before. HMAC means whoever verifies could also sign: give the serving side the key
only where its bundle volume is read-only.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import platform
import time
from pathlib import Path

from .errors import UserError

MANIFEST_NAME = "manifest.json"
SIGNATURE_ALG = "hmac-sha256"


class ArtifactError(UserError, RuntimeError):
    """An artifact is missing, or its bytes differ from the manifest written at export."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def signing_key(env: dict | None = None) -> bytes | None:
    """The signing key from $SHOPREC_SIGNING_KEY or the file $SHOPREC_SIGNING_KEY_FILE names; None when neither is set."""
    env = os.environ if env is None else env
    if env.get("SHOPREC_SIGNING_KEY"):
        key = env["SHOPREC_SIGNING_KEY"].encode()
    elif env.get("SHOPREC_SIGNING_KEY_FILE"):
        path = env["SHOPREC_SIGNING_KEY_FILE"]
        try:
            key = Path(path).read_bytes().strip()
        except OSError as exc:
            raise ArtifactError(f"SHOPREC_SIGNING_KEY_FILE: cannot read {path} ({exc.strerror})") from None
    else:
        return None
    if len(key) < 16:
        raise ArtifactError("the signing key is shorter than 16 bytes; use e.g. `openssl rand -hex 32`")
    return key


def _key_id(key: bytes) -> str:
    return hashlib.sha256(key).hexdigest()[:12]


def _signature(manifest: dict, key: bytes) -> str:
    body = json.dumps({k: v for k, v in manifest.items() if k != "signature"}, sort_keys=True, separators=(",", ":"))
    return hmac.new(key, body.encode(), hashlib.sha256).hexdigest()


def check_signature(manifest: dict, path: Path, key: bytes | None) -> None:
    """With a key, the manifest must carry a valid signature made with it; ArtifactError naming the manifest."""
    if key is None:
        return
    sig = manifest.get("signature")
    if not isinstance(sig, dict) or sig.get("alg") != SIGNATURE_ALG:
        raise ArtifactError(f"{path}: not signed, but a signing key is set; re-run the stage with the key "
                            "(SHOPREC_SIGNING_KEY / SHOPREC_SIGNING_KEY_FILE) - refusing to load it")
    if sig.get("key_id") != _key_id(key):
        raise ArtifactError(f"{path}: signed with key {sig.get('key_id')}, not the configured key {_key_id(key)} - refusing to load it")
    if not hmac.compare_digest(str(sig.get("value", "")), _signature(manifest, key)):
        raise ArtifactError(f"{path}: the signature does not match; the manifest changed after it was signed - refusing to load it")


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
    key = signing_key()
    if key is not None:
        manifest["signature"] = {"alg": SIGNATURE_ALG, "key_id": _key_id(key), "value": _signature(manifest, key)}
    out = directory / MANIFEST_NAME
    out.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return out


def read_manifest(directory: str | Path) -> dict:
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        raise ArtifactError(f"{path}: no manifest; re-run the stage that writes {Path(directory).name}/")
    try:
        manifest = json.loads(path.read_text())
    except ValueError as exc:
        raise ArtifactError(f"{path}: not valid JSON ({exc})") from None
    check_signature(manifest, path, signing_key())
    return manifest


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
