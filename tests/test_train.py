"""The train loop of train_gpt2.py end to end: a run stopped and resumed ends bit-identical to an uninterrupted one
(every optimizer, several architectures, the speedrun recipe, checkpoints from before later options), what a
checkpoint holds, which settings a resume may change and which it refuses, --epochs, --init_from a Hugging Face
directory, activation checkpointing and dropout; and the forked command line these tests run the trainer with.

Most runs call train_gpt2.main in this process (cli: the same code path as the command line, without paying for a
new interpreter each time); others are forked from a server that has imported torch (run_cli), one is a real
process."""

import dataclasses
import hashlib
import math
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import sample
import train_gpt2 as tg
from conftest import (
    MODERN,
    ROOT,
    SCRIPT,
    TINY,
    TINY_B,
    TINY_T,
    TINY_TOTAL,
    assert_one_line_error,
    ckpt,
    cli,
    kept_global_state,
    load_weights,
    mean_loss,
    ok,
    optimizer_tensors,
    read_log,
    run_cli,
    schedule,
    val_sequences,
)

pytestmark = pytest.mark.usefixtures("global_state")  # in-process runs: seeds and one thread, put back after

B, T, TOTAL = TINY_B, TINY_T, TINY_TOTAL
LOG_KEYS = ("step", "train_loss", "val_loss", "lr", "grad_norm", "tokens")


# ---------------------------------------------------------------------------------------------------------------
# stop and resume: bit-identical to the uninterrupted run


