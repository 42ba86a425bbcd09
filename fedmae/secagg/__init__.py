"""Secure aggregation (Bonawitz et al. 2017; Bell et al. 2020, SecAgg+), with no wire.

The building blocks: key agreement (:mod:`.keys`), mask expansion (:mod:`.masks`),
Shamir sharing (:mod:`.shamir`), share encryption (:mod:`.aead`), fixed-point encoding
into the ring (:mod:`.fixed_point`) and the neighbour graph (:mod:`.graph`). The
protocol on top of them: the phases' messages (:mod:`.messages`), signed key
advertisements (:mod:`.signing`), one round at a site (:mod:`.site`, ``SiteRound``) and
at the server (:mod:`.aggregation`, ``SecureSum``, with :mod:`.unmasking`).
``fedmae.transport`` carries the messages; every primitive comes from ``cryptography``,
and the only arithmetic written here is the prime-field Shamir scheme and the ring
encoding.
"""
