"""Issue 11, findings 3 and 14, over real gRPC/TLS and a real SQLite registry.

#3: enrollment labels are bounded and printable, stored rows of any size are still
listed (a page at a time, escaped), reserved and invalid names get INVALID_ARGUMENT, a
taken name ALREADY_EXISTS, and a token bound to another name learns nothing.
#14: refused enrollments and authentication failures reach the audit table, at a
bounded rate.
"""

from __future__ import annotations

import json
import sqlite3

import grpc
import pytest
from federation_harness import TIMEOUT, make_server, open_admin

from fedmae.cli.main import build_parser
from fedmae.pki.ca import make_key_and_csr
from fedmae.pki.issue import init_certs, issue_client
from fedmae.pki.peer import certificate_info
from fedmae.transport._proto import admin_pb2 as apb
from fedmae.transport._proto import admin_pb2_grpc as apb_grpc
from fedmae.transport._proto import enrollment_pb2 as epb
from fedmae.transport._proto import enrollment_pb2_grpc as epb_grpc
from fedmae.transport._proto import federation_pb2 as pb
from fedmae.transport._proto import federation_pb2_grpc as pb_grpc
from fedmae.transport.credentials import channel_credentials


class Fed:
    """A running aggregator with its enrollment port, and the operator's admin stub."""

    def __init__(self, tmp_path):
        self.tmp = tmp_path
        self.certs = init_certs(tmp_path / "certs")
        # The per-address rate limit (tests/test_hardening_server.py) is off: these tests
        # send many refused enrollments in a row from 127.0.0.1 on purpose.
        self.server = make_server(
            tmp_path / "state", self.certs.dir, min_clients=2, rounds=1,
            server={"enroll_rate": 0}, min_participants=1,
        )  # fmt: skip
        self.port = self.server.start()
        self.addr = f"127.0.0.1:{self.port}"
        self.ca_pem = self.certs.ca_cert.read_bytes()
        self.admin_channel, self.admin = open_admin(self.port, self.certs.dir)
        self.enroll_channel = grpc.secure_channel(
            f"127.0.0.1:{self.server.enroll_port}", grpc.ssl_channel_credentials(self.ca_pem)
        )
        self.enrollment = epb_grpc.EnrollmentStub(self.enroll_channel)

    def token(self, name: str = "", uses: int = 1, labels: dict | None = None) -> str:
        req = apb.CreateTokenRequest(name=name, ttl_seconds=600, uses=uses, labels=labels or {})
        return self.admin.CreateToken(req, timeout=TIMEOUT).token

    def enroll(self, token: str, name: str = "", labels: dict | None = None) -> epb.EnrollResponse:
        """The raw RPC (no client-side checks), with a fresh key (its CSR names no one)."""
        _, csr = make_key_and_csr()
        return self.enrollment.Enroll(
            epb.EnrollRequest(token=token, csr_pem=csr, requested_name=name, labels=labels or {}),
            timeout=TIMEOUT,
        )

    def refused(self, token: str, name: str = "", labels: dict | None = None) -> grpc.RpcError:
        with pytest.raises(grpc.RpcError) as err:
            self.enroll(token, name, labels)
        return err.value

    def audit(self) -> list[apb.AuditEntry]:
        return list(self.admin.Audit(apb.AuditRequest(limit=1000), timeout=TIMEOUT).entries)

    def cli(self, capsys, *argv: str) -> str:
        """A `fedmae` admin command in this process; its stdout."""
        capsys.readouterr()
        args = build_parser().parse_args(
            [*argv, "--server", self.addr, "--identity", str(self.certs.dir / "admin")]
        )
        assert args.func(args) == 0
        return capsys.readouterr().out

    def close(self):
        self.enroll_channel.close()
        self.admin_channel.close()
        self.server.stop(grace=0)


@pytest.fixture
def fed(tmp_path):
    f = Fed(tmp_path)
    yield f
    f.close()


def _store_labels(f: Fed, labels_by_client: dict[str, dict[str, str]]) -> None:
    """Write labels straight into the state database, as rows from before the limits."""
    db = sqlite3.connect(f.server.registry.path, timeout=TIMEOUT)
    with db:
        db.executemany(
            "UPDATE clients SET labels = ? WHERE client_id = ?",
            [(json.dumps(labels), cid) for cid, labels in labels_by_client.items()],
        )
    db.close()


# ---------------------------------------------------------------- 3: labels


