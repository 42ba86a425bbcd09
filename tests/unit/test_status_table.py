"""The one table from domain error to gRPC status code: complete, and what the docs say."""

from __future__ import annotations

import re
from pathlib import Path

import grpc

from fedmae import errors
from fedmae.transport.status import DOMAIN_ERRORS, STATUS_CODES, error_for, status_code

DOCS = Path(__file__).resolve().parents[2] / "docs" / "errors.md"


def _subclasses(cls: type) -> set[type]:
    found = set()
    for sub in cls.__subclasses__():
        found |= {sub, *_subclasses(sub)}
    return found


def _documented() -> dict[str, str]:
    """The table under "Where the codes come from" in docs/errors.md: name -> code."""
    section = DOCS.read_text().split("## Where the codes come from", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `(\w+)`[^|]*\| `(\w+)` \|$", section, re.MULTILINE)
    return dict(rows)


def test_every_domain_error_has_its_own_entry():
    domain = {cls for cls in _subclasses(errors.FedmaeError) if cls.__module__ == errors.__name__}
    assert domain, "no domain errors found"
    missing = sorted(cls.__name__ for cls in domain - STATUS_CODES.keys())
    assert missing == [], f"add these to STATUS_CODES (and docs/errors.md): {missing}"
    assert errors.FedmaeError in STATUS_CODES


def test_the_docs_list_exactly_the_table():
    table = {cls.__name__: code.name for cls, code in STATUS_CODES.items()}
    assert _documented() == table


def test_every_documented_code_is_explained_in_the_main_table():
    head = DOCS.read_text().split("\n## ", 1)[0]
    explained = set(re.findall(r"^\| `([A-Z_]+)` \|", head, re.MULTILINE))
    assert {code.name for code in STATUS_CODES.values()} <= explained


def test_status_code_of_an_instance_follows_its_type():
    assert status_code(errors.VersionNotFound("v9")) == grpc.StatusCode.NOT_FOUND
    assert status_code(errors.ConnectionReplaced("x")) == grpc.StatusCode.ABORTED

    class Unlisted(errors.LimitExceeded):  # a subclass not in the table: its base's code
        pass

    assert status_code(Unlisted("x")) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert status_code(RuntimeError("a bug")) == grpc.StatusCode.INTERNAL


def test_the_core_errors_module_does_not_import_grpc():
    source = Path(errors.__file__).read_text()
    assert not re.search(r"^\s*(import grpc|from grpc)", source, re.MULTILINE)


def test_error_for_gives_back_the_code_it_stands_for():
    """A client's reverse of the table: each code's domain error keeps the code and the
    message, and is answered with that code again (CANCELLED and UNKNOWN share the
    error of UNAVAILABLE and INTERNAL); a code no domain error stands for gives
    FedmaeError itself."""
    aliases = {grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN}
    for code in grpc.StatusCode:
        error = error_for(code, "the message")
        assert isinstance(error, errors.FedmaeError) and str(error) == "the message"
        assert error.code() == code and error.details() == "the message"
        if code in DOMAIN_ERRORS:
            assert isinstance(error, DOMAIN_ERRORS[code])
            if code not in aliases:
                assert status_code(error) == code
        else:
            assert not isinstance(error, tuple(DOMAIN_ERRORS.values()))
    assert isinstance(error_for(grpc.StatusCode.PERMISSION_DENIED, "no"), errors.PermissionDenied)
