"""Client-level differential privacy (DP-FedAvg, McMahan et al. 2018), with no wire.

The pieces: each site's delta clipped to an L2 norm, the fixed-denominator estimator
with capped weights and central Gaussian noise (:mod:`.mechanisms`), and the privacy
ledger, which turns the rounds run so far into ε at a configured δ with a maintained
accountant, ``dp-accounting`` (:mod:`.accountant`); for secure aggregation, each site's
share of integer Skellam noise in the ring's units and its accounting
(:mod:`.skellam`). The round engine, the agent and the
CLI put them together; nothing here knows about rounds on the network.
"""
