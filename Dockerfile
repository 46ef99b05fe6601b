# spendstream: one image for every role (collector, worker, exporter, topics, breaker, report).
# It installs the package exactly as the README does (`pip install .`); tests/unit/test_deploy.py
# builds a wheel from this image's build context and compares it with one built from the repository.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY schemas/ schemas/
COPY collector/ collector/
COPY pipeline/ pipeline/
RUN pip install . && rm -rf /src

RUN useradd --system --uid 10001 --home-dir /var/lib/spendstream --create-home spendstream
USER spendstream
WORKDIR /var/lib/spendstream

# OTLP gRPC, OTLP HTTP, Prometheus metrics
EXPOSE 4317 4318 9464
ENTRYPOINT ["spendstream"]
CMD ["--help"]
