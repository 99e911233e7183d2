"""Static checks of deploy/ beyond what the generic validators know: the rules the issue sets
for each artefact, and agreement between the artefacts and the code (environment variable
names ragway reads, metric names it exports, ports, memory limits).

Usage: python artifacts.py REPO_ROOT COMPOSE_SPEC_JSON
Prints one line per failed rule and exits 1 if any failed.
"""

import glob
import json
import os
import re
import sys

import jsonschema
import yaml
from dockerfile_parse import DockerfileParser

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import limits  # noqa: E402

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
SCRIPT = read("deploy", "systemd", "ragway-upgrade.sh")


def env_known(name, where):
    """Every variable a deploy file sets must be one ragway (or the systemd wrapper) reads."""
    check(f'"{name}"' in SRC or re.search(rf"\b{name}\b", SCRIPT) is not None,
          f"{where}: sets {name}, which neither ragway nor ragway-upgrade.sh reads")


# --- Dockerfile -------------------------------------------------------------------------------
df = DockerfileParser(path=os.path.join(DEPLOY, "Dockerfile"))
ins = df.structure
froms = [i for i in ins if i["instruction"] == "FROM"]
check(len(froms) >= 2, "Dockerfile: not multi-stage")
final_line = froms[-1]["startline"]
build = [i for i in ins if i["startline"] < final_line]
final = [i for i in ins if i["startline"] > final_line]
check(re.match(r"rust:\S*bookworm", froms[0]["value"].replace("${RUST_VERSION}", "x")),
      f"Dockerfile: build stage is not the official Rust image on bookworm: {froms[0]['value']}")
check(re.search(r"distroless/cc-debian12|debian:\S*-slim", froms[-1]["value"]),
      f"Dockerfile: runtime stage is not distroless cc-debian12 or Debian slim: {froms[-1]['value']}")
runs = " ".join(i["value"] for i in build if i["instruction"] == "RUN")
check("cargo build --release --locked" in runs, "Dockerfile: no `cargo build --release --locked`")
check("scripts/fetch-model.sh" in runs, "Dockerfile: ONNX Runtime/model not from scripts/fetch-model.sh")
for i in ins:
    if i["instruction"] == "RUN":
        check(not re.search(r"\b(curl|wget|git clone)\b", i["value"]),
              f"Dockerfile:{i['startline'] + 1}: downloads outside the package registries")
    if i["instruction"] == "ADD":
        check(not re.search(r"https?://", i["value"]), f"Dockerfile:{i['startline'] + 1}: ADD URL")
users = [i["value"].split(":")[0] for i in final if i["instruction"] == "USER"]
check(users and users[-1] not in ("root", "0"), "Dockerfile: runtime stage does not run as non-root")
exposed = " ".join(i["value"] for i in final if i["instruction"] == "EXPOSE").split()
check({"3000", "9091"} <= set(exposed), f"Dockerfile: EXPOSE {exposed}, expected 3000 and 9091")
hc = [i["value"] for i in final if i["instruction"] == "HEALTHCHECK"]
check(hc and "probe" in hc[-1] and "CMD" in hc[-1], "Dockerfile: no HEALTHCHECK running `ragway probe`")
env = df.envs
check(env.get("RAGWAY_LISTEN") == "0.0.0.0:3000", "Dockerfile: RAGWAY_LISTEN is not 0.0.0.0:3000")
check(env.get("RAGWAY_METRICS_LISTEN") == "0.0.0.0:9091",
      "Dockerfile: RAGWAY_METRICS_LISTEN is not 0.0.0.0:9091")
vols = " ".join(i["value"] for i in final if i["instruction"] == "VOLUME")
check(env.get("DATA_DIR", "?") in vols, "Dockerfile: DATA_DIR is not a VOLUME")
copied = " ".join(i["value"] for i in final if i["instruction"] == "COPY")
for k in ("ORT_DYLIB_PATH", "RAGWAY_MODEL_DIR"):
    v = env.get(k, "")
    check(v.startswith("/opt/ragway/") and "/opt/ragway" in copied,
          f"Dockerfile: {k}={v!r} is not inside the copied /opt/ragway")
for k in env:
    env_known(k, "Dockerfile ENV")
entry = [i["value"] for i in final if i["instruction"] in ("ENTRYPOINT", "CMD")]
check(entry and "ragway" in entry[0] and "serve" in " ".join(entry),
      "Dockerfile: does not start `ragway serve`")
ignored = read(".dockerignore").split()
for d in ("target/", "models/", "data/", ".cache/"):
    check(d in ignored, f".dockerignore: {d} missing")

