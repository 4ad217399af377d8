"""
Checks for prepare_fineweb.py: shards hold exactly the independently tokenised corpus, in train_gpt2.py's format;
output does not depend on worker count or streaming; interrupted runs resume to byte-identical output; user errors
are one line. Corpora are tiny and generated here, in FineWeb's column layout; shards are small so that every run
writes several of them and documents cross shard boundaries.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import export_hf
import gpt2_tokens
import prepare_fineweb
import train_gpt2
from conftest import ROOT, assert_one_line_error, child_env, expected_tokens, free_port, shard_bytes

SCRIPT = os.path.join(ROOT, "prepare_fineweb.py")
SHARD = 2000  # tokens per shard in these tests
VAL = 1500  # val split: less than one shard, so the first train shard follows a short val shard
EOT = 50256  # <|endoftext|> in GPT-2's published vocabulary

WORDS = (
    "the of and to in education students learning teacher school science history water energy cell plant "
    "naïve café Zürich 東京 данные ελληνικά 🙂 — don't it's we'll 1984 3.14159 $100 <b>bold</b> "
    "http://example.org/a?b=c"
).split()


def make_docs(n: int, seed: int = 0) -> list[dict]:
    """FineWeb-like rows: random prose with odd characters, an empty document, a document quoting the special
    token's text, and one long enough to span several shards."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        if i == 3:
            text = ""
        elif i == 5:
            text = "Plain text may contain <|endoftext|> literally; it is not a document boundary."
        elif i == 7:
            text = " ".join(rng.choice(WORDS) for _ in range(3 * SHARD))
        else:
            paragraphs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 60)))
                          for _ in range(rng.randint(1, 4))]
            text = "\n\n".join(paragraphs) + rng.choice(["", "\n", "  "])
        docs.append({
            "text": text,
            "id": f"<urn:uuid:{rng.getrandbits(128):032x}>",
            "dump": "CC-MAIN-2024-10",
            "url": f"https://example.org/{i}",
            "date": "2024-02-20T12:00:00Z",
            "file_path": "s3://commoncrawl/crawl-data/x.warc.gz",
            "language": "en",
            "language_score": round(rng.uniform(0.6, 1.0), 4),
            "token_count": 0,
            "score": round(rng.uniform(2.5, 5.0), 3),
            "int_score": rng.randint(3, 5),
        })
    return docs


