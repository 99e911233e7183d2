#!/usr/bin/env python3
"""Builds the known-item retrieval sets of the README ("Retrieval quality") from the man
pages installed on this machine, in BEIR layout (corpus.jsonl, queries.jsonl,
qrels/test.tsv and qrels/dev.tsv), for `ragway eval`.

query = a page's one-line NAME description; the one relevant document = that page, whose
text is the page without its NAME section (otherwise the query would be a verbatim
substring). Pages whose description is shared with another page are kept as documents but
get no query (no single right answer). Selection is deterministic (sha256 of the file name),
so every machine with the same man pages builds the same sets.

usage: scripts/known-item-sets.py OUT_DIR   (writes OUT_DIR/man and OUT_DIR/gcloud)
"""
import gzip
import hashlib
import json
import os
import re
import sys

MAN1 = "/usr/share/man/man1"
# Documents per set and characters kept per document: sized so one ingest of both sets
# takes minutes on two shared cores.
DOCS = 500
MAX_CHARS = 3000
QUERIES = 250


def roff_to_text(src):
    out = []
    for line in src.splitlines():
        if line.startswith(".\\\"") or line.startswith("'\\\""):
            continue
        if line.startswith("."):
            parts = line.split(None, 1)
            if parts[0] in (".SH", ".SS", ".B", ".I", ".BR", ".IR", ".BI", ".IB", ".RB", ".RI", ".TP", ".IP") and len(parts) > 1:
                line = parts[1].replace('"', "")
            else:
                continue
        out.append(line)
    text = "\n".join(out)
    text = re.sub(r"\\f(\[[^\]]*\]|\(..|.)", "", text)
    text = re.sub(r"\\\(em|\\\(en", "-", text)
    text = re.sub(r"\\\(..", "", text)
    text = re.sub(r"\\\[[^\]]*\]", "", text)
    text = text.replace("\\-", "-").replace("\\ ", " ").replace("\\e", "\\").replace("\\&", "")
    text = re.sub(r"\\.", "", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


def split_name(text):
    """(description, text without the NAME section) or None."""
    m = re.search(r"^NAME\s*\n(.*?)(?=^[A-Z][A-Z ]+\s*$)", text, re.S | re.M)
    if not m:
        return None
    name = " ".join(m.group(1).split())
    if " - " not in name:
        return None
    desc = name.split(" - ", 1)[1].strip()
    rest = (text[: m.start()] + text[m.end():]).strip()
    return desc, rest


def key(f):
    return hashlib.sha256(f.encode()).hexdigest()


def build(files, out):
    docs = []
    for f in sorted(files, key=key):
        if len(docs) >= DOCS:
            break
        try:
            raw = gzip.open(os.path.join(MAN1, f)).read().decode("utf-8", "replace")
        except OSError:
            continue
        if raw.lstrip().startswith(".so "):
            continue  # an alias of another page
        parsed = split_name(roff_to_text(raw))
        if not parsed:
            continue
        desc, text = parsed
        if len(desc.split()) < 3 or len(text) < 200:
            continue
        docs.append((f[: -len(".1.gz")], desc, text[:MAX_CHARS]))
    counts = {}
    for _, d, _ in docs:
        counts[d.lower()] = counts.get(d.lower(), 0) + 1
    os.makedirs(os.path.join(out, "qrels"), exist_ok=True)
    with open(os.path.join(out, "corpus.jsonl"), "w") as c:
        for i, (name, _, text) in enumerate(docs):
            c.write(json.dumps({"_id": name, "title": "", "text": text}) + "\n")
    asked = [(n, d) for n, d, _ in docs if counts[d.lower()] == 1][: 2 * QUERIES]
    with open(os.path.join(out, "queries.jsonl"), "w") as q:
        for i, (_, d) in enumerate(asked):
            q.write(json.dumps({"_id": f"q{i}", "text": d}) + "\n")
    # Alternate queries between the dev (tuning) and test (reporting) splits.
    for split, parity in (("dev", 1), ("test", 0)):
        with open(os.path.join(out, "qrels", f"{split}.tsv"), "w") as r:
            r.write("query-id\tcorpus-id\tscore\n")
            for i, (n, _) in enumerate(asked):
                if i % 2 == parity:
                    r.write(f"q{i}\t{n}\t1\n")
    print(f"{out}: {len(docs)} documents, {len(asked)} queries")


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    files = [f for f in os.listdir(MAN1) if f.endswith(".1.gz")]
    build([f for f in files if not f.startswith("gcloud")], os.path.join(sys.argv[1], "man"))
    build([f for f in files if f.startswith("gcloud_")], os.path.join(sys.argv[1], "gcloud"))


main()