# --- compose ----------------------------------------------------------------------------------
raw = read("deploy", "compose.yaml")
# The schema applies after interpolation: ${VAR:-default} → default, as with an empty shell.
interpolated = re.sub(r"\$\{[A-Z0-9_]+:-([^}]*)\}", r"\1", raw)
check("${" not in interpolated, "compose: a variable without a default")
compose = yaml.safe_load(interpolated)
with open(sys.argv[2]) as f:
    schema = json.load(f)
for e in jsonschema.Draft7Validator(schema).iter_errors(compose):
    errors.append(f"compose: schema: {'/'.join(map(str, e.absolute_path))}: {e.message}")
svc = compose.get("services", {})
check({"ollama", "ragway"} <= set(svc), "compose: ollama and ragway services expected")
rg = svc.get("ragway", {})
check(any(str(p).endswith(":3000") for p in rg.get("ports", [])),
      "compose: ragway's port 3000 is not published")
renv = rg.get("environment", {})
for k in ("WEBUI_ADMIN_EMAIL", "WEBUI_ADMIN_PASSWORD", "WEBUI_SECRET_KEY"):
    check(k in renv, f"compose: ragway does not take {k} from the environment")
check(renv.get("OLLAMA_BASE_URL") == "http://ollama:11434",
      "compose: ragway is not pointed at the ollama service")
for k in renv:
    env_known(k, "compose ragway.environment")
named = set(compose.get("volumes", {}))
for name, s in svc.items():
    for v in s.get("volumes", []):
        src = str(v).split(":")[0]
        if src.startswith("."):
            check(os.path.exists(os.path.join(DEPLOY, src)), f"compose: {name} mounts missing {src}")
        else:
            check(src in named, f"compose: {name} uses undeclared volume {src}")
for name in ("prometheus", "grafana"):
    check(svc.get(name, {}).get("profiles"), f"compose: {name} must be optional (a profile)")
b = rg.get("build", {})
check(os.path.exists(os.path.join(DEPLOY, b.get("context", "?"), b.get("dockerfile", "?"))),
      "compose: ragway's build context/dockerfile do not exist")

# --- Prometheus and Grafana -------------------------------------------------------------------
prom = yaml.safe_load(read("deploy", "prometheus", "prometheus.yml"))
targets = [t for job in prom["scrape_configs"] for sc in job.get("static_configs", [])
           for t in sc["targets"]]
metrics_port = env.get("RAGWAY_METRICS_LISTEN", ":").rsplit(":", 1)[1]
check(f"ragway:{metrics_port}" in targets, f"prometheus.yml: no target ragway:{metrics_port}")
exported = set(re.findall(r'"(ragway_[a-z_]+)"', SRC))
dash = json.loads(read("deploy", "grafana", "ragway-dashboard.json"))
used = set()
for p in dash["panels"]:
    for t in p.get("targets", []):
        for m in re.findall(r"\bragway_[a-z_]+", t["expr"]):
            used.add(re.sub(r"_(bucket|sum|count)$", "", m))
for m in sorted(used - exported):
    errors.append(f"grafana dashboard: {m} is not a metric ragway exports")
# A metric added to the code without a panel is worth a note, not a red build.
for m in sorted(exported - used):
    print(f"deploy check: warning: grafana dashboard: metric {m} has no panel", file=sys.stderr)

