"""Static checks of the multi-replica layout (PostgreSQL + pgvector, several ragway replicas
behind a load balancer): deploy/compose.postgres.yaml with deploy/nginx/ragway.conf, and
deploy/kubernetes/postgres/. What must hold for replicas to share one state: one database
URL and one JWT secret for all of them, required (never generated per replica), nothing kept
on a per-replica volume, the balancer reaching every replica.

Usage: python replicas.py REPO_ROOT COMPOSE_SPEC_JSON
Prints one line per failed rule and exits 1 if any failed.
"""

import glob
import json
import os
import re
import sys
import tempfile

import crossplane
import jsonschema
import yaml

ROOT = os.path.abspath(sys.argv[1])
DEPLOY = os.path.join(ROOT, "deploy")
errors = []


def check(ok, msg):
    if not ok:
        errors.append(msg)
    return ok


def read(*parts):
    with open(os.path.join(ROOT, *parts)) as f:
        return f.read()


SRC = "\n".join(open(p).read() for p in glob.glob(os.path.join(ROOT, "src", "**", "*.rs"),
                                                   recursive=True))


def env_known(name, where):
    check(f'"{name}"' in SRC, f"{where}: sets {name}, which ragway does not read")


# --- compose ----------------------------------------------------------------------------------
raw = read("deploy", "compose.postgres.yaml")
# ${VAR:?message} must be set (compose stops otherwise): the secret and the password are
# never defaulted. Interpolate as a shell with both set, the rest at their defaults.
required = set(re.findall(r"\$\{([A-Z0-9_]+):\?[^}]*\}", raw))
for k in ("WEBUI_SECRET_KEY", "POSTGRES_PASSWORD"):
    check(k in required, f"compose.postgres: {k} must be required (${{{k}:?...}}), not defaulted")
interpolated = re.sub(r"\$\{([A-Z0-9_]+):\?[^}]*\}", r"set-\1", raw)
interpolated = re.sub(r"\$\{[A-Z0-9_]+:-([^}]*)\}", r"\1", interpolated)
check("${" not in interpolated, "compose.postgres: a variable neither required nor defaulted")
compose = yaml.safe_load(interpolated)
with open(sys.argv[2]) as f:
    schema = json.load(f)
for e in jsonschema.Draft7Validator(schema).iter_errors(compose):
    errors.append(f"compose.postgres: schema: {'/'.join(map(str, e.absolute_path))}: {e.message}")
svc = compose.get("services", {})
replicas = {n: s for n, s in svc.items() if n.startswith("ragway")}
check(len(replicas) >= 2, f"compose.postgres: at least two ragway replicas expected: {sorted(replicas)}")
check("pgvector" in svc.get("postgres", {}).get("image", ""),
      "compose.postgres: the postgres service must run a pgvector image")
pg_env = svc.get("postgres", {}).get("environment", {})
envs = [s.get("environment", {}) for s in replicas.values()]
for k in ("DATABASE_URL", "WEBUI_SECRET_KEY"):
    values = {e.get(k) for e in envs}
    check(len(values) == 1 and None not in values,
          f"compose.postgres: every replica must have the same {k}: {values}")
url = envs[0].get("DATABASE_URL", "") if envs else ""
m = re.fullmatch(r"postgres(?:ql)?://([^:]+):([^@]+)@([^:/]+):(\d+)/(\w+)", url)
if check(m, f"compose.postgres: DATABASE_URL {url!r} is not postgres://user:pw@host:port/db"):
    user, pw, host, _, db = m.groups()
    check(host in svc, f"compose.postgres: DATABASE_URL names host {host}, not a service")
    check(user == pg_env.get("POSTGRES_USER") and db == pg_env.get("POSTGRES_DB")
          and pw == pg_env.get("POSTGRES_PASSWORD"),
          "compose.postgres: DATABASE_URL's user, password and database differ from postgres's")
for name, s in replicas.items():
    for k in s.get("environment", {}):
        env_known(k, f"compose.postgres {name}.environment")
    check(not s.get("ports"), f"compose.postgres: {name} is published; clients go through the balancer")
    check(not s.get("volumes"), f"compose.postgres: {name} keeps a volume; replicas share nothing on disk")
    check("/data" in " ".join(map(str, s.get("tmpfs", []))),
          f"compose.postgres: {name} needs a writable /data (tmpfs) under read_only")
    deps = s.get("depends_on", {})
    check(deps.get("postgres", {}).get("condition") == "service_healthy",
          f"compose.postgres: {name} must wait for a healthy postgres")
named = set(compose.get("volumes", {}))
for name, s in svc.items():
    for v in s.get("volumes", []):
        src = str(v).split(":")[0]
        if src.startswith("."):
            check(os.path.exists(os.path.join(DEPLOY, src)),
                  f"compose.postgres: {name} mounts missing {src}")
        else:
            check(src in named, f"compose.postgres: {name} uses undeclared volume {src}")
lb = svc.get("nginx", {})
check(any(str(p).endswith(":80") for p in lb.get("ports", [])),
      "compose.postgres: the balancer (nginx) must be published")

