"""Fixtures shared by the in-process integration tests (real gRPC and mTLS on 127.0.0.1)."""

from __future__ import annotations

import pytest

# The harness loads grpc, torch and the aggregator (4-5 s of CPU): imported in the
# fixtures, so that the pytest-xdist controller, which loads this file but runs no
# test, does not pay for it.


@pytest.fixture
def cluster(tmp_path):
    """Factory: a started aggregator plus subscribed scripted clients; all torn down.

    ``cluster(names, rounds=1, min_clients=None, **policy)`` -> (server, port, clients,
    identities); ``policy`` holds RoundPolicy fields, min_clients defaults to one per name.
    """
    from federation_harness import Federations

    with Federations(tmp_path) as federations:

        def start(names: list[str], rounds: int = 1, min_clients: int | None = None, **policy):
            fed = federations.launch(names, rounds=rounds, min_clients=min_clients, policy=policy)
            return fed.server, fed.port, fed.clients, fed.ids

        yield start


@pytest.fixture
def fed(tmp_path):
    """Factory: a running aggregator with no pre-registered clients, and the operator's
    admin stub (``EnrollmentFederation``); all closed at teardown."""
    from federation_harness import EnrollmentFederation

    made = []

    def start(**kwargs) -> EnrollmentFederation:
        made.append(EnrollmentFederation(tmp_path, **kwargs))
        return made[-1]

    yield start
    for f in made:
        f.close()
