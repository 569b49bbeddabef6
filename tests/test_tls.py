"""gRPC over TLS, and mutual TLS, on a real tritonserver, with self-signed certificates made by openssl."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from client import RecommenderClient
from serving.command import check_tls_files
from serving.launcher import LaunchError, TritonServer

pytestmark = pytest.mark.integration


def _openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _signed(name: str, ca: str, cwd, san: str | None = None) -> None:
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}",
             cwd=cwd)
    ext = cwd / f"{name}.ext"
    ext.write_text(f"subjectAltName={san}\n" if san else "basicConstraints=CA:FALSE\n")
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-CAcreateserial",
             "-out", f"{name}.pem", "-days", "2", "-extfile", ext.name, cwd=cwd)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA, a server certificate for 127.0.0.1 and a client certificate it signed, and a second, unrelated CA."""
    d = tmp_path_factory.mktemp("pki")
    for ca in ("ca", "other_ca"):
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{ca}.key", "-out", f"{ca}.pem", "-days", "2",
                 "-subj", f"/CN={ca}", cwd=d)
    _signed("server", "ca", d, san="IP:127.0.0.1")
    _signed("client", "ca", d)
    return d


def _user(artifacts) -> int:
    return int(np.load(artifacts / "serving" / "user_store.npz")["user_id"][0])


def _server(artifacts, cfg, pki, mutual: bool, front: str = "false"):
    serve = cfg.replace("serve", online_store="none", canary_interval_s=0.0, grpc_front=front,
                        grpc_tls_cert=str(pki / "server.pem"),
                        grpc_tls_key=str(pki / "server.key"),
                        grpc_tls_client_ca=str(pki / "ca.pem") if mutual else "").serve
    return TritonServer.from_config(serve, artifacts, ephemeral_ports=True)


def test_grpc_over_tls_answers_only_clients_that_trust_its_certificate(artifacts, cfg, pki):
    user = _user(artifacts)
    with _server(artifacts, cfg, pki, mutual=False) as server:
        with RecommenderClient(server.grpc_url, tls_ca=str(pki / "ca.pem")) as c:
            assert len(c.recommend(user, k=5).item_ids) == 5
        for kwargs in ({}, {"tls_ca": str(pki / "other_ca.pem")}):  # plaintext; a CA that did not sign it
            with RecommenderClient(server.grpc_url, **kwargs) as c, pytest.raises(InferenceServerException):
                c.recommend(user, k=5)


@pytest.mark.parametrize("front", ["false", "true"])  # TLS ended by Triton, or by the size-capping gRPC front
def test_mutual_tls_refuses_a_client_without_a_certificate(artifacts, cfg, pki, front):
    user = _user(artifacts)
    with _server(artifacts, cfg, pki, mutual=True, front=front) as server:
        assert server.grpc_front == (front == "true")
        with RecommenderClient(server.grpc_url, tls_ca=str(pki / "ca.pem"), tls_cert=str(pki / "client.pem"),
                               tls_key=str(pki / "client.key")) as c:
            assert len(c.recommend(user, k=5).item_ids) == 5
        with RecommenderClient(server.grpc_url, tls_ca=str(pki / "ca.pem")) as c, pytest.raises(InferenceServerException):
            c.recommend(user, k=5)


def test_tls_settings_are_checked_before_the_server_starts(artifacts, cfg, pki, tmp_path):
    (tmp_path / "not.pem").write_text("hello\n")
    cases = [
        ({"grpc_tls_cert": str(pki / "server.pem")}, "needs both serve.grpc_tls_cert and serve.grpc_tls_key"),
        ({"grpc_tls_cert": str(pki / "server.pem"), "grpc_tls_key": str(tmp_path / "missing.key")},
         "serve.grpc_tls_key: cannot read"),
        ({"grpc_tls_cert": str(tmp_path / "not.pem"), "grpc_tls_key": str(pki / "server.key")},
         "serve.grpc_tls_cert: .*not.pem is not a PEM file"),
        ({"grpc_tls_client_ca": str(pki / "ca.pem")}, "grpc_tls_client_ca needs serve.grpc_tls_cert"),
    ]
    for changes, message in cases:
        with pytest.raises(LaunchError, match=message):
            TritonServer.from_config(cfg.replace("serve", **changes).serve, artifacts, ephemeral_ports=True)
    assert check_tls_files("", "") is None
