#!/usr/bin/env python3
"""The storage backends side by side: the same release ragway on the embedded backend (redb +
in-process indexes) and on PostgreSQL + pgvector, in one run, all on 127.0.0.1.

1. Proxying with an API key: non-streamed `/api/chat/completions` and streamed
   `/ollama/api/generate` at c=16 (wrk) through each backend to the fast fake upstream of
   benches/harness; rounds interleaved with the order rotated, medians of req/s, CPU ms per
   request of ragway and (PostgreSQL target) of every postgres process, from
   /proc/PID/task/*/schedstat; latency at c=1 (benches/harness `latency`, targets alternate
   request by request); database transactions and rows written per request
   (pg_stat_database).
2. RAG added latency through the API: the same chat request with and without
   `files: [collection]`, in interleaved pairs, on a collection of CHUNKS chunks that both
   backends hold identically (built once with `ragway ingest` into a data dir, copied into
   PostgreSQL with `ragway migrate`: the same chunk ids and vectors).
3. Ingestion: N NFCorpus abstracts (title and text, ../shared/datasets/nfcorpus) uploaded
   through the API for background processing (4 uploaders), timed until every file is
   `completed`: embedded, one replica on PostgreSQL, two replicas on one PostgreSQL (uploads
   alternate between them, as behind a load balancer). CPU seconds of ragway and postgres.
4. Connections and queue: `pg_stat_activity` per replica idle, under c=64 load and during
   two-replica ingestion (pool + the LISTEN connection); the queue's claim statement (the
   `UPDATE ... FOR UPDATE SKIP LOCKED` ragway runs, then the `DELETE` of completion) driven
   by pgbench at 1, 4 and 16 clients on a table of queued jobs.

PostgreSQL: a throwaway PG16 + pgvector cluster of its own (scripts/postgres.sh), made
durable for the run (fsync, synchronous_commit and full_page_writes on, as a production
server and as redb, which syncs every commit); `--postgres-url` uses an existing server
instead (a superuser URL: the run creates and drops databases named ragway_bench_*).

    python3 benches/backends.py [--quick] [--rounds N] [--seconds S] [--chunks N] [--files N]

Needs the release ragway (`cargo build --release --locked`), benches/harness built in release
(`cargo build --release --locked --manifest-path benches/harness/Cargo.toml --target-dir
target/bench-harness`), wrk (scripts/setup.sh) and the embedding model
(scripts/fetch-model.sh); benches/backends.sh builds and runs it. The table goes to stdout
and benches/results/backends.md. Full run ~12 minutes, --quick under 3.
"""
import argparse
import concurrent.futures
import http.client
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid

BENCHES = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCHES)
import side_by_side as sbs  # noqa: E402  (the wrk driver and /proc readers)
from memory_rag import text_of  # noqa: E402  (prose-like generated text)

ROOT = os.path.dirname(BENCHES)
SECRET = "bench-secret-shared-by-every-replica"
ADMIN = {"name": "bench", "email": "bench@example.com", "password": "bench-pw-123456"}
CHAT = [{"role": "user", "content": "Why is the sky blue?"}]
SCENARIOS = [
    ("`/api/chat/completions` JSON, c=16", "/api/chat/completions",
     {"model": "m:latest", "stream": False, "messages": CHAT}, 16),
    ("`/ollama/api/generate` stream, c=16", "/ollama/api/generate",
     {"model": "m:latest", "prompt": "hi"}, 16),
]
RAG_QUESTION = "what does the licence say about the distribution of binary software"
# Chunks per generated file (~1,450 characters at chunk-size 300, no overlap: 6 or 7).
PER_FILE = 6.5
# Databases this run creates (and drops): its own prefix, so runs on one server never meet.
DB_PREFIX = f"ragway_bench_{os.getpid()}_"


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def loadavg():
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


