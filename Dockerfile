# cxr-drift service image: the API (`cxr-drift serve`) and the audit DB migrations (`alembic upgrade head`).
# Model pairs are not baked in: mount an artifacts folder at /artifacts (read-only), see docker-compose.yml.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    CXR_DRIFT_ARTIFACTS_DIR=/artifacts \
    CXR_DRIFT_MIGRATIONS_DIR=/app/migrations

WORKDIR /app

# CPU wheels of torch first (the largest layer, changes least), pinned like the Makefile.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.14.1 torchvision==0.29.1

COPY pyproject.toml README.md ./
# the layers, bottom to top (docs/DESIGN.md); tests/service/test_compose.py checks this list against pyproject
COPY core ./core
COPY training ./training
COPY engine ./engine
COPY service ./service
COPY cli ./cli
RUN pip install .

COPY alembic.ini ./
COPY migrations ./migrations

RUN useradd --system --uid 10001 --home-dir /app cxr && mkdir -p /artifacts && chown cxr /app
USER cxr

EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=3)"]
CMD ["cxr-drift", "serve", "--host", "0.0.0.0", "--port", "8000"]
