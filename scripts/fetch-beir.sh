#!/usr/bin/env bash
# Installs a BEIR benchmark dataset for `ragway eval --dataset DIR`, verified against its
# published counts, under ${RAGWAY_CACHE:-$HOME/.cache/ragway}/beir/NAME (never in the repo).
#
#   scripts/fetch-beir.sh NAME [SOURCE] [--subset N]
#
# NAME: scifact, nfcorpus, arguana, fiqa, scidocs or trec-covid.
#
# SOURCE (or $BEIR_SOURCE): where the data comes from. No package registry reachable here
# (PyPI, npm, crates.io, Debian) ships a BEIR corpus: `beir`, `ir-datasets`, `mteb`,
# `pyserini`, `hydrag-benchmark` and the other BEIR-related packages only download from the
# BEIR/Hugging Face hosts at run time, and those hosts are not reachable here. So the data
# has to be brought in as one of:
#   - the official archive NAME.zip (BEIR's download, or any copy of it),
#   - a directory in BEIR layout (corpus.jsonl, queries.jsonl, qrels/test.tsv), e.g. the
#     unpacked archive,
#   - a directory in the Hugging Face BeIR layout (corpus.jsonl.gz, queries.jsonl.gz, and
#     qrels/test.tsv or NAME-qrels/test.tsv or test.tsv).
# Without a source the script uses what is already installed, or fails saying so.
#
# Verification: number of documents, of test queries and of test judgements, that every judged
# query has a text and that every judged document exists. The result is stamped with the
# files' sha256; a later run with the stamp intact does nothing (idempotent, cheap).
#
# --subset N: also writes NAME-subN beside it: every document judged relevant for a test
# query, plus documents drawn at random (seed 0) up to N in all; queries and judgements
# unchanged. For machines where embedding the whole corpus takes too long; say so when
# reporting numbers from it (scores on a subset are higher than on the full corpus).
#
# Prints the dataset directory on stdout (the subset's, with --subset).
# Environment: RAGWAY_CACHE, BEIR_SOURCE, PYTHON (default python3).
set -euo pipefail
shopt -s inherit_errexit

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
CACHE="${RAGWAY_CACHE:-$HOME/.cache/ragway}"
PYTHON="${PYTHON:-python3}"

say() { echo "fetch-beir: $*" >&2; }
die() {
  say "ERROR: $*"
  exit 1
}
usage() { die "usage: $0 NAME [SOURCE] [--subset N]  (NAME: scifact nfcorpus arguana fiqa scidocs trec-covid)"; }

NAME=""
SOURCE="${BEIR_SOURCE:-}"
SUBSET=""
while [ $# -gt 0 ]; do
  case "$1" in
    --subset)
      [ $# -ge 2 ] || usage
      SUBSET=$2
      shift 2
      ;;
    --subset=*)
      SUBSET=${1#--subset=}
      shift
      ;;
    -h | --help) usage ;;
    -*) usage ;;
    *)
      if [ -z "$NAME" ]; then NAME=$1; else SOURCE=$1; fi
      shift
      ;;
  esac
done
[ -n "$NAME" ] || usage
if [ -n "$SUBSET" ]; then
  case "$SUBSET" in '' | *[!0-9]*) die "--subset wants a number of documents, got '$SUBSET'" ;; esac
fi

# Published sizes (BEIR paper, Table 1; ir_datasets' beir/NAME/test): documents, test queries,
# test judgement rows.
case "$NAME" in
  scifact) EXPECT="5183 300 339" ;;
  nfcorpus) EXPECT="3633 323 12334" ;;
  arguana) EXPECT="8674 1406 1406" ;;
  fiqa) EXPECT="57638 648 1706" ;;
  scidocs) EXPECT="25657 1000 29928" ;;
  trec-covid) EXPECT="171332 50 66336" ;;
  *) die "unknown dataset '$NAME' (known: scifact nfcorpus arguana fiqa scidocs trec-covid)" ;;
esac

command -v "$PYTHON" >/dev/null 2>&1 || die "$PYTHON not found (needed to verify the JSON files)"

