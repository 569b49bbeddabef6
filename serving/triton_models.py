"""Triton python-backend models: ONE generic adapter from Triton requests to the step classes.

The model's name (its folder) picks its declaration in the step graph (shoprec/contract.py); the
declaration names the class in runtime/steps.py that computes it (in the cpu profile, adjacent
steps fused into one model: `Fused`). `execute` checks requests one by one (a bad one gets its
own error response), runs the good ones as one batch, checks the outputs against the declaration
and splits them back. A step whose output length differs per request (`per_request`, top-k) gets
the batch with its request boundaries (`run_requests`) and answers each request as if it had run
alone. An unexpected failure in the batched compute fails only the requests of that batch, with
the error message; the server stays up. The device comes from Triton (`model_instance_kind`),
never from code.
"""

from __future__ import annotations

import json
import threading

import numpy as np
import triton_python_backend_utils as pb_utils

from runtime.steps import Bundle, RequestError, bundle_dir, check_inputs, check_outputs, load_step, merge_requests, serve_config
from shoprec.contract import profile_step
from shoprec.device import triton_device


PUBLISH_EVERY_S = 0.5


def _input(request, name, required=True):
    t = pb_utils.get_input_tensor_by_name(request, name)
    if t is None:
        if required:
            raise RequestError(f"missing input {name!r}")
        return None
    return t.as_numpy()


def _error(message: str, bad_request: bool = True):
    """A per-request error. A bad request is INVALID_ARG (gRPC INVALID_ARGUMENT, HTTP 400), so clients can tell
    their mistake from the server's (INTERNAL, HTTP 500)."""
    code = pb_utils.TritonError.INVALID_ARG if bad_request else pb_utils.TritonError.INTERNAL
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))


class StepModel:
    """Every step of the ensemble: the generated model.py of each step imports this class."""

    def initialize(self, args):
        self.config = json.loads(args["model_config"])
        profile = self.config["parameters"]["shoprec_profile"]["string_value"]
        self.step = profile_step(profile, self.config["name"])
        device, device_id = triton_device(args)
        # the bundle of this model version (serving/versions.py): every step of one request runs one export
        self.impl = load_step(self.step, Bundle(bundle_dir(int(args["model_version"]))), serve_config(), device, device_id)
        self.optional = [t.name for t in self.step.inputs if t.optional]
        # the step's counters on Triton's metrics port, beside Triton's own (one family per name, owned by one step)
        self.families = {name: pb_utils.MetricFamily(name=name, description=text, kind=pb_utils.MetricFamily.COUNTER)
                         for name, text in self.impl.metrics().items()}
        self.families.update({name: pb_utils.MetricFamily(name=name, description=text, kind=pb_utils.MetricFamily.GAUGE)
                              for name, text in self.impl.gauges().items()})
        self.series: dict = {}
        # every increment is a round trip to the server process (~0.1 ms): counts are summed in the step and
        # published twice a second by a thread, off the request path
        self._stop = threading.Event()
        self._publisher = threading.Thread(target=self._publish_loop, name="shoprec-metrics", daemon=True)
        if self.families:
            self._publisher.start()

    def _publish_loop(self) -> None:
        while not self._stop.wait(PUBLISH_EVERY_S):
            self.publish()

    def finalize(self) -> None:
        self._stop.set()
        if self._publisher.is_alive():
            self._publisher.join(timeout=2)
        self.publish()

    def publish(self) -> None:
        for (name, labels), value in self.impl.take_counts().items():
            if value:
                self._series(name, labels).increment(value)
        for (name, labels), value in self.impl.gauge_values().items():
            self._series(name, labels).set(value)

    def _series(self, name: str, labels: tuple):
        key = (name, labels)
        if key not in self.series:
            self.series[key] = self.families[name].Metric(labels=dict(labels))
        return self.series[key]

    def parse(self, request) -> dict:
        t = {t.name: _input(request, t.name, not t.optional) for t in self.step.inputs}
        check_inputs(t, self.impl.sizes)  # internal steps can be called directly: their inputs are checked too
        return self.impl.check(t)

    def execute(self, requests):
        # optional inputs are present in every request of a batch or in none: group requests by which they carry
        keys = [tuple(pb_utils.get_input_tensor_by_name(r, n) is not None for n in self.optional) for r in requests]
        responses = [None] * len(requests)
        for key in set(keys):
            idx = [i for i, k in enumerate(keys) if k == key]
            for i, resp in zip(idx, self._execute([requests[i] for i in idx])):
                responses[i] = resp
        return responses

    def _execute(self, requests):
        responses = [None] * len(requests)
        parsed, good = [], []
        for i, request in enumerate(requests):
            try:
                parsed.append(self.parse(request))
                good.append(i)
            except RequestError as exc:
                responses[i] = _error(str(exc))
        if not good:
            return responses
        counts = [len(p[self.step.inputs[0].name]) for p in parsed]
        batch = merge_requests(self.step, parsed)
        try:
            with self.impl.batch_counts():  # a batch that fails is not counted: its requests are run again alone
                if self.step.per_request:
                    per_request = self.impl.run_requests(batch, counts)
                else:
                    outputs = self.impl.run(batch)
                    offsets = np.cumsum([0, *counts])
                    per_request = [tuple(out[a:b] for out in outputs) for a, b in zip(offsets[:-1], offsets[1:])]
                for outputs, n in zip(per_request, counts):
                    check_outputs(self.step, outputs, self.impl.sizes, n)
            error, bad_request = None, False
        except RequestError as exc:
            error, bad_request = str(exc), True
        except Exception as exc:  # noqa: BLE001 - reported per request; the model keeps serving
            # one request may have broken the batch: each runs alone, so only it fails. E.g. a direct caller's
            # embedding code past a vocabulary makes ONNX Runtime's Gather fail in a ranker with its deep part on
            # (not covered by a test: the test bundle's ranker has the deep part off and ignores the codes)
            if len(good) > 1:
                for i, resp in zip(good, (self._execute([requests[i]])[0] for i in good)):
                    responses[i] = resp
                return responses
            error, bad_request = f"{self.step.name} failed: {type(exc).__name__}: {exc}", False
        for j, i in enumerate(good):
            if error is not None:
                responses[i] = _error(error, bad_request)
                continue
            tensors = [pb_utils.Tensor(t.name, np.ascontiguousarray(out)) for t, out in zip(self.step.outputs, per_request[j])]
            responses[i] = pb_utils.InferenceResponse(output_tensors=tensors)
        return responses
