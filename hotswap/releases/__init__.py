"""Releases and data, in the operator's CLI: what to swap in, and when.

- release  release folders: `deploy`, `rollback`, the `current` link
- refresh  `hotswap refresh`: a new store switched in place, without a re-fork
- watch    `hotswap watch`: a drop folder or the `current` link followed, one reload a change
"""
