#!/usr/bin/env python3
"""Side-by-side proxy benchmark: the same fast fake upstream reached directly, through nginx
(Debian's, 2 workers, proxy_buffering off, upstream keep-alive, a static bearer check) and
through ragway (release build, API-key auth), driven by wrk on 127.0.0.1.

Every round runs every scenario once per target, in an order that rotates from round to round
and scenario to scenario (A B C, B C A, ...); the table gives medians over rounds of req/s,
ratios to nginx and to direct, and the proxy's CPU ms per request (on-CPU time of all its
threads and processes, from /proc/PID/task/*/schedstat, in ns). Memory: ragway's resident set
after start-up, after each round and at the end, and its peak. Time to first chunk and added
latency at c=1 come from benches/harness (`latency`), interleaved request by request. The
auth table runs one proxied route that needs no credential without one, with an API key and
with a session JWT.

ragway runs without the ONNX embedding model (`[embedding] engine = "ollama"`), as the
memory goal asks.

    benches/side-by-side.sh [--quick] [--rounds N] [--seconds S] [--only SUBSTRING]...

Needs the release ragway, benches/harness built in release and Debian's nginx and wrk;
benches/side-by-side.sh installs and builds all of it, then runs this script.
"""
import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NGINX_KEY = "sk-nginx-static-key"

CHAT = [{"role": "user", "content": "Why is the sky blue?"}]

# name, method, proxy path, direct path, body, connections. A proxy path is the same for
# nginx and ragway (nginx maps it to the upstream's path as ragway does).
SCENARIOS = [
    ("`/ollama/api/generate` stream, c=16", "POST", "/ollama/api/generate", "/api/generate",
     {"model": "m:latest", "prompt": "hi"}, 16),
    ("`/ollama/api/generate` stream, c=64", "POST", "/ollama/api/generate", "/api/generate",
     {"model": "m:latest", "prompt": "hi"}, 64),
    ("`/ollama/api/chat` stream, c=16", "POST", "/ollama/api/chat", "/api/chat",
     {"model": "m:latest", "messages": CHAT}, 16),
    ("`/api/chat/completions` stream, c=16", "POST", "/api/chat/completions", "/v1/chat/completions",
     {"model": "m:latest", "stream": True, "messages": CHAT}, 16),
    ("`/api/chat/completions` stream, c=64", "POST", "/api/chat/completions", "/v1/chat/completions",
     {"model": "m:latest", "stream": True, "messages": CHAT}, 64),
    ("`/api/chat/completions` JSON, c=16", "POST", "/api/chat/completions", "/v1/chat/completions",
     {"model": "m:latest", "stream": False, "messages": CHAT}, 16),
    ("`/api/chat/completions` JSON, c=64", "POST", "/api/chat/completions", "/v1/chat/completions",
     {"model": "m:latest", "stream": False, "messages": CHAT}, 64),
    ("`/ollama/api/show`, c=16", "POST", "/ollama/api/show", "/api/show", {"model": "m:latest"}, 16),
    ("`/ollama/api/embed`, c=16", "POST", "/ollama/api/embed", "/api/embed",
     {"model": "m:latest", "input": "Why is the sky blue?"}, 16),
    ("`/api/models` (ragway: its cache), c=16", "GET", "/api/models", "/v1/models", None, 16),
    ("`/ollama/api/tags` (ragway: merged, cached), c=16", "GET", "/ollama/api/tags", "/api/tags", None, 16),
]
# c=1 with 5 ms before each of the 200 chunks: ~1 s a request, so a fixed number of whole
# requests is timed (by benches/harness `latency`) rather than a wrk run that ends mid-stream.
SLOW = ("`/ollama/api/generate` stream, 5 ms between chunks, c=1", "/ollama/api/generate", "/api/generate",
        {"model": "slow:latest", "prompt": "hi"})
# A route ragway serves without a credential and proxies as it comes (url_idx 0 selects the
# upstream, so there is no fan-out): the same request without, with a key, with a JWT.
AUTH_PATH, AUTH_DIRECT = "/ollama/api/version/0", "/api/version"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, proc, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"{proc.args[0]} exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), 0.2):
                return
        except OSError:
            time.sleep(0.05)
    sys.exit(f"nothing listens on {port} after {timeout} s")


def family(pid):
    """pid and its children (nginx's workers)."""
    out = [pid]
    ps = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    for line in ps.split():
        out += family(int(line))
    return out


