"""The trainer's options beyond GPT-2's defaults: architecture flags, the adamw/sgd/muon optimisers, --epochs,
--init_from, activation checkpointing and dropout, sample.py's --int8, DDP with Muon. Each end-to-end case is
checked against an uninterrupted run, a second run that must agree, or a computation made here independently.

Most runs call train_gpt2.main in this process (the same code path as the command line, without paying for a new
interpreter each time); one error case and the torchrun case go through real processes."""

import contextlib
import dataclasses
import hashlib
import io
import math
import os
import random
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import export_hf as ex
import sample
import train_gpt2 as tg
from test_train import TINY, load_weights, make_shards, read_log, run_cli

TRAIN_SIZES, VAL_SIZE = (6000, 5000), 3000
B, T, TOTAL = 4, 32, 256  # as in TINY: 2 micro-steps of 4 x 32 tokens per optimizer step
MODERN = ["--norm", "rmsnorm", "--pos", "rope", "--mlp", "swiglu", "--no-bias", "--n_kv_head", "1"]
LOG_KEYS = ("step", "train_loss", "val_loss", "lr", "grad_norm", "tokens")


# ---------------------------------------------------------------------------------------------------------------
# helpers


def cli(argv, main=tg.main):
    """train_gpt2.main(argv) (or another script's main) in this process: (exit code, stdout, stderr), like a
    finished subprocess."""
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main([str(a) for a in argv])
        except SystemExit as e:
            code = e.code
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


def proc(argv, torchrun_procs=0):
    """The command line in a new process (torchrun's, with torchrun_procs ranks)."""
    return run_cli([str(a) for a in argv], torchrun_procs=torchrun_procs)


