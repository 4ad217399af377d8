"""
Checks for gpt2_tokens.py, the torch-free part that prepare_fineweb.py tokenises and writes shards with, against
train_gpt2.py's own tokenizer (tiktoken) and shard reader: the same constants on both sides, the same ids for every
text (awkward ones included), shards byte-identical to those that tiktoken's ids give, the tiktoken fallback where
fastokens cannot be imported. (That prep never imports torch is tested in test_imports.py.)
"""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

import gpt2_tokens
import prepare_fineweb
import train_gpt2
from conftest import child_env, expected_tokens, shard_bytes, write_jsonl

EOT = 50256  # <|endoftext|> in GPT-2's published vocabulary
SHARD = 3000  # tokens per shard in these tests: every output has several, and documents cross their boundaries
VAL = 1000


def awkward_texts(n_random: int = 400, seed: int = 0) -> list[str]:
    """Texts where a BPE implementation is most likely to part from tiktoken: the split pattern's edge cases
    (whitespace runs before a word or at the end, contractions in any case, numbers in other scripts), multi-byte
    and multi-code-point characters, control characters, the special token's text, and random mixtures of these."""
    fixed = [
        "", " ", "  ", "   x", "x   ", "a  b   c    d", "\n", "\n\n\n", "\t \t\n ", " " * 1000, "\r\n\r\n", "word\n \n",
        "don't", "DON'T", "it'S", "we'll've", "'s", "''", "'", "I'M", "they're'd", " 's 't 're 've 'm 'll 'd",
        "東京都", "中文字符和English混合", "한국어 텍스트", "日本語のテキスト。", "ภาษาไทย", "العربية", "עברית",
        "🙂", "a🙂b", " 🙂 🙂", "\U0001f468\u200d\U0001f469\u200d\U0001f467", "\U0001f3f3\ufe0f\u200d\U0001f308",
        "\U0001f1fa\U0001f1f8\U0001f1eb\U0001f1f7", "e\u0301", "a\u0308\u0304", "Z\u0351\u0352\u0353alg\u0315o",
        "\x00", "\x01\x1f\x7f", "\u200b\u200c\u200d", "\ufeff", "\x0b\x0c", "\u2028\u2029", "\x85", "\u00a0 \u00a0",
        "<|endoftext|>", "<|endoftext|><|endoftext|>", " <|endoftext|> ", "<|endoftext", "endoftext|>",
        "<|fim_prefix|>",
        "1234567890", "3.14159", "1,000,000", "١٢٣٤", "½ Ⅻ ²", "x" * 70_000, "ab" * 5000, "a1" * 3000,
        "naïve café Zürich данные ελληνικά", "http://example.org/a?b=c&d=%20", "<b>bold</b>", "$100 €200 £300",
    ]
    pieces = fixed[:40] + ["\u0300", "\ud7ff", "\ue000", "\U0010fffd", "\uffff", "\U0001f600", "Ǆ", "ǅ", "ß", "İ"]
    rng = random.Random(seed)
    mixed = ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 12))) for _ in range(n_random)]
    # random code points from the whole range outside the surrogates, runs of one of them, and of spaces
    for _ in range(n_random):
        chars = [chr(rng.choice([rng.randint(0, 0x7F), rng.randint(0x80, 0xD7FF), rng.randint(0xE000, 0x10FFFF)]))
                 for _ in range(rng.randint(1, 40))]
        mixed.append("".join(c * rng.choice([1, 1, 1, 3]) + " " * rng.choice([0, 0, 1, 2]) for c in chars))
    return fixed + mixed


# Python strings that UTF-8 cannot encode, as JSON escapes and some readers produce them
SURROGATE_TEXTS = ["a lone \ud800 high surrogate", "x\udfff", "\ud83d", "\ude00\ud83d reversed pair",
                   "a pair in halves \ud83d\ude00 (the emoji)", "\ud800\ud800\udc00", "end \udbff"]


def tiktoken_ids(text: str) -> list[int]:
    return train_gpt2.get_tokenizer().encode_ordinary(text)


def llmc_shard(tokens: np.ndarray) -> bytes:
    """llm.c's shard layout written out by hand: 256 little-endian int32 (magic, version, token count, then zeros),
    then the tokens as little-endian uint16."""
    header = [20240520, 1, len(tokens)] + [0] * 253
    return np.array(header, dtype="<i4").tobytes() + np.asarray(tokens, dtype="<u2").tobytes()


def tiktoken_shards(texts: list[str], out_dir, prefix: str, shard_size: int, val_tokens: int) -> None:
    """Shards as the README lays them out, written by hand (llmc_shard) from tiktoken's ids: the val split is
    the first val_tokens tokens, in shards of at most shard_size, then train shards of shard_size, the last partial;
    shard indices run on across the two splits."""
    stream = expected_tokens(texts)[0]
    cuts = [*range(0, min(val_tokens, len(stream)), shard_size), *range(val_tokens, len(stream), shard_size)]
    os.makedirs(out_dir, exist_ok=True)
    for index, start in enumerate(cuts):
        end = cuts[index + 1] if index + 1 < len(cuts) else len(stream)
        if start < val_tokens:
            end = min(end, val_tokens)
        split = "val" if start < val_tokens else "train"
        with open(os.path.join(out_dir, f"{prefix}_{split}_{index:06d}.bin"), "wb") as f:
            f.write(llmc_shard(stream[start:end]))


