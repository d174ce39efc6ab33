"""The instance's lifecycle, in the operator's CLI: start, find, stop, recover, set up.

- instance    finding the serving master, status, start, stop, recover
- supervisor  `hotswap start` in a terminal: the subreaper that keeps the foreground
- checks      what `start` refuses: an ini or uWSGI with which a swap breaks
- scaffold    `hotswap init`: an srv.ini and a systemd unit for an existing project
"""