def cpu_snapshot(pids):
    """On-CPU ns of every thread of pids (schedstat: finer than /proc/PID/stat's ticks)."""
    snap = {}
    for p in pids:
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for t in tasks:
            try:
                with open(f"/proc/{p}/task/{t}/schedstat") as f:
                    snap[(p, t)] = int(f.read().split()[0])
            except (OSError, ValueError, IndexError):
                pass
    return snap


def cpu_used_ns(before, after):
    """CPU time between two snapshots. Threads come and go (idle pool threads exit after a
    while): a thread gone by the second snapshot counts 0, a new one all of its time."""
    return sum(v - before.get(k, 0) for k, v in after.items())


def status_kib(pids, field):
    total = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith(field + ":"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


def http(method, url, body=None, token=None):
    req = urllib.request.Request(url, method=method, data=None if body is None else json.dumps(body).encode())
    req.add_header("content-type", "application/json")
    if token:
        req.add_header("authorization", f"Bearer {token}")
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read() or b"null")


def wrk(port, path, method, body, token, conns, seconds, workdir):
    """(requests, errors, seconds) of one wrk run."""
    script = os.path.join(workdir, "req.lua")
    with open(script, "w") as f:
        f.write(f'wrk.method = "{method}"\n')
        if body is not None:
            f.write(f"wrk.body = {json.dumps(json.dumps(body))}\n")
            f.write('wrk.headers["Content-Type"] = "application/json"\n')
        if token:
            f.write(f'wrk.headers["Authorization"] = "Bearer {token}"\n')
        f.write("done = function(summary, latency, requests)\n"
                "  local e = summary.errors\n"
                "  io.write(string.format('RESULT %d %d %d\\n', summary.requests,"
                " e.status + e.connect + e.read + e.write + e.timeout, summary.duration))\n"
                "end\n")
    threads = min(2, conns)
    run = subprocess.run(["wrk", "-t", str(threads), "-c", str(conns), "-d", f"{seconds}s", "--timeout", "30s",
                          "-s", script, f"http://127.0.0.1:{port}{path}"], capture_output=True, text=True)
    lines = [x for x in run.stdout.splitlines() if x.startswith("RESULT")]
    if not lines:
        sys.exit(f"wrk gave no result for {path} on {port}: {run.stdout}{run.stderr}")
    _, requests, errors, micros = lines[-1].split()
    return int(requests), int(errors), int(micros) / 1e6


