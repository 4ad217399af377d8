"""
Tokenising throughput of prepare_fineweb.py with 1 and 2 tokeniser threads on the bundled Gutenberg corpus, with
fastokens' BPE and with the tiktoken fallback that prep uses where fastokens cannot be imported.

  python benchmarks/bench_prepare.py                 # corpus repeated 5x (~10M tokens), 3 rounds
  python benchmarks/bench_prepare.py --repeat 1 --rounds 5 --bpe fastokens

Each round runs the real command line once per BPE and worker count, back to back, so that whatever else the machine
is doing slows all alike; the table reports the median tokens/s of the tokenise-and-write phase (from prep.json,
which excludes Python start-up and opening the dataset) and its ratio to the first row. The fallback runs are the
same command with `import fastokens` made to fail. A first unmeasured run converts the corpus to datasets' Arrow
cache, which later runs reuse. The outputs of all runs must be byte-identical.
bench_prepare_peer.py times whole processes instead, from start to the last shard, against build-nanogpt's script.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import pyarrow as pa
import pyarrow.parquet as pq

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "prepare_fineweb.py")
SAMPLE = os.path.join(REPO, "data", "gutenberg_sample.parquet")


def make_corpus(path: str, repeat: int) -> int:
    """Write the bundled corpus `repeat` times over into one parquet file (a longer run gives a steadier rate)."""
    table = pq.read_table(SAMPLE)
    pq.write_table(pa.concat_tables([table] * repeat), path)
    return table.num_rows * repeat


# prepare_fineweb.py as a platform without a fastokens wheel runs it: the import fails, prep falls back to tiktoken
WITHOUT_FASTOKENS = ("import os, runpy, sys; sys.modules['fastokens'] = None; sys.argv = sys.argv[1:]; "
                     "sys.path.insert(0, os.path.dirname(sys.argv[0])); "
                     "runpy.run_path(sys.argv[0], run_name='__main__')")


def run(corpus: str, out_dir: str, cache_dir: str, num_proc: int, bpe: str = "fastokens") -> dict:
    launch = [sys.executable] if bpe == "fastokens" else [sys.executable, "-c", WITHOUT_FASTOKENS]
    cmd = [
        *launch, SCRIPT, "--data_files", corpus, "--out_dir", out_dir, "--cache_dir", cache_dir,
        "--num_proc", str(num_proc), "--shard_size", "1M", "--val_tokens", "100k", "--overwrite",
    ]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.time() - t0
    if proc.returncode != 0:
        sys.exit(f"benchmark run failed: {' '.join(cmd)}\n{proc.stderr}")
    with open(os.path.join(out_dir, "prep.json")) as f:
        summary = json.load(f)
    summary["wall_seconds"] = wall
    return summary


def same_shards(a: str, b: str) -> bool:
    files = sorted(f for f in os.listdir(a) if f.endswith(".bin"))
    return files == sorted(f for f in os.listdir(b) if f.endswith(".bin")) and all(
        filecmp.cmp(os.path.join(a, f), os.path.join(b, f), shallow=False) for f in files
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--repeat", type=int, default=5,
                   help="copies of the bundled corpus to tokenise in each run (~2M tokens each)")
    p.add_argument("--rounds", type=int, default=3, help="measured runs per worker count; the median is reported")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2],
                   help="worker counts to compare; the first is the baseline")
    p.add_argument("--bpe", nargs="+", default=["fastokens", "tiktoken"], choices=["fastokens", "tiktoken"],
                   help="BPEs to compare: fastokens', and tiktoken's as the fallback uses it")
    args = p.parse_args()
    variants = [(bpe, n) for bpe in args.bpe for n in args.workers]

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        corpus = os.path.join(tmp, "corpus.parquet")
        docs = make_corpus(corpus, args.repeat)
        cache = os.path.join(tmp, "hf")
        out = {v: os.path.join(tmp, f"out_{v[0]}_{v[1]}") for v in variants}
        warm = run(corpus, out[variants[0]], cache, variants[0][1], variants[0][0])
        rates: dict[tuple[str, int], list[float]] = {v: [] for v in variants}
        walls: dict[tuple[str, int], list[float]] = {v: [] for v in variants}
        for _ in range(args.rounds):
            for v in variants:
                s = run(corpus, out[v], cache, v[1], v[0])
                rates[v].append(s["tokens_per_second"])
                walls[v].append(s["wall_seconds"])
        identical = all(same_shards(out[variants[0]], out[v]) for v in variants[1:])

    base = statistics.median(rates[variants[0]])
    print(f"corpus: bundled Gutenberg sample x{args.repeat} = {docs} documents, {warm['tokens']['total']:,} tokens; "
          f"{args.rounds} rounds; {os.cpu_count()} CPUs, Python {platform.python_version()}")
    print(f"| BPE | workers | tokens/s (median) | min .. max | wall s (median) | vs {variants[0][0]}, "
          f"{variants[0][1]} worker |")
    print("|---|---|---|---|---|---|")
    for v in variants:
        med = statistics.median(rates[v])
        print(f"| {v[0]} | {v[1]} | {med / 1e6:.2f} M | {min(rates[v]) / 1e6:.2f} .. {max(rates[v]) / 1e6:.2f} M | "
              f"{statistics.median(walls[v]):.1f} | {med / base:.2f}x |")
    print(f"byte-identical shards across BPEs and worker counts: {identical}")
    # other work on the machine skews the comparison: the benchmark alone keeps the 1-minute load near its worker count
    print(f"1-minute load average: {load_before:.2f} before, {os.getloadavg()[0]:.2f} after")
    if not identical:
        sys.exit(1)


if __name__ == "__main__":
    main()
