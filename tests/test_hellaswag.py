"""Tests of hellaswag_eval: data loading and download, scoring (batched, padded, truncated, rigged), DDP, CLI, plots."""

from __future__ import annotations

import functools
import json
import math
import os
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F

import hellaswag_eval as H
from conftest import HELLASWAG_SAMPLE, ROOT, FileServer, assert_one_line_error, cli, free_port, tiny_config, write_jsonl
from train_gpt2 import GPT, UserError, get_tokenizer

SAMPLE = HELLASWAG_SAMPLE
SCRIPT = os.path.join(ROOT, "hellaswag_eval.py")
V = 50257
FP32 = torch.float32


def raw_records(path=SAMPLE):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def tiny_gpt(seed=0, block_size=64):
    torch.manual_seed(seed)
    return GPT(tiny_config(gpt2_vocab=True, block_size=block_size, n_head=2, n_embd=32)).eval()


@functools.lru_cache(maxsize=1)
def enc():
    return get_tokenizer()


def reference_scores(model, examples, max_len=None):
    """Summed and mean ending loss, one unpadded row at a time, straight from the model's log-softmax.

    max_len: apply the documented truncation: keep the last max_len + 1 - longest_ending context tokens (at least
    one, and then only the first max_len tokens of each ending)."""
    sums, means = [], []
    for ex in examples:
        ctx = enc().encode_ordinary(ex["ctx"])
        ends = [enc().encode_ordinary(" " + e) for e in ex["endings"]]
        if max_len is not None:
            keep = max_len + 1 - max(len(e) for e in ends)
            if keep < 1:
                keep, ends = 1, [e[:max_len] for e in ends]
            ctx = ctx[-keep:]
        s_row, m_row = [], []
        for e in ends:
            seq = torch.tensor([ctx + e])
            with torch.no_grad():
                logits = model(seq[:, :-1])[0][0, :, :V].float()
            logp = F.log_softmax(logits, dim=-1)
            nll = [-logp[len(ctx) - 1 + j, e[j]].item() for j in range(len(e))]
            s_row.append(sum(nll))
            m_row.append(sum(nll) / len(nll))
        sums.append(s_row)
        means.append(m_row)
    return torch.tensor(sums, dtype=torch.float64), torch.tensor(means, dtype=torch.float64)


def accuracy(scores, labels):
    picked = [min(range(4), key=lambda i: row[i]) for row in scores.tolist()]
    return sum(int(p == lab) for p, lab in zip(picked, labels)) / len(labels)


# ----------------------------------------------------------------------------------------------------------------
# data


def test_sample_file_loads_with_int_labels_and_all_fields():
    raw = raw_records()
    examples = H.load_examples(SAMPLE)
    assert len(examples) == len(raw) >= 10
    # the fixture mixes both label encodings
    assert any(isinstance(r["label"], str) for r in raw) and any(isinstance(r["label"], int) for r in raw)
    for ex, r in zip(examples, raw):
        assert ex["label"] == int(r["label"]) and isinstance(ex["label"], int)
        assert {k: v for k, v in ex.items() if k != "label"} == {k: v for k, v in r.items() if k != "label"}
    assert [ex["ind"] for ex in H.load_examples(SAMPLE, limit=5)] == [r["ind"] for r in raw[:5]]


@pytest.mark.parametrize("mutate, message", [
    (lambda r: r.update(label=4), "label 4"),
    (lambda r: r.update(label="x"), "label 'x'"),
    (lambda r: r.update(label=True), "label True"),
    (lambda r: r.update(endings=r["endings"][:3]), "endings must be a list of 4"),
    (lambda r: r.pop("ctx"), "missing field(s) ctx"),
])
def test_malformed_lines_name_the_line(tmp_path, mutate, message):
    records = raw_records()
    mutate(records[2])
    path = write_jsonl(tmp_path / "bad.jsonl", records)
    with pytest.raises(UserError) as e:
        H.load_examples(path)
    assert "line 3" in str(e.value) and message in str(e.value) and "\n" not in str(e.value)


