"""The validating HTTP front (serving/http_front.py): the requests that kill Triton 2.51's HTTP front end get
400 and the server stays up; malformed JSON, integer overflow, chunked and oversized bodies are refused."""

from __future__ import annotations

import http.client
import json
import urllib.error
import urllib.request

import numpy as np
import pytest

from client import RecommenderClient
from serving.http_front import Refused, check_infer_json

pytestmark = pytest.mark.integration
K = {"name": "k", "shape": [1, 1], "datatype": "INT32", "data": [5]}


def _uid(shape=(1, 1), data=(1,)):
    return {"name": "user_id", "shape": list(shape), "datatype": "INT64", "data": list(data)}


@pytest.mark.parametrize("doc,binary,message", [
    ({"inputs": [_uid((2**31, 1)), K]}, None, "holds more than"),
    ({"inputs": [_uid((2**63 - 1, 1)), K]}, None, "holds more than"),
    ({"inputs": [_uid((-1, 1)), K]}, None, "negative dimension"),
    ({"inputs": [_uid(), {**K, "data": [2**32 + 5]}]}, None, "outside INT32"),
    ({"inputs": [_uid(data=[2**64]), K]}, None, "outside INT64"),
    ({"inputs": [_uid(), {**K, "data": ["ten"]}]}, None, "must be integers"),
    ({"inputs": [_uid(), {**K, "data": [1.5]}]}, None, "must be integers"),
    ({"inputs": [_uid((1, 3)), K]}, None, "1 values for shape"),
    ({"inputs": [{**_uid(), "datatype": "INT128"}, K]}, None, "unknown datatype"),
    ({"inputs": {"user_id": 1}}, None, "must be a non-empty list"),
    ({"inputs": [_uid(), {**K, "data": None}]}, None, "'data' must be a list"),
    ({"inputs": [{**_uid(), "data": None, "parameters": {"binary_data_size": 8}}, K]}, 9, "9 bytes sent"),
    ({"inputs": [{**_uid(), "data": None, "parameters": {"binary_data_size": 4}}, K]}, 4, "does not match shape"),
    ({"a": [[[[[[]]]]]]}, None, "nested deeper than 4"),
])
def test_malformed_inference_json_is_refused_with_a_reason(doc, binary, message):
    with pytest.raises(Refused, match=message):
        check_infer_json(doc, binary, max_depth=4 if "a" in doc else 32, max_elements=1 << 16)


def test_valid_requests_pass():
    check_infer_json({"inputs": [_uid(), K]}, None, 32, 1 << 16)
    check_infer_json({"inputs": [{**_uid(), "data": None, "parameters": {"binary_data_size": 8}}, K]}, 8, 32, 1 << 16)


def _post(url: str, body: bytes, headers=None) -> tuple[int, str]:
    req = urllib.request.Request(f"http://{url}/v2/models/recommender/infer", data=body, method="POST",
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_the_requests_that_kill_triton_251_get_400_and_the_server_stays_up(triton, artifacts):
    user = int(np.load(artifacts / "serving" / "user_store.npz")["user_id"][0])
    killers = [json.dumps({"inputs": [_uid((2**31, 1), [user]), K]}).encode(),
               json.dumps({"inputs": [_uid((2**63 - 1, 1), [user]), K]}).encode(),
               b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"]
    for body in killers:
        status, text = _post(triton.http_url, body)
        assert status == 400 and json.loads(text)["error"], text
    status, text = _post(triton.http_url, json.dumps({"inputs": [_uid((1, 1), [user]), {**K, "data": [2**32 + 5]}]}).encode())
    assert status == 400 and "outside INT32" in text  # not wrapped silently to k = 5
    status, text = _post(triton.http_url, b"{not json")
    assert status == 400 and "not valid JSON" in text
    for protocol, url in (("http", triton.http_url), ("grpc", triton.grpc_url)):
        with RecommenderClient(url, protocol) as c:  # tritonclient's HTTP client sends binary tensors: accepted
            assert len(c.recommend(user, k=5).item_ids) == 5
    assert triton.process.poll() is None


def test_chunked_and_oversized_bodies_are_refused_before_they_are_read(triton):
    host, port = triton.http_url.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("POST", "/v2/models/recommender/infer", body=iter([b'{"inputs": []}']),
                 headers={"Content-Type": "application/json", "Transfer-Encoding": "chunked"}, encode_chunked=True)
    r = conn.getresponse()
    assert r.status == 400 and "chunked" in r.read().decode()
    conn.close()
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.putrequest("POST", "/v2/models/recommender/infer")
    conn.putheader("Content-Length", str(64 << 20))  # announced, never sent: refused from the header alone
    conn.endheaders()
    r = conn.getresponse()
    assert r.status == 413 and "limit" in r.read().decode()
    conn.close()


def test_the_front_forwards_the_admin_header_and_tritons_own_port_is_loopback_only(triton):
    req = urllib.request.Request(f"http://{triton.http_url}/v2/repository/index", data=b"{}", method="POST")
    with pytest.raises(urllib.error.HTTPError):  # restricted without the key
        urllib.request.urlopen(req, timeout=10)
    req.add_header("shoprec-admin-key", triton.admin_key)
    with urllib.request.urlopen(req, timeout=10) as r:
        assert {m["name"] for m in json.loads(r.read())} >= {"recommender", "pipeline"}
    assert triton.triton_http_url.startswith("127.0.0.1:") and triton.triton_http_url != triton.http_url
