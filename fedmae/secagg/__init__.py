"""Secure aggregation building blocks (Bonawitz et al. 2017; Bell et al. 2020, SecAgg+).

Only the cryptographic and arithmetic parts, with no protocol and no wire: key
agreement (:mod:`.keys`), mask expansion (:mod:`.masks`), Shamir sharing
(:mod:`.shamir`), share encryption (:mod:`.aead`), fixed-point encoding into the
ring (:mod:`.fixed_point`) and the neighbour graph (:mod:`.graph`). Every primitive
comes from ``cryptography``; the only arithmetic written here is the prime-field
Shamir scheme and the ring encoding.
"""
