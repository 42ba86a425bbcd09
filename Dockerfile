# One image for both roles: `fedmae serve` (aggregator) and `fedmae client`.
#   docker compose up            builds it from python:3.11-slim (needs a registry)
#   make compose-test            builds it offline from a local Debian base and
#                                wheels prepared on the host (make wheels)
# BASE_IMAGE takes a tag or a digest; pin the digest for a reproducible build, e.g.
#   BASE_IMAGE=python:3.11-slim@sha256:<digest of the image you reviewed>
# (`docker buildx imagetools inspect python:3.11-slim` or `docker inspect --format
# '{{index .RepoDigests 0}}' python:3.11-slim` shows it). A local image without a
# registry digest is pinned by its id: BASE_IMAGE=sha256:<id> (what make compose-test does).
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

# "--no-index" for an offline build from docker/wheels only. With a registry, point
# PIP_EXTRA_INDEX_URL at PyTorch's CPU wheel index, or torch==2.13.0 from the default
# index brings GBs of CUDA libraries.
ARG PIP_OFFLINE=""
ARG PIP_EXTRA_INDEX_URL=""
ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/fedmae \
    PATH=/opt/fedmae/bin:$PATH

# Fashion-MNIST from Debian's dataset-fashion-mnist (the local base has it already),
# a virtualenv, and an unprivileged user owning every directory a volume is mounted on
# (an empty named volume takes its owner from the image: the containers never run as root).
RUN if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then \
        apt-get update \
        && apt-get install -y --no-install-recommends dataset-fashion-mnist \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 -m venv /opt/fedmae \
    && useradd --create-home --uid 10001 fedmae \
    && mkdir -p /state /certs /signer /admin /bootstrap /identities \
    && chown fedmae:fedmae /state /certs /signer /admin /bootstrap /identities \
    && chmod 0700 /state /certs /signer /admin /identities

# Dependencies before sources: torch and friends are rebuilt only when pyproject changes.
COPY docker/wheels/ /wheels/
COPY pyproject.toml README.md /src/
RUN python3 -c 'import tomllib; print("\n".join(tomllib.load(open("/src/pyproject.toml", "rb"))["project"]["dependencies"]))' > /tmp/requirements.txt \
    && pip install ${PIP_OFFLINE} --find-links /wheels torch==2.13.0 -r /tmp/requirements.txt

COPY proto /src/proto
COPY fedmae /src/fedmae
COPY aggregator_service /src/aggregator_service
COPY client_agent /src/client_agent
# Compose glue: one token and one name per client replica (docker-compose.yml).
COPY docker/replica.py /usr/local/bin/fedmae-replica
RUN pip install ${PIP_OFFLINE} --find-links /wheels --no-deps /src \
    && rm -rf /wheels /src/build \
    && chmod 0755 /usr/local/bin/fedmae-replica

USER 10001:10001
WORKDIR /home/fedmae
EXPOSE 50051 50052
ENTRYPOINT ["fedmae"]
CMD ["--help"]
