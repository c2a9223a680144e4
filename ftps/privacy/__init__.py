"""The privacy maths: membership-inference scores of a batch of records, pure numpy/scipy.

- :mod:`ftps.privacy.scoring`: PHI ``[n, m]`` and the inclusion masks -> per-record privacy
  scores with intervals and batch metrics (LiRA offline/online, RMIA; DESIGN.md §3);
- :mod:`ftps.privacy.masks`: seeds, Algorithm 1's complementary inclusion masks, the preparation
  stage's shadow masks, tracing broken models back to records;
- :mod:`ftps.privacy.plots`: PNG figures of scores (matplotlib, Agg).

No gRPC, no torch, no I/O beyond a plot's optional path: the scorer service, the clients
(``ftps-score``, reports, web) and the benches all import it from here.
"""
