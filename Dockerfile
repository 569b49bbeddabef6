# syntax=docker/dockerfile:1
# GPU serving image: NGC Triton, the python-backend steps of this project, and TensorRT engines
# built or reused at start (docker/entrypoint.py). See docker/README.md.
#
# Base image: nvcr.io/nvidia/tritonserver:25.10-py3 (Triton 2.62.0). It replaces 24.10 (2.51),
# whose HTTP front end crashed on a ~100-byte request that declared a huge shape. What was
# checked without pulling the image:
#   - The Triton 25.10 release notes list the tag. It is built on CUDA 13.0.2, so the host needs
#     a recent driver (R575 or newer; R535/R545 on data-center GPUs) and compute capability 7.5+.
#   - build.py on the r25.10 branch of triton-inference-server/server creates the runtime image:
#     Ubuntu 24.04 with Python 3.12 and pip, PIP_BREAK_SYSTEM_PACKAGES=1, curl, and the user
#     triton-server with uid/gid 1000.
# The TensorRT version is not written down here. The entrypoint reads it from trtexec and puts
# it into the engine cache key, so moving TRITON_IMAGE to a newer release rebuilds the engines.
ARG TRITON_IMAGE=nvcr.io/nvidia/tritonserver:25.10-py3

# ---- builder: every wheel the image needs, in one folder; nothing of this stage ships -----------
FROM ${TRITON_IMAGE} AS builder
WORKDIR /src
COPY docker/requirements-serving.txt /wheels/
RUN python3 -m pip wheel --no-cache-dir --only-binary=:all: --wheel-dir /wheels \
        -r /wheels/requirements-serving.txt
# pyproject's readme is left out: it only fills the wheel's long description (setuptools warns)
COPY pyproject.toml ./
COPY shoprec/ shoprec/
COPY runtime/ runtime/
COPY serving/ serving/
COPY client/ client/
RUN python3 -m pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# ---- runtime ------------------------------------------------------------------------------------
FROM ${TRITON_IMAGE}
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    SHOPREC_ARTIFACTS=/models/artifacts \
    SHOPREC_ENGINE_CACHE=/engines \
    SHOPREC_MODEL_PROFILE=/opt/shoprec/model_repository/gpu \
    SHOPREC_RUNTIME_REPO=/tmp/shoprec/model_repository \
    SHOPREC_CONFIG=/opt/shoprec/configs/default.toml
# The packages go into the system site-packages of the image's Python. The python backend's stub
# embeds that interpreter in isolated mode, which ignores PYTHONPATH (we saw this with the 2.51
# stub: sys.flags.isolated=1), so a side folder on PYTHONPATH would hide `serving` from model.py.
# The wheels are bind-mounted from the builder and never stored in a layer. --no-deps on the
# project keeps the offline stack out of the image, and training/ is not copied at all: serving
# needs only shoprec/ (core), runtime/ and serving/ (NumPy, ORT, FAISS).
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    python3 -m pip install --no-cache-dir --no-index --find-links /wheels -r /wheels/requirements-serving.txt \
    && python3 -m pip install --no-cache-dir --no-index --no-deps /wheels/shoprec-*.whl
COPY model_repository/gpu/ /opt/shoprec/model_repository/gpu/
COPY docker/entrypoint.py /opt/shoprec/docker/entrypoint.py
COPY configs/default.toml /opt/shoprec/configs/default.toml
# Fail the build here, not the first pod on a GPU node: trtexec and tritonserver must be present
# with trtexec's libraries resolving, and the steps must import. FAISS-GPU imports without a GPU.
RUN python3 /opt/shoprec/docker/entrypoint.py --check-tools \
    && python3 -c "import faiss, numpy, onnxruntime, runtime.steps, runtime.pipeline, serving.command" \
    && mkdir -p /engines /models/artifacts \
    && chown 1000:1000 /engines /models/artifacts
# triton-server (uid 1000) comes with the base image. A numeric USER lets Kubernetes check
# runAsNonRoot.
USER 1000:1000
VOLUME ["/engines", "/models/artifacts"]
# gRPC is the public protocol and 8002 serves Prometheus metrics. HTTP :8000 listens on the
# loopback only, for the health check below (set SHOPREC_HTTP_PUBLIC=1 to open it).
EXPOSE 8001 8002
# start-period covers the first start, when trtexec builds both engines (minutes). Docker reads
# exit code 1 as unhealthy and reserves the others, so curl's own codes are mapped to 1.
HEALTHCHECK --interval=15s --timeout=5s --start-period=15m --retries=3 \
    CMD ["sh", "-c", "curl -fsS -o /dev/null http://127.0.0.1:8000/v2/health/ready || exit 1"]
ENTRYPOINT ["python3", "/opt/shoprec/docker/entrypoint.py"]