DEST="$CACHE/beir/$NAME"
canonical() {
  realpath -m "$1" 2>/dev/null || "$PYTHON" -c 'import os,sys; print(os.path.realpath(sys.argv[1]))' "$1"
}
case "$(canonical "$DEST")/" in
  "$(canonical "$ROOT")"/*) die "RAGWAY_CACHE points inside the repository ($CACHE); datasets must live outside it" ;;
esac
mkdir -p "$CACHE/beir"

sha256_of() {
  if command -v sha256sum >/dev/null 2>&1; then
    sha256sum "$1" | cut -d' ' -f1
  else
    "$PYTHON" -c 'import hashlib,sys; print(hashlib.sha256(open(sys.argv[1],"rb").read()).hexdigest())' "$1"
  fi
}

stamp_of() {
  local d=$1
  echo "name $NAME"
  echo "counts $EXPECT"
  for f in corpus.jsonl queries.jsonl qrels/test.tsv; do
    echo "sha256 $(sha256_of "$d/$f") $f"
  done
}

stamp_ok() {
  local d=$1
  [ -f "$d/.verified" ] && [ -f "$d/corpus.jsonl" ] && [ -f "$d/queries.jsonl" ] && [ -f "$d/qrels/test.tsv" ] \
    && [ "$(stamp_of "$d")" = "$(cat "$d/.verified")" ]
}

# Checks a BEIR-layout directory against EXPECT; prints what it found.
verify() {
  local expect
  read -r -a expect <<<"$EXPECT"
  "$PYTHON" - "$1" "${expect[@]}" <<'PY'
import json, sys
d, want = sys.argv[1], tuple(int(x) for x in sys.argv[2:5])
docs = set()
with open(f"{d}/corpus.jsonl", encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
        if line.strip():
            o = json.loads(line)
            if "_id" not in o or not isinstance(o.get("text", ""), str):
                sys.exit(f"corpus.jsonl line {n}: no _id or a non-string text")
            docs.add(str(o["_id"]))
queries = {}
with open(f"{d}/queries.jsonl", encoding="utf-8") as f:
    for line in f:
        if line.strip():
            o = json.loads(line)
            queries[str(o["_id"])] = o.get("text", "")
rows, qids, missing_docs = 0, set(), 0
with open(f"{d}/qrels/test.tsv", encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
        cols = line.rstrip("\n").split("\t")
        if n == 1 and not cols[-1].strip().lstrip("-").isdigit():
            continue  # header
        if len(cols) < 3:
            continue
        rows += 1
        qids.add(cols[0])
        missing_docs += cols[1] not in docs
got = (len(docs), len(qids), rows)
print(f"{got[0]} documents, {got[1]} test queries, {got[2]} test judgements", file=sys.stderr)
problems = []
if got != want:
    problems.append(f"expected {want[0]} documents, {want[1]} test queries, {want[2]} test judgements")
no_text = [q for q in qids if not queries.get(q)]
if no_text:
    problems.append(f"{len(no_text)} judged queries have no text in queries.jsonl (e.g. {no_text[0]})")
if missing_docs:
    problems.append(f"{missing_docs} judgements name documents missing from corpus.jsonl")
if problems:
    sys.exit("; ".join(problems))
PY
}

# Copies/converts SOURCE into BEIR layout in directory $2.
import_source() {
  local src=$1 out=$2 dir
  if [ -f "$src" ]; then
    case "$src" in
      *.zip) ;;
      *) die "$src: expected NAME.zip or a directory" ;;
    esac
    say "unpacking $src"
    "$PYTHON" - "$src" "$out/unzipped" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    for m in z.namelist():
        if m.startswith("/") or ".." in m.split("/"):
            sys.exit(f"unsafe member name in archive: {m}")
    z.extractall(sys.argv[2])
PY
    dir=$(find "$out/unzipped" \( -name corpus.jsonl -o -name corpus.jsonl.gz \) -print | head -n1)
    [ -n "$dir" ] || die "$src has no corpus.jsonl"
    dir=$(dirname "$dir")
  elif [ -d "$src" ]; then
    dir=$src
  else
    die "source $src does not exist"
  fi
  mkdir -p "$out/qrels"
  local f
  for f in corpus queries; do
    if [ -f "$dir/$f.jsonl" ]; then
      cp "$dir/$f.jsonl" "$out/$f.jsonl"
    elif [ -f "$dir/$f.jsonl.gz" ]; then
      gzip -dc "$dir/$f.jsonl.gz" >"$out/$f.jsonl"
    else
      die "$dir has neither $f.jsonl nor $f.jsonl.gz"
    fi
  done
  for f in "$dir/qrels/test.tsv" "$dir/$NAME-qrels/test.tsv" "$dir/test.tsv"; do
    if [ -f "$f" ]; then
      cp "$f" "$out/qrels/test.tsv"
      break
    fi
  done
  [ -f "$out/qrels/test.tsv" ] || die "$dir has no qrels/test.tsv"
}

if [ -n "$SOURCE" ]; then
  SRC_ABS="$(cd "$(dirname "$SOURCE")" && pwd -P)/$(basename "$SOURCE")"
  TMP="$(mktemp -d "$CACHE/beir/.$NAME.XXXXXX")"
  trap 'rm -rf "$TMP"' EXIT
  import_source "$SRC_ABS" "$TMP"
  say "verifying $NAME"
  verify "$TMP" || die "$SOURCE is not BEIR $NAME (see above)"
  rm -rf "$TMP/unzipped"
  stamp_of "$TMP" >"$TMP/.verified"
  if stamp_ok "$DEST" && [ "$(cat "$DEST/.verified")" = "$(cat "$TMP/.verified")" ]; then
    say "$DEST is already this data"
  else
    rm -rf "$DEST.old"
    [ ! -e "$DEST" ] || mv "$DEST" "$DEST.old"
    mv "$TMP" "$DEST"
    rm -rf "$DEST.old"
    say "installed $DEST"
  fi
elif stamp_ok "$DEST"; then
  say "$DEST is installed and verified"
elif [ -d "$DEST" ]; then
  say "verifying $DEST (no valid stamp)"
  verify "$DEST" || die "$DEST is not BEIR $NAME; remove it or give a SOURCE"
  stamp_of "$DEST" >"$DEST/.verified"
else
  die "$NAME is not installed and no SOURCE was given. No registry reachable from here ships \
BEIR corpora (checked: PyPI beir, ir-datasets, mteb, pyserini, hydrag-benchmark, beir-qdrant, \
milvus-beir; npm/crates have none), and the BEIR and Hugging Face hosts are not reachable. \
Bring $NAME.zip (BEIR's official archive) or an unpacked copy and run: $0 $NAME PATH"
fi

OUT=$DEST
if [ -n "$SUBSET" ]; then
  SUB="$CACHE/beir/$NAME-sub$SUBSET"
  STAMP_WANT="$(cat "$DEST/.verified") subset $SUBSET seed 0"
  if [ -f "$SUB/.subset" ] && [ "$(cat "$SUB/.subset")" = "$STAMP_WANT" ]; then
    say "$SUB is up to date"
  else
    rm -rf "$SUB"
    mkdir -p "$SUB/qrels"
    "$PYTHON" - "$DEST" "$SUB" "$SUBSET" <<'PY'
import json, random, sys
src, dst, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
judged = set()
with open(f"{src}/qrels/test.tsv", encoding="utf-8") as f:
    for i, line in enumerate(f):
        cols = line.rstrip("\n").split("\t")
        if len(cols) >= 3 and cols[2].strip().isdigit() and int(cols[2]) > 0:
            judged.add(cols[1])
lines = open(f"{src}/corpus.jsonl", encoding="utf-8").read().splitlines()
ids = [str(json.loads(l)["_id"]) for l in lines]
rest = [i for i, d in enumerate(ids) if d not in judged]
random.Random(0).shuffle(rest)
keep = {i for i, d in enumerate(ids) if d in judged}
keep.update(rest[: max(0, n - len(keep))])
with open(f"{dst}/corpus.jsonl", "w", encoding="utf-8") as f:
    for i in sorted(keep):
        f.write(lines[i] + "\n")
print(f"subset: {len(keep)} documents ({len(judged)} judged relevant)", file=sys.stderr)
PY
    cp "$DEST/queries.jsonl" "$SUB/queries.jsonl"
    cp "$DEST/qrels/test.tsv" "$SUB/qrels/test.tsv"
    echo "$STAMP_WANT" >"$SUB/.subset"
    say "wrote $SUB"
  fi
  OUT=$SUB
fi
echo "$OUT"
