#!/usr/bin/env python3
"""Memory while embedding, and RAG added latency, measured on the release binary through the
public API (Python standard library only; needs `scripts/fetch-model.sh` and
`cargo build --release --locked`).

    python3 benches/memory_rag.py memory [--sessions N]   # 1 MB file, then 8 files at once
    python3 benches/memory_rag.py latency [--sessions N]  # 10,000-chunk collection, 60 pairs

memory: starts `ragway serve`, reads idle VmRSS, uploads a 1 MB English text file and waits
for `completed`, then eight 128 KB files at once, printing peak VmHWM and VmRSS after each.

latency: builds a collection of CHUNKS (default 10,000) short chunks through the API (uploads
plus knowledge add; the data dir is kept in $RAG_BENCH_DIR, default /tmp/ragway-rag-bench, and
reused by later runs), then sends PAIRS (default 60) interleaved pairs of the same chat request
with and without `files` to a fake Ollama upstream and prints the median of the differences
with the load average. With RAG_BENCH_EXISTING=1 the data dir in $RAG_BENCH_DIR/data is used
as it is (e.g. a copy of a `ragway eval --data-dir` collection, with an admin added by
`ragway user add --role admin --email admin@example.com --password pw-123456`) and its
largest collection is searched.
"""

import http.client
import http.server
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.environ.get("RAGWAY_RELEASE_BIN", os.path.join(ROOT, "target/release/ragway"))

# A vocabulary of ordinary English words; generated sentences tokenise like prose (~1.2 tokens
# per word), so chunks of 1000 characters are ~220 tokens, as the reference text was.
WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his from at "
    "which but have an they you were her she there been one all we their has would when if "
    "so no will more can said what about out up into them some could time these two may then "
    "do first any my now such like our over man me even most made after also did many before "
    "must through back years where much your way well down should because each just those "
    "people how too little state good very make world still own see men work long get here "
    "between both life being under never day same another know while last might us great old "
    "year off come since against go came right used take three himself few house use during "
    "without again place around however home small found thought went say part once general "
    "high upon school every don does got united left number course war until always away "
    "something fact though water less public put think almost hand enough far took head yet "
    "government system better set told nothing night end why called didn eyes find going look "
    "asked later knew point next program city business give group toward young days let room "
    "president side social given present several order national possible rather second face "
    "per among form important often things looked early white case john become large big need "
    "four within felt along children saw best church ever least power development light thing "
    "seemed family interest want members mind country area others done turned although open "
    "god service certain kind problem began different door thus help sense means whole matter "
    "perhaps itself york times law human line above name example action company hands local "
    "show whether five history gave today either act feet across taken past quite anything "
    "having seen death experience body word half really field am car words already themselves "
    "information tell together college shall money period held keep sure free real probably "
    "seems political cannot behind miss question air office making brought whose special major "
    "heard problems federal became study ago moment known result street economic boy position "
    "reason change south board individual job society areas west close turn love community true "
    "court force full interpreter function module argument exception variable licence software "
    "warranty copyright distribution permission condition source binary library object method"
).split()


def text_of(size, seed):
    rng = random.Random(seed)
    out, n = [], 0
    while n < size:
        words = [rng.choice(WORDS) for _ in range(rng.randint(8, 22))]
        s = " ".join(words).capitalize() + ". "
        if rng.random() < 0.12:
            s += "\n\n"
        out.append(s)
        n += len(s)
    return "".join(out)[:size]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def status_kib(pid, key):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1])
    return 0


class FakeOllama(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def _json(self, obj):
        body = json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path.startswith("/api/tags"):
            self._json({"models": [{"name": "m:latest", "model": "m:latest", "size": 1,
                                    "digest": "0" * 64, "details": {}}]})
        elif self.path.startswith("/api/version"):
            self._json({"version": "0.6.0"})
        else:
            self._json({})

    def do_POST(self):
        n = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(n)
        if self.path.startswith("/api/show"):
            self._json({"model_info": {"llama.context_length": 8192}, "details": {}})
        elif self.path.startswith("/api/chat"):
            self._json({"model": "m:latest", "created_at": "2024-01-01T00:00:00Z",
                        "message": {"role": "assistant", "content": "ok"}, "done": True,
                        "done_reason": "stop", "prompt_eval_count": 1, "eval_count": 1})
        elif self.path.startswith("/v1/chat/completions"):
            self._json({"id": "x", "object": "chat.completion", "created": 0, "model": "m:latest",
                        "choices": [{"index": 0, "finish_reason": "stop",
                                     "message": {"role": "assistant", "content": "ok"}}],
                        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})
        else:
            self._json({})


def fake_ollama():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeOllama)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{srv.server_address[1]}"


