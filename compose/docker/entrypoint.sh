#!/bin/sh
# First start: write the config and keys into the volume (listening on all of the container's addresses),
# and apply the environment: COTERIE_DATABASE_URL (PostgreSQL), COTERIE_RELAY_PORT, COTERIE_ADVERTISE
# (the tcp://HOST:PORT agents reach, comma-separated); then run the command.
set -eu
: "${COTERIE_HOME:=/var/lib/coterie}"
if [ ! -f "$COTERIE_HOME/config.toml" ]; then
    coterie init --dir "$COTERIE_HOME" --listen 0.0.0.0 --port "${COTERIE_PORT:-7870}"
fi
python3 - "$COTERIE_HOME/config.toml" <<'PY'
import os, sys, tomllib, tomli_w
path = sys.argv[1]
doc = tomllib.load(open(path, "rb"))
url = os.environ.get("COTERIE_DATABASE_URL", "")
relay_port = os.environ.get("COTERIE_RELAY_PORT", "")
advertise = os.environ.get("COTERIE_ADVERTISE", "")
if url:
    doc.setdefault("database", {})["url"] = url
if relay_port:
    doc.setdefault("relay", {})["port"] = int(relay_port)
if advertise:  # what join strings carry, and where agents find the reflector: the host's address, not ours
    doc.setdefault("server", {})["advertise"] = [e.strip() for e in advertise.split(",") if e.strip()]
open(path, "wb").write(tomli_w.dumps(doc).encode())
key = tomllib.load(open(os.path.join(os.path.dirname(path), "keys", "server.pub"), "rb"))["public"]
print(f"coterie: server public key (agents need it): {key}", flush=True)
PY
exec coterie "$@"
