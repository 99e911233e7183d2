#!/usr/bin/env python3
"""Paired comparison of two TREC run files (`ragway eval --run-dir`) on one qrels file:
nDCG@10 of each (graded gains, log2 discount, as `ragway eval`), the mean difference B - A
and its 95 % paired-bootstrap interval (10,000 resamples of the queries, fixed seed).
Used to compare two data dirs, e.g. ingested with and without `rag.title-in-chunks`.

    python3 scripts/paired-runs.py A.run B.run DATASET/qrels/test.tsv
"""
import math
import random
import sys
from collections import defaultdict


def qrels(path):
    rel = defaultdict(dict)
    with open(path) as f:
        for i, line in enumerate(f):
            cols = line.rstrip("\n").split("\t")
            if len(cols) < 3:
                continue
            try:
                score = int(cols[2])
            except ValueError:
                if i == 0:
                    continue
                raise
            if score > 0:
                rel[cols[0]][cols[1]] = score
    return rel


def run(path):
    ranked = defaultdict(list)
    with open(path) as f:
        for line in f:
            q, _, d, rank, _, _ = line.split()
            ranked[q].append((int(rank), d))
    return {q: [d for _, d in sorted(v)] for q, v in ranked.items()}


def ndcg(ranked, rel, k=10):
    dcg = sum(rel.get(d, 0) / math.log2(i + 2) for i, d in enumerate(ranked[:k]))
    ideal = sorted(rel.values(), reverse=True)[:k]
    idcg = sum(g / math.log2(i + 2) for i, g in enumerate(ideal))
    return dcg / idcg if idcg else 0.0


def main():
    a, b, rel = run(sys.argv[1]), run(sys.argv[2]), qrels(sys.argv[3])
    qs = sorted(q for q in rel if q in a or q in b)
    sa = [ndcg(a.get(q, []), rel[q]) for q in qs]
    sb = [ndcg(b.get(q, []), rel[q]) for q in qs]
    diff = [y - x for x, y in zip(sa, sb)]
    n = len(diff)
    rng = random.Random(0x5EED)
    means = sorted(sum(diff[rng.randrange(n)] for _ in range(n)) / n for _ in range(10_000))
    lo, hi = means[250], means[9750]
    mark = " *" if lo > 0 or hi < 0 else ""
    print(f"queries {n}  A {sum(sa) / n:.4f}  B {sum(sb) / n:.4f}  "
          f"B-A {sum(diff) / n:+.4f} [{lo:+.4f}, {hi:+.4f}]{mark}")


if __name__ == "__main__":
    main()
