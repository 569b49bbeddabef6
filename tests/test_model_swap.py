"""Numbered bundles and zero-downtime model updates (shoprec/bundles.py, serving/versions.py), against a real
tritonserver: export never writes a live bundle, deploy and rollback under load lose no request, a bundle that
is changed or does not start is refused while the old version keeps serving."""

from __future__ import annotations

import json
import shutil
import urllib.request

import pytest

from benchmarks import model_swap
from serving.versions import DeployError
from shoprec import bundles
from shoprec.manifest import ArtifactError, sha256_file, write_manifest


@pytest.fixture(scope="module")
def copy(artifacts, tmp_path_factory):
    """The session's artifacts copied (the shared server and other tests keep theirs)."""
    root = tmp_path_factory.mktemp("swap") / "artifacts"
    shutil.copytree(artifacts, root, symlinks=True, ignore=shutil.ignore_patterns("triton", "online", "results"))
    return root


def _hashes(folder):
    return {p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file()}


def test_export_adds_a_version_and_never_writes_the_served_one(copy, cfg):
    from training.export import export_bundle

    serving = copy / "serving"
    old = bundles.current_version(serving)
    assert old is not None and serving.is_symlink()
    before = _hashes(bundles.version_dir(serving, old))
    report = export_bundle(copy / "features", copy / "models", serving, cfg.replace("serve", keep_versions=2))
    new = report["version"]
    assert new == old + 1 and bundles.current_version(serving) == new
    assert _hashes(bundles.version_dir(serving, old)) == before  # the previous version is untouched
    assert json.loads((serving / "manifest.json").read_text())["bundle_version"] == new
    assert not list(bundles.bundles_root(serving).glob(".tmp-*"))  # written aside, renamed into place
    # keep_versions = 2: a third export drops the oldest (no live server serves it)
    third = export_bundle(copy / "features", copy / "models", serving, cfg.replace("serve", keep_versions=2))["version"]
    assert bundles.versions(serving) == [new, third]


def test_concurrent_exports_take_different_numbers_and_the_link_only_moves_forward(tmp_path):
    serving = tmp_path / "serving"
    v1, t1 = bundles.reserve(serving)
    v2, t2 = bundles.reserve(serving)  # while the first is still being written
    assert (v1, v2) == (1, 2)
    (t2 / "f").write_text("2")
    bundles.publish(t2, serving, v2)
    (t1 / "f").write_text("1")
    bundles.publish(t1, serving, v1)  # the older number finishes last: the link stays on the newer
    assert bundles.current_version(serving) == 2 and bundles.versions(serving) == [1, 2]
    elsewhere = tmp_path / "other" / "serving"  # a link into another artifacts folder serves from its versions
    elsewhere.parent.mkdir()
    elsewhere.symlink_to(bundles.bundles_root(serving).resolve() / "2")
    assert bundles.current_version(elsewhere) == 2 and bundles.version_dir(elsewhere, 1) == bundles.bundles_root(serving) / "1"
    stale = bundles.bundles_root(serving) / ".tmp-7-999999999"  # an export whose process died
    stale.mkdir()
    v3, t3 = bundles.reserve(serving)
    assert v3 == 3 and not stale.exists() and t3.is_dir()


def test_deploy_and_rollback_under_load_lose_no_request(copy, cfg):
    r = model_swap.run(copy, concurrency=4, swaps=1, settle_s=2.0, cfg=cfg)
    assert r["failed"] == 0, r["errors"]
    a, b = r["version_a"], r["version_b"]
    assert b == a + 1 and r["served_at_end"] == a
    assert {str(a), str(b)} <= set(r["answered_by_version"])  # responses name the version that served them
    assert [(s["kind"], s["from"], s["to"]) for s in r["switches"]] == [("deploy", a, b), ("rollback", b, a)]
    assert r["doctor_incidents"] == 0


def test_a_changed_or_broken_version_is_refused_and_the_old_one_keeps_serving(copy, cfg):
    from client import RecommenderClient
    from serving.launcher import TritonServer

    serving = copy / "serving"
    served = bundles.current_version(serving)
    root = bundles.bundles_root(serving)
    tampered, broken = max(bundles.versions(serving)) + 1, max(bundles.versions(serving)) + 2
    shutil.copytree(root / str(served), root / str(tampered))
    with open(root / str(tampered) / "item_embeddings.npy", "r+b") as f:  # changed after export
        f.seek(200)
        f.write(b"\x01\x02\x03")
    # a bundle whose manifest is in order but whose steps cannot start: contract.json lacks the dims
    shutil.copytree(root / str(served), root / str(broken))
    (root / str(broken) / "contract.json").write_text("{}\n")
    write_manifest(root / str(broken), extra={"stage": "export", "bundle_version": broken})
    user = int(model_swap.warm_users(copy)[0])
    server_cfg = cfg.replace("serve", online_store="none", canary_interval_s=0.0).serve
    with TritonServer.from_config(server_cfg, copy, ephemeral_ports=True) as server, RecommenderClient(server.grpc_url) as c:
        with pytest.raises(ArtifactError, match="item_embeddings.npy"):
            server.deploy(tampered)
        with pytest.raises(DeployError, match=f"version {broken} did not start"):
            server.deploy(broken)
        assert server.served_version() == served and c.recommend(user, k=5).version == served
        with pytest.raises(DeployError, match="nothing to roll back to"):
            server.deploy(rollback=True)
        with pytest.raises(bundles.BundleError, match="no bundle version 999"):
            server.deploy(999)
        # the version is in the metrics too: Triton labels each step's series with its model version
        with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5) as m:
            text = m.read().decode()
        assert f'nv_inference_request_success{{model="pipeline",version="{served}"}}' in text
    assert not (copy / "triton" / "servers" / f"{server.grpc_port}.json").exists()  # the record goes with the server
