"""Small OS-facing leaves, imported by both sides; none imports anything else of the kit.

- procs     /proc: processes, their children, the descriptors they hold; polling with a deadline
- files     atomic writes (write beside, rename into place)
- notify    sd_notify to systemd
- stats     uWSGI's stats socket
- uwsgilog  reading uWSGI's log from an offset
- memory    smaps, cgroup limits and OOM scores: will a second generation fit
"""
