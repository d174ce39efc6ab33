"""What two processes exchange, one schema each; both sides of the boundary import these.

- record  the hand-over record: the accepting hook writes it, the CLI reads it
- fifo    uWSGI's master FIFO, written without ever blocking on a master that is gone
- store   the memory-mapped store's file format: built by scripts/build_store.py, opened by
          the app (hotswap.inside.live_store), validated by the CLI
"""