def test_not_json_and_missing_file(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"ctx": "a"\n')
    with pytest.raises(UserError, match="line 1: not valid JSON"):
        H.load_examples(str(bad))
    with pytest.raises(UserError, match="not found"):
        H.load_examples(str(tmp_path / "nope.jsonl"))


def test_download_once_into_cache(tmp_path, monkeypatch):
    with open(SAMPLE, "rb") as f:
        server = FileServer(f.read())
    try:
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
        monkeypatch.setattr(H, "HELLASWAG_URL", server.url)
        first = H.load_examples()
        second = H.load_examples(limit=3)
    finally:
        server.close()
    cached = tmp_path / "cache" / "gpt2-trainer" / "hellaswag_val.jsonl"
    assert cached.read_bytes() == open(SAMPLE, "rb").read()
    assert server.requests == 1
    assert first == H.load_examples(SAMPLE) and second == first[:3]
    assert os.listdir(cached.parent) == ["hellaswag_val.jsonl"]  # no temporary file left behind


def test_download_of_something_else_is_not_cached(tmp_path, monkeypatch):
    server = FileServer(b"<html>rate limited</html>\n")
    try:
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
        monkeypatch.setattr(H, "HELLASWAG_URL", server.url)
        with pytest.raises(UserError, match="--data_file"):
            H.load_examples()
    finally:
        server.close()
    assert os.listdir(tmp_path / "gpt2-trainer") == []


def _closed_port_url():
    return f"http://127.0.0.1:{free_port()}/hellaswag_val.jsonl"


def test_offline_download_is_one_line_naming_data_file(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(H, "HELLASWAG_URL", _closed_port_url())
    with pytest.raises(UserError) as e:
        H.load_examples()
    assert "--data_file" in str(e.value) and "\n" not in str(e.value)
    assert not os.path.exists(H.default_data_file())
    # and through the command line: one line on stderr, non-zero exit
    assert H.main(["--checkpoint", "unused.pt"]) != 0
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("error: ") and "--data_file" in err


# ----------------------------------------------------------------------------------------------------------------
# scoring


def test_batched_padded_scores_equal_one_row_at_a_time():
    model = tiny_gpt()
    examples = H.load_examples(SAMPLE)
    ref_sum, ref_mean = reference_scores(model, examples)
    for batch_size in (3, len(examples)):
        got = H.score(model, examples, batch_size=batch_size, autocast_dtype=FP32)
        torch.testing.assert_close(got["loss_sum"], ref_sum, rtol=0, atol=2e-5)
        torch.testing.assert_close(got["loss_mean"], ref_mean, rtol=0, atol=2e-5)
    labels = [ex["label"] for ex in examples]
    result = H.evaluate(model, examples, batch_size=len(examples), autocast_dtype=FP32)
    assert result["n"] == len(examples)
    assert result["acc"] == accuracy(ref_sum, labels) and result["acc_norm"] == accuracy(ref_mean, labels)


def test_padding_does_not_change_scores():
    model = tiny_gpt(seed=1, block_size=256)
    examples = H.load_examples(SAMPLE)[:3]
    long_example = dict(examples[0], ctx=" ".join([examples[1]["ctx"]] * 5), label=1)
    alone = H.score(model, examples, batch_size=1, autocast_dtype=FP32)
    # batched with a much longer example, every row of the first three carries 40+ padding positions
    padded = H.score(model, [long_example] + examples, batch_size=4, autocast_dtype=FP32)
    assert len(enc().encode(long_example["ctx"])) > 40 + len(enc().encode(examples[0]["ctx"]))
    torch.testing.assert_close(padded["loss_sum"][1:], alone["loss_sum"], rtol=0, atol=1e-5)
    torch.testing.assert_close(padded["loss_mean"][1:], alone["loss_mean"], rtol=0, atol=1e-5)


def test_int_and_string_labels_give_the_same_result(tmp_path):
    records = raw_records()
    as_int = write_jsonl(tmp_path / "int.jsonl", [dict(r, label=int(r["label"])) for r in records])
    as_str = write_jsonl(tmp_path / "str.jsonl", [dict(r, label=str(r["label"])) for r in records])
    model = tiny_gpt(seed=2)
    a = H.evaluate(model, H.load_examples(as_int), batch_size=4, autocast_dtype=FP32)
    b = H.evaluate(model, H.load_examples(as_str), batch_size=4, autocast_dtype=FP32)
    assert a == b
    # examples that never went through load_examples keep string labels too
    c = H.evaluate(model, [dict(r, label=str(r["label"])) for r in records], batch_size=4, autocast_dtype=FP32)
    assert c == a


@pytest.mark.parametrize("block", [32, 16])
def test_long_context_is_cut_on_the_left(block):
    model = tiny_gpt(seed=3, block_size=block)  # GPT refuses inputs longer than its block_size
    examples = H.load_examples(SAMPLE)
    ctx_lens = [len(enc().encode(ex["ctx"])) for ex in examples]
    end_lens = [max(len(enc().encode(" " + e)) for e in ex["endings"]) for ex in examples]
    assert max(c + e - 1 for c, e in zip(ctx_lens, end_lens)) > block  # the fixture needs truncation at this size
    assert (max(end_lens) > block) == (block == 16)  # at 16 one ending alone is longer than the context window
    ref_sum, ref_mean = reference_scores(model, examples, max_len=block)
    got = H.score(model, examples, batch_size=4, autocast_dtype=FP32)  # block_size read from model.config
    torch.testing.assert_close(got["loss_sum"], ref_sum, rtol=0, atol=2e-5)
    torch.testing.assert_close(got["loss_mean"], ref_mean, rtol=0, atol=2e-5)
    # a plain function hides the config: max_seq_len says it
    fn = H.score(lambda idx: model(idx)[0], examples, batch_size=4, autocast_dtype=FP32, max_seq_len=block)
    torch.testing.assert_close(fn["loss_sum"], got["loss_sum"], rtol=0, atol=0)


class BigramStub:
    """logits[b, t] depend only on idx[b, t]: `boost[prev][next]` on favoured next tokens, 0 elsewhere; the vocab
    padding columns (50257..50303) hold large garbage that a correct scorer must ignore."""

    def __init__(self, boost: dict[int, dict[int, float]]):
        # row 0: no boost; row k: the logits after the k-th boosted previous token
        self.row_of = torch.zeros(50304, dtype=torch.long)
        self.table = torch.zeros(len(boost) + 1, 50304)
        for k, (prev, nexts) in enumerate(boost.items(), 1):
            self.row_of[prev] = k
            for nxt, value in nexts.items():
                self.table[k, nxt] = value

    def __call__(self, idx):
        logits = self.table[self.row_of[idx]]
        logits[:, :, V:] = 25.0 + (idx % 7).unsqueeze(-1).float()
        return logits


def test_rigged_model_gets_exactly_the_expected_accuracy():
    examples = H.load_examples(SAMPLE)
    tokens = [(enc().encode_ordinary(ex["ctx"]), [enc().encode_ordinary(" " + e) for e in ex["endings"]])
              for ex in examples]
    # favour the label for even examples and the next ending for odd ones; every third example strongly
    boost: dict[int, dict[int, float]] = {}
    for i, (ex, (ctx, ends)) in enumerate(zip(examples, tokens)):
        favoured = ex["label"] if i % 2 == 0 else (ex["label"] + 1) % 4
        strength = 12.0 if i % 3 == 0 else 4.0
        seq = ctx + ends[favoured]
        for j in range(len(ctx), len(seq)):
            boost.setdefault(seq[j - 1], {})[seq[j]] = strength

    def loss(prev, nxt):  # closed form: softmax over 50257 logits, zero except the boosted ones
        row = boost.get(prev, {})
        lse = math.log(V - len(row) + sum(math.exp(v) for v in row.values()))
        return lse - row.get(nxt, 0.0)

    exp_sum, exp_mean = [], []
    for ctx, ends in tokens:
        sums = [sum(loss(p, n) for p, n in zip((ctx + e)[len(ctx) - 1 : -1], e)) for e in ends]
        exp_sum.append(sums)
        exp_mean.append([s / len(e) for s, e in zip(sums, ends)])
    labels = [ex["label"] for ex in examples]
    exp_acc = accuracy(torch.tensor(exp_sum), labels)
    exp_acc_norm = accuracy(torch.tensor(exp_mean), labels)
    assert exp_acc != exp_acc_norm  # the fixture separates the two metrics

    stub = BigramStub(boost)
    got = H.score(stub, examples, batch_size=4, autocast_dtype=FP32)
    # an fp32 log-softmax over ~50,000 equal logits is off by up to ~3e-4 per token; a misaligned or unsliced
    # scorer would be off by 4 or more
    torch.testing.assert_close(got["loss_sum"], torch.tensor(exp_sum, dtype=torch.float64), rtol=0, atol=1e-2)
    torch.testing.assert_close(got["loss_mean"], torch.tensor(exp_mean, dtype=torch.float64), rtol=0, atol=5e-4)
    result = H.evaluate(stub, examples, batch_size=4, autocast_dtype=FP32)
    assert (result["acc"], result["acc_norm"]) == (exp_acc, exp_acc_norm)
    assert result["correct_norm"] == round(exp_acc_norm * len(examples))


def test_model_output_forms_are_accepted():
    model = tiny_gpt(seed=4)
    examples = H.load_examples(SAMPLE, limit=4)
    plain = H.evaluate(lambda idx: model(idx)[0], examples, autocast_dtype=FP32)
    assert H.evaluate(model, examples, autocast_dtype=FP32) == plain  # (logits, loss) tuple
    with pytest.raises(ValueError, match="need at least 50257"):
        H.evaluate(lambda idx: model(idx)[0][..., :1000], examples, autocast_dtype=FP32)
    with pytest.raises(ValueError, match="no HellaSwag examples"):
        H.evaluate(model, [], autocast_dtype=FP32)


def uniform_logits(idx):
    """Every token costs ln(50257): an ending's summed loss is its token count times ln(50257)."""
    return torch.zeros(*idx.shape, V)


def test_acc_norm_chars_divides_by_the_characters_of_the_ending():
    """lm-eval's acc_norm divides by len(ending): characters, not UTF-8 bytes, and not the leading space."""
    endings = ["très bien", "délicieux, vraiment délicieux", "ok", "résumé"]
    n_tok = [len(enc().encode_ordinary(" " + e)) for e in endings]
    lengths = {"chars": [len(e) for e in endings], "bytes": [len(e.encode("utf-8")) for e in endings],
               "with the space": [len(e) + 1 for e in endings]}
    picks = {name: min(range(4), key=lambda i: n_tok[i] / ls[i]) for name, ls in lengths.items()}
    assert len(set(picks.values())) == 3  # the three conventions choose three different endings here
    example = {"ctx": "The chef tasted the soup and said it was", "endings": endings, "label": picks["chars"]}
    got = H.score(uniform_logits, [example], autocast_dtype=FP32)
    expected = torch.tensor([[t * math.log(V) / c for t, c in zip(n_tok, lengths["chars"])]], dtype=torch.float64)
    torch.testing.assert_close(got["loss_per_char"], expected, rtol=1e-5, atol=0)
    result = H.evaluate(uniform_logits, [example], autocast_dtype=FP32)
    assert (result["acc_norm_chars"], result["correct_norm_chars"]) == (1.0, 1)
    for name in ("bytes", "with the space"):
        wrong = dict(example, label=picks[name])
        assert H.evaluate(uniform_logits, [wrong], autocast_dtype=FP32)["acc_norm_chars"] == 0.0, name
    assert n_tok.index(min(n_tok)) != picks["chars"] and result["acc"] == 0.0  # acc: the fewest tokens


def test_acc_norm_chars_of_a_small_model_follows_its_scores():
    model = tiny_gpt(seed=9)
    examples = H.load_examples(SAMPLE)
    ref_sum, _ = reference_scores(model, examples)
    per_char = ref_sum / torch.tensor([[len(e) for e in ex["endings"]] for ex in examples], dtype=torch.float64)
    got = H.score(model, examples, batch_size=5, autocast_dtype=FP32)
    torch.testing.assert_close(got["loss_per_char"], per_char, rtol=0, atol=2e-5)
    result = H.evaluate(model, examples, batch_size=5, autocast_dtype=FP32)
    labels = [ex["label"] for ex in examples]
    assert result["acc_norm_chars"] == accuracy(per_char, labels) == result["correct_norm_chars"] / len(examples)


def test_lm_eval_text_rewrites_the_example_as_lm_eval_hellaswag_does():
    examples = H.load_examples(SAMPLE)
    first, wikihow = H.lm_eval_text(examples[0]), H.lm_eval_text(examples[3])
    assert first["ctx"] == "Baking cookies: A woman stands at a kitchen counter with a bowl of flour and a tray. She"
    assert first["endings"] == examples[0]["endings"]
    assert {k: v for k, v in first.items() if k not in ("ctx", "endings")} == \
        {k: v for k, v in examples[0].items() if k not in ("ctx", "endings")}
    # " [title]" becomes ". ", other [markers] go, double spaces are made single; an ending that starts with
    # "[title]" keeps the space that followed the marker, as in lm-eval
    assert wikihow["ctx"] == ("Home and Garden: How to repot a houseplant. Choose a slightly larger pot. "
                              "The new pot should be one or two inches wider than the old one.")
    assert wikihow["endings"][1] == " Paint the plant. Use bright colors."
    assert H.lm_eval_text({"activity_label": "Fishing", "ctx_a": "A man casts.", "ctx_b": "the LINE",
                           "endings": ["a", "b", "c", "d"]})["ctx"] == "Fishing: A man casts. The line"
    with pytest.raises(UserError, match="ctx_a"):
        H.lm_eval_text({"ctx": "x", "endings": ["a", "b", "c", "d"], "label": 0})
    with pytest.raises(ValueError, match="text must be one of"):
        H.evaluate(uniform_logits, examples, text="lm-eval")


def test_cli_text_lm_eval_and_the_printed_line(checkpoint, tmp_path, capsys):
    path, model = checkpoint
    out = tmp_path / "lm_eval_text.json"
    assert H.main(["--checkpoint", path, "--data_file", SAMPLE, "--dtype", "fp32", "--text", "lm_eval",
                   "--no_progress", "--out", str(out)]) == 0
    stdout, _ = capsys.readouterr()
    examples = H.load_examples(SAMPLE)
    expected = H.evaluate(model, [H.lm_eval_text(ex) for ex in examples], autocast_dtype=FP32)
    assert H.evaluate(model, examples, autocast_dtype=FP32, text="lm_eval") == expected
    saved = json.loads(out.read_text())
    assert {k: saved[k] for k in expected} == expected and saved["text"] == "lm_eval"
    assert (f"acc={expected['acc']:.4f} acc_norm={expected['acc_norm']:.4f} "
            f"acc_norm_chars={expected['acc_norm_chars']:.4f} ") in stdout
    stripped = tmp_path / "stripped.jsonl"
    write_jsonl(stripped, [{k: v for k, v in r.items() if k != "ctx_b"} for r in raw_records()])
    assert "ctx_b" in _one_line_error(["--checkpoint", path, "--data_file", str(stripped), "--text", "lm_eval"])
    assert "invalid choice" in _one_line_error(["--checkpoint", path, "--text", "lm-eval"])


def _ddp_worker(rank, world_size, port, cases, out_dir):
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                         world_size=world_size)
    try:
        model = tiny_gpt(seed=5)
        examples = H.load_examples(SAMPLE)
        results = []
        for limit, batch_size in cases:
            calls = [0]

            def model_fn(idx, calls=calls):
                calls[0] += 1
                return model(idx)[0]

            r = H.evaluate(model_fn, examples[:limit], batch_size=batch_size, rank=rank, world_size=world_size,
                           autocast_dtype=FP32)
            results.append({"result": r, "forwards": calls[0]})
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
    finally:
        torch.distributed.destroy_process_group()


def test_two_gloo_ranks_equal_one_process(tmp_path):
    examples = H.load_examples(SAMPLE)
    n = len(examples)
    # 13 examples in batches of 2: 7 batches, 4 + 3 per rank; a single example: rank 1 has nothing of its own
    cases = [(n, 2), (n, 5), (1, 4)]
    assert n % 2 == 1
    torch.multiprocessing.spawn(_ddp_worker, args=(2, free_port(), cases, str(tmp_path)), nprocs=2, join=True)
    ranks = [json.load(open(tmp_path / f"rank{r}.json")) for r in range(2)]
    model = tiny_gpt(seed=5)
    for k, (limit, batch_size) in enumerate(cases):
        single = H.evaluate(model, examples[:limit], batch_size=batch_size, autocast_dtype=FP32)
        assert ranks[0][k]["result"] == single and ranks[1][k]["result"] == single
        n_batches = math.ceil(limit / batch_size)
        assert ranks[0][k]["forwards"] == ranks[1][k]["forwards"] == math.ceil(n_batches / 2)


# ----------------------------------------------------------------------------------------------------------------
# command line


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A checkpoint in train_gpt2.py's format (config + model state), of a tiny random GPT."""
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    model = tiny_gpt(seed=6)
    torch.save({"config": asdict(model.config), "model": model.state_dict()}, path)
    return str(path), model


def test_cli_checkpoint_result_and_json(checkpoint, tmp_path, capsys):
    path, model = checkpoint
    out = tmp_path / "sub" / "result.json"
    rc = H.main(["--checkpoint", path, "--data_file", SAMPLE, "--dtype", "fp32", "--batch_size", "3",
                 "--no_progress", "--out", str(out)])
    stdout, _ = capsys.readouterr()
    assert rc == 0
    expected = H.evaluate(model, H.load_examples(SAMPLE), batch_size=3, autocast_dtype=FP32)
    saved = json.loads(out.read_text())
    assert {k: saved[k] for k in expected} == expected
    assert saved["examples_per_s"] > 0 and saved["dtype"] == "float32" and saved["world_size"] == 1
    lines = stdout.splitlines()
    assert len(lines) == 1
    assert f"n={expected['n']} acc={expected['acc']:.4f} acc_norm={expected['acc_norm']:.4f}" in lines[0]
    assert "seconds=" in lines[0] and "examples/s=" in lines[0]


def test_cli_under_torchrun_matches_single_process(checkpoint, tmp_path):
    path, model = checkpoint
    out = tmp_path / "ddp.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", SCRIPT,
         "--checkpoint", path, "--data_file", SAMPLE, "--limit", "11", "--batch_size", "2", "--dtype", "fp32",
         "--device", "cpu", "--out", str(out)],
        capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("hellaswag n=") == 1  # only rank 0 prints
    saved = json.loads(out.read_text())
    expected = H.evaluate(model, H.load_examples(SAMPLE, limit=11), batch_size=2, autocast_dtype=FP32)
    assert {k: saved[k] for k in expected} == expected and saved["world_size"] == 2


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    d = tmp_path_factory.mktemp("hf_gpt2")
    torch.manual_seed(7)
    config = transformers.GPT2Config(n_positions=64, n_embd=32, n_layer=2, n_head=2, vocab_size=V)
    transformers.GPT2LMHeadModel(config).save_pretrained(d)
    return str(d)