class Postgres:
    """The cluster: its own (scripts/postgres.sh) or the one --postgres-url names."""

    def __init__(self, url, work):
        self.own_dir = None
        self.bin = os.environ.get("RAGWAY_TEST_POSTGRES_BIN", "")
        if url is None:
            out = subprocess.run([os.path.join(ROOT, "scripts", "postgres.sh"), "start"],
                                 capture_output=True, text=True)
            if out.returncode != 0:
                sys.exit(f"scripts/postgres.sh start failed:\n{out.stderr}")
            env = dict(line.removeprefix("export ").split("=", 1)
                       for line in out.stdout.splitlines() if line.startswith("export "))
            url, self.own_dir = env["RAGWAY_TEST_POSTGRES_URL"], env["RAGWAY_TEST_POSTGRES_DIR"]
            self.bin = env["RAGWAY_TEST_POSTGRES_BIN"]
        self.psql = os.path.join(self.bin, "psql") if self.bin else shutil.which("psql")
        self.pgbench = os.path.join(self.bin, "pgbench") if self.bin else shutil.which("pgbench")
        if not self.psql:
            sys.exit("psql not found: set RAGWAY_TEST_POSTGRES_BIN or put psql on PATH")
        self.admin_url = url
        self.base = url.rsplit("/", 1)[0]
        self.work = work

    def url(self, db):
        return f"{self.base}/{db}"

    def sql(self, query, db="postgres"):
        """Rows of one statement, as lists of strings."""
        run = subprocess.run([self.psql, "-X", "-A", "-t", "-F", "\t", "-v", "ON_ERROR_STOP=1",
                              self.url(db), "-c", query], capture_output=True, text=True, timeout=600)
        if run.returncode != 0:
            sys.exit(f"psql failed on {query!r}: {run.stderr}")
        return [line.split("\t") for line in run.stdout.splitlines() if line]

    def create(self, name):
        self.sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        self.sql(f"CREATE DATABASE {name}")
        # An existing server may lack the extension in template1; ragway creates it anyway
        # when the role may, and a throwaway cluster has it already.
        return self.url(name)

    def drop_all(self):
        for (name,) in self.sql(f"SELECT datname FROM pg_database WHERE datname LIKE '{DB_PREFIX}%'"):
            self.sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def durable(self):
        for setting in ("fsync", "synchronous_commit", "full_page_writes"):
            self.sql(f"ALTER SYSTEM SET {setting} = on")
        self.sql("SELECT pg_reload_conf()")
        time.sleep(0.5)
        return {k: self.sql(f"SHOW {k}")[0][0] for k in ("fsync", "synchronous_commit", "full_page_writes")}

    def cpu_snapshot(self):
        return sbs.cpu_snapshot(self.pids())

    def cpu_ns_since(self, before):
        """On-CPU ns of the cluster since `before`. The process list is read again: a backend
        that a pool opened in between is new in the second snapshot, and all of its time is
        in the interval."""
        return sbs.cpu_used_ns(before, self.cpu_snapshot())

    def pids(self):
        """The postmaster and its children (backends, checkpointer, WAL writer...)."""
        data = self.sql("SHOW data_directory")[0][0]
        try:
            with open(os.path.join(data, "postmaster.pid")) as f:
                return sbs.family(int(f.readline()))
        except OSError:
            return []

    def version(self):
        v = self.sql("SHOW server_version")[0][0]
        vec = self.sql("SELECT extversion FROM pg_extension WHERE extname = 'vector'", db="template1")
        return f"PostgreSQL {v}" + (f" + pgvector {vec[0][0]}" if vec else "")

    def xacts(self, db):
        """(transactions, rows inserted + updated + deleted) of db so far, once the counters
        are settled. A busy backend flushes its counters at most once a second; what it
        counted in its last second before going idle is flushed 10 s later
        (PGSTAT_IDLE_INTERVAL): wait that out, then read until two reads agree."""
        q = (f"SELECT xact_commit + xact_rollback, tup_inserted + tup_updated + tup_deleted "
             f"FROM pg_stat_database WHERE datname = '{db}'")
        time.sleep(10.5)
        last = None
        for _ in range(20):
            now = tuple(int(x) for x in self.sql(q)[0])
            if now == last:
                return now
            last = now
            time.sleep(1.1)
        return last

    def connections(self, db):
        """Connections to db by what they wait in: the LISTEN connection shows its query."""
        rows = self.sql(f"SELECT coalesce(state, ''), left(query, 6), client_port FROM pg_stat_activity "
                        f"WHERE datname = '{db}' AND pid <> pg_backend_pid()")
        listen = sum(1 for _, q, _ in rows if q.upper().startswith("LISTEN"))
        active = sum(1 for s, _, _ in rows if s == "active")
        return len(rows), listen, active

    def stop(self):
        if self.own_dir:
            subprocess.run([os.path.join(ROOT, "scripts", "postgres.sh"), "stop", self.own_dir],
                           capture_output=True)


class Ragway:
    """One `ragway serve` on the release binary: embedded when db_url is None."""

    def __init__(self, bench, name, data_dir, db_url=None):
        self.name = name
        self.port = sbs.free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        os.makedirs(data_dir, exist_ok=True)
        conf = bench.config(data_dir, self.port)
        env = bench.env(db_url)
        self.log = open(os.path.join(bench.work, f"{name}-{self.port}.log"), "w")
        self.proc = subprocess.Popen([bench.a.ragway, "serve", "--config", conf], cwd=ROOT, env=env,
                                     stdout=self.log, stderr=subprocess.STDOUT)
        sbs.wait_port(self.port, self.proc, timeout=120)
        self.token = self.key = None

    def signin(self):
        try:
            v = sbs.http("POST", self.base + "/api/v1/auths/signin", ADMIN)
        except OSError:
            v = sbs.http("POST", self.base + "/api/v1/auths/signup", ADMIN)
        self.token = v["token"]
        return self

    def api_key(self):
        self.key = sbs.http("POST", self.base + "/api/v1/auths/api_key", {}, self.token)["api_key"]
        return self.key

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def request(conn, method, path, token, body=None, headers=None):
    h = dict(headers or {})
    h["Authorization"] = f"Bearer {token}"
    if isinstance(body, (dict, list)):
        body = json.dumps(body).encode()
        h["Content-Type"] = "application/json"
    conn.request(method, path, body=body, headers=h)
    r = conn.getresponse()
    data = r.read()
    return r.status, data


