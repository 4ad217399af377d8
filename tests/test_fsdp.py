"""--fsdp (FSDP2 fully_shard) under torchrun with 2 gloo ranks: the same run as DDP, resumable, exportable."""

import os

import pytest
import torch

import train_gpt2 as tg
from test_train import TINY, load_weights, make_shards, read_log, run_cli

# 2 ranks x 2 micro-steps x 2 sequences of 32 tokens per step, with validation and a sample every 2 steps
FSDP_RUN = TINY + ["--max_steps", "4", "--batch_size", "2", "--val_every", "2", "--sample_every", "2",
                   "--sample_tokens", "8"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One DDP run and one FSDP run (with activation checkpointing, which must not change the numbers) of the
    same 4 steps, and an FSDP run stopped at step 2 then resumed."""
    root = tmp_path_factory.mktemp("fsdp")
    data = str(root / "shards")
    make_shards(data, train_sizes=(6000, 5000), val_size=3000)
    common = FSDP_RUN + ["--data_dir", data]
    fsdp = ["--fsdp", "--activation_checkpointing"]
    out = {name: str(root / name) for name in ("ddp", "fsdp", "split")}
    results = {
        "ddp": run_cli(common + ["--out_dir", out["ddp"]], torchrun_procs=2),
        "fsdp": run_cli(common + fsdp + ["--out_dir", out["fsdp"]], torchrun_procs=2),
        "stop": run_cli(common + fsdp + ["--out_dir", out["split"], "--stop_at_step", "2"], torchrun_procs=2),
        "resume": run_cli(common + fsdp + ["--out_dir", out["split"], "--resume", "auto"], torchrun_procs=2),
    }
    for name, r in results.items():
        assert r.returncode == 0, f"{name}: {r.stderr[-3000:]}"
    return out, results


def test_fsdp_gives_the_losses_and_weights_of_ddp(runs):
    out, results = runs
    assert "world size 2 (FSDP)" in results["fsdp"].stdout
    log_ddp, log_fsdp = read_log(out["ddp"]), read_log(out["fsdp"])
    assert [r["step"] for r in log_ddp] == [r["step"] for r in log_fsdp] == [0, 1, 2, 3, 4]
    for a, b in zip(log_ddp, log_fsdp):
        # reduce-scatter and all-reduce add the same numbers in another order: fp32 rounding only. Losses agree to
        # 1e-5; the gradient norm, a sum of squares dominated by the few weights AdamW moved most, to 1e-3.
        for key, rel in (("train_loss", 1e-5), ("val_loss", 1e-5), ("grad_norm", 1e-3)):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=rel), (a["step"], key)
    samples = [[line for line in results[name].stdout.splitlines() if "sample:" in line] for name in ("ddp", "fsdp")]
    assert samples[0] and samples[0] == samples[1]
    a = load_weights(os.path.join(out["ddp"], "ckpt_0000004.pt"))
    b = load_weights(os.path.join(out["fsdp"], "ckpt_0000004.pt"))
    assert a.keys() == b.keys()
    for k in a:
        # AdamW divides by sqrt(v): where a gradient is ~0 a rounding difference moves a weight by a sizeable part of
        # one update (lr 3e-3); 1e-4 is 3% of that, and far below the changes 4 steps make
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-4)


def test_fsdp_checkpoint_is_whole_and_resumes_bit_identically(runs):
    out, results = runs
    ckpt = torch.load(os.path.join(out["fsdp"], "ckpt_0000004.pt"), map_location="cpu", weights_only=True)
    reference = tg.GPT(tg.GPTConfig(**ckpt["config"])).state_dict()
    assert {k: v.shape for k, v in ckpt["model"].items()} == {k: v.shape for k, v in reference.items()}
    from torch.distributed.tensor import DTensor  # train_gpt2 imports it only under --fsdp
    assert not any(isinstance(v, DTensor) for v in ckpt["model"].values())
    # the tied embedding is gathered once and saved once
    assert ckpt["model"]["lm_head.weight"].data_ptr() == ckpt["model"]["transformer.wte.weight"].data_ptr()
    # the optimizer state has DDP's layout: whole tensors, same parameter order and groups
    ddp = torch.load(os.path.join(out["ddp"], "ckpt_0000004.pt"), map_location="cpu", weights_only=True)
    for ours, theirs in zip(ckpt["optimizer"], ddp["optimizer"], strict=True):
        assert ours["param_groups"] == theirs["param_groups"]
        assert {i: {k: v.shape for k, v in s.items()} for i, s in ours["state"].items()} == \
               {i: {k: v.shape for k, v in s.items()} for i, s in theirs["state"].items()}
    assert "resumed from" in results["resume"].stdout
    whole = load_weights(os.path.join(out["fsdp"], "ckpt_0000004.pt"))
    resumed = load_weights(os.path.join(out["split"], "ckpt_0000004.pt"))
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    keys = ("step", "train_loss", "val_loss", "grad_norm")
    assert [[r.get(k) for k in keys] for r in read_log(out["fsdp"])] == \
           [[r.get(k) for k in keys] for r in read_log(out["split"])]


def test_fsdp_checkpoint_exports_and_loads_without_fsdp(runs, tmp_path):
    out, _ = runs
    path = os.path.join(out["fsdp"], "ckpt_0000004.pt")
    export = str(tmp_path / "hf")
    r = run_cli(["--resume", path, "--export_hf", export])
    assert r.returncode == 0, r.stderr
    ours = tg.load_checkpoint_model(path)
    back = tg.GPT.from_pretrained(export)
    idx = torch.randint(0, ours.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(back(idx)[0][..., :ours.config.vocab_size],
                                   ours(idx)[0][..., :ours.config.vocab_size], rtol=0, atol=1e-5)


@pytest.mark.parametrize("argv, env, fragment", [
    (["--fsdp"], {}, "launch with torchrun"),
    (["--fsdp", "--optimizer", "muon"], {"WORLD_SIZE": "2"}, "--optimizer muon"),
])
def test_impossible_fsdp_runs_are_refused_in_one_line(tmp_path, argv, env, fragment):
    data = str(tmp_path / "shards")
    make_shards(data)
    out = str(tmp_path / "out")
    r = run_cli(TINY + ["--data_dir", data, "--out_dir", out, "--max_steps", "2"] + argv, env_extra=env)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0] and "--fsdp" in lines[0], r.stderr
    assert not os.path.exists(out)
