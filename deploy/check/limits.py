"""The memory figures the deploy files declare for ragway, in bytes: {where: (request, limit)}.
One reader for the static check (they must agree) and the smoke test (they must hold what was
measured)."""

import os
import re

import yaml

UNITS = {"": 1, "k": 1000, "K": 1024, "Ki": 1024, "M": 1000**2, "Mi": 1024**2, "G": 1000**3,
         "Gi": 1024**3, "m": 1024**2, "g": 1024**3}


def k8s_bytes(v):
    m = re.fullmatch(r"(\d+)(Ki|Mi|Gi|K|M|G)?", str(v))
    if not m:
        raise ValueError(f"memory quantity {v!r}")
    return int(m.group(1)) * UNITS[m.group(2) or ""]


def compose_bytes(v):
    m = re.fullmatch(r"(\d+)([kmg])?b?", str(v).lower())
    if not m:
        raise ValueError(f"compose memory {v!r}")
    return int(m.group(1)) * {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}[m.group(2) or ""]


def systemd_bytes(v):
    m = re.fullmatch(r"(\d+)([KMG])?", v.strip())
    if not m:
        raise ValueError(f"systemd memory {v!r}")
    return int(m.group(1)) * {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}[m.group(2) or ""]


def declared(root):
    out = {}
    deploy = os.path.join(root, "deploy")
    unit = open(os.path.join(deploy, "systemd", "ragway.service")).read()
    kv = dict(re.findall(r"^(Memory(?:High|Max))=(\S+)$", unit, re.M))
    out["systemd"] = (systemd_bytes(kv["MemoryHigh"]), systemd_bytes(kv["MemoryMax"]))
    for variant in ("sidecar", "standalone", "postgres"):
        with open(os.path.join(deploy, "kubernetes", variant, "deployment.yaml")) as f:
            for doc in yaml.safe_load_all(f):
                if doc and doc.get("kind") == "Deployment":
                    for c in doc["spec"]["template"]["spec"]["containers"]:
                        if c["name"] == "ragway":
                            r = c["resources"]
                            out[f"kubernetes/{variant}"] = (
                                k8s_bytes(r["requests"]["memory"]),
                                k8s_bytes(r["limits"]["memory"]))
    with open(os.path.join(deploy, "compose.yaml")) as f:
        compose = yaml.safe_load(f)
    out["compose"] = (None, compose_bytes(compose["services"]["ragway"]["mem_limit"]))
    # The replicas' file needs its required variables set to be YAML (${VAR:?msg}).
    with open(os.path.join(deploy, "compose.postgres.yaml")) as f:
        replicas = yaml.safe_load(re.sub(r"\$\{[A-Z0-9_]+:[?-][^}]*\}", "x", f.read()))
    for name, svc in replicas["services"].items():
        if name.startswith("ragway"):
            out[f"compose.postgres/{name}"] = (None, compose_bytes(svc["mem_limit"]))
    return out
