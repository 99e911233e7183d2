"""A stand-in for the ragway binary that plays the upgrade protocol, so deploy/check.sh can
exercise ragway-upgrade.sh's PID-file and signal handling without systemd:

  serve            serves at once; on SIGQUIT marks the sockets handed over, drains, exits
  serve --upgrade  listens on $DATA_DIR/upgrade.sock (after 1.5 s if FAKE_SLOW=1), waits
                   for the handover, then serves (exits 1 at once if FAKE_FAIL=1)
  probe            exit 0 while a live process is serving, else 1

State lives in $FAKE_STATE: `serving` holds the PID that serves, `handed` marks a handover.
"""

import os
import signal
import socket
import sys
import time

state = os.environ["FAKE_STATE"]
serving = os.path.join(state, "serving")
handed = os.path.join(state, "handed")


def alive(pid):
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False


def serve_until_signalled():
    with open(serving + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.replace(serving + ".tmp", serving)
    quit_ = []
    # Explicit handlers: a shell's background job starts with SIGQUIT ignored, as the real
    # binary does; it must install its own handler to take part in the upgrade.
    signal.signal(signal.SIGQUIT, lambda *_: quit_.append(1))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    while not quit_:
        time.sleep(0.05)
    open(handed, "w").close()
    time.sleep(0.5)  # draining
    sys.exit(0)


args = sys.argv[1:]
if args[:1] == ["probe"]:
    try:
        pid = int(open(serving).read())
    except (OSError, ValueError):
        sys.exit(1)
    sys.exit(0 if alive(pid) else 1)
if args[:1] == ["serve"] and "--upgrade" in args:
    if os.environ.get("FAKE_FAIL") == "1":
        sys.exit(1)
    # Like the real binary: the upgrade socket exists only while waiting for the hand-over.
    path = os.path.join(os.environ.get("DATA_DIR", "./data"), "upgrade.sock")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if os.environ.get("FAKE_SLOW") == "1":
        time.sleep(1.5)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen(1)
    deadline = time.monotonic() + 30
    while not os.path.exists(handed):
        if time.monotonic() > deadline:
            sys.exit(1)
        time.sleep(0.05)
    os.remove(handed)
    sock.close()
    os.remove(path)
    serve_until_signalled()
if args[:1] == ["serve"]:
    serve_until_signalled()
sys.exit(2)
