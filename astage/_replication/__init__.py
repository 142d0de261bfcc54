"""Replication: swap staged snapshots with a partner rank over torch.distributed.

One idea per module, from the bottom up:

- ``_pairing``: who swaps with whom (pure arithmetic);
- ``_wire``: the pickle-free codec, a snapshot as a JSON header plus byte messages;
- ``_transport``: posting sends and receives with deadlines, blocking, for a worker thread;
- ``_persist``: the replica file, written while the bytes arrive;
- ``_stager``: :class:`ReplicationStager`, which drives them on anyio.
"""
