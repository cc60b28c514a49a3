"""The Arrow data plane of Forgetless: replay shards, schemas, snapshots.

Imports pyarrow and numpy only; unit-testable with no cluster.
"""