class Harness:
    def __init__(self, args, work):
        self.a = args
        self.work = work
        self.procs = []
        self.notes = []

    def start(self, cmd, **kw):
        p = subprocess.Popen(cmd, **kw)
        self.procs.append(p)
        return p

    def stop(self):
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()

    def latency(self, mode, requests, body, targets, warm=None):
        cmd = [self.a.latency, "--mode", mode, "--requests", str(requests), "--body", json.dumps(body)]
        if warm is not None:
            cmd += ["--warm", str(warm)]
        cmd += [",".join(str(x) for x in t if x is not None) for t in targets]
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if run.returncode != 0:
            sys.exit(f"latency client failed: {run.stderr}")
        out = {}
        for line in run.stdout.splitlines():
            if line.startswith("RESULT"):
                _, name, p50, p99, n = line.split()
                out[name] = (int(p50) / 1000, int(p99) / 1000, int(n))
        return out

    def setup(self):
        a, work = self.a, self.work
        self.up_port, self.ng_port, self.rw_port = free_port(), free_port(), free_port()
        self.up = self.start([a.fake, str(self.up_port), str(a.chunks), "5"])
        wait_port(self.up_port, self.up)
        conf = os.path.join(work, "nginx.conf")
        with open(conf, "w") as f:
            f.write(f"""worker_processes 2;
pid {work}/nginx.pid;
error_log {work}/nginx-error.log warn;
daemon off;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {work}/client_body;
  proxy_temp_path {work}/proxy;
  fastcgi_temp_path {work}/fastcgi; uwsgi_temp_path {work}/uwsgi; scgi_temp_path {work}/scgi;
  upstream up {{ server 127.0.0.1:{self.up_port}; keepalive 128; }}
  server {{
    listen 127.0.0.1:{self.ng_port};
    proxy_http_version 1.1;
    proxy_set_header Connection "";
    proxy_buffering off;
    proxy_request_buffering off;
    if ($http_authorization != "Bearer {NGINX_KEY}") {{ return 401; }}
    location /ollama/ {{ proxy_pass http://up/; }}
    location = /api/chat/completions {{ proxy_pass http://up/v1/chat/completions; }}
    location = /api/models {{ proxy_pass http://up/v1/models; }}
  }}
}}
""")
        self.nginx = self.start(["nginx", "-c", conf, "-p", work], stderr=subprocess.DEVNULL)
        wait_port(self.ng_port, self.nginx)
        data = os.path.join(work, "ragway-data")
        rconf = os.path.join(work, "ragway.toml")
        with open(rconf, "w") as f:
            f.write(f'listen = "127.0.0.1:{self.rw_port}"\nmetrics-listen = ""\ndata-dir = "{data}"\n'
                    f'[[ollama]]\nurl = "http://127.0.0.1:{self.up_port}"\n'
                    f'[embedding]\nengine = "ollama"\nurl = "http://127.0.0.1:{self.up_port}"\n')
        env = dict(os.environ, RAGWAY_LOG="warn")
        for k in list(env):
            # Open WebUI's variables would override the generated file.
            if k.startswith(("OLLAMA_", "OPENAI_", "RAG_", "WEBUI_", "ENABLE_")) or k in (
                    "DATA_DIR", "PORT", "HOST", "ENV", "RAGWAY_LISTEN", "RAGWAY_METRICS_LISTEN"):
                env.pop(k)
        self.rw = self.start([a.ragway, "serve", "--config", rconf], cwd=ROOT, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.rw_port, self.rw)
        base = f"http://127.0.0.1:{self.rw_port}"
        self.jwt = http("POST", base + "/api/v1/auths/signup",
                        {"name": "bench", "email": "bench@example.com", "password": "bench-pw-123456"})["token"]
        self.key = http("POST", base + "/api/v1/auths/api_key", {}, self.jwt)["api_key"]
        # Fill the model cache, then let start-up settle before the idle figure.
        http("GET", base + "/api/models", None, self.key)
        time.sleep(1)
        self.rss_idle = status_kib([self.rw.pid], "VmRSS")
        self.nginx_pids = family(self.nginx.pid)
        # name → (port, token, pids, use the direct path)
        self.targets = {
            "direct": (self.up_port, None, [self.up.pid], True),
            "nginx": (self.ng_port, NGINX_KEY, self.nginx_pids, False),
            "ragway": (self.rw_port, self.key, [self.rw.pid], False),
        }

    def measure(self, port, path, method, body, token, conns, seconds, pids, label):
        before = cpu_snapshot(pids)
        n, errors, secs = wrk(port, path, method, body, token, conns, seconds, self.work)
        used = cpu_used_ns(before, cpu_snapshot(pids))
        if errors:
            self.notes.append(f"{label}: {errors} errors of {n} requests")
        if n == 0:
            sys.exit(f"{label}: no request completed")
        return n / secs, used / 1e6 / n

    def run(self):
        a = self.a
        order = ["direct", "nginx", "ragway"]
        def chosen(name):
            return a.only is None or any(o in name for o in a.only)
        scenarios = [s for s in SCENARIOS if chosen(s[0])]
        slow, auth = chosen(SLOW[0]), chosen("auth")
        results, slow_cpu, auth_res, rss_rounds = {}, {}, {}, []
        # Warm-up of the proxies: upstream connections, the model cache, the key cache; not
        # recorded. Quick runs warm up once: the upstream pools are shared by every path.
        for name, method, ppath, dpath, body, conns in scenarios[:1] if a.quick else scenarios:
            for t in ("nginx", "ragway"):
                port, tok, _, _ = self.targets[t]
                wrk(port, ppath, method, body, tok, min(conns, 16), 1, self.work)
        if auth:
            for tok in (None, self.key, self.jwt):
                wrk(self.rw_port, AUTH_PATH, "GET", None, tok, 16, 1, self.work)
        started = time.time()
        for r in range(a.rounds):
            for i, (name, method, ppath, dpath, body, conns) in enumerate(scenarios):
                k = (r + i) % 3
                for t in order[k:] + order[:k]:
                    port, tok, pids, direct = self.targets[t]
                    results.setdefault((name, t), []).append(self.measure(
                        port, dpath if direct else ppath, method, body, tok, conns, a.seconds, pids,
                        f"{t} {name}"))
            if slow:
                k = r % 2
                for t in (["nginx", "ragway"][k:] + ["nginx", "ragway"][:k]):
                    port, tok, pids, _ = self.targets[t]
                    before = cpu_snapshot(pids)
                    self.latency("full", a.slow_requests, SLOW[3], [(t, port, SLOW[1], tok)], warm=0)
                    used = cpu_used_ns(before, cpu_snapshot(pids))
                    slow_cpu.setdefault(t, []).append(used / 1e6 / a.slow_requests)
            if auth:
                creds = [("none", None), ("API key", self.key), ("JWT", self.jwt)]
                k = r % 3
                for label, tok in creds[k:] + creds[:k]:
                    auth_res.setdefault(label, []).append(self.measure(
                        self.rw_port, AUTH_PATH, "GET", None, tok, 16, a.seconds, [self.rw.pid],
                        f"auth {label}"))
                auth_res.setdefault("direct", []).append(self.measure(
                    self.up_port, AUTH_DIRECT, "GET", None, None, 16, a.seconds, [self.up.pid],
                    "auth direct"))
            rss_rounds.append(status_kib([self.rw.pid], "VmRSS"))
            print(f"round {r + 1}/{a.rounds} done after {time.time() - started:.0f} s", file=sys.stderr, flush=True)
        lat = {}
        if chosen("latency"):
            targets = [("direct", self.up_port, "/api/generate", None),
                       ("nginx", self.ng_port, "/ollama/api/generate", NGINX_KEY),
                       ("ragway", self.rw_port, "/ollama/api/generate", self.key)]
            lat["ttfb"] = self.latency("ttfb", a.ttfb_requests, {"model": "ttfb:latest", "prompt": "hi"}, targets)
            targets = [("direct", self.up_port, "/v1/chat/completions", None),
                       ("nginx", self.ng_port, "/api/chat/completions", NGINX_KEY),
                       ("ragway", self.rw_port, "/api/chat/completions", self.key)]
            lat["json"] = self.latency("full", a.json_requests,
                                       {"model": "m:latest", "stream": False, "messages": CHAT}, targets)
        return scenarios, results, slow_cpu, auth_res, rss_rounds, lat

    def report(self, scenarios, results, slow_cpu, auth_res, rss_rounds, lat):
        a = self.a
        load = open("/proc/loadavg").read().split()[:3]
        med = statistics.median
        out = [
            f"Side-by-side run of {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: {a.rounds} round(s) of "
            f"{a.seconds} s per target and scenario, interleaved and rotated; {a.chunks}-chunk streams of "
            f"4-byte tokens; wrk -t2; load average after the run {' '.join(load)}; {os.cpu_count()} cores "
            f"shared by wrk, the fake upstream and the proxy. Medians over rounds.",
            "",
            "| scenario | direct req/s | nginx req/s | ragway req/s | ragway / nginx | ragway / direct "
            "| CPU ms/req nginx | CPU ms/req ragway | ragway CPU / nginx |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for name, *_ in scenarios:
            rps = {t: med(x[0] for x in results[(name, t)]) for t in ("direct", "nginx", "ragway")}
            cpu = {t: med(x[1] for x in results[(name, t)]) for t in ("nginx", "ragway")}
            out.append(f"| {name} | {rps['direct']:,.0f} | {rps['nginx']:,.0f} | {rps['ragway']:,.0f} | "
                       f"{rps['ragway'] / rps['nginx']:.2f}× | {rps['ragway'] / rps['direct']:.2f}× | "
                       f"{cpu['nginx']:.3f} | {cpu['ragway']:.3f} | {cpu['ragway'] / cpu['nginx']:.2f}× |")
        if slow_cpu:
            n, r = med(slow_cpu["nginx"]), med(slow_cpu["ragway"])
            out.append(f"| {SLOW[0]} ({a.slow_requests} requests per round) | — | — | — | — | — | "
                       f"{n:.3f} | {r:.3f} | {r / n:.2f}× |")
        if lat:
            t, j = lat["ttfb"], lat["json"]
            d, dj = t["direct"], j["direct"]
            out += ["", "Latency at c=1 (benches/harness `latency`, one keep-alive connection per target, "
                    "targets alternate request by request), ms:", "",
                    "| measure | direct | nginx | ragway | added by nginx | added by ragway |",
                    "|---|---|---|---|---|---|",
                    f"| time to first chunk, median (`/ollama/api/generate`, 5 ms before each chunk, "
                    f"{t['ragway'][2]} requests) | {d[0]:.3f} | {t['nginx'][0]:.3f} | {t['ragway'][0]:.3f} | "
                    f"+{t['nginx'][0] - d[0]:.3f} | +{t['ragway'][0] - d[0]:.3f} |",
                    f"| `/api/chat/completions` JSON, p50 ({j['ragway'][2]} requests) | {dj[0]:.3f} | "
                    f"{j['nginx'][0]:.3f} | {j['ragway'][0]:.3f} | +{j['nginx'][0] - dj[0]:.3f} | "
                    f"+{j['ragway'][0] - dj[0]:.3f} |",
                    f"| `/api/chat/completions` JSON, p99 | {dj[1]:.3f} | {j['nginx'][1]:.3f} | "
                    f"{j['ragway'][1]:.3f} | +{j['nginx'][1] - dj[1]:.3f} | +{j['ragway'][1] - dj[1]:.3f} |"]
        if auth_res:
            out += ["", f"Auth cost: `GET {AUTH_PATH}` (ragway serves it without a credential and proxies it "
                    "as it comes), c=16, interleaved:", "",
                    "| credential | req/s | ragway CPU ms/req | req/s vs no credential |", "|---|---|---|---|"]
            base = med(x[0] for x in auth_res["none"])
            for label in ("direct", "none", "API key", "JWT"):
                rps = med(x[0] for x in auth_res[label])
                cpu = med(x[1] for x in auth_res[label])
                shown = "— (upstream, no proxy)" if label == "direct" else label
                out.append(f"| {shown} | {rps:,.0f} | {'—' if label == 'direct' else f'{cpu:.4f}'} | "
                           f"{rps / base:.2f}× |")
        peak = status_kib([self.rw.pid], "VmHWM")
        end = status_kib([self.rw.pid], "VmRSS")
        # ragway gives back what requests freed once they stop for a second.
        time.sleep(2.5)
        settled = status_kib([self.rw.pid], "VmRSS")
        nginx_peak = status_kib(self.nginx_pids, "VmHWM")
        out += ["", f"ragway resident memory, without the embedding model: {self.rss_idle / 1024:.1f} MiB idle "
                f"after start-up, {end / 1024:.1f} MiB at the end of the load run and {settled / 1024:.1f} MiB "
                f"2.5 s later, peak {peak / 1024:.1f} MiB; "
                f"after each round: {', '.join(f'{x / 1024:.1f}' for x in rss_rounds)} MiB "
                f"(nginx, master and workers: peak {nginx_peak / 1024:.1f} MiB)."]
        if self.notes:
            out += ["", "Errors (wrk counts non-2xx answers and socket errors): " + "; ".join(self.notes) + "."]
        text = "\n".join(out) + "\n"
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            f.write(text)
        print(text)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 round of 2 s per target, fewer latency samples (< 2 min)")
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--seconds", type=int)
    ap.add_argument("--chunks", type=int, default=200)
    ap.add_argument("--slow-requests", type=int, help="whole 5 ms-per-chunk streams per round and proxy")
    ap.add_argument("--ttfb-requests", type=int)
    ap.add_argument("--json-requests", type=int)
    ap.add_argument("--only", action="append",
                    help="run only the scenarios whose names contain this string (repeatable); "
                         "'auth' and 'latency' select those tables")
    ap.add_argument("--out", default=os.path.join(ROOT, "benches", "results", "side-by-side.md"))
    ap.add_argument("--ragway", default=os.path.join(ROOT, "target", "release", "ragway"))
    harness = os.path.join(ROOT, "target", "bench-harness", "release")
    ap.add_argument("--fake", default=os.path.join(harness, "fake_upstream"))
    ap.add_argument("--latency", default=os.path.join(harness, "latency"))
    a = ap.parse_args()
    quick = a.quick
    a.rounds = a.rounds or (1 if quick else 3)
    a.seconds = a.seconds or (2 if quick else 4)
    a.slow_requests = a.slow_requests or (2 if quick else 4)
    a.ttfb_requests = a.ttfb_requests or (40 if quick else 200)
    a.json_requests = a.json_requests or (300 if quick else 2000)
    for tool in ("nginx", "wrk"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is missing: run scripts/setup.sh (installs Debian's nginx-light and wrk)")
    for path in (a.ragway, a.fake, a.latency):
        if not os.path.exists(path):
            sys.exit(f"{path} is missing: run benches/side-by-side.sh (it builds it)")
    work = tempfile.mkdtemp(prefix="ragway-bench-")
    h = Harness(a, work)
    try:
        h.setup()
        h.report(*h.run())
    finally:
        h.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