# --- Kubernetes -------------------------------------------------------------------------------
for variant in ("sidecar", "standalone", "monitoring"):
    d = os.path.join(DEPLOY, "kubernetes", variant)
    kz = yaml.safe_load(read("deploy", "kubernetes", variant, "kustomization.yaml"))
    check(kz.get("kind") == "Kustomization", f"{variant}/kustomization.yaml: not a Kustomization")
    docs = []
    for r in kz.get("resources", []):
        path = os.path.join(d, r)
        if check(os.path.exists(path), f"{variant}/kustomization.yaml: missing {r}"):
            docs += [x for x in yaml.safe_load_all(open(path)) if x]
    on_disk = {os.path.basename(p) for p in glob.glob(os.path.join(d, "*.yaml"))}
    check(on_disk - {"kustomization.yaml"} == set(kz.get("resources", [])),
          f"{variant}: files not listed in kustomization.yaml: {on_disk}")
    if variant == "monitoring":
        sm = docs[0]
        check(sm["kind"] == "ServiceMonitor" and sm["spec"]["endpoints"][0]["port"] == "metrics",
              "monitoring: ServiceMonitor must scrape the Service port named metrics")
        continue
    kinds = {x["kind"]: x for x in docs}
    dep, service = kinds.get("Deployment"), kinds.get("Service")
    if not check(dep and service and "PersistentVolumeClaim" in kinds,
                 f"{variant}: Deployment, Service and PersistentVolumeClaim expected"):
        continue
    pod = dep["spec"]["template"]
    cs = {c["name"]: c for c in pod["spec"]["containers"]}
    rgc = cs["ragway"]
    check(rgc["readinessProbe"]["httpGet"]["path"] == "/ready", f"{variant}: readiness is not /ready")
    check(rgc["livenessProbe"]["httpGet"]["path"] == "/health", f"{variant}: liveness is not /health")
    cenv = {e["name"]: e for e in rgc["env"]}
    check("secretKeyRef" in cenv.get("WEBUI_SECRET_KEY", {}).get("valueFrom", {}),
          f"{variant}: WEBUI_SECRET_KEY does not come from a Secret")
    for k in cenv:
        env_known(k, f"kubernetes/{variant}")
    url = cenv.get("OLLAMA_BASE_URL", {}).get("value")
    if variant == "sidecar":
        check("ollama" in cs and url == "http://127.0.0.1:11434",
              "sidecar: ragway must share the Ollama pod and use 127.0.0.1:11434")
    else:
        check("ollama" not in cs and url and "127.0.0.1" not in url,
              "standalone: ragway alone, in front of an Ollama Service")
    claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["spec"]["volumes"]
              if "persistentVolumeClaim" in v}
    pvcs = {x["metadata"]["name"] for x in docs if x["kind"] == "PersistentVolumeClaim"}
    check(claims <= pvcs, f"{variant}: claims {claims - pvcs} not defined")
    check(any(m["mountPath"] == "/data" for m in rgc["volumeMounts"]),
          f"{variant}: no data volume on /data")
    check(dep["spec"].get("strategy", {}).get("type") == "Recreate",
          f"{variant}: the single-process database needs strategy Recreate")
    labels = pod["metadata"]["labels"]
    check(all(labels.get(k) == v for k, v in service["spec"]["selector"].items()),
          f"{variant}: the Service does not select the pod")
    ports = {p["name"]: p["containerPort"] for p in rgc["ports"]}
    for p in service["spec"]["ports"]:
        check(p["targetPort"] in ports, f"{variant}: Service targets unknown port {p['targetPort']}")
    ann = pod["metadata"].get("annotations", {})
    check(ann.get("prometheus.io/port") == str(ports.get("metrics")) == metrics_port,
          f"{variant}: scrape annotation port is not the metrics port")
    check(rgc["securityContext"].get("readOnlyRootFilesystem") is True,
          f"{variant}: ragway's root filesystem should be read-only")

# --- systemd ----------------------------------------------------------------------------------
unit = read("deploy", "systemd", "ragway.service")
directives = dict(re.findall(r"^([A-Za-z]+)=(.*)$", unit, re.M))
for k, want in {"ProtectSystem": "strict", "NoNewPrivileges": "yes", "PrivateTmp": "yes",
                "ProtectHome": "yes"}.items():
    check(directives.get(k) == want, f"ragway.service: {k}={want} expected")
check(directives.get("DynamicUser") == "yes" or "User" in directives,
      "ragway.service: DynamicUser or a dedicated User expected")
check("StateDirectory" in directives, "ragway.service: StateDirectory expected")
check("AF_UNIX" in directives.get("RestrictAddressFamilies", ""),
      "ragway.service: the upgrade needs AF_UNIX in RestrictAddressFamilies")
check("reload" in directives.get("ExecReload", ""), "ragway.service: ExecReload must upgrade")
check(directives.get("PIDFile", "").startswith("/run/" + directives.get("RuntimeDirectory", "?")),
      "ragway.service: PIDFile must live in the RuntimeDirectory")
for m in re.findall(r"^Environment=([A-Z0-9_]+)=", unit, re.M):
    env_known(m, "ragway.service")

# --- memory figures agree ---------------------------------------------------------------------
mem = limits.declared(ROOT)
lims = {where: lim for where, (_, lim) in mem.items()}
check(len(set(lims.values())) == 1, f"memory limits disagree: {lims}")
for where, (req, lim) in mem.items():
    check(req is None or req < lim, f"{where}: request {req} not below limit {lim}")

for e in errors:
    print(f"deploy check: {e}")
print(f"deploy check: {len(errors)} problem(s) in the artefacts' rules", file=sys.stderr)
sys.exit(1 if errors else 0)