def write_corpus(directory, docs: list[dict], kind: str, files: int = 2) -> str:
    """Write docs as `files` parquet/jsonl files (FineWeb layout) or one .txt per document; returns the glob."""
    os.makedirs(directory, exist_ok=True)
    if kind == "txt":
        for i, d in enumerate(docs):
            with open(os.path.join(directory, f"doc_{i:04d}.txt"), "w", encoding="utf-8", newline="") as f:
                f.write(d["text"])
        return os.path.join(directory, "*.txt")
    per_file = -(-len(docs) // files)
    for f in range(files):
        part = docs[f * per_file : (f + 1) * per_file]
        path = os.path.join(directory, f"part_{f:02d}.{kind}")
        if kind == "parquet":
            pq.write_table(pa.Table.from_pylist(part), path)
        else:
            with open(path, "w", encoding="utf-8") as fh:
                fh.writelines(json.dumps(d, ensure_ascii=False) + "\n" for d in part)
    return os.path.join(directory, f"*.{kind}")


def read_header_and_tokens(path: str) -> np.ndarray:
    """Parse an llm.c shard by hand (not through train_gpt2) and check its header against the file."""
    header = np.fromfile(path, dtype=np.int32, count=256)
    assert header[0] == 20240520 and header[1] == 1, f"{path}: bad magic/version {header[:2]}"
    assert (header[3:] == 0).all()
    n = int(header[2])
    assert os.path.getsize(path) == 256 * 4 + 2 * n, f"{path}: header says {n} tokens, size disagrees"
    tokens = np.fromfile(path, dtype=np.uint16, offset=256 * 4)
    assert np.array_equal(tokens, train_gpt2.read_shard(path))
    return tokens


def shard_files(out_dir) -> list[str]:
    return sorted(f for f in os.listdir(out_dir) if f.endswith(".bin"))


def stream_of(out_dir) -> np.ndarray:
    """All shards in index order (val first, then train), as one token stream."""
    files = sorted(shard_files(out_dir), key=lambda f: f.rsplit("_", 1)[1])
    return np.concatenate([read_header_and_tokens(os.path.join(out_dir, f)) for f in files])


def run(capsys, *argv) -> tuple[int, str, str]:
    """Run the command line in this process (each CLI subprocess costs seconds of imports)."""
    code = prepare_fineweb.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def prepare_cli(*argv, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """`python prepare_fineweb.py ARGV` in a new process."""
    return subprocess.run([sys.executable, SCRIPT, *map(str, argv)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout, cwd=ROOT)


@pytest.fixture(scope="module", autouse=True)
def small_tasks():
    """Pool tasks of a few documents, so that even these tiny corpora make dozens of tasks: result order across
    workers and the in-flight limit are then exercised. (Subprocess runs keep the default task size, and must
    still produce the same bytes.)"""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(prepare_fineweb, "TASK_CHARS", 256)
        yield


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    docs = make_docs(40)
    root = tmp_path_factory.mktemp("corpus")
    tokens, lengths = expected_tokens([d["text"] for d in docs])
    return {"docs": docs, "root": root, "tokens": tokens, "lengths": lengths,
            "parquet": write_corpus(root / "parquet", docs, "parquet"), "cache": str(root / "hf")}


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory) -> str:
    """An uninterrupted run over the parquet corpus, which other outputs must match byte for byte."""
    out = tmp_path_factory.mktemp("reference") / "out"
    code = prepare_fineweb.main(["--data_files", corpus["parquet"], "--out_dir", str(out),
                                 "--cache_dir", corpus["cache"],
                                 "--shard_size", str(SHARD), "--val_tokens", str(VAL), "--num_proc", "2"])
    assert code == 0
    return str(out)


def common(corpus) -> list:
    return ["--cache_dir", corpus["cache"], "--shard_size", SHARD, "--val_tokens", VAL]


# ----------------------------------------------------------------------------------------------------------------
# tokenizer


def test_tokenizer_matches_published_gpt2_ids():
    enc = train_gpt2.get_tokenizer()
    assert enc.encode("Hello world") == [15496, 995]
    assert enc.encode(" the") == [262]
    assert enc.encode("<|endoftext|>", allowed_special="all") == [EOT]
    assert EOT not in enc.encode_ordinary("<|endoftext|>")  # document text never becomes the special token
    tokens, lengths = prepare_fineweb.tokenize_batch(["Hello world", "", " the"])
    assert tokens.dtype == np.uint16
    assert tokens.tolist() == [EOT, 15496, 995, EOT, EOT, 262]
    assert lengths.tolist() == [3, 1, 2]


def test_batch_tokenising_equals_one_document_at_a_time():
    texts = [d["text"] for d in make_docs(12, seed=3)] + [
        "a lone surrogate \ud800 repaired as encode_ordinary repairs it",  # as a JSON escape can produce
        "<|endoftext|><|endoftext|>",
        "   \n\n\t ",
        "x" * 70_000,  # one long run of letters: a single regex piece, many merges
    ]
    tokens, lengths = prepare_fineweb.tokenize_batch(texts)
    expected, expected_lengths = expected_tokens(texts)
    assert lengths.tolist() == expected_lengths
    assert tokens.dtype == np.uint16 and np.array_equal(tokens, expected)


@functools.lru_cache(maxsize=1)
def hf_gpt2_bpe():
    """GPT-2's BPE as Hugging Face `tokenizers` implements it (its own regex, byte mapping and merge loop), from
    vocab.json and merges.txt: a tokenisation that shares no code with tiktoken."""
    tokenizers = pytest.importorskip("tokenizers")
    files = export_hf.gpt2_tokenizer_files()
    vocab = json.loads(files["vocab.json"])
    merges = [tuple(line.split(" ")) for line in files["merges.txt"].splitlines()[1:]]
    tk = tokenizers.Tokenizer(tokenizers.models.BPE(vocab, merges))
    tk.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)  # GPT-2's pre-tokenising regex
    return tk


def test_shards_equal_an_independent_bpe(corpus, reference):
    tk = hf_gpt2_bpe()
    sample = pq.read_table(prepare_fineweb.SAMPLE_PATH).column("text").to_pylist()[:3]
    texts = [d["text"] for d in corpus["docs"]]
    independent = np.array([t for text in texts for t in [EOT, *tk.encode(text).ids]], dtype=np.uint16)
    assert np.array_equal(stream_of(reference), independent)
    for text in sample:  # real prose, as a check that the BPE above is GPT-2's and not just self-consistent
        tokens, _ = prepare_fineweb.tokenize_batch([text])
        assert tokens[1:].tolist() == tk.encode(text).ids


def test_prep_writes_the_trainers_shard_format(corpus, tmp_path, capsys, monkeypatch):
    # one copy of each, in gpt2_tokens (tests/test_gpt2_tokens.py holds it to train_gpt2's): prep's shards are
    # whatever gpt2_tokens.write_shard writes, read back by the trainer token for token
    assert not any(hasattr(prepare_fineweb, name) for name in ("SHARD_MAGIC", "HEADER_INTS", "BPE_RANKS_PATH"))
    assert gpt2_tokens.EOT_TOKEN == train_gpt2.get_tokenizer().eot_token == EOT
    assert (train_gpt2.SHARD_MAGIC, train_gpt2.SHARD_VERSION, train_gpt2.HEADER_BYTES) == (20240520, 1, 1024)
    written = []
    real_write = gpt2_tokens.write_shard
    monkeypatch.setattr(gpt2_tokens, "write_shard",
                        lambda path, tokens: (written.append(path), real_write(path, tokens)))
    out = tmp_path / "out"
    code, _, err = run(capsys, "--data_files", corpus["parquet"], "--out_dir", out, "--num_proc", 1, *common(corpus))
    assert code == 0, err
    assert sorted(os.path.basename(p) for p in written) == shard_files(out)
    assert np.array_equal(stream_of(out), corpus["tokens"])


@pytest.mark.parametrize("argv, hub_id, name, out_dir", [
    ([], "HuggingFaceFW/fineweb-edu", "sample-10BT", "data/edu_fineweb10B"),  # train_gpt2.py's default --data_dir
    (["--dataset", "fineweb-edu"], "HuggingFaceFW/fineweb-edu", "sample-10BT", "data/edu_fineweb10B"),
    (["--dataset", "fineweb"], "HuggingFaceFW/fineweb", "sample-10BT", "data/fineweb10B"),
    (["--dataset", "HuggingFaceFW/fineweb", "--name", "sample-100BT"], "HuggingFaceFW/fineweb", "sample-100BT",
     "data/fineweb_sample-100BT"),
])
def test_dataset_names_and_default_output(argv, hub_id, name, out_dir):
    source = prepare_fineweb.resolve_source(prepare_fineweb.build_parser().parse_args(argv))
    got = (source.path, source.name, source.split, source.out_dir, source.hub)
    assert got == (hub_id, name, "train", out_dir, True)


# ----------------------------------------------------------------------------------------------------------------
# shard contents and format


@pytest.mark.parametrize("kind", ["parquet", "jsonl", "txt"])
def test_shards_hold_the_independently_tokenised_corpus(kind, corpus, tmp_path, capsys):
    docs = corpus["docs"]
    if kind == "txt":  # one document per file; an empty file holds no document
        docs = [d for d in docs if d["text"]]
    glob_ = write_corpus(tmp_path / "in", docs, kind) if kind != "parquet" else corpus["parquet"]
    expected, lengths = expected_tokens([d["text"] for d in docs])
    out = tmp_path / "out"
    code, stdout, err = run(capsys, "--data_files", glob_, "--out_dir", out, "--num_proc", 2, *common(corpus))
    assert code == 0, err

    files = shard_files(out)
    n_val = -(-VAL // SHARD)
    n_train = -(-(len(expected) - VAL) // SHARD)
    assert files == sorted([f"corpus_val_{i:06d}.bin" for i in range(n_val)] +
                           [f"corpus_train_{i:06d}.bin" for i in range(n_val, n_val + n_train)])
    sizes = [len(read_header_and_tokens(os.path.join(out, f))) for f in sorted(files, key=lambda f: f[-10:])]
    assert sizes[:n_val] == [min(SHARD, VAL - i * SHARD) for i in range(n_val)]
    assert all(s == SHARD for s in sizes[n_val:-1]) and 0 < sizes[-1] <= SHARD  # the last partial shard is written

    got = stream_of(out)
    assert len(got) == sum(lengths) == sum(sizes)
    assert np.array_equal(got, expected)
    assert int((got == EOT).sum()) == len(docs)  # one boundary per document, none from the quoted special token
    starts = np.cumsum([0] + sizes)[1:-1]
    assert any(got[s] != EOT for s in starts), "some document should continue across a shard boundary"

    summary = json.loads((out / "prep.json").read_text())
    assert summary["documents"] == len(docs)
    assert summary["tokens"] == {"val": VAL, "train": len(expected) - VAL, "total": len(expected)}
    assert summary["shards"] == {"val": n_val, "train": n_train}
    assert summary["seconds"] > 0 and summary["tokens_per_second"] > 0
    assert f"{len(expected):,} tokens" in stdout


def test_worker_count_and_streaming_do_not_change_the_bytes(corpus, reference, tmp_path, capsys):
    expected = shard_bytes(reference)
    for name, extra in [("one", ["--num_proc", 1]), ("streamed", ["--num_proc", 2, "--streaming"])]:
        out = tmp_path / name
        code, _, err = run(capsys, "--data_files", corpus["parquet"], "--out_dir", out, *common(corpus), *extra)
        assert code == 0, err
        assert shard_bytes(out) == expected, name


def test_round_trip_through_train_gpt2_loader(corpus, reference):
    B, T = 2, 16
    val, train = corpus["tokens"][:VAL], corpus["tokens"][VAL:]
    for split, expected in [("train", train), ("val", val)]:
        loader = train_gpt2.ShardLoader(reference, split, B, T)
        steps = (len(expected) - 1) // (B * T)
        xs, ys = zip(*(loader.next_batch() for _ in range(steps)))
        assert xs[0].shape == (B, T) and xs[0].dtype == train_gpt2.torch.int64
        x = np.concatenate([b.reshape(-1).numpy() for b in xs])
        y = np.concatenate([b.reshape(-1).numpy() for b in ys])
        assert np.array_equal(x, expected[: steps * B * T]), split
        assert np.array_equal(y, expected[1 : steps * B * T + 1]), split


def test_sample_defaults_give_val_and_train_splits(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the default output directory is relative to where the command runs
    code, _, err = run(capsys, "--sample", "--cache_dir", tmp_path / "hf")
    assert code == 0, err
    out = tmp_path / "data" / "gutenberg"
    files = shard_files(out)
    assert files[0] == "gutenberg_train_000001.bin" and "gutenberg_val_000000.bin" in files
    expected, lengths = expected_tokens(pq.read_table(prepare_fineweb.SAMPLE_PATH).column("text").to_pylist())
    assert np.array_equal(stream_of(out), expected)
    summary = json.loads((out / "prep.json").read_text())
    assert summary["tokens"]["val"] == prepare_fineweb.SAMPLE_VAL_TOKENS
    assert summary["tokens"]["train"] == len(expected) - prepare_fineweb.SAMPLE_VAL_TOKENS > 0
    assert summary["shards"]["train"] >= 2 and summary["documents"] == len(lengths)


# ----------------------------------------------------------------------------------------------------------------
# interruption and resume

KILLED_RUN = """
import os, signal, sys
import numpy as np
import gpt2_tokens, prepare_fineweb

real_write, calls = gpt2_tokens.write_shard, []

def write_then_die(path, tokens):
    # the third shard: half of it reaches a temporary file, then the process is killed (as by SIGKILL or power loss)
    calls.append(path)
    if len(calls) == 3:
        with open(path + ".tmp" + str(os.getpid()), "wb") as f:
            f.write(np.zeros(256, np.int32).tobytes() + np.asarray(tokens[: len(tokens) // 2]).tobytes())
        os.kill(os.getpid(), signal.SIGKILL)
    real_write(path, tokens)

gpt2_tokens.write_shard = write_then_die
if __name__ == "__main__":
    sys.exit(prepare_fineweb.main(sys.argv[1:]))
"""


def test_one_batch_across_many_shards_records_each_resume_point(corpus, tmp_path, monkeypatch):
    """A batch spanning several shards (small shards, or one long document): every full shard records where the next
    one starts, i.e. the document holding its first token and the offset in it, found here from the lengths alone."""
    tokens, lengths = corpus["tokens"], corpus["lengths"]
    doc_starts = np.cumsum([0] + lengths)
    bounds = [b for b in [VAL, *range(VAL + SHARD, len(tokens), SHARD)] if b < len(tokens)]

    def doc_at(t: int) -> tuple[int, int]:
        d = int(np.searchsorted(doc_starts, t, side="right")) - 1
        return d, int(t - doc_starts[d])

    def feed(first_doc: int, skip: int, out) -> list:
        writer = prepare_fineweb.ShardWriter(str(out), "corpus", SHARD, VAL, None, prepare_fineweb.new_state({}), "")
        if first_doc or skip:  # as --resume sets it up: the shards before this one are already on disk
            writer.written = int(doc_starts[first_doc] + skip)
        recorded, real_write = [], writer.write
        monkeypatch.setattr(writer, "write", lambda full, next_start: (recorded.append(next_start) if full else None,
                                                                       real_write(full, next_start)))
        assert writer.add(first_doc, skip, tokens[doc_starts[first_doc]:], np.array(lengths[first_doc:]))
        assert writer.documents == len(lengths)
        return recorded

    assert feed(0, 0, tmp_path / "whole") == [doc_at(b) for b in bounds]
    doc, skip = doc_at(bounds[2])
    assert skip > 0, "the corpus should put a shard boundary inside a document here"
    assert feed(doc, skip, tmp_path / "resumed") == [doc_at(b) for b in bounds[3:]]


def test_resume_after_kill_is_byte_identical(corpus, reference, tmp_path, capsys):
    script = tmp_path / "killed_run.py"
    script.write_text(KILLED_RUN)
    out = tmp_path / "out"
    args = ["--data_files", corpus["parquet"], "--out_dir", out, *common(corpus), "--num_proc", 2]
    # the pipes close only once every process holding them exits: a worker outliving its parent would time out here
    proc = subprocess.run([sys.executable, str(script), *map(str, args)], capture_output=True, text=True, timeout=120,
                          env=child_env())
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert any(".tmp" in f for f in os.listdir(out))  # the half-written shard never got a final name
    assert len(shard_files(out)) == 2
    for f in shard_files(out):
        read_header_and_tokens(os.path.join(out, f))
    state = json.loads((out / "prep_state.json").read_text())
    assert state["resume"]["shard"] == 2 and not state["complete"]

    code, stdout, err = run(capsys, *args, "--resume")
    assert code == 0, err
    assert "resuming at shard 2" in stdout
    assert shard_bytes(out) == shard_bytes(reference)
    assert not any(".tmp" in f for f in os.listdir(out))


def test_resume_mid_document_and_after_max_tokens(corpus, reference, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--data_files", corpus["parquet"], "--out_dir", out, *common(corpus)]
    total = len(corpus["tokens"])
    # interrupted right after a full shard that ends inside the long document, at a point where the next shard
    # ends inside it too: simulate by deleting the shards after it and rewinding the state to that moment
    assert run(capsys, *args)[0] == 0
    state = json.loads((out / "prep_state.json").read_text())
    bounds = np.cumsum([s["tokens"] for s in state["shards"]])
    doc_starts = np.cumsum([0] + corpus["lengths"])

    def doc_of(t):  # the document holding token t
        return int(np.searchsorted(doc_starts, t, side="right")) - 1

    mid = next(i for i in range(1, len(bounds) - 1)
               if doc_of(bounds[i - 1]) == doc_of(bounds[i]) and bounds[i - 1] != doc_starts[doc_of(bounds[i - 1])])
    doc = doc_of(bounds[mid - 1])
    state.update(complete=False, max_tokens=None, shards=state["shards"][:mid],
                 resume={"shard": mid, "doc": doc, "offset": int(bounds[mid - 1] - doc_starts[doc])})
    for s in shard_files(out):
        if int(s[-10:-4]) >= mid:
            os.remove(out / s)
    (out / "prep_state.json").write_text(json.dumps(state))
    # resume for exactly one more shard, which ends inside the same document, then resume again to the end
    code, _, err = run(capsys, *args, "--resume", "--max_tokens", bounds[mid])
    assert code == 0, err
    state = json.loads((out / "prep_state.json").read_text())
    assert state["resume"] == {"shard": mid + 1, "doc": doc, "offset": int(bounds[mid] - doc_starts[doc])}
    code, _, err = run(capsys, *args, "--resume", "--streaming")  # the streamed reader skips ahead as well
    assert code == 0, err
    assert shard_bytes(out) == shard_bytes(reference)

    # a prefix of the corpus that ends mid-shard, then extended to all of it
    prefix_out = tmp_path / "prefix"
    pargs = ["--data_files", corpus["parquet"], "--out_dir", prefix_out, *common(corpus)]
    cut = VAL + 2 * SHARD + SHARD // 3
    assert run(capsys, *pargs, "--max_tokens", cut)[0] == 0
    assert np.array_equal(stream_of(prefix_out), corpus["tokens"][:cut])
    assert json.loads((prefix_out / "prep.json").read_text())["tokens"]["total"] == cut
    code, _, err = run(capsys, *pargs, "--resume")
    assert code == 0, err
    assert shard_bytes(prefix_out) == shard_bytes(reference) and len(stream_of(prefix_out)) == total

    # resuming a complete output changes nothing; asking for fewer tokens than it has is refused
    before = {f: os.stat(prefix_out / f).st_mtime_ns for f in os.listdir(prefix_out)}
    code, stdout, _ = run(capsys, *pargs, "--resume")
    assert code == 0 and "nothing to do" in stdout
    code, _, err = run(capsys, *pargs, "--resume", "--max_tokens", cut)
    assert_one_line_error((code, err), code=None)
    assert {f: os.stat(prefix_out / f).st_mtime_ns for f in os.listdir(prefix_out)} == before


def test_refuses_to_overwrite_without_a_flag(corpus, reference, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    (out / "notes.txt").write_text("kept")
    before = shard_bytes(out)
    args = ["--data_files", corpus["parquet"], "--out_dir", out, "--cache_dir", corpus["cache"]]
    line = assert_one_line_error(run(capsys, *args, "--shard_size", 3000)[::2], code=None)
    assert "--resume" in line and "--overwrite" in line
    line = assert_one_line_error(run(capsys, *args, "--shard_size", 3000, "--val_tokens", VAL, "--resume")[::2],
                                 code=None)
    assert "shard_size" in line  # settings differ from the state: resuming would mix two layouts
    assert shard_bytes(out) == before

    code, _, err = run(capsys, *args, "--shard_size", 3000, "--val_tokens", 0, "--overwrite")
    assert code == 0, err
    assert (out / "notes.txt").read_text() == "kept"  # only this script's own files are replaced
    files = shard_files(out)
    assert files[0] == "corpus_train_000000.bin" and not any("_val_" in f for f in files)
    assert len(files) == -(-len(corpus["tokens"]) // 3000)
    assert np.array_equal(stream_of(out), corpus["tokens"])

    # shards under another prefix would be read along with ours: refused even with --overwrite
    (out / "old_train_000001.bin").write_bytes((out / files[0]).read_bytes())
    before = shard_bytes(out)
    line = assert_one_line_error(run(capsys, *args, "--shard_size", 3000, "--val_tokens", 0, "--overwrite")[::2],
                                 code=None)
    assert "old_train_000001.bin" in line
    assert shard_bytes(out) == before


# ----------------------------------------------------------------------------------------------------------------
# user errors: one line, non-zero exit, nothing written


def make_bad_inputs(tmp_path) -> dict:
    (tmp_path / "empty.jsonl").write_text("")
    no_rows = pa.table({"text": pa.array([], pa.string()), "id": pa.array([], pa.string())})
    pq.write_table(no_rows, tmp_path / "empty.parquet")
    pq.write_table(pa.Table.from_pylist(make_docs(3)), tmp_path / "good.parquet")
    (tmp_path / "data.csv").write_text("text\nhello\n")
    return {
        "missing file": (["--data_files", tmp_path / "missing.parquet"], "matches no files"),
        "no match": (["--data_files", tmp_path / "nothing" / "*.jsonl"], "matches no files"),
        "empty jsonl": (["--data_files", tmp_path / "empty.jsonl"], "empty"),
        "empty parquet": (["--data_files", tmp_path / "empty.parquet", "--streaming"], "empty"),
        "wrong column": (["--data_files", tmp_path / "good.parquet", "--text_column", "content"],
                         "its columns are text, id, dump, url"),
        "unsupported": (["--data_files", tmp_path / "data.csv"], ".csv"),
        "sample+files": (["--sample", "--data_files", tmp_path / "good.parquet"], "--sample"),
        "resume+overwrite": (["--sample", "--resume", "--overwrite"], "--resume and --overwrite"),
        "bad number": (["--sample", "--shard_size", "lots"], "--shard_size"),
        "zero shard": (["--sample", "--shard_size", "0"], "--shard_size"),
        "prefix with split": (["--sample", "--prefix", "interval"], "val"),
        "unknown flag": (["--sample", "--shards", "3"], "--shards"),
    }


BAD_INPUTS = ["missing file", "no match", "empty jsonl", "empty parquet", "wrong column", "unsupported",
              "sample+files", "resume+overwrite", "bad number", "zero shard", "prefix with split", "unknown flag"]


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_user_errors_are_one_line(case, tmp_path, capsys):
    argv, needle = make_bad_inputs(tmp_path)[case]
    out = tmp_path / "out"
    code, _, err = run(capsys, *argv, "--out_dir", out, "--cache_dir", tmp_path / "hf")
    assert needle in assert_one_line_error((code, err), code=None)
    assert not out.exists()


def test_corrupt_file_mid_stream_is_one_line_and_keeps_earlier_shards(corpus, tmp_path, capsys):
    docs = make_docs(3 * prepare_fineweb.READ_BATCH, seed=1)  # more than one read batch before the corrupt file
    glob_ = write_corpus(tmp_path / "in", docs, "jsonl", files=3)
    with open(tmp_path / "in" / "part_02.jsonl", "a") as f:
        f.write('{"text": "cut off in the mid')
    out = tmp_path / "out"
    # streamed, the first documents are tokenised and written before the last file fails to parse
    code, _, err = run(capsys, "--data_files", glob_, "--out_dir", out, *common(corpus), "--streaming", "--num_proc", 2)
    line = assert_one_line_error((code, err), code=None)
    assert "JSON" in line and "--resume" in line
    state = json.loads((out / "prep_state.json").read_text())
    kept = stream_of(out)
    assert len(shard_files(out)) == state["resume"]["shard"] >= 2
    assert np.array_equal(kept, expected_tokens([d["text"] for d in docs])[0][: len(kept)])


class NotTheHub(http.server.BaseHTTPRequestHandler):
    """Answers every request with 404, as a proxy or captive portal does for a host it will not serve."""

    def do_HEAD(self):
        self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_HEAD

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("env", ["offline", "refused", "not the hub"])
def test_unreachable_hub_fails_fast_with_a_way_out(env, tmp_path):
    hub_env = {"HF_HOME": str(tmp_path / "hf_home"), "HF_DATASETS_CACHE": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "0"}
    server = None
    if env == "offline":
        hub_env["HF_HUB_OFFLINE"] = "1"
    elif env == "refused":  # nothing listens on this port
        hub_env["HF_ENDPOINT"] = f"http://127.0.0.1:{free_port()}"
    else:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotTheHub)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        hub_env["HF_ENDPOINT"] = f"http://127.0.0.1:{server.server_address[1]}"
    out = tmp_path / "out"
    t0 = time.time()
    try:
        proc = prepare_cli("--out_dir", out, "--streaming", env=hub_env, timeout=60)
    finally:
        if server:
            server.shutdown()
    line = assert_one_line_error(proc, code=None)
    assert "Hub" in line and "--data_files" in line and "--sample" in line
    assert time.time() - t0 < 45  # fails fast instead of retrying
    assert not out.exists()


SPAWN_RUN = """
import multiprocessing, sys
import prepare_fineweb

if __name__ == "__main__":
    multiprocessing.set_start_method("spawn")  # the default on macOS and Windows: workers re-import, share nothing
    sys.exit(prepare_fineweb.main(sys.argv[1:]))
"""


def test_spawn_start_method_gives_identical_bytes(corpus, reference, tmp_path):
    script = tmp_path / "spawn_run.py"
    script.write_text(SPAWN_RUN)
    out = tmp_path / "out"
    args = ["--data_files", corpus["parquet"], "--out_dir", out, *common(corpus), "--num_proc", 2]
    proc = subprocess.run([sys.executable, str(script), *map(str, args)], capture_output=True, text=True, timeout=120,
                          env=child_env())
    assert proc.returncode == 0, proc.stderr
    assert shard_bytes(out) == shard_bytes(reference)
