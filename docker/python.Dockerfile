# syntax=docker/dockerfile:1
# The project's one Python image: CDR loader, tick sink, HVS consumer, usage API, dbt and the
# connector registration. Build context: the repository root (see docker-compose.yml).
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    WTC_LOG_FORMAT=json \
    DBT_PROFILES_DIR=/app/dbt

WORKDIR /app

# Dependencies first (pinned by constraints.txt), so code edits do not reinstall them.
COPY pyproject.toml constraints.txt ./
RUN mkdir -p common ops ingestion hvs api connect macros_py \
    && for p in common ops ingestion hvs api connect macros_py; do touch $p/__init__.py; done \
    && pip install -c constraints.txt . \
    && pip uninstall -y wtc-analytics \
    && rm -rf common ops ingestion hvs api connect macros_py build ./*.egg-info

COPY common common
COPY contracts contracts
COPY ops ops
COPY ingestion ingestion
COPY hvs hvs
COPY api api
COPY macros_py macros_py
COPY monitoring monitoring
COPY connect connect
COPY dbt dbt

# Run from the source tree (PROJECT_ROOT = /app) as an unprivileged user; dbt writes
# target/ and logs/ into its project folder.
RUN useradd --system --uid 10001 --home-dir /app wtc \
    && mkdir -p dbt/target dbt/logs /srv/wtc/monitoring /srv/wtc/alerts \
    && chown -R wtc dbt /srv/wtc
ENV PYTHONPATH=/app
USER wtc

CMD ["python", "-m", "hvs"]