def backends() -> list:
    return [pytest.param(gpt2_tokens.FastokensBPE, id="fastokens"),
            pytest.param(gpt2_tokens.TiktokenBPE, id="tiktoken")]


# ----------------------------------------------------------------------------------------------------------------
# one contract on both sides


def test_prep_and_trainer_share_one_contract():
    """The values prep writes shards with are the trainer's (and the published GPT-2 and llm.c values)."""
    enc = train_gpt2.get_tokenizer()
    assert (gpt2_tokens.SHARD_MAGIC, gpt2_tokens.SHARD_VERSION, gpt2_tokens.HEADER_INTS, gpt2_tokens.HEADER_BYTES) \
        == (train_gpt2.SHARD_MAGIC, train_gpt2.SHARD_VERSION, train_gpt2.HEADER_INTS, train_gpt2.HEADER_BYTES) \
        == (20240520, 1, 256, 1024)
    assert gpt2_tokens.EOT_TOKEN == train_gpt2.EOT_TOKEN == enc.eot_token == EOT
    assert os.path.samefile(gpt2_tokens.BPE_RANKS_PATH, train_gpt2.BPE_RANKS_PATH)
    assert gpt2_tokens.GPT2_SPLIT_PATTERN == train_gpt2.GPT2_SPLIT_PATTERN == enc._pat_str
    assert enc._special_tokens == {"<|endoftext|>": gpt2_tokens.EOT_TOKEN}
    assert enc.n_vocab == EOT + 1 <= 2**16  # every id fits the uint16 shards


def test_prep_writes_llmc_shards_that_both_sides_read(tmp_path):
    rng = np.random.default_rng(0)
    for n, tokens in enumerate([rng.integers(0, 2**16, 5000, dtype=np.uint16), np.array([], np.uint16),
                                np.array([0, EOT, 2**16 - 1], np.uint16)]):
        ours, by_hand = tmp_path / f"ours_{n}.bin", tmp_path / f"by_hand_{n}.bin"
        gpt2_tokens.write_shard(str(ours), tokens)
        by_hand.write_bytes(llmc_shard(tokens))
        assert ours.read_bytes() == by_hand.read_bytes()
        assert np.array_equal(train_gpt2.read_shard(str(ours)), tokens)
        assert np.array_equal(gpt2_tokens.read_shard(str(by_hand)), tokens)
    with pytest.raises(ValueError):
        gpt2_tokens.write_shard(str(tmp_path / "big.bin"), np.array([2**16]))
    assert not (tmp_path / "big.bin").exists()


@pytest.mark.parametrize("damage", ["short", "magic", "version", "truncated"])
def test_damaged_shards_are_refused_on_both_sides(damage, tmp_path):
    path = tmp_path / "d_train_000001.bin"
    gpt2_tokens.write_shard(str(path), np.arange(100, dtype=np.uint16))
    data = bytearray(path.read_bytes())
    if damage == "short":
        data = data[:100]
    elif damage in ("magic", "version"):
        data[0 if damage == "magic" else 4] ^= 1
    else:
        data = data[:-2]
    path.write_bytes(bytes(data))
    for side in (gpt2_tokens, train_gpt2):
        with pytest.raises(side.UserError, match="d_train_000001.bin"):
            side.read_shard(str(path))


# ----------------------------------------------------------------------------------------------------------------
# the same ids as tiktoken's


@pytest.mark.parametrize("bpe_class", backends())
def test_awkward_texts_get_tiktokens_ids(bpe_class):
    bpe = bpe_class()
    texts = awkward_texts() + SURROGATE_TEXTS
    tokens, lengths = bpe.encode_batch(texts)
    assert tokens.dtype == np.uint16
    assert lengths.tolist() == [len(tiktoken_ids(t)) + 1 for t in texts]
    assert np.array_equal(tokens, expected_tokens(texts)[0])
    for text in SURROGATE_TEXTS + awkward_texts(n_random=20, seed=1):  # one at a time: no batch to lean on
        assert bpe.encode(text) == tiktoken_ids(text), repr(text)


def test_surrogates_are_repaired_as_tiktoken_repairs_them():
    # what tiktoken does, spelled out: a pair in halves is the character it encodes, a lone half is U+FFFD
    assert tiktoken_ids("\ud83d\ude00") == tiktoken_ids("\U0001f600")
    assert tiktoken_ids("a\ud800b") == tiktoken_ids("a\ufffdb")
    for text in SURROGATE_TEXTS:
        assert tiktoken_ids(gpt2_tokens.repair_surrogates(text)) == tiktoken_ids(text)
    plain = awkward_texts(n_random=50)
    assert [gpt2_tokens.repair_surrogates(t) for t in plain] == plain


