# exegpt: one image for every process (router, worker, stage, scheduler, profiler).
#
#   docker build -t exegpt:cpu .
#   docker run --rm -p 8000:8000 exegpt:cpu up --host 0.0.0.0       # everything, one machine
#   docker run --rm exegpt:cpu worker --help                         # any `exegpt` command
#
# CPU image (the default): torch comes from the CPU wheel index first, as scripts/setup.sh
# pins it, so pip never pulls the multi-GB CUDA build.
#
# CUDA variant: the same file with a CUDA runtime base and the matching wheel index, e.g.
#
#   docker build -t exegpt:cu128 \
#     --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
#
# (the base must provide python3 >= 3.11 and venv: on the nvidia/cuda images install
# python3 and python3-venv with apt first, as the apt step below does when it is missing).
# Run it with `--gpus all` (Docker) or a `nvidia.com/gpu` resource limit (Kubernetes) and
# `--device cuda` on the worker or stage.
#
# Configuration is by flags and environment only: nothing is baked in. The API key comes
# from EXEGPT_API_KEY (a Kubernetes Secret in deploy/k8s/); models from a mounted directory
# or the Hugging Face cache at HF_HUB_CACHE (default /models/hub), never downloaded.
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_SPEC=torch==2.13.0

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_CACHE=/models/hub \
    HF_HUB_OFFLINE=1 \
    VIRTUAL_ENV=/opt/exegpt \
    PATH=/opt/exegpt/bin:${PATH}

# gcc: the native bf16 decode kernel is compiled on first use (exegpt/models/paged_decode.py);
# without a compiler the worker logs a warning and keeps the slower torch path.
RUN if ! command -v gcc >/dev/null; then \
        apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && if ! command -v python3 >/dev/null || ! python3 -m venv --help >/dev/null 2>&1; then \
        apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 -m venv /opt/exegpt \
    && pip install --index-url "${TORCH_INDEX_URL}" "${TORCH_SPEC}"

WORKDIR /src
COPY pyproject.toml README.md ./
COPY exegpt ./exegpt
COPY services ./services
COPY protos ./protos
RUN pip install . && python -c "import exegpt.commands.cli, services.worker.server"

RUN useradd --create-home --uid 10001 exegpt && mkdir -p /models /profiles \
    && chown exegpt /models /profiles
USER 10001
WORKDIR /home/exegpt
ENTRYPOINT ["exegpt"]
CMD ["--help"]
