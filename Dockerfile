# One image for both roles (aggregator and client). First version; the docker
# compose issue builds it offline in CI.
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

# Wheels prepared on the host (pip download/wheel into ./wheels) let the build run
# without network; with an empty ./wheels pip uses its configured index.
ARG PIP_EXTRA_ARGS=""
ENV PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 VIRTUAL_ENV=/opt/fedmae
ENV PATH=/opt/fedmae/bin:$PATH

RUN python3 -m venv /opt/fedmae
COPY wheels/ /wheels/
# torch first and alone: the biggest layer changes least often.
RUN pip install --no-cache-dir --find-links /wheels ${PIP_EXTRA_ARGS} torch==2.13.0
COPY pyproject.toml README.md /src/
COPY fedmae /src/fedmae
COPY aggregator_service /src/aggregator_service
COPY client_agent /src/client_agent
RUN pip install --no-cache-dir --find-links /wheels ${PIP_EXTRA_ARGS} /src && rm -rf /wheels

RUN useradd --create-home --uid 10001 fedmae && mkdir -p /state /certs /identities \
    && chown fedmae /state /certs /identities
USER fedmae
WORKDIR /home/fedmae
ENTRYPOINT ["fedmae"]
CMD ["--help"]
