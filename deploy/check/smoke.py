"""Runs the release binary the way deploy/Dockerfile's image runs it, without a container
engine (none runs on the build machines): the final stage's ENV, ENTRYPOINT + CMD and
HEALTHCHECK are read from the Dockerfile itself, image paths are mapped onto the local build
(/usr/local/bin/ragway → target/release/ragway, /opt/ragway → models/; copied into a
world-readable temporary tree when this runs as root), the process runs as the image's non-root
user when this runs as root, listens on 0.0.0.0, and talks to a fake Ollama.

Checks /health, /ready, /metrics, the admin bootstrap from the environment, an upload embedded
with the image's ONNX Runtime and model paths, the HEALTHCHECK command's exit code while up
and after SIGTERM, and the peak resident memory against the limits the deploy files declare.

Usage: python smoke.py REPO_ROOT RELEASE_BINARY MODELS_DIR
"""

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from dockerfile_parse import DockerfileParser

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import limits  # noqa: E402

ROOT, BINARY, MODELS = (os.path.abspath(a) for a in sys.argv[1:4])
IMAGE_UID = 65532
DEADLINE = 120  # seconds for anything to happen: generous, CI runs many builds at once


def fail(msg):
    print(f"smoke: FAIL: {msg}", file=sys.stderr)
    sys.exit(1)


def say(msg):
    print(f"smoke: {msg}", file=sys.stderr)


class FakeOllama(BaseHTTPRequestHandler):
    MODEL = {
        "name": "tiny:latest",
        "model": "tiny:latest",
        "modified_at": "2026-01-01T00:00:00Z",
        "size": 1000,
        "digest": "sha256:" + "0" * 64,
        "details": {"format": "gguf", "family": "llama", "parameter_size": "1B",
                    "quantization_level": "Q4_0"},
    }

    def log_message(self, *args):
        pass

    def reply(self, body, ctype="application/json"):
        data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
        self.send_response(200)
        self.send_header("content-type", ctype)
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path == "/api/tags":
            self.reply({"models": [self.MODEL]})
        elif self.path == "/api/version":
            self.reply({"version": "0.12.6"})
        else:
            self.reply("Ollama is running", "text/plain")

    def do_HEAD(self):
        self.reply("")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method, url, body=None, headers=None, timeout=30):
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except OSError:
        return None, b""


def proc_kib(pid, field):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    fail(f"no {field} in /proc/{pid}/status")


# --- what the image does, read from the Dockerfile -------------------------------------------
df = DockerfileParser(path=os.path.join(ROOT, "deploy", "Dockerfile"))
final = [i for i in df.structure if i["instruction"] == "FROM"][-1]["startline"]
later = [i for i in df.structure if i["startline"] > final]


def last(instr):
    found = [i for i in later if i["instruction"] == instr]
    return found[-1]["value"] if found else None


env_image = df.envs  # the final stage's ENV
entry = json.loads(last("ENTRYPOINT"))
cmd = json.loads(last("CMD"))
health = last("HEALTHCHECK")
if " CMD " not in f" {health} ":
    fail(f"HEALTHCHECK has no CMD: {health}")
health_cmd = health.split(" CMD ", 1)[1].strip()
health_cmd = json.loads(health_cmd) if health_cmd.startswith("[") else shlex.split(health_cmd)


data = tempfile.mkdtemp(prefix="ragway-smoke-")
os.chmod(data, 0o700)
as_image_user = os.geteuid() == 0
if as_image_user:
    os.chown(data, IMAGE_UID, IMAGE_UID)
    # The image's layout in a world-readable copy: the checkout may sit below a directory the
    # unprivileged user cannot enter (/root), and the copy is what the image would hold.
    image_root = tempfile.mkdtemp(prefix="ragway-image-")
    os.chmod(image_root, 0o755)
    os.makedirs(os.path.join(image_root, "usr/local/bin"))
    shutil.copy2(BINARY, os.path.join(image_root, "usr/local/bin/ragway"))
    shutil.copytree(MODELS, os.path.join(image_root, "opt/ragway"), symlinks=True)
    subprocess.run(["chmod", "-R", "a+rX", image_root], check=True)
    BINARY = os.path.join(image_root, "usr/local/bin/ragway")
    MODELS = os.path.join(image_root, "opt/ragway")
else:
    image_root = None


def image_path(p):
    if p == "/usr/local/bin/ragway":
        return BINARY
    if p.startswith("/opt/ragway/"):
        return os.path.join(MODELS, p[len("/opt/ragway/"):])
    return p


port, mport, oport = free_port(), free_port(), free_port()
ollama = ThreadingHTTPServer(("127.0.0.1", oport), FakeOllama)
threading.Thread(target=ollama.serve_forever, daemon=True).start()

env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
       "HOME": "/home/nonroot", "RAGWAY_LOG": "warn"}
for k, v in env_image.items():
    env[k] = image_path(v)
if not env.get("RAGWAY_LISTEN", "").startswith("0.0.0.0:"):
    fail(f"image RAGWAY_LISTEN {env.get('RAGWAY_LISTEN')!r} is not 0.0.0.0")
env.update({
    "RAGWAY_LISTEN": f"0.0.0.0:{port}",
    "RAGWAY_METRICS_LISTEN": f"0.0.0.0:{mport}",
    "DATA_DIR": data,
    "OLLAMA_BASE_URL": f"http://127.0.0.1:{oport}",
    "WEBUI_SECRET_KEY": "smoke-test-secret-key-0123456789abcdef",
    "WEBUI_ADMIN_EMAIL": "admin@example.com",
    "WEBUI_ADMIN_PASSWORD": "smoke-test-password-42",
})
for k in ("ORT_DYLIB_PATH", "RAGWAY_MODEL_DIR"):
    if not os.path.exists(env[k]):
        fail(f"{k}={env_image.get(k)} maps to {env[k]}, which does not exist")