def ok(result):
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return result


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def schedule(step, warmup, max_steps, ratio=0.1):
    """The documented schedule written out again: linear warmup from 1/warmup, cosine to `ratio`, flat after."""
    if step >= max_steps:
        return ratio
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, max_steps - warmup)
    return ratio + (1 - ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def ckpt(out, step):
    return torch.load(os.path.join(out, f"ckpt_{step:07d}.pt"), map_location="cpu", weights_only=True)


def digest(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def shard_tokens(path):
    """The tokens of an llm.c shard, read here without the trainer: a 256-int32 header, then uint16."""
    return np.fromfile(path, dtype=np.uint16, offset=256 * 4).astype(np.int64)


def val_sequences(data_dir, seq_len, budget):
    """The trainer's validation set, by its definition: the first budget // seq_len windows of seq_len + 1 tokens,
    stride seq_len."""
    val = shard_tokens(os.path.join(data_dir, "t_val_000000.bin"))
    n_seq = min(budget // seq_len, (len(val) - 1) // seq_len)
    return torch.stack([torch.from_numpy(val[i * seq_len: i * seq_len + seq_len + 1]) for i in range(n_seq)])


def mean_loss(logits_fn, seqs, vocab=tg.GPT2_VOCAB_SIZE):
    """Mean next-token cross-entropy over every position of every sequence, one sequence at a time."""
    total = 0.0
    with torch.no_grad():
        for s in seqs:
            logits = logits_fn(s[None, :-1])[0, :, :vocab].double()
            total += F.cross_entropy(logits, s[1:], reduction="sum").item()
    return total / (seqs.shape[0] * (seqs.shape[1] - 1))


def optimizer_tensors(saved):
    """Every tensor in a checkpoint's list of optimizer state dicts, keyed by (optimizer, param index, name)."""
    return {(i, pid, k): v for i, sd in enumerate(saved) for pid, st in sd["state"].items()
            for k, v in st.items() if torch.is_tensor(v)}


@contextlib.contextmanager
def kept_global_state():
    """In-process runs seed the global generators, and runs here use one thread: both are put back afterwards."""
    states = torch.get_rng_state(), np.random.get_state(), random.getstate(), torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_rng_state(states[0])
        np.random.set_state(states[1])
        random.setstate(states[2])
        torch.set_num_threads(states[3])


@pytest.fixture(autouse=True)
def global_state():
    with kept_global_state():
        yield


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("option_shards"))
    train = make_shards(folder, train_sizes=TRAIN_SIZES, val_size=VAL_SIZE)
    return folder, train


@pytest.fixture(scope="module")
def base_run(data, tmp_path_factory):
    """One AdamW step of the default d2: a checkpoint to resume, sample from, and refuse mismatches against."""
    out = str(tmp_path_factory.mktemp("base"))
    with kept_global_state():
        ok(cli(TINY + ["--data_dir", data[0], "--max_steps", 1, "--val_every", 0, "--out_dir", out]))
    return out


# ---------------------------------------------------------------------------------------------------------------
# stop and resume: every optimiser, several architectures


@pytest.mark.parametrize("optimizer, arch, extra", [
    ("adamw", ["--untie", "--pos", "rope", "--rope_theta", "500", "--mlp_hidden", "96", "--n_kv_head", "2"], []),
    ("sgd", ["--no-bias", "--mlp", "swiglu", "--norm", "rmsnorm"], ["--lr", "0.05", "--sgd_momentum", "0.8"]),
    ("muon", MODERN, ["--muon_lr", "0.03", "--muon_weight_decay", "0.01"]),
])
def test_stop_and_resume_is_bit_identical(data, tmp_path, optimizer, arch, extra):
    whole, split = str(tmp_path / "whole"), str(tmp_path / "split")
    common = TINY + ["--data_dir", data[0], "--max_steps", 4, "--optimizer", optimizer] + arch + extra
    ok(cli(common + ["--out_dir", whole]))
    ok(cli(common + ["--out_dir", split, "--stop_at_step", 2]))
    assert sorted(os.listdir(split)) == ["ckpt_0000002.pt", "log.jsonl"]
    r = ok(cli(common + ["--out_dir", split, "--resume", "auto"]))
    assert "resumed from" in r.stdout and "at step 2" in r.stdout

    a, b = ckpt(whole, 4), ckpt(split, 4)
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    sa, sb = optimizer_tensors(a["optimizer"]), optimizer_tensors(b["optimizer"])
    assert sa.keys() == sb.keys() and sa
    assert all(torch.equal(sa[k], sb[k]) for k in sa)  # momentum and moment buffers carried over exactly
    log_a, log_b = read_log(whole), read_log(split)
    assert [[r.get(k) for k in LOG_KEYS] for r in log_a] == [[r.get(k) for k in LOG_KEYS] for r in log_b]
    assert [r["step"] for r in log_a] == [0, 1, 2, 3, 4]

    # the configuration is saved as asked, with one optimizer state per optimizer
    config = a["config"]
    if optimizer == "muon":
        assert (config["norm"], config["pos"], config["mlp"], config["bias"], config["n_kv_head"]) == (
            "rmsnorm", "rope", "swiglu", False, 1)
    elif optimizer == "sgd":
        assert (config["norm"], config["mlp"], config["bias"], config["pos"]) == ("rmsnorm", "swiglu", False, "learned")
    else:
        assert config["tie_embeddings"] is False and config["pos"] == "rope" and config["rope_theta"] == 500.0
        assert config["mlp_hidden"] == 96 and config["n_kv_head"] == 2
        assert not torch.equal(a["model"]["lm_head.weight"], a["model"]["transformer.wte.weight"])
    assert len(a["optimizer"]) == (2 if optimizer == "muon" else 1)
    assert a["settings"]["optimizer"] == optimizer

    # logged lr is --lr times the schedule; every saved group carries the lr its own flag sets for the last step
    args = a["settings"]
    for rec in log_a[1:]:
        assert rec["lr"] == pytest.approx(args["lr"] * schedule(rec["step"] - 1, 1, 4), rel=1e-12)
    last = schedule(3, 1, 4)
    for sd in a["optimizer"]:
        for group in sd["param_groups"]:
            assert group["lr"] == pytest.approx(args[group["lr_flag"]] * last, rel=1e-12)
    flags_used = [g["lr_flag"] for sd in a["optimizer"] for g in sd["param_groups"]]
    assert set(flags_used) == ({"muon_lr", "lr"} if optimizer == "muon" else {"lr"})
    if optimizer == "muon":
        assert all(g["lr_flag"] == "muon_lr" for g in a["optimizer"][0]["param_groups"])
        assert all(g["lr_flag"] == "lr" for g in a["optimizer"][1]["param_groups"])
        assert a["optimizer"][0]["param_groups"][0]["lr"] == pytest.approx(0.03 * last)


# ---------------------------------------------------------------------------------------------------------------
# optimiser construction


def build(name, **overrides):
    args = tg.parse_settings(["--optimizer", name, "--lr", "0.004", "--weight_decay", "0.05", "--muon_lr", "0.03",
                          "--muon_momentum", "0.9", "--muon_weight_decay", "0.01", "--sgd_momentum", "0.7"])
    config = tg.GPTConfig(block_size=32, n_layer=2, n_head=2, n_embd=64, **overrides)
    torch.manual_seed(0)
    model = tg.GPT(config)
    return model, tg.configure_optimizers(model, args, "cpu"), args


def block_matrix_names(n_layer):
    return {f"transformer.h.{i}.{leaf}" for i in range(n_layer)
            for leaf in ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")}


@pytest.mark.parametrize("overrides", [
    {},
    dict(norm="rmsnorm", pos="rope", mlp="swiglu", bias=False, n_kv_head=1),
    dict(tie_embeddings=False, bias=False),
])
def test_muon_takes_the_block_matrices_and_adamw_everything_else(overrides):
    model, opts, args = build("muon", **overrides)
    assert [type(o) for o in opts] == [tg.Muon, torch.optim.AdamW]
    muon, adam = opts
    names = {id(p): n for n, p in model.named_parameters()}  # the tied matrix appears once, as wte
    muon_params = [p for g in muon.param_groups for p in g["params"]]
    adam_params = [p for g in adam.param_groups for p in g["params"]]
    assert sorted(names[id(p)] for p in muon_params) == sorted(block_matrix_names(2))
    everything = muon_params + adam_params
    assert len({id(p) for p in everything}) == len(everything)  # none twice
    assert {id(p) for p in everything} == {id(p) for p in model.parameters()}  # none missing
    adam_names = {names[id(p)] for p in adam_params}
    assert "transformer.wte.weight" in adam_names and "transformer.ln_f.weight" in adam_names
    assert ("lm_head.weight" in adam_names) == (not model.config.tie_embeddings)
    assert ("transformer.wpe.weight" in adam_names) == (model.config.pos == "learned")
    if model.config.bias:
        assert "transformer.h.0.attn.c_attn.bias" in adam_names
    # AdamW decays exactly its >= 2-D tensors (embeddings, untied head), never gains or biases
    decayed = {names[id(p)] for g in adam.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decayed == {n for n in adam_names if dict(model.named_parameters())[n].dim() >= 2}
    assert all(g["weight_decay"] in (0.0, args.weight_decay) for g in adam.param_groups)
    assert all(g["lr"] == args.lr and g["lr_flag"] == "lr" for g in adam.param_groups)
    for g in muon.param_groups:
        assert g["lr_flag"] == "muon_lr" and g["lr"] == args.muon_lr
        assert g["momentum"] == args.muon_momentum and g["weight_decay"] == args.muon_weight_decay and g["nesterov"]


@pytest.mark.parametrize("name, kind", [("adamw", torch.optim.AdamW), ("sgd", torch.optim.SGD)])
def test_adamw_and_sgd_cover_every_parameter_once(name, kind):
    model, opts, args = build(name, tie_embeddings=True)
    assert [type(o) for o in opts] == [kind]
    params = [p for g in opts[0].param_groups for p in g["params"]]
    assert len(params) == len({id(p) for p in params}) == len(list(model.parameters()))
    for g in opts[0].param_groups:
        assert g["lr_flag"] == "lr" and g["lr"] == args.lr
        assert g["weight_decay"] == (args.weight_decay if all(p.dim() >= 2 for p in g["params"]) else 0.0)
        assert all(p.dim() < 2 for p in g["params"]) or all(p.dim() >= 2 for p in g["params"])
        if kind is torch.optim.SGD:
            assert g["momentum"] == args.sgd_momentum and g["nesterov"]


def test_two_sgd_steps_on_the_cli_match_a_hand_computed_update(data, tmp_path):
    """Nesterov momentum and L2 decay on matrices, written out with plain tensor arithmetic, on batches read here
    from the train tokens: init, data order, gradient accumulation and schedule all have to agree."""
    folder, train = data
    lr, momentum, wd = 0.5, 0.9, 0.1
    out = str(tmp_path / "o")
    ok(cli(TINY + ["--data_dir", folder, "--out_dir", out, "--max_steps", 2, "--val_every", 0, "--optimizer", "sgd",
                   "--lr", lr, "--sgd_momentum", momentum, "--weight_decay", wd, "--grad_clip", 0]))
    got = load_weights(os.path.join(out, "ckpt_0000002.pt"))

    torch.manual_seed(1337)  # the default --seed, set right before the model is built
    model = tg.GPT(tg.GPTConfig(n_layer=2, n_head=2, n_embd=128))
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers = {}
    for step in range(2):
        model.zero_grad(set_to_none=True)
        for micro in range(2):
            pos = (2 * step + micro) * B * T
            chunk = torch.from_numpy(train[pos: pos + B * T + 1].astype(np.int64))
            _, loss = model(chunk[:-1].view(B, T), chunk[1:].view(B, T))
            (loss / 2).backward()
        step_lr = lr * schedule(step, 1, 2)
        with torch.no_grad():
            for n, p in model.named_parameters():
                g = p.grad + wd * p if p.dim() >= 2 else p.grad.clone()
                buffers[n] = g.clone() if step == 0 else momentum * buffers[n] + g
                p -= step_lr * (g + momentum * buffers[n])
    for n, p in model.named_parameters():
        torch.testing.assert_close(got[n], p.detach(), rtol=1e-5, atol=1e-6, msg=n)
    moved = max((got[n] - start[n]).abs().max().item() for n in start)
    assert moved > 1e-3  # far above the tolerance: a wrong momentum or decay could not hide in it


# ---------------------------------------------------------------------------------------------------------------
# resuming into something else


def copy_run(src, tmp_path):
    """A private copy of a run, hard-linked: the trainer replaces files by renaming, never rewrites them in place."""
    dst = str(tmp_path / "run")
    shutil.copytree(src, dst, copy_function=os.link)
    return dst


def test_resume_with_another_optimizer_is_refused(data, base_run, tmp_path):
    out = copy_run(base_run, tmp_path)
    before = {f: digest(os.path.join(out, f)) for f in os.listdir(out)}
    r = proc(TINY + ["--data_dir", data[0], "--out_dir", out, "--max_steps", 2, "--val_every", 0,
                     "--resume", "auto", "--optimizer", "muon"])  # a real process: exit status and stderr
    assert_one_line_error(r, "--optimizer adamw", "muon")
    r = cli(TINY + ["--data_dir", data[0], "--out_dir", out, "--max_steps", 2, "--val_every", 0,
                    "--resume", "auto", "--optimizer", "sgd"])
    assert_one_line_error(r, "adamw", "sgd")
    assert {f: digest(os.path.join(out, f)) for f in os.listdir(out)} == before


@pytest.mark.parametrize("flags, field", [
    (["--norm", "rmsnorm"], "norm"),
    (["--pos", "rope"], "pos"),
    (["--rope_theta", "500"], "rope_theta"),
    (["--n_kv_head", "1"], "n_kv_head"),
    (["--mlp", "swiglu"], "mlp"),
    (["--mlp_hidden", "256"], "mlp_hidden"),
    (["--no-bias"], "bias"),
    (["--untie"], "tie_embeddings"),
])
def test_resume_with_another_architecture_is_refused(data, base_run, tmp_path, flags, field):
    out = copy_run(base_run, tmp_path)
    before = {f: digest(os.path.join(out, f)) for f in os.listdir(out)}
    r = cli(TINY + ["--data_dir", data[0], "--out_dir", out, "--max_steps", 2, "--val_every", 0,
                    "--resume", "auto"] + flags)
    assert_one_line_error(r, "different model", field)
    assert {f: digest(os.path.join(out, f)) for f in os.listdir(out)} == before


def test_resume_with_another_dropout_is_accepted(data, base_run, tmp_path):
    out = copy_run(base_run, tmp_path)
    r = ok(cli(TINY + ["--data_dir", data[0], "--out_dir", out, "--max_steps", 2, "--val_every", 0,
                       "--resume", "auto", "--dropout", "0.1"]))
    assert "resumed from" in r.stdout
    first, second = ckpt(out, 1), ckpt(out, 2)
    assert second["config"]["dropout"] == 0.1
    assert {k: v for k, v in second["config"].items() if k != "dropout"} == \
        {k: v for k, v in first["config"].items() if k != "dropout"}


def test_the_startup_line_and_the_checkpoint_show_the_settings(data, base_run):
    saved = tg.saved_settings_of(tg.load_checkpoint(f"{base_run}/ckpt_0000001.pt"))
    assert saved["max_steps"] == 1 and saved["seq_len"] == 32 and saved["lr"] == 3e-3
    assert saved.keys() == {f.name for f in dataclasses.fields(tg.Settings)}


@pytest.mark.parametrize("flags, named", [
    (["--lr", "0.004"], "--lr 0.003"),
    (["--seq_len", "16"], "--seq_len 32"),
    (["--total_batch_size", "512"], "--total_batch_size 256"),
    (["--seed", "7"], "--seed 1337"),
    (["--lr_schedule", "wsd"], "--lr_schedule cosine"),
])
def test_resume_with_another_fixed_setting_is_refused(data, base_run, tmp_path, flags, named):
    out = copy_run(base_run, tmp_path)
    r = cli(TINY + ["--data_dir", data[0], "--out_dir", out, "--max_steps", 2, "--val_every", 0, "--resume", "auto"]
            + flags)
    assert_one_line_error(r, named, "to resume it")


def test_resume_may_change_the_micro_batch_and_the_run_length(data, base_run, tmp_path):
    out = copy_run(base_run, tmp_path)
    r = ok(cli(TINY + ["--data_dir", data[0], "--out_dir", out, "--max_steps", 3, "--val_every", 0,
                       "--resume", "auto", "--batch_size", 2]))
    assert "resumed from" in r.stdout and "4 micro-steps" in r.stdout and "step     3/3" in r.stdout


def test_checkpoint_with_a_single_optimizer_dict_still_resumes(data, base_run, tmp_path):
    """Checkpoints from before the optimiser list held one AdamW state dict and no --optimizer in their args."""
    new = copy_run(base_run, tmp_path / "new")
    old = copy_run(base_run, tmp_path / "old")
    path = os.path.join(old, "ckpt_0000001.pt")
    saved = torch.load(path, map_location="cpu", weights_only=True)
    assert isinstance(saved["optimizer"], list) and len(saved["optimizer"]) == 1
    saved["optimizer"] = saved["optimizer"][0]
    saved["args"] = saved.pop("settings")  # as older checkpoints name them
    del saved["args"]["optimizer"]
    os.remove(path)  # a new file, not the base run's (hard-linked) one rewritten
    torch.save(saved, path)
    common = TINY + ["--data_dir", data[0], "--max_steps", 2, "--val_every", 0, "--resume", "auto"]
    ok(cli(common + ["--out_dir", new]))
    ok(cli(common + ["--out_dir", old]))
    a, b = load_weights(os.path.join(new, "ckpt_0000002.pt")), load_weights(os.path.join(old, "ckpt_0000002.pt"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    start = load_weights(os.path.join(base_run, "ckpt_0000001.pt"))
    assert not torch.equal(a["transformer.h.0.attn.c_attn.weight"], start["transformer.h.0.attn.c_attn.weight"])


# ---------------------------------------------------------------------------------------------------------------
# --epochs


def test_epochs_sets_the_number_of_steps(data, tmp_path):
    folder, train = data
    epochs = 0.05
    expected = math.ceil(epochs * len(train) / TOTAL)  # 550 tokens / 256 a step: 2.15, so 3 steps
    assert expected != round(epochs * len(train) / TOTAL)
    out = str(tmp_path / "o")
    ok(cli(TINY + ["--data_dir", folder, "--out_dir", out, "--epochs", epochs, "--val_every", 0]))
    log = read_log(out)
    assert [rec["step"] for rec in log] == list(range(1, expected + 1))
    assert sorted(os.listdir(out)) == [f"ckpt_{expected:07d}.pt", "log.jsonl"]
    assert ckpt(out, expected)["settings"]["max_steps"] == expected
    for rec in log:  # the cosine ends at the derived length
        assert rec["lr"] == pytest.approx(3e-3 * schedule(rec["step"] - 1, 1, expected), rel=1e-12)


@pytest.mark.parametrize("flags, fragments", [
    (["--epochs", "1", "--max_steps", "5"], ["--epochs", "--max_steps"]),
    (["--epochs", "0"], ["--epochs"]),
    (["--epochs", "-0.5"], ["--epochs"]),
])
def test_bad_epochs_are_refused(data, tmp_path, flags, fragments):
    out = tmp_path / "o"
    r = cli(TINY + ["--data_dir", data[0], "--out_dir", str(out)] + flags)
    assert_one_line_error(r, *fragments)
    assert not out.exists()


# ---------------------------------------------------------------------------------------------------------------
# --init_from a Hugging Face directory


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp, kept_global_state():
        mp.setenv("HF_HUB_OFFLINE", "1")
        transformers = pytest.importorskip("transformers")
        torch.manual_seed(0)
        config = transformers.GPT2Config(vocab_size=50257, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                                         resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)
        path = str(tmp_path_factory.mktemp("hf_gpt2"))
        hf = transformers.GPT2LMHeadModel(config)
        with torch.no_grad():  # far from a fresh init, whose loss is ln(50257) give or take a little
            for p in hf.parameters():
                p.add_(0.1 * torch.randn_like(p))
        hf.save_pretrained(path)
        yield path


def test_init_from_starts_at_the_hugging_face_models_loss(data, hf_dir, tmp_path, monkeypatch):
    from transformers import GPT2LMHeadModel

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder, train = data
    out = str(tmp_path / "o")
    r = ok(cli(TINY + ["--data_dir", folder, "--out_dir", out, "--init_from", hf_dir, "--max_steps", 1,
                       "--val_every", 1000]))
    assert hf_dir in r.stdout
    log = read_log(out)
    hf = GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    logits = lambda x: hf(input_ids=x).logits  # noqa: E731
    expected_val = mean_loss(logits, val_sequences(folder, T, 1024))
    assert log[0]["step"] == 0 and abs(log[0]["val_loss"] - expected_val) <= 1e-4
    # step 1's train loss is measured before the update: HF's loss on the first 2 x 4 x 32 training tokens
    first = torch.from_numpy(train[: 2 * B * T + 1].astype(np.int64))
    batches = torch.stack([first[i * T: i * T + T + 1] for i in range(2 * B)])
    assert abs(log[1]["train_loss"] - mean_loss(logits, batches)) <= 1e-4
    config = ckpt(out, 1)["config"]
    assert (config["n_layer"], config["n_head"], config["n_embd"], config["block_size"]) == (2, 4, 64, 64)
    assert config["norm"] == "layernorm" and config["pos"] == "learned" and config["tie_embeddings"]

    r = ok(cli(["--init_from", hf_dir, "--device", "cpu", "--dtype", "fp32", "--sample_tokens", 4],
               main=sample.main))
    assert re.search(rf"^full \({re.escape(hf_dir)}\): [\d.]+ tok/s \| ", r.stdout, re.M), r.stdout


@pytest.mark.parametrize("flags, named", [
    (["--n_layer", "2"], "--n_layer"),
    (["--norm", "rmsnorm"], "--norm"),
    (["--untie"], "--untie"),
    (["--mlp", "swiglu", "--n_kv_head", "1"], "--n_kv_head"),
])
def test_init_from_refuses_architecture_flags(data, hf_dir, tmp_path, flags, named):
    out = tmp_path / "o"
    r = cli(TINY + ["--data_dir", data[0], "--out_dir", str(out), "--init_from", hf_dir, "--max_steps", 1] + flags)
    assert_one_line_error(r, "--init_from", named)
    assert not out.exists()


# ---------------------------------------------------------------------------------------------------------------
# activation checkpointing and dropout


def test_activation_checkpointing_and_dropout(data, tmp_path):
    common = TINY + ["--data_dir", data[0], "--max_steps", 2, "--val_every", 1000, "--pos", "rope", "--mlp",
                     "swiglu", "--n_kv_head", "1"]
    runs = {}
    for dropout in ("0", "0.1"):
        for recompute in (False, True):
            out = str(tmp_path / f"d{dropout}_{recompute}")
            ok(cli(common + ["--out_dir", out, "--dropout", dropout]
                   + (["--activation_checkpointing"] if recompute else [])))
            runs[dropout, recompute] = (read_log(out), load_weights(os.path.join(out, "ckpt_0000002.pt")))

    def same(a, b):
        (log_a, w_a), (log_b, w_b) = a, b
        for ra, rb in zip(log_a, log_b, strict=True):
            for key in ("train_loss", "val_loss", "grad_norm"):
                assert (key in ra) == (key in rb)
                if key in ra:
                    assert abs(ra[key] - rb[key]) <= 1e-6, (key, ra, rb)
        for k in w_a:
            torch.testing.assert_close(w_a[k], w_b[k], rtol=0, atol=1e-6)

    # recomputing each block in backward changes nothing, dropout included: the masks are replayed
    same(runs["0", False], runs["0", True])
    same(runs["0.1", False], runs["0.1", True])
    # dropout acts in training only: the same init gives the same step-0 validation loss, not the same training
    assert runs["0.1", False][0][0]["val_loss"] == runs["0", False][0][0]["val_loss"]
    assert runs["0.1", False][0][1]["train_loss"] != runs["0", False][0][1]["train_loss"]
    assert not torch.equal(runs["0.1", False][1]["transformer.h.0.mlp.c_fc.weight"],
                           runs["0", False][1]["transformer.h.0.mlp.c_fc.weight"])


# ---------------------------------------------------------------------------------------------------------------
# sample.py: --int8, and its bad input


def batched_loss(model, seqs, batch):
    """Mean next-token loss over `seqs` fed `batch` at a time, in order (int8 quantises each call's input as a whole,
    so the grouping matters); the reduction is done here."""
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(seqs), batch):
            chunk = seqs[i: i + batch]
            logits = model(chunk[:, :-1])[0][..., :tg.GPT2_VOCAB_SIZE].double()
            total += F.cross_entropy(logits.reshape(-1, logits.size(-1)), chunk[:, 1:].reshape(-1),
                                     reduction="sum").item()
    return total / (seqs.shape[0] * (seqs.shape[1] - 1))


def test_sample_int8_reports_consistent_numbers(data, base_run, tmp_path):
    folder = data[0]
    # the base checkpoint with large weights, each row holding one outlier: int8 rounding then moves the loss
    # clearly, so a wrong sign or a mixed-up variant cannot pass for rounding
    saved = torch.load(os.path.join(base_run, "ckpt_0000001.pt"), map_location="cpu", weights_only=True)
    gen = torch.Generator().manual_seed(0)
    for name, w in saved["model"].items():
        if w.dim() == 2:
            w.normal_(0, 0.15, generator=gen)
            w[:, 0] = 10.0
    path = str(tmp_path / "ckpt_0000001.pt")
    torch.save(saved, path)
    r = ok(cli(["--resume", path, "--int8", "--device", "cpu", "--dtype", "fp32",
                "--data_dir", folder, "--seq_len", T, "--batch_size", B, "--val_tokens", 1024,
                "--sample_tokens", 8, "--prompt", "Hello"], main=sample.main))
    speed = {m.group(1): float(m.group(2)) for m in re.finditer(
        rf"^(full|int8) \({re.escape(path)}\): ([\d.]+) tok/s \| ['\"]Hello.*$", r.stdout, re.M)}
    assert speed.keys() == {"full", "int8"}, r.stdout
    loss = {m.group(1): (float(m.group(2)), int(m.group(3).replace(",", ""))) for m in re.finditer(
        r"^(full|int8): val loss ([\d.]+) over ([\d,]+) tokens$", r.stdout, re.M)}
    assert loss.keys() == {"full", "int8"}, r.stdout
    assert loss["full"][1] == loss["int8"][1] == 1024
    m = re.search(r"^int8 vs full: ([\d.]+)x tokens/s, val loss ([+-][\d.]+)$", r.stdout, re.M)
    assert m, r.stdout
    # the summary agrees with the two lines above it, up to their printed rounding
    assert abs(float(m.group(2)) - (loss["int8"][0] - loss["full"][0])) <= 1.5e-4
    assert abs(loss["int8"][0] - loss["full"][0]) > 1e-3
    ratio = speed["int8"] / speed["full"]
    assert abs(float(m.group(1)) - ratio) <= 0.006 + 1e-3 * ratio

    # and both losses are those of the checkpoint and of its int8 copy on the validation sequences, summed here
    model = tg.load_checkpoint_model(path)
    seqs = val_sequences(folder, T, 1024)
    assert len(seqs) % B == 0  # no padded rows: the batches below are the command's
    assert abs(loss["full"][0] - mean_loss(lambda x: model(x)[0], seqs)) <= 1e-4
    assert abs(loss["int8"][0] - batched_loss(sample.int8_copy(model), seqs, B)) <= 1e-4


@pytest.mark.parametrize("flags, fragments", [
    ([], ["--resume", "--init_from"]),
    (["--resume", "auto"], ["no checkpoint in", "--resume PATH"]),
    (["--resume", "/nonexistent/ckpt.pt"], ["does not exist"]),
])
def test_sample_without_what_it_needs(tmp_path, flags, fragments):
    out = tmp_path / "o"
    r = cli(["--out_dir", str(out)] + flags, main=sample.main)
    assert_one_line_error(r, *fragments)
    assert not out.exists()


def save_tiny_checkpoint(path, seed: int) -> tg.GPT:
    torch.manual_seed(seed)
    model = tg.GPT(tg.GPTConfig(block_size=16, vocab_size=300, padded_vocab_size=320, n_layer=1, n_head=2, n_embd=32))
    torch.save({"model": model.state_dict(), "config": dataclasses.asdict(model.config), "step": 1}, path)
    return model


@pytest.mark.parametrize("case, fragments", [
    ("missing_checkpoint", ["missing.pt", "does not exist"]),
    ("run_without_checkpoints", ["no checkpoint", "checkpoint file"]),
    ("occupied_out_dir", ["occupied", "already exists"]),
])
def test_export_without_what_it_needs(tmp_path, case, fragments):
    """export_hf.py's bad input: one error line, exit 2, nothing written (the occupied directory left as it was)."""
    run, occupied = tmp_path / "run", tmp_path / "occupied"
    run.mkdir()
    occupied.mkdir()
    (occupied / "keep.txt").write_text("x")
    save_tiny_checkpoint(run / "ckpt_0000001.pt", seed=0)
    argv = {"missing_checkpoint": [tmp_path / "missing.pt", tmp_path / "export"],
            "run_without_checkpoints": [occupied, tmp_path / "export"],
            "occupied_out_dir": [run / "ckpt_0000001.pt", occupied]}[case]
    assert_one_line_error(cli(argv, main=ex.main), *fragments)
    assert sorted(os.listdir(tmp_path)) == ["occupied", "run"]
    assert os.listdir(occupied) == ["keep.txt"] and os.listdir(run) == ["ckpt_0000001.pt"]


def test_export_of_a_run_takes_its_newest_readable_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setattr(ex, "gpt2_tokenizer_files", lambda: {})  # checkpoint choice only: no tokenizer needed
    run = tmp_path / "run"
    run.mkdir()
    save_tiny_checkpoint(run / "ckpt_0000001.pt", seed=1)
    model = save_tiny_checkpoint(run / "ckpt_0000002.pt", seed=2)
    (run / "ckpt_0000003.pt").write_bytes(b"cut short")
    r = ok(cli([run, tmp_path / "hf"], main=ex.main))
    assert "ckpt_0000003.pt" in r.stdout and "warning" in r.stdout
    assert f"exported {run / 'ckpt_0000002.pt'} as a Hugging Face gpt2 model to {tmp_path / 'hf'}" in r.stdout
    safetensors_torch = pytest.importorskip("safetensors.torch")
    exported = safetensors_torch.load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert torch.equal(exported["transformer.wpe.weight"], model.transformer.wpe.weight)
    assert sorted(os.listdir(tmp_path)) == ["hf", "run"]


# ---------------------------------------------------------------------------------------------------------------
# DDP with Muon


def test_ddp_two_processes_with_muon_equal_one_process(data, tmp_path):
    """2 gloo ranks x 2 micro-steps of 2 sequences == 1 process x 4 micro-steps. The summed gradients (Muon's
    momentum, AdamW's moments) and AdamW's weights agree to fp32 rounding. torch's Muon orthogonalises in bf16, so
    an fp32-rounding difference in a gradient can move its matrices by a few bf16 steps of the update: those are
    held to a small fraction of the update instead (a 1-process run split into 2 micro-steps instead of 4 differs
    from the 4-step one by as much)."""
    common = TINY + ["--data_dir", data[0], "--max_steps", 1, "--batch_size", 2, "--val_every", 1000,
                     "--optimizer", "muon"] + MODERN
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    r1 = ok(cli(common + ["--out_dir", one]))
    r2 = ok(proc(common + ["--out_dir", two], torchrun_procs=2))
    assert "world size 2" in r2.stdout and "2 micro-steps" in r2.stdout and "4 micro-steps" in r1.stdout
    a, b = ckpt(one, 1), ckpt(two, 1)

    sa, sb = optimizer_tensors(a["optimizer"]), optimizer_tensors(b["optimizer"])
    assert sa.keys() == sb.keys() and any(k[2] == "momentum_buffer" for k in sa)
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=1e-5, atol=1e-5 * sa[k].abs().max().item(), msg=str(k))

    torch.manual_seed(1337)
    start = tg.GPT(tg.GPTConfig(**a["config"])).state_dict()
    muon_names = block_matrix_names(2)
    for k, wa in a["model"].items():
        if k in muon_names:
            update = (wa - start[k]).abs().max().item()
            assert update > 1e-3
            assert (wa - b["model"][k]).abs().max().item() <= 0.1 * update, k
        else:
            torch.testing.assert_close(wa, b["model"][k], rtol=0, atol=1e-5, msg=k)
    la, lb = read_log(one), read_log(two)
    assert [r["step"] for r in la] == [r["step"] for r in lb] == [0, 1]
    assert la[0]["val_loss"] == pytest.approx(lb[0]["val_loss"], rel=1e-6)
    assert la[1]["train_loss"] == pytest.approx(lb[1]["train_loss"], rel=1e-5)
    assert la[1]["grad_norm"] == pytest.approx(lb[1]["grad_norm"], rel=1e-5)
    assert la[1]["val_loss"] == pytest.approx(lb[1]["val_loss"], rel=1e-4)
