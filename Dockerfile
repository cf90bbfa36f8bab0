# One image for the sandbox provider and the consumer daemon (see docker-compose.yml).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY consumer/ consumer/
COPY producer/ producer/
COPY sandbox/ sandbox/
RUN pip install '.[encryption]' \
    && rm -rf /src

# /data holds the SQLite dedupe store; a fresh named volume inherits this ownership.
RUN useradd --system --uid 10001 --user-group --home-dir /data --no-create-home idv \
    && mkdir -p /data \
    && chown idv:idv /data
USER idv
WORKDIR /data

EXPOSE 8080
CMD ["idv-sandbox", "--host", "0.0.0.0", "--port", "8080"]
