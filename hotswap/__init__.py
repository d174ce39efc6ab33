"""hotswap: zero-downtime release swaps under uWSGI (master re-fork)."""
