"""hotswap: zero-downtime release swaps under uWSGI (master re-fork)."""

# The one place the version lives: pyproject.toml reads it (dynamic = ["version"]),
# `hotswap --version` prints it and /healthz reports it as `kit_version`.
__version__ = "0.2.0"