def upload(port, token, name, text):
    b = uuid.uuid4().hex
    body = (f"--{b}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\n"
            f"Content-Type: text/plain\r\n\r\n").encode() + text.encode() + f"\r\n--{b}--\r\n".encode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        st, data = request(conn, "POST", "/api/v1/files/", token, body,
                           {"Content-Type": f"multipart/form-data; boundary={b}"})
    finally:
        conn.close()
    if st != 200:
        sys.exit(f"upload {name}: {st} {data[:300]!r}")
    return json.loads(data)["id"]


class Bench:
    def __init__(self, a, work):
        self.a = a
        self.work = work
        self.procs = []
        self.facts = {}

    def config(self, data_dir, port):
        os.makedirs(data_dir, exist_ok=True)
        path = os.path.join(data_dir, "bench.toml")
        with open(path, "w") as f:
            f.write(f'listen = "127.0.0.1:{port}"\nmetrics-listen = ""\ndata-dir = "{data_dir}"\n'
                    f'shutdown-grace = "1s"\n[[ollama]]\nurl = "http://127.0.0.1:{self.up_port}"\n'
                    f'[rag]\nchunk-size = 300\nchunk-overlap = 0\n')
        return path

    def env(self, db_url):
        env = dict(os.environ, RAGWAY_LOG="warn", WEBUI_SECRET_KEY=SECRET)
        for k in list(env):
            # Open WebUI's variables would override the generated file.
            if k.startswith(("OLLAMA_", "OPENAI_", "RAG_", "ENABLE_", "CHUNK_")) or k in (
                    "DATA_DIR", "PORT", "HOST", "ENV", "RAGWAY_LISTEN", "RAGWAY_METRICS_LISTEN",
                    "DATABASE_URL", "RAGWAY_CONFIG"):
                env.pop(k)
        if db_url:
            env["DATABASE_URL"] = db_url
        return env

    def cli(self, *args, data_dir):
        conf = self.config(data_dir, sbs.free_port())
        run = subprocess.run([self.a.ragway, *args, "--config", conf], cwd=ROOT, env=self.env(None),
                             capture_output=True, text=True, timeout=1800)
        if run.returncode != 0:
            sys.exit(f"ragway {' '.join(args)} failed:\n{run.stdout[-2000:]}{run.stderr[-2000:]}")
        return run.stdout + run.stderr

    # ---- set-up -------------------------------------------------------------------------

    def setup(self):
        a = self.a
        self.up_port = sbs.free_port()
        self.up = subprocess.Popen([a.fake, str(self.up_port), "200", "5"])
        self.procs.append(self.up)
        sbs.wait_port(self.up_port, self.up)
        log("starting PostgreSQL" + ("" if a.postgres_url is None else " (given URL)"))
        self.pg = Postgres(a.postgres_url, self.work)
        self.pg.drop_all()
        self.facts["durable"] = self.pg.durable() if a.durable else None
        self.facts["pg"] = self.pg.version()
        self.build_collection()

    def build_collection(self):
        """A collection of `chunks` chunks in an embedded data dir, then the same rows copied
        into PostgreSQL: both targets search identical chunks and vectors."""
        a = self.a
        files = max(1, round(a.chunks / PER_FILE))
        self.emb_dir = os.path.join(self.work, "embedded")
        docs = os.path.join(self.work, "docs")
        os.makedirs(docs)
        for i in range(files):
            with open(os.path.join(docs, f"doc{i:05}.txt"), "w") as f:
                f.write(text_of(5 * 290, 1000 + i))
        self.cli("user", "add", "--role", "admin", "--email", ADMIN["email"], "--password",
                 ADMIN["password"], "--name", ADMIN["name"], data_dir=self.emb_dir)
        log(f"ingesting {files} files ({a.chunks} chunks expected) with `ragway ingest`")
        t = time.time()
        self.cli("ingest", "--knowledge", "bench", docs, data_dir=self.emb_dir)
        self.facts["ingest_cli_s"] = time.time() - t
        self.rag_db = DB_PREFIX + "rag"
        url = self.pg.create(self.rag_db)
        log("copying it into PostgreSQL with `ragway migrate`")
        t = time.time()
        self.cli("migrate", "--to", url, data_dir=self.emb_dir)
        self.facts["migrate_s"] = time.time() - t
        # Planner statistics now, as autovacuum would within a minute or so: without them the
        # scope join is planned as a nested loop over every chunk and every file.
        self.pg.sql("ANALYZE", db=self.rag_db)
        # The same rows with the vectors stored in the row: pgvector's advice for tables it
        # scans. A chunk row (text, vector, tsvector) is ~2.3 KB, over the 2 KB TOAST
        # threshold, so by default each 1.5 KB vector is moved out of line and every distance
        # of an exact scan fetches it from the TOAST table.
        self.plain_db = self.rag_db + "_plain"
        self.pg.sql(f"CREATE DATABASE {self.plain_db} TEMPLATE {self.rag_db}")
        self.pg.sql("ALTER TABLE chunks ALTER COLUMN embedding SET STORAGE PLAIN", db=self.plain_db)
        self.pg.sql("VACUUM FULL ANALYZE chunks", db=self.plain_db)
        self.facts["toast"] = {db: self.pg.sql(
            "SELECT pg_size_pretty(pg_relation_size(oid)), pg_size_pretty(pg_relation_size(reltoastrelid)) "
            "FROM pg_class WHERE relname = 'chunks'", db=db)[0] for db in (self.rag_db, self.plain_db)}
        self.facts["chunks"] = int(self.pg.sql("SELECT count(*) FROM chunks", db=self.rag_db)[0][0])
        self.facts["files"] = files
        self.rag_url = url

    # ---- 1, 2, 4a: the two targets side by side -----------------------------------------

    def serve_pair(self):
        e = Ragway(self, "embedded", self.emb_dir)
        self.procs_rw = [e]
        p = Ragway(self, "postgres", os.path.join(self.work, "pg-serve"), self.rag_url)
        self.procs_rw.append(p)
        q = Ragway(self, "postgres-inline", os.path.join(self.work, "pg-inline"), self.pg.url(self.plain_db))
        self.procs_rw.append(q)
        for r in (e, p, q):
            r.signin().api_key()
            sbs.http("GET", r.base + "/api/models", None, r.key)
        kbs = sbs.http("GET", e.base + "/api/v1/knowledge/", None, e.token)
        items = kbs.get("items", kbs) if isinstance(kbs, dict) else kbs
        self.kb = next(k["id"] for k in items if k["name"] == "bench")
        time.sleep(1)
        self.facts["conn_idle"] = self.pg.connections(self.rag_db)
        return e, p, q

    def throughput(self, e, p):
        a = self.a
        targets = {"embedded": (e, [e.proc.pid], False), "postgres": (p, [p.proc.pid], True)}
        order = list(targets)
        for _, path, body, conns in SCENARIOS:
            for t in order:
                r = targets[t][0]
                sbs.wrk(r.port, path, "POST", body, r.key, conns, 1, self.work)
        res = {}
        notes = []
        for rnd in range(a.rounds):
            for i, (name, path, body, conns) in enumerate(SCENARIOS):
                k = (rnd + i) % 2
                for t in order[k:] + order[:k]:
                    r, rw_pids, on_pg = targets[t]
                    b_rw, b_db = sbs.cpu_snapshot(rw_pids), self.pg.cpu_snapshot() if on_pg else None
                    n, errors, secs = sbs.wrk(r.port, path, "POST", body, r.key, conns, a.seconds, self.work)
                    rw_ns = sbs.cpu_used_ns(b_rw, sbs.cpu_snapshot(rw_pids))
                    db_ns = self.pg.cpu_ns_since(b_db) if on_pg else 0
                    if errors or n == 0:
                        notes.append(f"{t} {name}: {errors} errors of {n} requests")
                    res.setdefault((name, t), []).append((n / secs, rw_ns / 1e6 / max(n, 1),
                                                           db_ns / 1e6 / max(n, 1)))
            log(f"throughput round {rnd + 1}/{a.rounds} done (load {loadavg()})")
        return res, notes

    def round_trips(self, p):
        """Database transactions and rows written per request on PostgreSQL: each proxied
        scenario, then the RAG request. Nothing else uses the database meanwhile (the
        embedded and inline targets have their own)."""
        out = {}
        conn = http.client.HTTPConnection("127.0.0.1", p.port, timeout=60)
        n = self.a.trip_requests
        kinds = [(name, path, body) for name, path, body, _ in SCENARIOS]
        kinds.append(("rag", "/api/chat/completions", self.rag_body()))
        after = self.pg.xacts(self.rag_db)
        for name, path, body in kinds:
            before = after
            count = n if name != "rag" else max(10, n // 4)
            for _ in range(count):
                st, data = request(conn, "POST", path, p.key, body)
                if st != 200:
                    sys.exit(f"{name} on postgres: {st} {data[:200]!r}")
            after = self.pg.xacts(self.rag_db)
            out[name] = ((after[0] - before[0]) / count, (after[1] - before[1]) / count, count)
        conn.close()
        return out

    def rag_body(self, with_files=True):
        plain = {"model": "m:latest", "stream": False,
                 "messages": [{"role": "user", "content": RAG_QUESTION}]}
        return dict(plain, files=[{"type": "collection", "id": self.kb}]) if with_files else plain

    def c1_latency(self, e, p):
        body = {"model": "m:latest", "stream": False, "messages": CHAT}
        cmd = [self.a.latency, "--mode", "full", "--requests", str(self.a.c1_requests),
               "--body", json.dumps(body)]
        cmd += [f"{r.name},{r.port},/api/chat/completions,{r.key}" for r in (e, p)]
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if run.returncode != 0:
            sys.exit(f"latency client failed: {run.stderr}")
        out = {}
        for line in run.stdout.splitlines():
            if line.startswith("RESULT"):
                _, name, p50, p99, n = line.split()
                out[name] = (int(p50) / 1000, int(p99) / 1000, int(n))
        return out

    def load_connections(self, p):
        """Connections to the database while c=64 requests run on one replica."""
        seen = []
        stop = threading.Event()

        def sample():
            while not stop.is_set():
                seen.append(self.pg.connections(self.rag_db))
                time.sleep(0.3)

        th = threading.Thread(target=sample)
        th.start()
        try:
            sbs.wrk(p.port, SCENARIOS[0][1], "POST", SCENARIOS[0][2], p.key, 64, 3, self.work)
        finally:
            stop.set()
            th.join()
        return tuple(max((x[i] for x in seen), default=0) for i in range(3))

    def rag_pairs(self, targets):
        """Median added latency of `files` per target; pairs interleave the targets, and
        within a target the order of the two requests alternates."""
        plain, rag = self.rag_body(False), self.rag_body()
        conns = {r.name: http.client.HTTPConnection("127.0.0.1", r.port, timeout=120) for r in targets}

        def send(r, body):
            t = time.perf_counter()
            st, data = request(conns[r.name], "POST", "/api/chat/completions", r.key, body)
            if st != 200:
                sys.exit(f"RAG chat on {r.name}: {st} {data[:300]!r}")
            return (time.perf_counter() - t) * 1000

        for _ in range(8):
            for r in targets:
                send(r, plain)
                send(r, rag)
        got = {r.name: ([], []) for r in targets}
        n = len(targets)
        for i in range(self.a.pairs):
            for r in targets[i % n:] + targets[:i % n]:
                if (i // 2) % 2 == 0:
                    a_ms, b_ms = send(r, plain), send(r, rag)
                else:
                    b_ms, a_ms = send(r, rag), send(r, plain)
                got[r.name][0].append(a_ms)
                got[r.name][1].append(b_ms)
        for c in conns.values():
            c.close()
        med = statistics.median
        return {name: (med(a), med(b), med(y - x for x, y in zip(a, b)))
                for name, (a, b) in got.items()}

    # ---- 3, 4b: ingestion ---------------------------------------------------------------

    def abstracts(self):
        out = []
        with open(self.a.corpus) as f:
            for line in f:
                d = json.loads(line)
                out.append((d["_id"], f"{d.get('title', '')}\n\n{d.get('text', '')}"))
                if len(out) == self.a.files:
                    break
        if len(out) < self.a.files:
            sys.exit(f"{self.a.corpus} has only {len(out)} documents")
        return out

    def ingest_once(self, target, docs, rnd):
        """Seconds from the first upload until every file is `completed`, with CPU seconds."""
        tag = f"{target}-{rnd}"
        if target == "embedded":
            replicas = [Ragway(self, tag, os.path.join(self.work, f"ingest-{tag}"))]
            db = None
        else:
            db = f"{DB_PREFIX}ingest_{target.replace('-', '_')}_{rnd}"
            url = self.pg.create(db)
            n = 2 if target == "postgres-2" else 1
            replicas = [Ragway(self, f"{tag}-{i}", os.path.join(self.work, f"ingest-{tag}-{i}"), url)
                        for i in range(n)]
        try:
            replicas[0].signin()
            for r in replicas[1:]:
                r.signin()
            time.sleep(0.5)
            conn_before = self.pg.connections(db) if db else None
            rw_pids = [r.proc.pid for r in replicas]
            b_rw, b_db = sbs.cpu_snapshot(rw_pids), self.pg.cpu_snapshot() if db else None
            t0 = time.time()
            with concurrent.futures.ThreadPoolExecutor(4) as pool:
                futs = [pool.submit(upload, replicas[i % len(replicas)].port, replicas[i % len(replicas)].token,
                                    f"{did}.txt", text) for i, (did, text) in enumerate(docs)]
                ids = [f.result() for f in futs]
            uploaded = time.time() - t0
            conn_peak = self.wait_completed(replicas[0], ids, db)
            total = time.time() - t0
            rw_s = sbs.cpu_used_ns(b_rw, sbs.cpu_snapshot(rw_pids)) / 1e9
            db_s = self.pg.cpu_ns_since(b_db) / 1e9 if db else 0.0
            return {"total": total, "uploaded": uploaded, "rw_cpu": rw_s, "db_cpu": db_s,
                    "conn_before": conn_before, "conn_peak": conn_peak}
        finally:
            for r in replicas:
                r.stop()
            if db:
                self.pg.sql(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")

    def wait_completed(self, r, ids, db):
        """Waits in upload order (the queue is FIFO) asking one file at a time; samples the
        database's connections while it waits."""
        conn = http.client.HTTPConnection("127.0.0.1", r.port, timeout=60)
        deadline = time.time() + 1800
        peak = (0, 0, 0)
        pending = list(ids)
        last_sample = 0.0
        while pending:
            st, data = request(conn, "GET", f"/api/v1/files/{pending[0]}/process/status", r.token)
            status = json.loads(data).get("status") if st == 200 else None
            if status == "completed":
                pending.pop(0)
                continue
            if status == "failed" or st != 200:
                sys.exit(f"file {pending[0]} on {r.name}: {st} {data[:300]!r}")
            if time.time() > deadline:
                sys.exit("ingestion timed out")
            if db and time.time() - last_sample > 1.0:
                c = self.pg.connections(db)
                peak = tuple(max(a, b) for a, b in zip(peak, c))
                last_sample = time.time()
            time.sleep(0.1)
        conn.close()
        return peak

    def ingestion(self):
        docs = self.abstracts()
        targets = ["embedded", "postgres-1", "postgres-2"]
        res = {}
        for rnd in range(self.a.ingest_rounds):
            k = rnd % len(targets)
            for t in targets[k:] + targets[:k]:
                r = self.ingest_once(t, docs, rnd)
                res.setdefault(t, []).append(r)
                log(f"ingestion {t}: {len(docs)} files in {r['total']:.1f} s (load {loadavg()})")
        return res

    # ---- 4c: the queue's claim under contention -----------------------------------------

    def claims(self):
        """pgbench runs ragway's claim (UPDATE ... SKIP LOCKED) and completion (DELETE) as one
        script on a jobs table of queued rows; every client runs the same number of claims."""
        if not self.pgbench:
            return None
        db = DB_PREFIX + "queue"
        url = self.pg.create(db)
        # The schema comes from ragway itself (a replica starting on the empty database).
        r = Ragway(self, "queue-schema", os.path.join(self.work, "queue-schema"), url)
        r.stop()
        script = os.path.join(self.work, "claim.sql")
        with open(script, "w") as f:
            f.write("UPDATE jobs SET token = md5(random()::text), "
                    "lease_until = clock_timestamp() + make_interval(secs => 60), attempts = attempts + 1 "
                    "WHERE file_id = (SELECT file_id FROM jobs WHERE lease_until IS NULL OR "
                    "lease_until <= clock_timestamp() ORDER BY seq LIMIT 1 FOR UPDATE SKIP LOCKED) "
                    "RETURNING file_id AS claimed \\gset\n"
                    "DELETE FROM jobs WHERE file_id = :claimed;\n")
        total = self.a.claims
        out = {}
        for clients in (1, 4, 16):
            self.pg.sql("TRUNCATE jobs, files CASCADE", db=db)
            self.pg.sql(f"INSERT INTO files (id, user_id, body, created_at) SELECT 'f' || g, 'u', '{{}}', g "
                        f"FROM generate_series(1, {total}) g", db=db)
            self.pg.sql("INSERT INTO jobs (file_id) SELECT id FROM files ORDER BY created_at", db=db)
            self.pg.sql("VACUUM ANALYZE jobs", db=db)
            run = subprocess.run([self.pgbench, "-n", "-M", "prepared", "-f", script, "-c", str(clients), "-j", str(min(clients, 2)),
                                  "-t", str(total // clients), url], capture_output=True, text=True, timeout=600)
            if run.returncode != 0:
                sys.exit(f"pgbench failed: {run.stdout}{run.stderr}")
            tps = lat = None
            for line in run.stdout.splitlines():
                if line.startswith("tps ="):
                    tps = float(line.split()[2])
                if line.startswith("latency average"):
                    lat = float(line.split()[3])
            left = int(self.pg.sql("SELECT count(*) FROM jobs", db=db)[0][0])
            out[clients] = (tps, lat, left)
        self.pg.sql(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
        return out

    @property
    def pgbench(self):
        return self.pg.pgbench if self.pg.pgbench and os.path.exists(self.pg.pgbench) else None

    # ---- the run ------------------------------------------------------------------------

    def run(self):
        load_start = loadavg()
        self.setup()
        e, p, q = self.serve_pair()
        try:
            log("proxying throughput")
            thr, notes = self.throughput(e, p)
            log("latency at c=1")
            c1 = self.c1_latency(e, p)
            log("database round trips per request")
            trips = self.round_trips(p)
            conn_load = self.load_connections(p)
            log("RAG added latency")
            rag = self.rag_pairs([e, p, q])
        finally:
            for r in self.procs_rw:
                r.stop()
        log("ingestion")
        ing = self.ingestion()
        log("queue claims")
        claims = self.claims()
        return dict(load_start=load_start, thr=thr, notes=notes, c1=c1, trips=trips,
                    conn_load=conn_load, rag=rag, ing=ing, claims=claims)

    def report(self, r):
        a, f = self.a, self.facts
        med = statistics.median
        dur = f["durable"]
        out = [
            f"Storage backends run of {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
            f"{' (--quick)' if a.quick else ''}: the same release ragway, embedded vs {f['pg']} "
            f"({'durable: fsync, synchronous_commit, full_page_writes on' if dur else 'settings as given'}), "
            f"on {os.cpu_count()} cores shared by the load client, the fake upstream, ragway and postgres; "
            f"load average {r['load_start']} at the start, {loadavg()} at the end.",
            "",
            f"**Proxying with an API key** ({a.rounds} round(s) of {a.seconds} s per target and scenario, "
            "interleaved and rotated; wrk -t2; medians over rounds):",
            "",
            "| scenario | embedded req/s | postgres req/s | postgres / embedded | ragway CPU ms/req embedded "
            "| ragway CPU ms/req postgres | postgres CPU ms/req | PG transactions/req | rows written/req |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for name, *_ in SCENARIOS:
            e = r["thr"][(name, "embedded")]
            p = r["thr"][(name, "postgres")]
            er, pr = med(x[0] for x in e), med(x[0] for x in p)
            tx, rows, _ = r["trips"][name]
            out.append(f"| {name} | {er:,.0f} | {pr:,.0f} | {pr / er:.2f}× | {med(x[1] for x in e):.3f} | "
                       f"{med(x[1] for x in p):.3f} | {med(x[2] for x in p):.3f} | {tx:.2f} | {rows:.2f} |")
        c1 = r["c1"]
        out += ["", f"Latency at c=1, `/api/chat/completions` JSON (benches/harness `latency`, "
                f"{c1['embedded'][2]} requests per target, alternating), ms: embedded p50 "
                f"{c1['embedded'][0]:.3f} / p99 {c1['embedded'][1]:.3f}, postgres p50 {c1['postgres'][0]:.3f} "
                f"/ p99 {c1['postgres'][1]:.3f}. PG transactions and rows written per request: "
                f"pg_stat_database (xact_commit + xact_rollback, tup_inserted + tup_updated + tup_deleted) over "
                f"{a.trip_requests} sequential requests per scenario; a statement that is prepared, then run, is two "
                "(each ends at a Sync), so this counts round trips rather than SQL statements."]
        rg = r["rag"]
        out += ["", f"**RAG added latency** (`/api/chat/completions` with and without `files: [collection]`, "
                f"{a.pairs} interleaved pairs per target; collection of {f['chunks']:,} chunks in "
                f"{f['files']:,} files, built with `ragway ingest` in {f['ingest_cli_s']:.0f} s and copied into "
                f"PostgreSQL with `ragway migrate` in {f['migrate_s']:.1f} s, so both hold the same chunks "
                f"and vectors), ms:", "",
                "| backend | median without files | median with files | added: median of paired differences |",
                "|---|---|---|---|"]
        toast = f["toast"]
        labels = {"embedded": "embedded",
                  "postgres": f"postgres (chunks heap {toast[self.rag_db][0]}, TOAST {toast[self.rag_db][1]})",
                  "postgres-inline": f"postgres, `embedding` SET STORAGE PLAIN (heap {toast[self.plain_db][0]}, "
                                     f"TOAST {toast[self.plain_db][1]})"}
        for name in ("embedded", "postgres", "postgres-inline"):
            a_ms, b_ms, d = rg[name]
            out.append(f"| {labels[name]} | {a_ms:.2f} | {b_ms:.2f} | +{d:.2f} |")
        tx, rows, count = r["trips"]["rag"]
        out += ["", f"PG transactions per request with `files` (pg_stat_database, {count} sequential requests): "
                f"{tx:.1f}, rows written {rows:.2f}. Both PostgreSQL databases were ANALYZEd after the copy."]
        ing = r["ing"]
        out += ["", f"**Ingestion**: {a.files} NFCorpus abstracts uploaded through the API (4 uploaders, "
                "background processing, default workers and embedding sessions per replica), timed until "
                f"every file is `completed`; {a.ingest_rounds} round(s), order rotated, medians:", "",
                "| target | seconds | files/s | vs one replica on postgres | uploads done after (s) "
                "| ragway CPU s | postgres CPU s | PG connections before → peak |",
                "|---|---|---|---|---|---|---|---|"]
        base = med(x["total"] for x in ing["postgres-1"])
        for t in ("embedded", "postgres-1", "postgres-2"):
            xs = ing[t]
            tot = med(x["total"] for x in xs)
            conn = "—"
            if xs[0]["conn_before"]:
                conn = f"{xs[0]['conn_before'][0]} → {max(x['conn_peak'][0] for x in xs)}"
            label = {"embedded": "embedded", "postgres-1": "postgres, one replica",
                     "postgres-2": "postgres, two replicas"}[t]
            out.append(f"| {label} | {tot:.1f} | {a.files / tot:.1f} | {base / tot:.2f}× | "
                       f"{med(x['uploaded'] for x in xs):.1f} | {med(x['rw_cpu'] for x in xs):.1f} | "
                       f"{med(x['db_cpu'] for x in xs):.1f} | {conn} |")
        idle, load = f["conn_idle"], r["conn_load"]
        out += ["", f"**Connections** (`pg_stat_activity` of the serving database, one replica, pool-size 16): "
                f"{idle[0]} after start-up and one request per route ({idle[1]} of them LISTEN), at most "
                f"{load[0]} while c=64 requests ran for 3 s ({load[1]} LISTEN; at most {load[2]} running a statement at "
                "a sample, samples 0.3 s apart). Ingestion: before → peak in the table above (two replicas: both)."]
        if r["claims"]:
            out += ["", f"**Queue claims** (pgbench: ragway's `UPDATE jobs ... FOR UPDATE SKIP LOCKED` claim, "
                    f"then the `DELETE` of completion, {a.claims} jobs queued, every client the same share):", "",
                    "| clients | claims + completions per s | latency per pair, ms | jobs left |", "|---|---|---|---|"]
            for c, (tps, lat, left) in r["claims"].items():
                out.append(f"| {c} | {tps:,.0f} | {lat:.2f} | {left} |")
        if r["notes"]:
            out += ["", "Errors (wrk counts non-2xx answers and socket errors): " + "; ".join(r["notes"]) + "."]
        text = "\n".join(out) + "\n"
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as fh:
            fh.write(text)
        print(text)
        return text

    def stop(self):
        for p in getattr(self, "procs_rw", []):
            p.stop()
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
                p.wait(10)
        if getattr(self, "pg", None):
            if self.a.postgres_url:
                self.pg.drop_all()
            self.pg.stop()


def self_check(text):
    """Fails unless every table row has its numbers: a smoke test that the harness still
    measures (no speed is asserted)."""
    rows = ["`/api/chat/completions` JSON, c=16", "`/ollama/api/generate` stream, c=16", "embedded",
            "postgres (chunks heap", "postgres, `embedding` SET STORAGE PLAIN", "postgres, one replica",
            "postgres, two replicas", "1", "16"]
    for label in rows:
        line = next((x for x in text.splitlines() if x.startswith(f"| {label}")), None)
        if line is None:
            sys.exit(f"self-check: no row {label!r}")
        cells = [c.strip().lstrip("+").rstrip("×").replace(",", "") for c in line.split("|")[2:-1]]
        numbers = [c for c in cells if c and c != "—" and "→" not in c]
        try:
            [float(c) for c in numbers]
        except ValueError:
            sys.exit(f"self-check: row {label!r} has a cell that is not a number: {line}")
        if not numbers:
            sys.exit(f"self-check: row {label!r} has no numbers: {line}")
    if "**Connections**" not in text or "Errors" in text:
        sys.exit("self-check: connections missing or requests failed")
    log("self-check passed")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer rounds, chunks, files and pairs (< 3 min)")
    ap.add_argument("--rounds", type=int, help="throughput rounds (3; quick 1)")
    ap.add_argument("--seconds", type=int, help="seconds per wrk run (4; quick 2)")
    ap.add_argument("--chunks", type=int, help="chunks in the RAG collection (3000; quick 600)")
    ap.add_argument("--pairs", type=int, help="RAG pairs per target (60; quick 20)")
    ap.add_argument("--files", type=int, help="abstracts ingested per target (200; quick 40)")
    ap.add_argument("--ingest-rounds", type=int, help="ingestion rounds (2; quick 1)")
    ap.add_argument("--c1-requests", type=int, help="c=1 latency requests per target (1000; quick 200)")
    ap.add_argument("--trip-requests", type=int, default=200, help="requests counted in pg_stat_database")
    ap.add_argument("--claims", type=int, help="jobs claimed per pgbench run (8000; quick 2000)")
    ap.add_argument("--postgres-url", help="use this PostgreSQL (superuser) instead of a throwaway cluster")
    ap.add_argument("--no-durable", dest="durable", action="store_false",
                    help="keep the cluster's settings (scripts/postgres.sh turns fsync off)")
    ap.add_argument("--self-check", action="store_true", help="exit non-zero when a table is missing")
    ap.add_argument("--out", default=os.path.join(BENCHES, "results", "backends.md"))
    ap.add_argument("--corpus", default=os.path.join(ROOT, "..", "shared", "datasets", "nfcorpus", "corpus.jsonl"))
    ap.add_argument("--ragway", default=os.path.join(ROOT, "target", "release", "ragway"))
    harness = os.path.join(ROOT, "target", "bench-harness", "release")
    ap.add_argument("--fake", default=os.path.join(harness, "fake_upstream"))
    ap.add_argument("--latency", default=os.path.join(harness, "latency"))
    a = ap.parse_args()
    q = a.quick
    a.rounds = a.rounds or (1 if q else 3)
    a.seconds = a.seconds or (2 if q else 4)
    a.chunks = a.chunks or (600 if q else 3000)
    a.pairs = a.pairs or (20 if q else 60)
    a.files = a.files or (40 if q else 200)
    a.ingest_rounds = a.ingest_rounds or (1 if q else 2)
    a.c1_requests = a.c1_requests or (200 if q else 1000)
    a.claims = a.claims or (2000 if q else 8000)
    if shutil.which("wrk") is None:
        sys.exit("wrk is missing: run scripts/setup.sh")
    for path in (a.ragway, a.fake, a.latency, a.corpus):
        if not os.path.exists(path):
            sys.exit(f"{path} is missing: run benches/backends.sh (it builds what is needed)")
    work = tempfile.mkdtemp(prefix="ragway-backends-")
    os.chmod(work, 0o755)
    b = Bench(a, work)
    started = time.time()
    try:
        text = b.report(b.run())
        log(f"done in {time.time() - started:.0f} s")
        if a.self_check:
            self_check(text)
    finally:
        b.stop()
        if os.environ.get("RAGWAY_BENCH_KEEP") != "1":
            shutil.rmtree(work, ignore_errors=True)
        else:
            log(f"kept {work}")


if __name__ == "__main__":
    main()