drop = (["setpriv", f"--reuid={IMAGE_UID}", f"--regid={IMAGE_UID}", "--clear-groups"]
        if as_image_user else [])


def run_image(argv):
    return [*drop, image_path(argv[0]), *argv[1:]]


say(f"starting {' '.join(entry + cmd)} as uid {IMAGE_UID if as_image_user else os.geteuid()} "
    f"on 0.0.0.0:{port}")
server = subprocess.Popen(run_image(entry + cmd), env=env, cwd="/", stdin=subprocess.DEVNULL)
base = f"http://127.0.0.1:{port}"


def healthcheck():
    r = subprocess.run(run_image(health_cmd), env=env, cwd="/", capture_output=True,
                       text=True, timeout=DEADLINE)
    return r.returncode, (r.stdout + r.stderr).strip()


try:
    t0 = time.monotonic()
    while http("GET", f"{base}/health", timeout=5)[0] != 200:
        if server.poll() is not None:
            fail(f"ragway exited with {server.returncode} during start-up")
        if time.monotonic() - t0 > DEADLINE:
            fail("/health did not answer 200")
        time.sleep(0.2)
    say("/health 200")
    idle_rss = proc_kib(server.pid, "VmRSS")

    st, body = http("GET", f"{base}/ready")
    if st != 200:
        fail(f"/ready answered {st}: {body[:200]!r}")
    say("/ready 200 (fake Ollama reachable)")

    code, out = healthcheck()
    if code != 0:
        fail(f"HEALTHCHECK {health_cmd} exited {code}: {out}")
    say(f"HEALTHCHECK {' '.join(health_cmd)}: exit 0 ({out})")

    st, body = http("GET", f"http://127.0.0.1:{mport}/metrics")
    if st != 200 or b"ragway_http_requests_total" not in body:
        fail(f"/metrics on the metrics port answered {st}")
    say("/metrics on the metrics port: ragway_http_requests_total present")

    st, body = http("POST", f"{base}/api/v1/auths/signin",
                    json.dumps({"email": env["WEBUI_ADMIN_EMAIL"],
                                "password": env["WEBUI_ADMIN_PASSWORD"]}).encode(),
                    {"content-type": "application/json"})
    if st != 200:
        fail(f"admin bootstrapped from WEBUI_ADMIN_EMAIL/PASSWORD cannot sign in: {st} {body[:200]!r}")
    signin = json.loads(body)
    if signin.get("role") != "admin":
        fail(f"bootstrapped account is not admin: {signin.get('role')}")
    auth = {"authorization": f"Bearer {signin['token']}"}
    st, body = http("GET", f"{base}/api/models", headers=auth)
    if st != 200 or b"tiny:latest" not in body:
        fail(f"/api/models answered {st}: {body[:200]!r}")
    say("admin bootstrap from the environment: signed in, /api/models lists the upstream's model")

    # An upload embedded with the image's ORT_DYLIB_PATH and RAGWAY_MODEL_DIR.
    boundary = "smokeboundary7f3a"
    text = ("ragway smoke test. The gateway embeds this paragraph with ONNX Runtime. " * 40).encode()
    payload = (f"--{boundary}\r\ncontent-disposition: form-data; name=\"file\"; "
               f"filename=\"smoke.txt\"\r\ncontent-type: text/plain\r\n\r\n").encode() + text + \
        f"\r\n--{boundary}--\r\n".encode()
    st, body = http("POST", f"{base}/api/v1/files/?process_in_background=false", payload,
                    {**auth, "content-type": f"multipart/form-data; boundary={boundary}"},
                    timeout=DEADLINE)
    if st != 200:
        fail(f"upload answered {st}: {body[:300]!r}")
    status = json.loads(body).get("data", {}).get("status")
    if status != "completed":
        fail(f"upload not processed: status {status!r}: {body[:300]!r}")
    say("upload embedded with the image's ONNX Runtime and model paths: completed")
    loaded_rss = proc_kib(server.pid, "VmRSS")
    peak = proc_kib(server.pid, "VmHWM")

    declared = limits.declared(ROOT)
    say(f"memory: idle VmRSS {idle_rss // 1024} MiB; after embedding VmRSS {loaded_rss // 1024} "
        f"MiB, peak VmHWM {peak // 1024} MiB; limits declared {declared}")
    for where, (request, limit) in declared.items():
        if peak * 1024 >= limit:
            fail(f"{where}: peak {peak} KiB is not below the declared limit {limit} B")
        if request is not None and loaded_rss * 1024 > request:
            fail(f"{where}: the request {request} B is below the measured RSS {loaded_rss} KiB")

    owner = os.stat(os.path.join(data, "ragway.redb")).st_uid
    if as_image_user and owner != IMAGE_UID:
        fail(f"database owned by uid {owner}, not the image user")

    server.send_signal(signal.SIGTERM)
    try:
        rc = server.wait(timeout=DEADLINE)
    except subprocess.TimeoutExpired:
        fail("no exit after SIGTERM")
    if rc != 0:
        fail(f"exit status {rc} after SIGTERM")
    say("SIGTERM: clean exit 0")
    code, out = healthcheck()
    if code != 1:
        fail(f"HEALTHCHECK after exit: {code}, expected 1 ({out})")
    say(f"HEALTHCHECK after exit: exit 1 ({out})")
    print(json.dumps({"idle_rss_kib": idle_rss, "loaded_rss_kib": loaded_rss,
                      "peak_kib": peak}))
finally:
    if server.poll() is None:
        server.kill()
        server.wait()
    ollama.shutdown()
    for d in (data, image_root):
        if d:
            shutil.rmtree(d, ignore_errors=True)
