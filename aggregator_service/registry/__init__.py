"""The aggregator's SQLite state: clients, admins, enrollment tokens, audit trail,
rounds.

``Registry`` is the one object the aggregator and the CLI open; each idea lives in
its own module and ``Registry`` puts them together over one connection
(``database``): ``clients``, ``enrollment`` (spending a token), ``tokens``,
``admins``, ``audit``, ``rounds`` (the feed ``fedmae watch`` replays), and
``schema`` (the tables and their migrations). Rows become records
(``records``) in one place.
"""

from __future__ import annotations

from aggregator_service.registry.admins import Admins
from aggregator_service.registry.audit import AuditTrail
from aggregator_service.registry.enrollment import Enrollment
from aggregator_service.registry.rounds import RoundsFeed


class Registry(Enrollment, Admins, AuditTrail, RoundsFeed):
    """Thread-safe access to the state database (one connection, one lock):
    ``Registry(state_dir / "fedmae.db")``."""