def test_f3_enrollment_labels_are_bounded_and_printable(fed):
    token = fed.token(uses=1)
    bad = {
        "too many labels: 17 (at most 16)": {f"k{i}": "v" for i in range(17)},
        "invalid label key": {"k" * 65: "v"},
        "invalid label key 'Site'": {"Site": "a"},
        "is 257 bytes (at most 256)": {"site": "é" * 128 + "x"},
        "non-printable character (\\x1b at position 0)": {"site": "\x1b[2J\x1b[31mowned"},
        "non-printable character (\\u202e": {"site": "abc\u202etxt.exe"},
        "non-printable character (\\n": {"site": "a\nb"},
    }
    for message, labels in bad.items():
        err = fed.refused(token, labels=labels)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (message, err.details())
        assert message in err.details()
        assert "\x1b" not in err.details()
    # The token and the request's labels count together.
    bound_labels = fed.token(uses=1, labels={f"t{i}": "x" for i in range(10)})
    err = fed.refused(bound_labels, labels={f"r{i}": "y" for i in range(7)})
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "(the token's and the request's together): 17" in err.details()
    # None of the refusals spent the token; the most the limits allow enrolls.
    most = {f"example.org/k{i:02d}-" + "x" * 48: "é" * 128 for i in range(16)}
    assert all(len(k) == 64 for k in most)
    resp = fed.enroll(token, name="site-1", labels=most)
    info = fed.admin.GetClient(apb.GetClientRequest(client_id=resp.client_id), timeout=TIMEOUT)
    assert dict(info.labels) == most and info.labels_omitted == 0


def test_f3_token_labels_and_names_are_checked_at_creation(fed):
    cases = [
        (apb.CreateTokenRequest(labels={f"k{i}": "v" for i in range(17)}), "too many"),
        (apb.CreateTokenRequest(labels={"bad key": "v"}), "invalid label key"),
        (apb.CreateTokenRequest(labels={"k": "\x1b]0;title\x07"}), "non-printable"),
        (apb.CreateTokenRequest(labels={"k": "v" * 257}), "257 bytes"),
        (apb.CreateTokenRequest(name="admin"), "reserved"),
        (apb.CreateTokenRequest(name="monitor-1"), "reserved"),
        (apb.CreateTokenRequest(name="no spaces"), "invalid client name"),
    ]
    for request, message in cases:
        with pytest.raises(grpc.RpcError) as err:
            fed.admin.CreateToken(request, timeout=TIMEOUT)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
        assert message in err.value.details()
    tokens = fed.admin.ListTokens(apb.ListTokensRequest(include_inactive=True), timeout=TIMEOUT)
    assert not tokens.tokens


def test_f3_clients_list_survives_huge_and_hostile_stored_labels(fed, capsys):
    # The reported case: two enrollments with 15,000 and 12,000 labels (7.2 MB in one
    # ListClients response) plus a label carrying terminal escapes, stored before the
    # limits existed.
    for name in ("big-1", "big-2", "escapes"):
        fed.enroll(fed.token(name=name), name=name)
    huge = {f"k{i:05d}": "v" * 250 for i in range(15_000)}
    _store_labels(fed, {
        "big-1": huge,
        "big-2": dict(list(huge.items())[:12_000]),
        "escapes": {"site": "\x1b[2J\x1b]0;pwned\x07lab", "note\x1b[31m": "\u202eexe.txt"},
    })  # fmt: skip
    resp = fed.admin.ListClients(apb.ListClientsRequest(), timeout=TIMEOUT)
    assert resp.ByteSize() < 64 << 10
    listed = {c.client_id: c for c in resp.clients}
    assert len(listed["big-1"].labels) == 16 and listed["big-1"].labels_omitted == 14_984
    assert listed["big-2"].labels_omitted == 11_984
    out = fed.cli(capsys, "clients", "list")
    assert "(+14984 more not shown)" in out and "(+11984 more not shown)" in out
    assert "\x1b" not in out and "\u202e" not in out and "\x07" not in out
    assert "site=\\x1b[2J\\x1b]0;pwned\\x07lab" in out
    assert "note\\x1b[31m=\\u202eexe.txt" in out
    shown = fed.cli(capsys, "clients", "show", "escapes")
    assert "\x1b" not in shown and "site=\\x1b[2J" in shown
    shown = fed.cli(capsys, "clients", "show", "big-1")
    assert "(+14984 more not shown)" in shown and len(shown) < 16 << 10


