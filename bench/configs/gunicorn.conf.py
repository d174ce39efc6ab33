"""gunicorn config for bench mode 4 (re-exec upgrade: USR2 to the master, then TERM to the
old master once the new one serves). Mirrors srv.ini: 4 sync workers, the app imported
once in the master (--preload), a unix socket with a 1024 backlog, 60 s to drain.

The bench runs `gunicorn -c <workdir>/gunicorn.conf.py srv:app` with cwd = the workdir
that holds the private copy of srv.py, so every path here is relative to that folder.
"""

import os

_here = os.path.dirname(os.path.abspath(__file__))

bind = f"unix:{_here}/run/http.sock"
umask = 0o007  # socket mode 660, like chmod-socket in srv.ini
backlog = 1024
workers = 4
worker_class = "sync"
preload_app = True
graceful_timeout = 60
timeout = 60
pidfile = f"{_here}/run/master.pid"
errorlog = f"{_here}/log/gunicorn.log"
accesslog = None
loglevel = "info"
proc_name = "bench-gunicorn"
# gunicorn >= 24 opens a control socket in $HOME/.gunicorn, shared by every instance: not here
control_socket_disable = True
raw_env = [f"SRV_RESOURCE={_here}/data/terms.tsv"]
chdir = _here
