"""``fedmae serve --secure-aggregation``: the flags, and the configurations refused at
start with an error that says what to change."""

from __future__ import annotations

import pytest

from aggregator_service.config import SecureAggregation, ServerConfig
from aggregator_service.secure_rounds import plan_params
from fedmae.cli.main import build_parser, main
from fedmae.cli.serve import _secure
from fedmae.errors import ConfigError


def _serve(*flags: str):
    return build_parser().parse_args(["serve", "--state-dir", "s", *flags])


def test_secure_aggregation_is_off_by_default_and_on_with_the_flag_or_1():
    assert _secure(_serve()) is None
    assert _secure(_serve("--secure-aggregation=0")) is None  # compose's default
    on = _secure(_serve("--secure-aggregation"))
    assert on == SecureAggregation()  # defaults: auto ring, clip 1, majority threshold
    assert _secure(_serve("--secure-aggregation=1")) == on
    tuned = _secure(_serve("--secure-aggregation", "--secagg-threshold", "5",
                           "--secagg-neighbours", "8", "--secagg-clip", "0.5",
                           "--secagg-ring-bits", "64", "--secagg-max-sites", "40",
                           "--secagg-phase-timeout", "30"))  # fmt: skip
    assert tuned == SecureAggregation(threshold=5, neighbours=8, clip=0.5, ring_bits=64,
                                      max_sites=40, phase_timeout_s=30.0)  # fmt: skip


def test_the_ring_is_planned_at_start_and_an_overflowing_one_is_refused():
    params = plan_params(SecureAggregation(), weight_cap=10_000)
    assert (params.ring_bits, params.frac_bits) == (32, 11)
    big = SecureAggregation(max_sites=5_000, clip=8.0, ring_bits=32)
    with pytest.raises(ConfigError, match="32-bit ring can overflow.*use 64 ring bits"):
        plan_params(big, weight_cap=10_000)
    assert plan_params(SecureAggregation(max_sites=5_000, clip=8.0), 10_000).ring_bits == 64


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"threshold": 1}, "threshold of 1 lets any one share holder"),
        ({"neighbours": 1}, "use 0 \\(default\\) or >= 2"),
        ({"clip": 0.0}, "--secagg-clip > 0"),
    ],
)
def test_unsafe_or_impossible_settings_are_refused(settings, message):
    with pytest.raises(ConfigError, match=message):
        SecureAggregation(**settings)


def test_secure_aggregation_refuses_insecure_mode_and_rules_that_need_every_update(tmp_path):
    with pytest.raises(ConfigError, match="needs mTLS identities"):
        ServerConfig(state_dir=tmp_path, insecure=True, secure=SecureAggregation())


def test_serve_exits_2_with_the_ring_error_before_it_starts(tmp_path, capsys):
    code = main(["serve", "--state-dir", str(tmp_path / "s"), "--secure-aggregation",
                 "--secagg-ring-bits", "32", "--secagg-max-sites", "5000",
                 "--secagg-clip", "8"])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert "32-bit ring can overflow" in err and "5000 sites" in err
    assert not (tmp_path / "s").exists()  # refused before anything was created