@pytest.mark.parametrize("bpe_class", backends())
def test_bundled_corpus_gets_tiktokens_ids(bpe_class):
    texts = pq.read_table(prepare_fineweb.SAMPLE_PATH).column("text").to_pylist()
    tokens, lengths = bpe_class().encode_batch(texts)
    assert np.array_equal(tokens, expected_tokens(texts)[0]) and len(tokens) > 1_900_000
    assert lengths.tolist() == [len(tiktoken_ids(t)) + 1 for t in texts]


# ----------------------------------------------------------------------------------------------------------------
# shards byte-identical to tiktoken's


def test_bundled_corpus_shards_are_tiktokens(tmp_path, capsys):
    out = tmp_path / "out"
    code = prepare_fineweb.main(["--sample", "--out_dir", str(out), "--cache_dir", str(tmp_path / "hf")])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "fastokens" not in err  # the fast BPE is there: no fallback line
    texts = pq.read_table(prepare_fineweb.SAMPLE_PATH).column("text").to_pylist()
    tiktoken_shards(texts, tmp_path / "expected", "gutenberg", prepare_fineweb.SAMPLE_SHARD_SIZE,
                    prepare_fineweb.SAMPLE_VAL_TOKENS)
    expected = shard_bytes(tmp_path / "expected")
    assert len(expected) >= 4 and shard_bytes(out) == expected


@pytest.fixture(scope="module")
def awkward_corpus(tmp_path_factory) -> dict:
    """The awkward texts (less the surrogates, which neither JSON readers nor Arrow accept) as a jsonl corpus, and
    the shards tiktoken's ids make of them."""
    root = tmp_path_factory.mktemp("awkward")
    texts = awkward_texts()
    path = write_jsonl(root / "awkward.jsonl", [{"text": t} for t in texts])
    tiktoken_shards(texts, root / "expected", "corpus", SHARD, VAL)
    return {"texts": texts, "path": path, "expected": shard_bytes(root / "expected"), "cache": str(root / "hf")}


def prep_args(corpus: dict, out) -> list[str]:
    return ["--data_files", corpus["path"], "--out_dir", str(out), "--cache_dir", corpus["cache"],
            "--shard_size", str(SHARD), "--val_tokens", str(VAL)]


@pytest.mark.parametrize("num_proc", [1, 2])
def test_awkward_corpus_shards_are_tiktokens(num_proc, awkward_corpus, tmp_path, capsys):
    code = prepare_fineweb.main([*prep_args(awkward_corpus, tmp_path / "out"), "--num_proc", str(num_proc)])
    assert code == 0, capsys.readouterr().err
    assert len(awkward_corpus["expected"]) >= 5
    assert shard_bytes(tmp_path / "out") == awkward_corpus["expected"]


def test_surrogates_in_documents_give_tiktokens_shards(awkward_corpus, tmp_path, capsys, monkeypatch):
    """Texts with surrogates cannot be stored in a file datasets reads, so they are handed to prep in place of the
    corpus's own texts, as a reader that produced them would: whole runs of documents, mixed with ordinary ones."""
    texts = [t for pair in zip(awkward_corpus["texts"], SURROGATE_TEXTS * 200) for t in pair]

    def iter_texts(ds, source, start):
        return iter(texts[start:])

    monkeypatch.setattr(prepare_fineweb, "iter_texts", iter_texts)
    code = prepare_fineweb.main(prep_args(awkward_corpus, tmp_path / "out"))
    assert code == 0, capsys.readouterr().err
    tiktoken_shards(texts, tmp_path / "expected", "corpus", SHARD, VAL)
    assert shard_bytes(tmp_path / "out") == shard_bytes(tmp_path / "expected")


# ----------------------------------------------------------------------------------------------------------------
# where fastokens cannot be imported

WITHOUT_FASTOKENS = """
import sys
sys.modules["fastokens"] = None  # `import fastokens` now raises ImportError, as on a platform without a wheel
import prepare_fineweb

if __name__ == "__main__":
    sys.exit(prepare_fineweb.main(sys.argv[1:]))
"""


def test_without_fastokens_prep_falls_back_to_tiktoken_and_says_so(awkward_corpus, tmp_path):
    script = tmp_path / "without_fastokens.py"
    script.write_text(WITHOUT_FASTOKENS)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(script), *prep_args(awkward_corpus, out), "--num_proc", "2"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env=child_env())
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    # says that it falls back, to what, and what that costs
    assert lines[0].startswith("warning: ") and "fastokens" in lines[0] and "tiktoken" in lines[0]
    assert re.search(r"\b\d+(-\d+)?x more slowly\b", lines[0]), lines[0]
    assert shard_bytes(out) == awkward_corpus["expected"]
