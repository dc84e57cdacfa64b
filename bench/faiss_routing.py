"""FAISS routing at scale: the index the router chooses (exact up to EXACT_SEARCH_LIMIT rows, HNSW above), its
single-query latency and its recall@1 against exact search.

    python bench/faiss_routing.py [--sizes 10000,100000,1000000] [--queries 1000]

Keys are random unit vectors of the routing width (1,280 image + 384 instruction dimensions) and queries are keys
plus noise, so the right answer is known. Goal: p50 <= 1 ms at 1 M keys with recall@1 >= 0.99.
"""
from __future__ import annotations

import argparse
import sys
import time

import faiss
import numpy as np

from cit_registry.router import EXACT_SEARCH_LIMIT, make_index

DIM = 1280 + 384


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000")
    parser.add_argument("--queries", type=int, default=1000)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    for n in (int(s) for s in args.sizes.split(",")):
        keys = rng.standard_normal((n, DIM), dtype=np.float32)
        keys /= np.linalg.norm(keys, axis=1, keepdims=True)
        picked = rng.integers(0, n, args.queries)
        queries = keys[picked] + 0.03 * rng.standard_normal((args.queries, DIM), dtype=np.float32)
        start = time.perf_counter()
        index = make_index(keys)
        built = time.perf_counter() - start
        exact = faiss.IndexFlatIP(DIM)
        exact.add(keys)
        truth = exact.search(queries, 1)[1][:, 0]
        found = index.search(queries, 1)[1][:, 0]
        latencies = []
        for q in queries[:200]:
            t = time.perf_counter()
            index.search(q[None], 1)
            latencies.append(time.perf_counter() - t)
        kind = "exact (flat)" if n <= EXACT_SEARCH_LIMIT else "HNSW"
        print(f"{n:>9,} keys: {kind}, built in {built:.1f} s, single-query p50 {np.median(latencies) * 1000:.3f} ms, "
              f"p99 {np.percentile(latencies, 99) * 1000:.3f} ms, recall@1 vs exact {np.mean(found == truth):.4f}")
        del keys, index, exact
    return 0


if __name__ == "__main__":
    sys.exit(main())