def test_f3_clients_are_listed_a_page_at_a_time(fed, capsys):
    db = sqlite3.connect(fed.server.registry.path, timeout=TIMEOUT)
    with db:
        db.executemany(
            "INSERT INTO clients (client_id, fingerprint, serial, created) VALUES (?, ?, ?, 0)",
            [(f"site-{i:03d}", "00" * 32, str(i)) for i in range(250)],
        )
    db.close()
    first = fed.admin.ListClients(apb.ListClientsRequest(), timeout=TIMEOUT)
    assert len(first.clients) == 100 and first.next_page_token  # the default page
    capped = fed.admin.ListClients(apb.ListClientsRequest(page_size=10_000), timeout=TIMEOUT)
    assert len(capped.clients) == 200  # the largest page
    seen, token = [], ""
    while True:
        page = fed.admin.ListClients(
            apb.ListClientsRequest(page_size=64, page_token=token), timeout=TIMEOUT
        )
        seen += [c.client_id for c in page.clients]
        token = page.next_page_token
        if not token:
            break
    assert seen == [f"site-{i:03d}" for i in range(250)]
    with pytest.raises(grpc.RpcError) as bad:
        fed.admin.ListClients(apb.ListClientsRequest(page_token="%%%"), timeout=TIMEOUT)
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "page_token" in bad.value.details()
    rows = fed.cli(capsys, "clients", "list").splitlines()
    assert len(rows) == 1 + 250  # the CLI walked every page
    assert rows[-1].startswith("site-249")


# ---------------------------------------------------------------- 3: names


def test_f3_invalid_and_reserved_names_are_invalid_argument(fed):
    token = fed.token(uses=2)
    for name in ("admin", "Admin", "ADMIN-2", "admin.ops", "health", "healthcheck",
                 "monitor", "monitor_1", "aggregator", "bad name", "-dash", "x" * 65):  # fmt: skip
        err = fed.refused(token, name=name)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, err.details())
        assert "reserved" in err.details() or "invalid client name" in err.details()
    # "administrative" is not a role name with a suffix: allowed.
    assert fed.enroll(token, name="administrative").client_id == "administrative"
    # A generated id is reserved for the server: an unbound token cannot pick one, taken
    # or free, and gets the same answer either way.
    generated = fed.enroll(token).client_id
    assert generated.startswith("client-") and len(generated) == 13
    other = fed.token(uses=1)
    taken, free = fed.refused(other, name=generated), fed.refused(other, name="client-000000")
    assert taken.code() == free.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert taken.details().replace(generated, "N") == free.details().replace("client-000000", "N")
    assert "reserved" in taken.details()
    # ... but the operator may bind a token to it (to renew that client).
    renewed = fed.enroll(fed.token(name=generated), name=generated)
    assert renewed.renewed and renewed.client_id == generated
    # The token whose requests were refused was not spent.
    assert fed.enroll(other, name="site-b").client_id == "site-b"


def test_f3_taken_name_is_already_exists_only_for_a_token_that_may_enroll_it(fed):
    fed.enroll(fed.token(name="site-a"), name="site-a")
    unbound = fed.token(uses=1)
    taken = fed.refused(unbound, name="site-a")
    assert taken.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "already enrolled" in taken.details()
    # A token bound to site-b learns nothing about other names: taken, free, reserved
    # or generated-looking, the answer is the same.
    bound = fed.token(name="site-b")
    answers = {}
    for name in ("site-a", "site-c", "client-abcdef"):
        err = fed.refused(bound, name=name)
        answers[name] = (err.code(), err.details().replace(repr(name), "'N'"))
    assert len(set(answers.values())) == 1, answers
    code, details = answers["site-a"]
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert "this token is bound to another name" in details
    assert fed.enroll(bound, name="site-b").client_id == "site-b"  # still unspent
    assert fed.enroll(unbound, name="site-d").client_id == "site-d"


# ---------------------------------------------------------------- 14: audit


def _refusals(entries, action: str) -> list[tuple[apb.AuditEntry, dict]]:
    return [(e, json.loads(e.details)) for e in entries if e.action == action]


