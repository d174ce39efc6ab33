"""Run a command as systemd runs a socket-activated service: fd 3 is the listening socket,
LISTEN_FDS=1 and LISTEN_PID=this pid (the command is exec'd, so the pid is its own).

    python scripts/socket-activate.py FD COMMAND...     (FD: an inherited listening socket)

tests/test_socket_activation.py holds the socket itself across a stop and a start, the way
hotswap.socket keeps it in systemd.
"""

import os
import sys

if __name__ == "__main__":
    fd = int(sys.argv[1])
    if fd != 3:
        os.dup2(fd, 3)
        os.close(fd)
    os.set_inheritable(3, True)
    env = dict(os.environ, LISTEN_PID=str(os.getpid()), LISTEN_FDS="1")
    os.execvpe(sys.argv[2], sys.argv[2:], env)