def test_cli_hf_model_directory_matches_our_gpt(hf_dir, tmp_path, capsys):
    out = tmp_path / "hf.json"
    rc = H.main(["--hf_model", hf_dir, "--data_file", SAMPLE, "--dtype", "fp32", "--no_progress", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    ours = GPT.from_pretrained(hf_dir).eval()  # the same weights in this project's model
    expected = H.evaluate(ours, H.load_examples(SAMPLE), autocast_dtype=FP32)
    saved = json.loads(out.read_text())
    assert {k: saved[k] for k in expected} == expected


def test_hf_model_with_its_own_tokenizer(tmp_path, capsys):
    """A model whose tokenizer is not GPT-2's is scored with that tokenizer and its full vocabulary."""
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    examples = H.load_examples(SAMPLE)
    words = sorted({w for ex in examples for text in [ex["ctx"], *ex["endings"]] for w in text.split()})
    vocab = {"<unk>": 0, "<s>": 1, **{w: i + 2 for i, w in enumerate(words)}}
    tk = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tk.post_processor = tokenizers.processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    d = tmp_path / "wordlevel"
    transformers.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>").save_pretrained(d)
    torch.manual_seed(8)
    config = transformers.GPT2Config(n_positions=64, n_embd=32, n_layer=2, n_head=2, vocab_size=len(vocab),
                                     bos_token_id=1, eos_token_id=1)
    model = transformers.GPT2LMHeadModel(config).eval()
    model.save_pretrained(d)

    sums, means = [], []
    for ex in examples:  # by hand: BOS + context words, then the ending's words, scored over the whole vocabulary
        ctx = [1] + [vocab[w] for w in ex["ctx"].split()]
        s_row, m_row = [], []
        for e in ex["endings"]:
            end = [vocab[w] for w in e.split()]
            with torch.no_grad():
                logp = F.log_softmax(model(torch.tensor([ctx + end])).logits[0].float(), dim=-1)
            nll = [-logp[len(ctx) - 1 + j, t].item() for j, t in enumerate(end)]
            s_row.append(sum(nll))
            m_row.append(sum(nll) / len(nll))
        sums.append(s_row)
        means.append(m_row)
    labels = [ex["label"] for ex in examples]
    out = tmp_path / "r.json"
    argv = ["--hf_model", str(d), "--data_file", SAMPLE, "--dtype", "fp32", "--no_progress", "--out", str(out)]
    assert H.main(argv) == 0
    saved = json.loads(out.read_text())
    assert saved["acc"] == accuracy(torch.tensor(sums), labels)
    assert saved["acc_norm"] == accuracy(torch.tensor(means), labels)


def _one_line_error(argv):
    """hellaswag_eval's command line on bad input: one error line, and nothing on stdout."""
    r = cli(argv, main=H.main)
    assert r.stdout == ""
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    assert_one_line_error(r, code=None)
    return r.stderr


def test_cli_bad_input_is_one_line(checkpoint, tmp_path, capsys):
    path, _ = checkpoint
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    cases = [
        ([], "exactly one of --checkpoint"),
        (["--checkpoint", path, "--hf_model", "x"], "exactly one of --checkpoint"),
        (["--checkpoint", path, "--limit", "0"], "positive integer"),
        (["--checkpoint", path, "--batch_size", "abc"], "positive integer"),
        (["--checkpoint", path, "--device", "tpu"], "invalid choice"),
        (["--checkpoint", path, "--data_file", str(tmp_path / "missing.jsonl")], "not found"),
        (["--checkpoint", str(tmp_path / "missing.pt"), "--data_file", SAMPLE], "missing.pt"),
        (["--checkpoint", str(garbage), "--data_file", SAMPLE], "garbage.pt"),
        (["--hf_model", str(tmp_path / "no_such_dir"), "--data_file", SAMPLE], "no such directory"),
        (["--hf_model", str(tmp_path), "--data_file", SAMPLE], "could not load a causal LM"),
        (["--plot", str(tmp_path), "--checkpoint", path], "do not combine"),
        (["--plot", str(tmp_path / "no_run")], "no training log"),
    ]
    for argv, message in cases:
        assert message in _one_line_error(argv), argv


def test_cli_missing_transformers(hf_dir, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    err = _one_line_error(["--hf_model", hf_dir, "--data_file", SAMPLE])
    assert "pip install transformers" in err


def test_cli_unreachable_hub_asks_for_a_local_directory():
    env = dict(os.environ, HF_HUB_OFFLINE="1")  # the Hub is unreachable: fail fast instead of retrying
    proc = subprocess.run([sys.executable, SCRIPT, "--hf_model", "someone/some-model", "--data_file", SAMPLE],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode != 0 and proc.stdout == ""
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert "local directory" in proc.stderr and "Traceback" not in proc.stderr


# ----------------------------------------------------------------------------------------------------------------
# plots


def _write_log(path, rows, tail=""):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "log.jsonl"), "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
        f.write(tail)


def test_plot_overlays_runs(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    import matplotlib.image

    runs = {}
    for k, name in enumerate(["d6", "d6_lr2x"]):
        rows = [{"step": 0, "tokens": 0, "val_loss": 10.9, "hellaswag_acc_norm": 0.25}]
        for step in range(1, 41):
            row = {"step": step, "train_loss": 10.0 * 0.97 ** step + k * 0.1, "lr": 1e-3, "tokens": step * 1024}
            if step % 10 == 0:
                row.update(val_loss=row["train_loss"] + 0.05, hellaswag_acc_norm=0.25 + 0.001 * step)
            rows.append(row)
        rows.append({"step": 41, "train_loss": None, "mfu": None})  # keys present but empty
        runs[name] = rows
        _write_log(tmp_path / name, rows, tail='{"step": 42, "train_lo')  # a line still being written
    png = tmp_path / "out" / "runs.png"
    summary = H.plot_runs([str(tmp_path / n) for n in runs], str(png))
    for name, rows in runs.items():
        expect = {key: sum(1 for r in rows if isinstance(r.get(key), float))
                  for key in ("train_loss", "val_loss", "hellaswag_acc_norm")}
        assert summary[name] == expect
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    height, width = matplotlib.image.imread(str(png)).shape[:2]
    assert width > height > 300
    assert sorted(os.listdir(png.parent)) == ["runs.png"]
    # the command line draws the same picture
    png2 = tmp_path / "cli.png"
    assert H.main(["--plot", str(tmp_path / "d6"), "--png", str(png2)]) == 0
    assert png2.exists() and "wrote" in capsys.readouterr().out


def test_plot_needs_matplotlib(tmp_path, monkeypatch, capsys):
    _write_log(tmp_path / "run", [{"step": 1, "train_loss": 5.0}])
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    err = _one_line_error(["--plot", str(tmp_path / "run"), "--png", str(tmp_path / "x.png")])
    assert "pip install matplotlib" in err