def test_f14_refused_enrollments_are_audited_with_peer_and_reason(fed):
    secret = "fmt_00000000_" + "s3cr3t" * 7
    fed.refused(secret, name="site-x")
    spent = fed.token(uses=1)
    fed.enroll(spent, name="site-y")
    fed.refused(spent, name="site-z")
    fed.refused(fed.token(), name="evil\x1b[31m")
    rows = _refusals(fed.audit(), "enroll.refused")
    assert len(rows) == 3
    (unknown, d1), (used_up, d2), (bad_name, d3) = rows
    assert unknown.actor == "anonymous" and unknown.target == "site-x"
    assert d1["peer"].startswith(("ipv4:127.0.0.1:", "ipv6:")) and d1["code"] == "UNAUTHENTICATED"
    assert "unknown enrollment token" in d1["reason"] and d1["token_id"] is None
    spent_id = spent.split("_")[1]
    assert used_up.actor == f"token:{spent_id}" and d2["token_id"] == spent_id
    assert "used up" in d2["reason"] and used_up.target == "site-z"
    assert d3["code"] == "INVALID_ARGUMENT" and bad_name.target == "evil\\x1b[31m"
    # The secrets are nowhere in the state database, refused or not.
    db = sqlite3.connect(fed.server.registry.path, timeout=TIMEOUT)
    dump = "\n".join(db.iterdump())
    db.close()
    assert secret not in dump and "s3cr3t" not in dump
    assert spent.split("_", 2)[2] not in dump


def test_f14_authentication_failures_are_audited(fed):
    loose = issue_client(fed.certs.dir, "loose", fed.tmp / "loose")  # never registered
    with grpc.secure_channel(fed.addr, channel_credentials(loose)) as ch:
        with pytest.raises(grpc.RpcError) as unknown:
            list(pb_grpc.FederationStub(ch).FetchModel(pb.FetchModelRequest(), timeout=TIMEOUT))
        assert unknown.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as not_admin:
            apb_grpc.AdminStub(ch).ListClients(apb.ListClientsRequest(), timeout=TIMEOUT)
        assert not_admin.value.code() == grpc.StatusCode.PERMISSION_DENIED
    rows = _refusals(fed.audit(), "auth.refused")
    assert [(e.actor, e.target, d["code"]) for e, d in rows] == [
        ("cert:loose", "client", "UNAUTHENTICATED"),
        ("cert:loose", "admin", "PERMISSION_DENIED"),
    ]
    fingerprint = certificate_info(loose.cert.read_bytes()).fingerprint
    for _, d in rows:
        assert d["peer"].startswith(("ipv4:127.0.0.1:", "ipv6:"))
        assert d["fingerprint"] == fingerprint[:16]
    assert "not registered" in rows[0][1]["reason"] and "not an admin" in rows[1][1]["reason"]


def test_f14_a_flood_of_refusals_leaves_a_bounded_number_of_rows(fed):
    from aggregator_service.audit_throttle import AuditThrottle

    now = [1000.0]
    throttle = AuditThrottle(per_key=10, total=60, window_s=60.0, clock=lambda: now[0])
    fed.server.registry.refusal_throttle = throttle  # the same limits, on a clock we move
    before = len(fed.audit())
    for _ in range(150):
        fed.refused("fmt_00000000_" + "x" * 43)
    for _ in range(30):
        fed.refused(fed.token(), name="admin")
    entries = fed.audit()
    assert len(entries) - before == 10 + 10 + 30  # two keys at 10 rows each; token.create
    assert len(_refusals(entries, "enroll.refused")) == 20
    now[0] += 61  # the window closes: what it held back is counted, once per key
    suppressed = {
        d["code"]: d for _, d in _refusals(fed.audit(), "audit.suppressed")
    }  # fmt: skip
    assert suppressed["UNAUTHENTICATED"]["suppressed"] == 140
    assert suppressed["INVALID_ARGUMENT"]["suppressed"] == 20
    assert suppressed["UNAUTHENTICATED"]["peer_ip"] in ("127.0.0.1", "::1")
    assert len(_refusals(fed.audit(), "audit.suppressed")) == 2  # reported once
    fed.refused("fmt_00000000_" + "x" * 43)  # a new window admits again
    assert len(_refusals(fed.audit(), "enroll.refused")) == 21


def test_f14_audit_throttle_bounds_rows_from_many_peers():
    from aggregator_service.audit_throttle import OVERFLOW_KEY, AuditThrottle

    now = [0.0]
    throttle = AuditThrottle(per_key=10, total=60, window_s=60.0, max_keys=100,
                             clock=lambda: now[0])  # fmt: skip
    admitted = sum(
        throttle.admit((f"10.0.{i // 256}.{i % 256}", "enroll.refused", "UNAUTHENTICATED"))
        for _ in range(5)
        for i in range(2000)
    )
    assert admitted == 60
    assert throttle.due() == []  # nothing closed yet
    assert len(throttle._windows) <= 101  # memory stays bounded: 100 keys and the overflow
    now[0] += 60
    due = throttle.due()
    assert sum(s.count for s in due) == 5 * 2000 - 60
    assert [s.key for s in due] == [OVERFLOW_KEY]  # held back by the global limit
    assert throttle.due() == []