def test_resume_is_bit_identical_to_an_uninterrupted_run(data_dir, tmp_path):
    whole, split = str(tmp_path / "whole"), str(tmp_path / "split")
    common = TINY + ["--data_dir", data_dir, "--max_steps", "6"]
    r = run_cli(common + ["--out_dir", whole])
    assert r.returncode == 0, r.stderr
    r = run_cli(common + ["--out_dir", split, "--stop_at_step", "3"])
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(split)) == ["ckpt_0000003.pt", "log.jsonl"]
    r = run_cli(common + ["--out_dir", split, "--resume", "auto"])
    assert r.returncode == 0, r.stderr
    assert "resumed from" in r.stdout
    a, b = load_weights(os.path.join(whole, "ckpt_0000006.pt")), load_weights(os.path.join(split, "ckpt_0000006.pt"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    log_a, log_b = read_log(whole), read_log(split)
    keys = ("step", "train_loss", "val_loss", "lr", "grad_norm", "tokens")
    assert [[rec.get(k) for k in keys] for rec in log_a] == [[rec.get(k) for k in keys] for rec in log_b]
    assert [rec["step"] for rec in log_a] == [0, 1, 2, 3, 4, 5, 6]
    assert {"step", "train_loss", "lr", "grad_norm", "tokens", "dt_ms", "tok_per_s", "mfu"} <= log_a[1].keys()
    assert "val_loss" in log_a[3] and "val_loss" not in log_a[2]
    assert log_a[6]["val_loss"] < log_a[0]["val_loss"]


@pytest.mark.parametrize("optimizer, arch, extra", [
    ("adamw", ["--untie", "--pos", "rope", "--rope_theta", "500", "--mlp_hidden", "96", "--n_kv_head", "2"], []),
    ("sgd", ["--no-bias", "--mlp", "swiglu", "--norm", "rmsnorm"], ["--lr", "0.05", "--sgd_momentum", "0.8"]),
    ("muon", MODERN, ["--muon_lr", "0.03", "--muon_weight_decay", "0.01"]),
])
def test_stop_and_resume_is_bit_identical(shards, tmp_path, optimizer, arch, extra):
    whole, split = str(tmp_path / "whole"), str(tmp_path / "split")
    common = TINY + ["--data_dir", shards[0], "--max_steps", 4, "--optimizer", optimizer] + arch + extra
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


def test_recipe_resumes_bit_identical_and_keeps_its_recipe(docs, tmp_path):
    whole, split = str(tmp_path / "whole"), str(tmp_path / "split")
    common = TINY + ["--data_dir", docs, "--max_steps", 5]
    r = ok(cli(common + ["--out_dir", whole, "--recipe", "speedrun", "--head_lr", "0.02"]))
    assert "recipe speedrun: --norm rmsnorm" in r.stdout and "given on the command line: --head_lr" in r.stdout
    assert "--warmup_steps 1 --muon_momentum_warmup 2" in r.stdout and "starting at document starts" in r.stdout
    # no parameter trains at --lr under the recipe: the step line gives the schedule's multiplier of every peak LR
    assert re.search(r"^step +1/5 \| loss [\d.]+ \| lr x1\.000 \|", r.stdout, re.M), r.stdout
    assert all("lr" not in rec and 0 < rec["lr_scale"] <= 1 for rec in read_log(whole) if "train_loss" in rec)
    ok(cli(common + ["--out_dir", split, "--recipe", "speedrun", "--head_lr", "0.02", "--stop_at_step", 2]))
    r = ok(cli(common + ["--out_dir", split, "--head_lr", "0.02", "--resume", "auto"]))  # no --recipe: kept
    assert "resumed from" in r.stdout and "recipe speedrun" in r.stdout
    a, b = ckpt(whole, 5), ckpt(split, 5)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    sa, sb = optimizer_tensors(a["optimizer"]), optimizer_tensors(b["optimizer"])
    assert sa.keys() == sb.keys() and any(k[2] == "second_moment" for k in sa)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert [r.get("train_loss") for r in read_log(whole)] == [r.get("train_loss") for r in read_log(split)]
    assert a["config"]["qk_norm"] and a["settings"]["recipe"] == "speedrun" and a["settings"]["head_lr"] == 0.02


def test_a_checkpoint_from_before_the_speedrun_options_resumes(data_dir, tmp_path):
    out = str(tmp_path / "old")
    common = TINY + ["--data_dir", data_dir, "--max_steps", 3, "--out_dir", out]
    ok(cli(common + ["--stop_at_step", 1]))
    path = os.path.join(out, "ckpt_0000001.pt")
    saved = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("qk_norm", "embed_norm", "x0_lambdas", "zero_init", "logit_softcap"):
        del saved["config"][key]
    saved["args"] = saved.pop("settings")  # as older checkpoints name them
    for key in ("recipe", "bos_aligned", "shuffle", "lr_schedule", "explicit"):
        del saved["args"][key]
    torch.save(saved, path)
    r = ok(cli(common + ["--resume", "auto"]))
    assert "resumed from" in r.stdout and ckpt(out, 3)["step"] == 3


def test_checkpoint_with_a_single_optimizer_dict_still_resumes(shards, base_run, tmp_path):
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
    common = TINY + ["--data_dir", shards[0], "--max_steps", 2, "--val_every", 0, "--resume", "auto"]
    ok(cli(common + ["--out_dir", new]))
    ok(cli(common + ["--out_dir", old]))
    a, b = load_weights(os.path.join(new, "ckpt_0000002.pt")), load_weights(os.path.join(old, "ckpt_0000002.pt"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    start = load_weights(os.path.join(base_run, "ckpt_0000001.pt"))
    assert not torch.equal(a["transformer.h.0.attn.c_attn.weight"], start["transformer.h.0.attn.c_attn.weight"])


# ---------------------------------------------------------------------------------------------------------------
# checkpoints


def test_checkpoint_contents(data_dir, tmp_path):
    out = str(tmp_path / "out")
    r = run_cli(TINY + ["--data_dir", data_dir, "--max_steps", "2", "--out_dir", out, "--dtype", "fp16"])
    assert r.returncode == 0, r.stderr
    ckpt = torch.load(os.path.join(out, "ckpt_0000002.pt"), map_location="cpu", weights_only=True)
    assert {"model", "optimizer", "step", "loader", "rng", "scaler", "config", "settings"} <= ckpt.keys()
    assert ckpt["step"] == 2 and ckpt["settings"]["max_steps"] == 2
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ckpt["model"])
    assert ckpt["scaler"]["scale"] > 0  # fp16 ran with a GradScaler, whose state is kept
    assert ckpt["loader"]["position"] == 2 * 256  # two steps of 256 tokens from the start
    model = tg.load_checkpoint_model(os.path.join(out, "ckpt_0000002.pt"))
    assert model.lm_head.weight is model.transformer.wte.weight
    assert all(np.isfinite(rec["train_loss"]) for rec in read_log(out) if "train_loss" in rec)


def test_the_startup_line_and_the_checkpoint_show_the_settings(shards, base_run):
    saved = tg.saved_settings_of(tg.load_checkpoint(f"{base_run}/ckpt_0000001.pt"))
    assert saved["max_steps"] == 1 and saved["seq_len"] == 32 and saved["lr"] == 3e-3
    assert saved.keys() == {f.name for f in dataclasses.fields(tg.Settings)}


def test_fresh_run_refuses_to_overwrite_checkpoints(data_dir, tmp_path):
    out = str(tmp_path / "o")
    assert run_cli(TINY + ["--data_dir", data_dir, "--max_steps", "1", "--out_dir", out]).returncode == 0
    before = open(os.path.join(out, "ckpt_0000001.pt"), "rb").read()
    r = run_cli(TINY + ["--data_dir", data_dir, "--max_steps", "1", "--out_dir", out, "--lr", "1e-2"])
    assert_one_line_error(r, "--resume auto")
    assert open(os.path.join(out, "ckpt_0000001.pt"), "rb").read() == before
    r = run_cli(TINY + ["--data_dir", data_dir, "--max_steps", "1", "--out_dir", out, "--resume", "auto",
                        "--n_embd", "256", "--n_head", "4"])
    assert_one_line_error(r, "different model", "n_embd")


# ---------------------------------------------------------------------------------------------------------------
# resuming into something else


def copy_run(src, tmp_path):
    """A private copy of a run, hard-linked: the trainer replaces files by renaming, never rewrites them in place."""
    dst = str(tmp_path / "run")
    shutil.copytree(src, dst, copy_function=os.link)
    return dst


def digest(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_resume_with_another_optimizer_is_refused(shards, base_run, tmp_path):
    out = copy_run(base_run, tmp_path)
    before = {f: digest(os.path.join(out, f)) for f in os.listdir(out)}
    r = run_cli(TINY + ["--data_dir", shards[0], "--out_dir", out, "--max_steps", 2, "--val_every", 0,
                     "--resume", "auto", "--optimizer", "muon"])  # a real process: exit status and stderr
    assert_one_line_error(r, "--optimizer adamw", "muon")
    r = cli(TINY + ["--data_dir", shards[0], "--out_dir", out, "--max_steps", 2, "--val_every", 0,
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
def test_resume_with_another_architecture_is_refused(shards, base_run, tmp_path, flags, field):
    out = copy_run(base_run, tmp_path)
    before = {f: digest(os.path.join(out, f)) for f in os.listdir(out)}
    r = cli(TINY + ["--data_dir", shards[0], "--out_dir", out, "--max_steps", 2, "--val_every", 0,
                    "--resume", "auto"] + flags)
    assert_one_line_error(r, "different model", field)
    assert {f: digest(os.path.join(out, f)) for f in os.listdir(out)} == before


def test_resume_with_another_dropout_is_accepted(shards, base_run, tmp_path):
    out = copy_run(base_run, tmp_path)
    r = ok(cli(TINY + ["--data_dir", shards[0], "--out_dir", out, "--max_steps", 2, "--val_every", 0,
                       "--resume", "auto", "--dropout", "0.1"]))
    assert "resumed from" in r.stdout
    first, second = ckpt(out, 1), ckpt(out, 2)
    assert second["config"]["dropout"] == 0.1
    assert {k: v for k, v in second["config"].items() if k != "dropout"} == \
        {k: v for k, v in first["config"].items() if k != "dropout"}


@pytest.mark.parametrize("flags, named", [
    (["--lr", "0.004"], "--lr 0.003"),
    (["--seq_len", "16"], "--seq_len 32"),
    (["--total_batch_size", "512"], "--total_batch_size 256"),
    (["--seed", "7"], "--seed 1337"),
    (["--lr_schedule", "wsd"], "--lr_schedule cosine"),
])
def test_resume_with_another_fixed_setting_is_refused(shards, base_run, tmp_path, flags, named):
    out = copy_run(base_run, tmp_path)
    r = cli(TINY + ["--data_dir", shards[0], "--out_dir", out, "--max_steps", 2, "--val_every", 0, "--resume", "auto"]
            + flags)
    assert_one_line_error(r, named, "to resume it")


def test_resume_may_change_the_micro_batch_and_the_run_length(shards, base_run, tmp_path):
    out = copy_run(base_run, tmp_path)
    r = ok(cli(TINY + ["--data_dir", shards[0], "--out_dir", out, "--max_steps", 3, "--val_every", 0,
                       "--resume", "auto", "--batch_size", 2]))
    assert "resumed from" in r.stdout and "4 micro-steps" in r.stdout and "step     3/3" in r.stdout


def test_resuming_with_another_data_order_is_refused(docs, tmp_path):
    out = str(tmp_path / "run")
    ok(cli(TINY + ["--data_dir", docs, "--max_steps", 2, "--out_dir", out, "--shuffle"]))
    r = cli(TINY + ["--data_dir", docs, "--max_steps", 3, "--out_dir", out, "--resume", "auto"])
    assert_one_line_error(r, "--shuffle")


# ---------------------------------------------------------------------------------------------------------------
# --epochs


def test_epochs_sets_the_number_of_steps(shards, tmp_path):
    folder, train = shards
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


def test_init_from_starts_at_the_hugging_face_models_loss(shards, hf_dir, tmp_path, monkeypatch):
    from transformers import GPT2LMHeadModel

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder, train = shards
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
def test_init_from_refuses_architecture_flags(shards, hf_dir, tmp_path, flags, named):
    out = tmp_path / "o"
    r = cli(TINY + ["--data_dir", shards[0], "--out_dir", str(out), "--init_from", hf_dir, "--max_steps", 1] + flags)
    assert_one_line_error(r, "--init_from", named)
    assert not out.exists()


# ---------------------------------------------------------------------------------------------------------------
# activation checkpointing and dropout


def test_activation_checkpointing_and_dropout(shards, tmp_path):
    common = TINY + ["--data_dir", shards[0], "--max_steps", 2, "--val_every", 1000, "--pos", "rope", "--mlp",
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
# the forked command line of these tests (conftest.run_cli)


@pytest.mark.parametrize("args", [["--help"], TINY + ["--model", "d99", "--data_dir", "missing"],
                                  TINY + ["--data_dir", "missing"]], ids=["help", "bad-preset", "missing-data"])
def test_forked_cli_run_is_what_a_fresh_interpreter_gives(args):
    """run_cli's forked runs stand for `python train_gpt2.py`: the same exit status, stdout and stderr."""
    forked = run_cli(args)
    fresh = subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, cwd=ROOT,
                           env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert (forked.returncode, forked.stdout, forked.stderr) == (fresh.returncode, fresh.stdout, fresh.stderr)
    assert fresh.stdout or fresh.stderr