class Server:
    def __init__(self, data_dir, extra_toml="", keep=False):
        self.port = free_port()
        self.data_dir = data_dir
        os.makedirs(data_dir, exist_ok=True)
        cfg = os.path.join(data_dir, "bench.toml")
        with open(cfg, "w") as f:
            f.write(f'listen = "127.0.0.1:{self.port}"\nmetrics-listen = ""\n'
                    f'data-dir = "{data_dir}/data"\nshutdown-grace = "1s"\n{extra_toml}\n')
        env = dict(os.environ, RAGWAY_LOG="warn")
        self.proc = subprocess.Popen([BIN, "serve", "--config", cfg], cwd=ROOT, env=env,
                                     stdout=subprocess.DEVNULL)
        deadline = time.time() + 120
        while True:
            try:
                if self.request("GET", "/health")[0] == 200:
                    break
            except OSError:
                pass
            if time.time() > deadline or self.proc.poll() is not None:
                raise SystemExit("ragway did not start")
            time.sleep(0.1)
        self.token = None

    def conn(self):
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)

    def request(self, method, path, body=None, headers=None, conn=None):
        c = conn or self.conn()
        h = dict(headers or {})
        if self.__dict__.get("token"):
            h["Authorization"] = f"Bearer {self.token}"
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
            h["Content-Type"] = "application/json"
        c.request(method, path, body=body, headers=h)
        r = c.getresponse()
        data = r.read()
        if conn is None:
            c.close()
        try:
            return r.status, json.loads(data) if data else None
        except ValueError:
            return r.status, data

    def login(self):
        creds = {"name": "a", "email": "admin@example.com", "password": "pw-123456"}
        st, v = self.request("POST", "/api/v1/auths/signup", creds)
        if st != 200:
            st, v = self.request("POST", "/api/v1/auths/signin", creds)
        assert st == 200, v
        self.token = v["token"]

    def upload(self, name, text):
        b = uuid.uuid4().hex
        body = (f"--{b}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\n"
                f"Content-Type: text/plain\r\n\r\n").encode() + text.encode() + f"\r\n--{b}--\r\n".encode()
        st, v = self.request("POST", "/api/v1/files/", body,
                             {"Content-Type": f"multipart/form-data; boundary={b}"})
        assert st == 200, v
        return v["id"]

    def wait_done(self, ids, timeout=1800):
        deadline = time.time() + timeout
        pending = set(ids)
        while pending:
            for i in list(pending):
                st, v = self.request("GET", f"/api/v1/files/{i}/process/status")
                if v.get("status") in ("completed", "failed"):
                    assert v["status"] == "completed", v
                    pending.discard(i)
            assert time.time() < deadline, "processing timed out"
            time.sleep(0.2)

    def peak(self):
        return status_kib(self.proc.pid, "VmHWM:")

    def rss(self):
        return status_kib(self.proc.pid, "VmRSS:")

    def settle_rss(self, seconds=3.0):
        time.sleep(seconds)
        return self.rss()

    def stop(self):
        self.proc.kill()
        self.proc.wait()


def loadavg():
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def arg(name, default):
    if name in sys.argv:
        return sys.argv[sys.argv.index(name) + 1]
    return default


