"""A placement simulator: simulated time and pods driving the real ``modelmesh.placement`` code.

``python -m loadtest.sim`` replays one request trace against several placement policies and
prints, per policy, the hit ratio, loads per minute, load imbalance and the time a hot model takes
to get its copies. No asyncio, no gRPC, no store: pods are dictionaries, time is the trace's.

- :mod:`.config`: one :class:`~.config.SimConfig` (the CLI's flags) and the cluster it implies;
- :mod:`.trace`: seeded request traces (Zipf, shifting popularity, bursts) and next-use indices;
- :mod:`.tally`: what is counted and how it turns into the reported figures;
- :mod:`.mesh`: the mesh policy, with the real eviction, load placement, copy rules and copy choice;
- :mod:`.baselines`: Ray Serve-style multiplexing, random placement, and Belady's offline optimum;
- :mod:`.run`: runs the policies (in parallel processes) and formats the table.
"""
