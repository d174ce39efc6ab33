#!/usr/bin/env bash
# Install the Debian packages the tests and the bench use: git and curl (tests/test_tour.py
# runs the README's tour), curl and socat (the shell health checks), nginx and wrk (the
# bench's independent client), systemd (the systemd tests),
# sshd (tests/test_fleet.py runs one Ansible host over a real SSH connection to 127.0.0.1),
# logrotate (tests/test_integrity.py rotates the log with deploy/logrotate.conf), prometheus
# and its node exporter (tests/test_prometheus.py scrapes the swap metrics' textfile and runs
# promtool on deploy/prometheus/'s rules), postgresql and redis-server (tests/test_sources.py
# announces releases through a trigger, pub/sub and a stream on servers it starts), and what
# compiles uWSGI for the system python (gcc, python3-dev, python3-venv): the systemd tests
# install the unit with a venv of /usr/bin/python3 (deploy/install-systemd.sh), and
# `make test` runs this before it builds .venv, so a fresh root machine (CI) can build it.
# As root it installs what is missing; otherwise it says what is missing and the tests that
# need it skip with that reason.
set -euo pipefail
declare -A need=([curl]=curl [git]=git [socat]=socat [nginx]=nginx-light [wrk]=wrk [sshd]=openssh-server [logrotate]=logrotate [prometheus]=prometheus [prometheus-node-exporter]=prometheus-node-exporter [redis-server]=redis-server)
[ -x /lib/systemd/systemd ] || need[systemd]=systemd
need[gcc]=gcc
sys_include=$(/usr/bin/python3 -c 'import sysconfig; print(sysconfig.get_paths()["include"])' 2>/dev/null || true)
[ -n "$sys_include" ] && [ -e "$sys_include/Python.h" ] || need[python-headers]=python3-dev
/usr/bin/python3 -c 'import ensurepip, venv' 2>/dev/null || need[python-venv]=python3-venv
# Debian keeps initdb and pg_ctl off PATH, under /usr/lib/postgresql/N/bin
compgen -G '/usr/lib/postgresql/*/bin/pg_ctl' >/dev/null || need[pkg-postgresql]=postgresql
missing=()
for cmd in "${!need[@]}"; do
  case "$cmd" in systemd|python-*|pkg-*) missing+=("${need[$cmd]}"); continue ;; esac
  command -v "$cmd" >/dev/null 2>&1 || [ -x "/usr/sbin/$cmd" ] || missing+=("${need[$cmd]}")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "system packages: all present"
  exit 0
fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "system packages missing (install them as root): ${missing[*]}" >&2
  exit 0
fi
echo "installing system packages: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
# nginx's package would start a system nginx on port 80; the tests and the bench run their
# own instances, so keep package scripts from starting services (policy-rc.d exit 101).
guard=""
if [ ! -e /usr/sbin/policy-rc.d ]; then
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
  guard=/usr/sbin/policy-rc.d
fi
trap 'if [ -n "$guard" ]; then rm -f "$guard"; fi' EXIT
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