def memory():
    sessions = int(arg("--sessions", "1"))
    tmp = f"/tmp/ragway-mem-bench-{os.getpid()}"
    srv = Server(tmp, f"[embedding]\nsessions = {sessions}\n")
    try:
        srv.login()
        idle = srv.settle_rss(2)
        print(f"sessions {sessions}  idle RSS {idle / 1024:.0f} MiB  peak so far {srv.peak() / 1024:.0f} MiB")
        t = time.time()
        fid = srv.upload("big.txt", text_of(1 << 20, 1))
        srv.wait_done([fid])
        print(f"1 MB file: {time.time() - t:.1f} s  peak {srv.peak() / 1024:.0f} MiB  "
              f"RSS after {srv.settle_rss() / 1024:.0f} MiB")
        t = time.time()
        ids = [None] * 8

        def up(i):
            ids[i] = srv.upload(f"f{i}.txt", text_of(128 << 10, 100 + i))

        threads = [threading.Thread(target=up, args=(i,)) for i in range(8)]
        [th.start() for th in threads]
        [th.join() for th in threads]
        srv.wait_done(ids)
        print(f"8 x 128 KB at once: {time.time() - t:.1f} s  peak {srv.peak() / 1024:.0f} MiB  "
              f"RSS after {srv.settle_rss() / 1024:.0f} MiB")
        print(f"load average {loadavg()}")
    finally:
        srv.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def latency():
    sessions = int(arg("--sessions", "1"))
    chunks = int(os.environ.get("CHUNKS", "10000"))
    pairs = int(os.environ.get("PAIRS", "60"))
    per_file = 5
    base = os.environ.get("RAG_BENCH_DIR", "/tmp/ragway-rag-bench")
    up = fake_ollama()
    toml = (f"[[ollama]]\nurl = \"{up}\"\n[embedding]\nsessions = {sessions}\n"
            f"[rag]\nchunk-size = 300\nchunk-overlap = 0\n")
    marker = os.path.join(base, f"built-{chunks}")
    existing = os.environ.get("RAG_BENCH_EXISTING") == "1"
    fresh = not existing and not os.path.exists(marker)
    if fresh:
        shutil.rmtree(base, ignore_errors=True)
    srv = Server(base, toml)
    try:
        srv.login()
        if fresh:
            t = time.time()
            st, kb = srv.request("POST", "/api/v1/knowledge/create",
                                 {"name": "bench", "description": "bench"})
            assert st == 200, kb
            files = chunks // per_file
            ids = []
            for i in range(files):
                # ~300 characters per chunk: `per_file` chunks per file.
                ids.append(srv.upload(f"doc{i}.txt", text_of(per_file * 290, 1000 + i)))
            srv.wait_done(ids)
            for i in ids:
                st, v = srv.request("POST", f"/api/v1/knowledge/{kb['id']}/file/add", {"file_id": i})
                assert st == 200, v
            with open(marker, "w") as f:
                f.write(kb["id"])
            print(f"collection of {files} files built through the API in {time.time() - t:.0f} s")
        if existing:
            st, kbs = srv.request("GET", "/api/v1/knowledge/")
            items = kbs.get("items", []) if isinstance(kbs, dict) else kbs
            assert st == 200 and items, kbs
            kb_id = items[0]["id"]
        else:
            with open(marker) as f:
                kb_id = f.read().strip()
        st, v = srv.request("GET", f"/api/v1/knowledge/{kb_id}")
        assert st == 200, v
        conn = srv.conn()
        plain = {"model": "m:latest", "stream": False,
                 "messages": [{"role": "user", "content": "what does the licence say about the "
                               "distribution of binary software"}]}
        rag = dict(plain, files=[{"type": "collection", "id": kb_id}])

        def send(body):
            t = time.perf_counter()
            st, v = srv.request("POST", "/api/chat/completions", body, conn=conn)
            assert st == 200, v
            return (time.perf_counter() - t) * 1000

        for _ in range(10):
            send(plain)
            send(rag)
        a, b = [], []
        for _ in range(pairs):
            a.append(send(plain))
            b.append(send(rag))
        diffs = [y - x for x, y in zip(a, b)]
        print(f"chunks {chunks}  sessions {sessions}  pairs {pairs}")
        print(f"median without files {statistics.median(a):.2f} ms, with files "
              f"{statistics.median(b):.2f} ms")
        print(f"RAG added latency: median of paired differences {statistics.median(diffs):.2f} ms"
              f"  (difference of medians {statistics.median(b) - statistics.median(a):.2f} ms)")
        print(f"load average {loadavg()}")
    finally:
        srv.stop()


if __name__ == "__main__":
    {"memory": memory, "latency": latency}[sys.argv[1] if len(sys.argv) > 1 else "memory"]()