# --- nginx ------------------------------------------------------------------------------------
# Parsed as nginx reads it: included into the http block of the image's nginx.conf, every
# directive checked against its allowed contexts and argument counts.
conf_path = os.path.join(DEPLOY, "nginx", "ragway.conf")
with tempfile.TemporaryDirectory() as tmp:
    main = os.path.join(tmp, "nginx.conf")
    with open(main, "w") as f:
        f.write(f"events {{}}\nhttp {{\n    include {conf_path};\n}}\n")
    parsed = crossplane.parse(main, catch_errors=True, strict=True)
# The same error is reported for the file and for the whole parse.
for msg in sorted({e["error"] for e in parsed["errors"]}):
    errors.append(f"nginx: {msg}")
check(len(parsed["config"]) == 2, "nginx: ragway.conf was not read through the include")
conf = read("deploy", "nginx", "ragway.conf")
upstream = re.search(r"upstream\s+(\w+)\s*\{([^}]*)\}", conf)
if check(upstream, "nginx: no upstream block"):
    servers = set(re.findall(r"server\s+([\w.-]+):3000", upstream.group(2)))
    check(servers == set(replicas), f"nginx: upstream {servers} is not the replicas {set(replicas)}")
    check(f"proxy_pass http://{upstream.group(1)};" in conf, "nginx: not proxying to the upstream")
check(re.search(r"proxy_buffering\s+off;", conf), "nginx: streamed answers need proxy_buffering off")
check(re.search(r"client_max_body_size\s+0;", conf),
      "nginx: uploads are limited by ragway (a clear JSON 413), not by nginx")
check(not re.search(r"proxy_next_upstream[^;]*non_idempotent", conf),
      "nginx: a POST must not be retried on another replica (it may have reached the model)")

# --- kubernetes -------------------------------------------------------------------------------
d = os.path.join(DEPLOY, "kubernetes", "postgres")
kz = yaml.safe_load(read("deploy", "kubernetes", "postgres", "kustomization.yaml"))
docs = []
for r in kz.get("resources", []):
    path = os.path.join(d, r)
    if check(os.path.exists(path), f"kubernetes/postgres: missing {r}"):
        docs += [x for x in yaml.safe_load_all(open(path)) if x]
on_disk = {os.path.basename(p) for p in glob.glob(os.path.join(d, "*.yaml"))}
check(on_disk - {"kustomization.yaml"} == set(kz.get("resources", [])),
      f"kubernetes/postgres: files not listed in kustomization.yaml: {on_disk}")
by = {(x["kind"], x["metadata"]["name"]): x for x in docs}
dep = by.get(("Deployment", "ragway"))
sts = by.get(("StatefulSet", "ragway-postgres"))
service = by.get(("Service", "ragway"))
pg_service = by.get(("Service", "ragway-postgres"))
if check(dep and sts and service and pg_service,
         "kubernetes/postgres: Deployment ragway, StatefulSet and Services expected"):
    check(dep["spec"]["replicas"] >= 2, "kubernetes/postgres: at least two replicas")
    check(dep["spec"].get("strategy", {}).get("type") == "RollingUpdate",
          "kubernetes/postgres: stateless replicas roll (RollingUpdate)")
    pod = dep["spec"]["template"]
    rgc = {c["name"]: c for c in pod["spec"]["containers"]}["ragway"]
    cenv = {e["name"]: e for e in rgc["env"]}
    for k in ("DATABASE_URL", "WEBUI_SECRET_KEY"):
        ref = cenv.get(k, {}).get("valueFrom", {}).get("secretKeyRef", {})
        check(ref.get("name") and not ref.get("optional"),
              f"kubernetes/postgres: {k} must come from a required Secret key")
    for k in cenv:
        env_known(k, "kubernetes/postgres")
    check(not any("persistentVolumeClaim" in v for v in pod["spec"].get("volumes", [])),
          "kubernetes/postgres: replicas keep nothing on a claim")
    check(rgc["readinessProbe"]["httpGet"]["path"] == "/ready",
          "kubernetes/postgres: readiness is not /ready")
    labels = pod["metadata"]["labels"]
    check(all(labels.get(k) == v for k, v in service["spec"]["selector"].items()),
          "kubernetes/postgres: the Service does not select the replicas")
    pg = sts["spec"]["template"]["spec"]["containers"][0]
    check("pgvector" in pg["image"], "kubernetes/postgres: the database must be a pgvector image")
    pg_labels = sts["spec"]["template"]["metadata"]["labels"]
    check(all(pg_labels.get(k) == v for k, v in pg_service["spec"]["selector"].items()),
          "kubernetes/postgres: the database Service does not select the database")
    kz_text = read("deploy", "kubernetes", "postgres", "kustomization.yaml")
    check(f"@{pg_service['metadata']['name']}:5432/" in kz_text,
          "kubernetes/postgres: the documented DATABASE_URL does not name the database Service")

for e in errors:
    print(f"deploy check: {e}")
print(f"deploy check: {len(errors)} problem(s) in the multi-replica layout", file=sys.stderr)
sys.exit(1 if errors else 0)
