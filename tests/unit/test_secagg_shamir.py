"""Shamir t-of-n sharing of 32-byte secrets over GF(2^521 - 1)."""

from __future__ import annotations

import itertools
import os

import pytest

from fedmae.secagg import shamir


@pytest.mark.parametrize(("threshold", "count"), [(1, 1), (1, 4), (3, 5), (5, 5), (4, 7)])
def test_any_threshold_shares_reconstruct(threshold, count):
    secret = os.urandom(32)
    shares = shamir.split(secret, threshold, count)
    assert [share.x for share in shares] == list(range(1, count + 1))
    for subset in itertools.combinations(shares, threshold):
        assert shamir.reconstruct(list(subset), threshold) == secret
        assert shamir.reconstruct(list(reversed(subset)), threshold) == secret


def test_more_than_threshold_shares_reconstruct():
    secret = os.urandom(32)
    shares = shamir.split(secret, 3, 6)
    assert shamir.reconstruct(shares, 3) == secret


def test_secrets_at_the_edges_of_the_range():
    for secret in (bytes(32), b"\xff" * 32, b"\x00" * 31 + b"\x01"):
        assert shamir.reconstruct(shamir.split(secret, 2, 3)[1:], 2) == secret


def test_one_share_too_few_is_refused_and_does_not_give_the_secret():
    secret = os.urandom(32)
    shares = shamir.split(secret, 4, 6)
    with pytest.raises(ValueError, match="need 4 shares"):
        shamir.reconstruct(shares[:3], 4)
    # Interpolating the t-1 points anyway gives some other value, not the secret.
    for subset in itertools.combinations(shares, 3):
        value = shamir.interpolate_at_zero(list(subset))
        assert value != int.from_bytes(secret, "big")


def test_a_share_below_the_threshold_is_fresh_randomness():
    # Perfect secrecy in miniature: with t = 2, one share's y is uniform whatever the
    # secret, so the same secret shared twice gives different first shares.
    secret = os.urandom(32)
    first = {shamir.split(secret, 2, 3)[0].y for _ in range(20)}
    assert len(first) == 20


def test_duplicate_shares_are_refused():
    shares = shamir.split(os.urandom(32), 3, 5)
    with pytest.raises(ValueError, match="duplicate"):
        shamir.reconstruct([shares[0], shares[1], shares[1]], 3)
    with pytest.raises(ValueError, match="duplicate"):
        shamir.reconstruct([shares[0], shamir.Share(shares[0].x, 5), shares[2]], 3)


def test_shares_from_two_sharings_do_not_give_a_secret():
    first = shamir.split(os.urandom(32), 2, 3)
    second = shamir.split(os.urandom(32), 2, 3)
    # A mixed pair interpolates to an unrelated field element: almost surely >= 2^256.
    with pytest.raises(ValueError, match="mixed or corrupt"):
        shamir.reconstruct([first[0], second[1]], 2)


def test_share_bytes_round_trip_and_validation():
    shares = shamir.split(os.urandom(32), 2, 3)
    for share in shares:
        raw = share.to_bytes()
        assert len(raw) == shamir.SHARE_BYTES
        assert shamir.Share.from_bytes(raw) == share
    with pytest.raises(ValueError, match="68 bytes"):
        shamir.Share.from_bytes(shares[0].to_bytes()[:-1])
    with pytest.raises(ValueError, match="x is 1..n"):
        shamir.Share.from_bytes(bytes(2) + shares[0].to_bytes()[2:])
    with pytest.raises(ValueError, match="below the field"):
        shamir.Share.from_bytes(b"\x00\x01" + shamir.PRIME.to_bytes(66, "big"))


@pytest.mark.parametrize(
    ("secret", "threshold", "count", "message"),
    [
        (b"short", 2, 3, "32 bytes"),
        (bytes(32), 0, 3, "threshold"),
        (bytes(32), 4, 3, "threshold"),
        (bytes(32), 2, 70000, "65536"),
    ],
)
def test_bad_sharing_parameters_are_refused(secret, threshold, count, message):
    with pytest.raises(ValueError, match=message):
        shamir.split(secret, threshold, count)


def test_the_field_prime_is_the_mersenne_prime_m521():
    # Fermat checks for a few bases: a typo in the constant would fail them.
    assert shamir.PRIME == 2**521 - 1
    for base in (2, 3, 5, 7, 11):
        assert pow(base, shamir.PRIME - 1, shamir.PRIME) == 1


def test_shares_at_chosen_points_rebuild_from_any_threshold_of_them():
    secret = bytes(range(32))
    shares = shamir.split_at(secret, 3, [7, 2, 40, 11])
    assert [s.x for s in shares] == [7, 2, 40, 11]
    for subset in itertools.combinations(shares, 3):
        assert shamir.reconstruct(subset, 3) == secret


@pytest.mark.parametrize("xs", [[1, 1, 2], [0, 1, 2], [1, 65536]])
def test_share_points_are_distinct_site_indices(xs):
    with pytest.raises(ValueError, match="distinct and in 1..65535"):
        shamir.split_at(bytes(32), 2, xs)
