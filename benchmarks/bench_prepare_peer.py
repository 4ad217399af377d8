"""
prepare_fineweb.py against build-nanogpt's fineweb.py: tokens/s from process start to the last shard on disk.

  git clone https://github.com/karpathy/build-nanogpt /tmp/build-nanogpt
  python benchmarks/bench_prepare_peer.py /tmp/build-nanogpt                  # 2 processes, then 1
  python benchmarks/bench_prepare_peer.py /tmp/build-nanogpt --num_proc 1 --repeat 5 --rounds 5

Both read the same local parquet (the bundled Gutenberg corpus repeated --repeat times) through datasets' parquet
loader, with the same datasets cache, tokenise with the same GPT-2 BPE ranks with N workers (the peer's pool
processes, our tokeniser threads), and write shards of the same size, for each N in --num_proc (2, then 1, by
default). Each round runs both once, in alternating order, so that whatever else the machine does slows both alike.
A run is timed from just before its process starts to the moment its last shard has its final name on disk (the
file's ctime: our shards are renamed into place, the peer's are written in place), so it includes Python start-up,
imports, opening the dataset and starting workers. Peak memory is reported twice, both sampled every 20 ms: the
largest resident high-water mark of any one process of the run, and the largest sum of resident sets over its
processes (forked workers count the pages they share with their parent again). The two outputs must hold the same
token stream. Then the ceilings: each BPE alone on the same documents in N processes of one thread each (tiktoken's
encode_ordinary_batch, as the peer's per-document calls; fastokens' flat batch call, as ours), with no start-up,
reading or writing timed. Last, start-up costs alone: interpreter, imports.

The peer runs from a temporary copy of the clone's fineweb.py in which exactly these lines are replaced (each must
occur once, so a changed upstream file stops the benchmark instead of timing something else):
  local_dir = "edu_fineweb10B"                          -> an absolute path in the benchmark's temporary directory
  shard_size = int(1e8)                                 -> --shard_size (the default is that same 1e8)
  fw = load_dataset("HuggingFaceFW/fineweb-edu", ...)   -> load_dataset("parquet", data_files=[corpus],
                                                           split="train", cache_dir=<shared cache>)
  enc = tiktoken.get_encoding("gpt2")                   -> tiktoken.Encoding built from data/gpt2.tiktoken with the
                                                           pattern and special token of train_gpt2.get_tokenizer
                                                           (get_encoding downloads the ranks)
  nprocs = max(1, os.cpu_count()//2)                    -> nprocs = --num_proc
Everything else, the pool, chunksize, per-document numpy conversion and np.save, is the published code. One
unmeasured run of each fills the datasets cache and the page cache first.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import gpt2_tokens  # noqa: E402
import train_gpt2  # noqa: E402

SCRIPT = os.path.join(REPO, "prepare_fineweb.py")
SAMPLE = os.path.join(REPO, "data", "gutenberg_sample.parquet")
SAMPLE_EVERY_S = 0.02


def make_corpus(path: str, repeat: int) -> int:
    table = pq.read_table(SAMPLE)
    pq.write_table(pa.concat_tables([table] * repeat), path)
    return table.num_rows * repeat


def peer_script(clone: str, dest: str, out_dir: str, corpus: str, cache: str, num_proc: int, shard_size: int) -> None:
    """Copy the peer's fineweb.py with only the substitutions listed in this file's docstring."""
    source_path = os.path.join(clone, "fineweb.py")
    with open(source_path) as f:
        text = f.read()
    enc = train_gpt2.get_tokenizer()
    encoding = (f"tiktoken.Encoding(name='gpt2', pat_str={enc._pat_str!r}, "
                f"mergeable_ranks=__import__('tiktoken.load').load.load_tiktoken_bpe({train_gpt2.BPE_RANKS_PATH!r}), "
                f"special_tokens={enc._special_tokens!r})")
    substitutions = [
        (r'local_dir = "edu_fineweb10B"', f"local_dir = {out_dir!r}"),
        (r"shard_size = int\(1e8\)", f"shard_size = {shard_size}"),
        (r'fw = load_dataset\("HuggingFaceFW/fineweb-edu", name=remote_name, split="train"\)',
         f'fw = load_dataset("parquet", data_files=[{corpus!r}], split="train", cache_dir={cache!r})'),
        (r'enc = tiktoken\.get_encoding\("gpt2"\)', f"enc = {encoding}"),
        (r"nprocs = max\(1, os\.cpu_count\(\)//2\)", f"nprocs = {num_proc}"),
    ]
    for pattern, replacement in substitutions:
        text, count = re.subn(pattern, lambda _: replacement, text)
        if count != 1:
            sys.exit(f"{source_path}: expected one line matching {pattern!r}, found {count}; "
                     "the peer's script changed, so the benchmark would no longer run it as published")
    with open(dest, "w") as f:
        f.write(text)


def tree_memory(pid: int) -> tuple[int, int]:
    """(summed resident bytes, largest resident high-water mark) over a process and its descendants. The kernel's
    rusage cannot give the latter: a child's maxrss starts from its parent's at fork and survives exec."""
    total, hwm, stack = 0, 0, [pid]
    while stack:
        p = stack.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                fields = dict(line.split(":", 1) for line in f)
            total += int(fields["VmRSS"].split()[0]) * 1024
            hwm = max(hwm, int(fields["VmHWM"].split()[0]) * 1024)
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    stack.extend(int(c) for c in f.read().split())
        except (OSError, ValueError, KeyError):
            continue  # exited between listing and reading
    return total, hwm


def timed_run(cmd: list[str], out_dir: str, cwd: str) -> dict:
    shutil.rmtree(out_dir, ignore_errors=True)
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = largest = 0
    while proc.poll() is None:
        total, hwm = tree_memory(proc.pid)
        peak, largest = max(peak, total), max(largest, hwm)
        time.sleep(SAMPLE_EVERY_S)
    wall = time.time() - t0
    err = proc.stderr.read().decode(errors="replace")
    if proc.returncode != 0:
        sys.exit(f"benchmark run failed ({proc.returncode}): {' '.join(cmd)}\n{err[-3000:]}")
    shards = sorted(f for f in os.listdir(out_dir) if f.endswith((".bin", ".npy")))
    last = max(os.stat(os.path.join(out_dir, f)).st_ctime for f in shards)
    return {"seconds": last - t0, "wall": wall, "peak": peak, "maxrss": largest,
            "shards": [os.path.join(out_dir, f) for f in shards]}


def import_seconds(statement: str, cwd: str, repeat: int = 3) -> float:
    """Median wall time of a Python process that only runs `statement`."""
    times = []
    for _ in range(repeat):
        t0 = time.time()
        subprocess.run([sys.executable, "-c", statement], cwd=cwd, check=True)
        times.append(time.time() - t0)
    return statistics.median(times)


def token_stream(paths: list[str]) -> np.ndarray:
    paths = sorted(paths, key=lambda p: os.path.splitext(p)[0].rsplit("_", 1)[1])  # by shard index: val, then train
    return np.concatenate([train_gpt2.read_shard(p) for p in paths])


def _encode_share(corpus: str, share: int, shares: int, bpe: str) -> tuple[int, float]:
    import pyarrow.parquet as pq
    texts = pq.read_table(corpus, columns=["text"]).column("text").to_pylist()[share::shares]
    if bpe == "tiktoken":
        enc = train_gpt2.get_tokenizer()
        enc.encode_ordinary_batch(texts[:2], num_threads=1)  # first-call set-up is not tokenising
        t0 = time.perf_counter()
        n = sum(len(ids) for ids in enc.encode_ordinary_batch(texts, num_threads=1))
        return n, time.perf_counter() - t0
    os.environ[gpt2_tokens.FASTOKENS_THREADS_VAR] = "1"  # one thread per process, as each of ours runs
    import fastokens
    fast = fastokens.Tokenizer.from_tiktoken(gpt2_tokens.BPE_RANKS_PATH, pattern=gpt2_tokens.GPT2_SPLIT_PATTERN,
                                             special_tokens={})
    batches, batch, chars = [], [], 0  # the batches prep's threads get: about 1M characters each
    for text in texts:
        batch.append(text)
        chars += len(text)
        if chars >= 1 << 20:
            batches.append(batch)
            batch, chars = [], 0
    batches.append(batch)
    fast.encode_batch_flat(texts[:2], split_special_tokens=True)
    t0 = time.perf_counter()
    n = sum(len(fast.encode_batch_flat(b, split_special_tokens=True)[0]) // 4 for b in batches)  # uint32 ids
    return n, time.perf_counter() - t0


def tokenizer_ceiling(corpus: str, num_proc: int, bpe: str) -> float:
    """Tokens/s of one BPE alone on the corpus, in num_proc processes with nothing else to do (no start-up, no
    reading, no writing): what no prepare script using that BPE can beat on this machine."""
    import multiprocessing
    with multiprocessing.get_context("spawn").Pool(num_proc) as pool:
        parts = pool.starmap(_encode_share, [(corpus, i, num_proc, bpe) for i in range(num_proc)])
    return sum(n for n, _ in parts) / max(dt for _, dt in parts)


def cpu_description() -> str:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and model in ("", platform.machine(), platform.processor()):
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    extras = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return f"{model} ({os.cpu_count()} CPUs{', ' + ' '.join(extras) if extras else ''})"


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def compare(args: argparse.Namespace, tmp: str, corpus: str, num_proc: int) -> dict:
    """Warm-up runs, then --rounds alternating timed runs of ours and the peer at num_proc workers each."""
    cache = os.path.join(tmp, "hf")
    out = {"ours": os.path.join(tmp, "ours"), "peer": os.path.join(tmp, "peer_out")}
    peer = os.path.join(tmp, f"peer{num_proc}", "fineweb.py")
    os.makedirs(os.path.dirname(peer))
    peer_script(args.peer, peer, out["peer"], corpus, cache, num_proc, args.shard_size)
    cmds = {
        "ours": [sys.executable, args.ours, "--data_files", corpus, "--out_dir", out["ours"], "--cache_dir", cache,
                 "--num_proc", str(num_proc), "--shard_size", str(args.shard_size)],
        "peer": [sys.executable, peer],
    }
    warm = {name: timed_run(cmd, out[name], tmp) for name, cmd in cmds.items()}
    ours_stream = token_stream(warm["ours"]["shards"])
    same = np.array_equal(ours_stream, token_stream(warm["peer"]["shards"]))
    tokens = len(ours_stream)
    print(f"\n--num_proc {num_proc} for both: {tokens:,} tokens, shard size {args.shard_size:,}; "
          f"same token stream: {same}")
    if not same:
        sys.exit("the two outputs differ")
    runs: dict[str, list[dict]] = {"ours": [], "peer": []}
    print("| round | ours tokens/s | peer tokens/s | ratio | ours s (wall) | peer s (wall) | load |")
    print("|---|---|---|---|---|---|---|")
    for r in range(args.rounds):
        for name in (["ours", "peer"] if r % 2 == 0 else ["peer", "ours"]):
            runs[name].append(timed_run(cmds[name], out[name], tmp))
        o, q = runs["ours"][-1], runs["peer"][-1]
        print(f"| {r + 1} | {tokens / o['seconds'] / 1e6:.2f} M | {tokens / q['seconds'] / 1e6:.2f} M | "
              f"{q['seconds'] / o['seconds']:.2f}x | {o['seconds']:.2f} ({o['wall']:.2f}) | "
              f"{q['seconds']:.2f} ({q['wall']:.2f}) | {os.getloadavg()[0]:.2f} |", flush=True)
    med = {n: statistics.median(r["seconds"] for r in runs[n]) for n in runs}
    ratios = [q["seconds"] / o["seconds"] for o, q in zip(runs["ours"], runs["peer"])]
    for n in ("ours", "peer"):
        print(f"{n}: median {tokens / med[n] / 1e6:.2f} M tokens/s ({med[n]:.2f} s to the last shard, "
              f"{statistics.median(r['wall'] for r in runs[n]):.2f} s whole process); peak RSS "
              f"{max(r['maxrss'] for r in runs[n]) / 2**20:.0f} MiB in its largest process, "
              f"{max(r['peak'] for r in runs[n]) / 2**20:.0f} MiB summed over its processes")
    print(f"ratio ours/peer: median {med['peer'] / med['ours']:.2f}x, per round {' '.join(f'{x:.2f}' for x in ratios)}")
    ceilings = {bpe: tokenizer_ceiling(corpus, num_proc, bpe) for bpe in ("fastokens", "tiktoken")}
    for bpe, rate in ceilings.items():
        print(f"{bpe} alone, {num_proc} process{'es' if num_proc > 1 else ''}, nothing else: "
              f"{rate / 1e6:.2f} M tokens/s = "
              f"{rate * med['peer'] / tokens:.2f}x the peer's end-to-end rate")
    return {"num_proc": num_proc, "tokens": tokens, "median": med, "ratio": med["peer"] / med["ours"],
            "maxrss": {n: max(r["maxrss"] for r in runs[n]) for n in runs}, "ceilings": ceilings}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("peer", help="a local clone of github.com/karpathy/build-nanogpt (its fineweb.py is run)")
    p.add_argument("--num_proc", type=int, nargs="+", default=[2, 1], help="process counts for both (default 2 1)")
    p.add_argument("--repeat", type=int, default=20, help="copies of the bundled corpus (~2M tokens each)")
    p.add_argument("--rounds", type=int, default=3, help="rounds, each running both once; medians are reported")
    p.add_argument("--shard_size", type=int, default=100_000_000, help="tokens per shard for both (default 1e8, "
                   "both scripts' default; the first shard is the val split in both)")
    p.add_argument("--ours", default=SCRIPT, help="the prepare_fineweb.py to run (default: this checkout's)")
    args = p.parse_args()
    if not os.path.isfile(os.path.join(args.peer, "fineweb.py")):
        sys.exit(f"{args.peer} has no fineweb.py: pass a clone of build-nanogpt")

    print(f"CPU: {cpu_description()}; Python {platform.python_version()}; load average before: {load()}")
    with tempfile.TemporaryDirectory() as tmp:
        corpus = os.path.join(tmp, "corpus.parquet")
        docs = make_corpus(corpus, args.repeat)
        print(f"corpus: bundled Gutenberg sample x{args.repeat} = {docs} documents")
        results = [compare(args, tmp, corpus, n) for n in args.num_proc]

    print(f"\nsummary (medians of {args.rounds} alternating rounds; load average after: {load()}):")
    print("| --num_proc | ours | build-nanogpt | ratio | peak RSS, ours / peer's largest process "
          "| fastokens alone | tiktoken alone |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        rate = {n: r["tokens"] / r["median"][n] / 1e6 for n in ("ours", "peer")}
        print(f"| {r['num_proc']} | {rate['ours']:.2f} M tokens/s ({r['median']['ours']:.2f} s) | "
              f"{rate['peer']:.2f} M tokens/s ({r['median']['peer']:.2f} s) | {r['ratio']:.2f}x | "
              f"{r['maxrss']['ours'] / 2**20:.0f} / {r['maxrss']['peer'] / 2**20:.0f} MiB | "
              f"{r['ceilings']['fastokens'] / 1e6:.2f} M tokens/s | {r['ceilings']['tiktoken'] / 1e6:.2f} M tokens/s |")
    ours_dir = os.path.dirname(os.path.abspath(args.ours))
    print(f"start-up alone: import prepare_fineweb {import_seconds('import prepare_fineweb', ours_dir):.2f} s "
          f"(python -c 'import torch' {import_seconds('import torch', ours_dir):.2f} s, "
          f"'import datasets' {import_seconds('import datasets', ours_dir):.2f} s, "
          f"'pass' {import_seconds('pass', ours_dir):.2f} s)")


if __name__ == "__main__":
    main()
