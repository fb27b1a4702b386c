# afina serving an exported model (`afina export`) behind its OpenAI-compatible API.
#
#   docker build -t afina .
#   docker run --rm -v afina-data:/data --entrypoint afina afina keys create ops     # once: an API key
#   docker run -p 8000:8000 -v "$PWD/tickets-v3-safetensors:/model:ro" -v afina-data:/data afina
#   docker run -p 8000:8000 -v "$PWD/tickets-v3-gguf-q8_0:/model:ro" -v afina-data:/data afina \
#     /model/tickets-v3-gguf-q8_0.gguf --engine llama.cpp
#
# Two stages: the first has the compilers that llama.cpp (llama-cpp-python) is built with; the
# second holds only the finished virtual environment and Python, runs as an unprivileged user, and
# reads the model from a read-only mount. /data is the afina home (AFINA_HOME): the store with the
# API keys, and the cache a GGUF is converted into for transformers. Any OpenAI client then works
# with base_url http://HOST:8000/v1 and a key from `afina keys create`.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential cmake \
 && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/afina
ENV PATH=/opt/afina/bin:$PATH PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# The CPU build of torch, pinned as in the Makefile: an unpinned torch pulls several GB of CUDA packages.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install .
# llama.cpp for GGUF models, built for AVX2 rather than for the build machine's exact CPU, so the
# image runs on any x86-64 server of the last decade (a native build can crash on CPUs with AMX).
RUN CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX512=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_TILE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON" \
    pip install "llama-cpp-python>=0.3.36,<0.4"

FROM ${PYTHON_IMAGE}
# libgomp1: the OpenMP runtime llama.cpp's library links against (a runtime library, not a compiler)
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgomp1 \
 && rm -rf /var/lib/apt/lists/* \
 && for tool in cc gcc c++ g++ clang make cmake; do \
      if command -v "$tool" >/dev/null; then echo "$tool must not be in the final image" >&2; exit 1; fi; done \
 && useradd --system --uid 10001 --user-group --home-dir /data --create-home --shell /usr/sbin/nologin afina
COPY --from=build /opt/afina /opt/afina
ENV PATH=/opt/afina/bin:$PATH AFINA_HOME=/data PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
USER afina:afina
WORKDIR /data
VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
ENTRYPOINT ["afina", "serve", "--host", "0.0.0.0", "--port", "8000"]
CMD ["/model"]
