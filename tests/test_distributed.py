"""Under torchrun with 2 gloo ranks: DDP gives the one-process run (AdamW, Muon; NorMuon's ranks stay identical);
--fsdp (FSDP2 fully_shard) gives the same run as DDP, resumable and exportable; a DDP run stopped on 2 ranks, resumed
on 1 process and then on 2 ranks again ends where the uninterrupted run ends; DDP and FSDP under --compile give the
eager run's losses; FSDP's gather dtype and fp16 loss scaling; one all-reduce per DDP step; what FSDP refuses."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch

import train_gpt2 as tg
from conftest import (
    MODERN,
    ROOT,
    TINY,
    assert_one_line_error,
    block_matrix_names,
    child_env,
    ckpt,
    cli,
    load_weights,
    make_shards,
    ok,
    optimizer_tensors,
    read_log,
    run_cli,
)

# 2 ranks x 2 micro-steps x 2 sequences of 32 tokens per step, with validation and a sample every 2 steps
FSDP_RUN = TINY + ["--max_steps", "4", "--batch_size", "2", "--val_every", "2", "--sample_every", "2",
                   "--sample_tokens", "8"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One DDP run and one FSDP run (with activation checkpointing, which must not change the numbers) of the
    same 4 steps, an FSDP run stopped at step 2 then resumed, and DDP and FSDP runs under --compile (without the
    evaluations, whose no-grad graphs would be compiles of their own)."""
    root = tmp_path_factory.mktemp("fsdp")
    data = str(root / "shards")
    make_shards(data, train_sizes=(6000, 5000), val_size=3000)
    common = FSDP_RUN + ["--data_dir", data]
    fsdp = ["--fsdp", "--activation_checkpointing"]
    compiled = ["--compile", "--val_every", "0", "--sample_every", "0"]
    out = {name: str(root / name) for name in ("ddp", "fsdp", "split", "ddp_compiled", "fsdp_compiled")}
    results = {
        "ddp": run_cli(common + ["--out_dir", out["ddp"]], torchrun_procs=2),
        "fsdp": run_cli(common + fsdp + ["--out_dir", out["fsdp"]], torchrun_procs=2),
        "stop": run_cli(common + fsdp + ["--out_dir", out["split"], "--stop_at_step", "2"], torchrun_procs=2),
        "resume": run_cli(common + fsdp + ["--out_dir", out["split"], "--resume", "auto"], torchrun_procs=2),
        "ddp_compiled": run_cli(common + compiled + ["--out_dir", out["ddp_compiled"]], torchrun_procs=2),
        "fsdp_compiled": run_cli(common + compiled + ["--fsdp", "--out_dir", out["fsdp_compiled"]], torchrun_procs=2),
    }
    for name, r in results.items():
        assert r.returncode == 0, f"{name}: {r.stderr[-3000:]}"
    return out, results


@pytest.fixture(scope="module")
def resized_runs(runs):
    """The DDP run of `runs` again, with the world size changed at each resume: stopped at step 2 on 2 ranks, resumed
    on 1 process (twice the micro-steps, the same global batch) and stopped at step 3, resumed on 2 ranks to step 4.
    `runs`' "ddp" run is the uninterrupted reference."""
    out, _ = runs
    root = os.path.dirname(out["ddp"])
    resized = os.path.join(root, "resized")
    common = FSDP_RUN + ["--data_dir", os.path.join(root, "shards"), "--out_dir", resized]
    results = {
        "stop": run_cli(common + ["--stop_at_step", "2"], torchrun_procs=2),
        "one": run_cli(common + ["--resume", "auto", "--stop_at_step", "3"]),
        "two": run_cli(common + ["--resume", "auto"], torchrun_procs=2),
    }
    for name, r in results.items():
        assert r.returncode == 0, f"{name}: {r.stderr[-3000:]}"
    return resized, results


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


@pytest.mark.parametrize("name", ["ddp_compiled", "fsdp_compiled"])
def test_compiled_runs_give_the_eager_runs_losses(runs, name):
    out, results = runs
    assert "compile True" in results[name].stdout
    eager = {r["step"]: r for r in read_log(out["ddp"]) if "train_loss" in r}
    compiled = {r["step"]: r for r in read_log(out[name]) if "train_loss" in r}
    assert sorted(compiled) == sorted(eager) == [1, 2, 3, 4]
    for step, r in compiled.items():
        # Inductor's kernels round differently from eager ones: fp32 rounding only
        assert r["train_loss"] == pytest.approx(eager[step]["train_loss"], rel=1e-5), (name, step)
        assert r["grad_norm"] == pytest.approx(eager[step]["grad_norm"], rel=1e-3), (name, step)
    a = load_weights(os.path.join(out["ddp"], "ckpt_0000004.pt"))
    b = load_weights(os.path.join(out[name], "ckpt_0000004.pt"))
    for k in a:
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


def test_a_ddp_run_resumed_on_another_world_size_ends_where_the_uninterrupted_run_ends(runs, resized_runs):
    out, _ = runs
    resized, results = resized_runs
    assert [re.findall(r"world size (\d+)", results[name].stdout) for name in ("stop", "one", "two")] == \
           [["2"], ["1"], ["2"]]
    assert "4 micro-steps" in results["one"].stdout and "2 micro-steps" in results["two"].stdout
    # the random state is per rank: a checkpoint of another world size is reseeded from (seed, step, rank)
    assert "checkpoint was written by 2 ranks, this run has 1: reseeding" in results["one"].stdout
    assert "checkpoint was written by 1 ranks, this run has 2: reseeding" in results["two"].stdout
    assert "reseeding" not in results["stop"].stdout
    assert f"resumed from {os.path.join(resized, 'ckpt_0000002.pt')} at step 2" in results["one"].stdout
    assert f"resumed from {os.path.join(resized, 'ckpt_0000003.pt')} at step 3" in results["two"].stdout
    log_whole, log_resized = read_log(out["ddp"]), read_log(resized)
    assert [r["step"] for r in log_resized] == [r["step"] for r in log_whole] == [0, 1, 2, 3, 4]
    for a, b in zip(log_whole, log_resized, strict=True):
        # 1 process adds its 4 micro-steps' gradients where 2 ranks all-reduce 2 each: fp32 rounding only
        for key, rel in (("train_loss", 1e-5), ("val_loss", 1e-5), ("grad_norm", 1e-3)):
            assert (key in a) == (key in b), (a["step"], key)
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=rel), (a["step"], key)
    assert [r["step"] for r in log_resized if "train_loss" in r] == [1, 2, 3, 4]
    whole = torch.load(os.path.join(out["ddp"], "ckpt_0000004.pt"), map_location="cpu", weights_only=True)
    ours = torch.load(os.path.join(resized, "ckpt_0000004.pt"), map_location="cpu", weights_only=True)
    assert ours["step"] == whole["step"] == 4 and ours["loader"] == whole["loader"]
    assert whole["model"].keys() == ours["model"].keys()
    for k in whole["model"]:
        torch.testing.assert_close(ours["model"][k], whole["model"][k], rtol=0, atol=5e-6)
    for theirs, mine in zip(whole["optimizer"], ours["optimizer"], strict=True):
        assert mine["param_groups"] == theirs["param_groups"]
        assert mine["state"].keys() == theirs["state"].keys()
        for i, state in theirs["state"].items():
            assert mine["state"][i].keys() == state.keys() == {"step", "exp_avg", "exp_avg_sq"}
            torch.testing.assert_close(mine["state"][i]["step"], state["step"], rtol=0, atol=0)
            # The moments are of gradients (up to 8e-3) and their squares (up to 2e-4, most entries far smaller):
            # a weight's 5e-6 would pass nearly any exp_avg_sq, and an element-wise rtol fails where a gradient is ~0
            # and rounding is all that is left of it. So 1e-5 of the tensor's largest entry, the losses' rel 1e-5;
            # the rounding seen here is under 5e-7 of it, a 1% higher lr for step 3 alone moves them by 5e-3 of it.
            for key in ("exp_avg", "exp_avg_sq"):
                scale = state[key].abs().max().item()
                torch.testing.assert_close(mine["state"][i][key], state[key], rtol=0, atol=1e-5 * scale,
                                           msg=lambda m, i=i, key=key: f"parameter {i} {key}: {m}")


def test_fsdp_checkpoint_exports_and_loads_without_fsdp(runs, tmp_path):
    out, _ = runs
    path = os.path.join(out["fsdp"], "ckpt_0000004.pt")
    export = str(tmp_path / "hf")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "export_hf.py"), path, export], capture_output=True,
                       text=True, cwd=ROOT, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
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


# 2 ranks shard a small GPT with train_gpt2.shard_model, take one autocast step, and report what the ranks saw, each
# in a file of its own (their stdout lines can interleave): the dtype a Block's and the root's weights had in
# forward, whether the step changed the weights, the loss scale before and after. With fp16, rank 1 first makes one
# of its own gradient shards inf.
SHARDED_STEP = """
import json, os, sys
import torch
import torch.distributed as dist
import train_gpt2 as tg

dist.init_process_group("gloo")
rank, dtype = dist.get_rank(), getattr(torch, sys.argv[1])
torch.manual_seed(0)
config = tg.GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=100, padded_vocab_size=128)
model = tg.GPT(config)
tg.shard_model(model, torch.device("cpu"), 2, dtype, compile_blocks=False)
seen = {}
model.transformer.h[0].attn.c_attn.register_forward_pre_hook(
    lambda m, a: seen.setdefault("block", str(m.weight.dtype)) and None)
model.transformer.wte.register_forward_pre_hook(lambda m, a: seen.setdefault("root", str(m.weight.dtype)) and None)
scaler = torch.amp.GradScaler("cpu", enabled=dtype == torch.float16)  # as the Trainer makes it
optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
idx = torch.randint(0, config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
with torch.autocast("cpu", dtype=dtype):
    _, loss = model(idx, idx)
scaler.scale(loss).backward()
before = [p.to_local().clone() for p in model.parameters()]
if rank == 1 and scaler.is_enabled():
    with torch.no_grad():
        next(p for p in model.parameters() if p.grad.to_local().numel()).grad.to_local().view(-1)[0] = float("inf")
scale = scaler.get_scale()
scaler.step(optimizer)
scaler.update()
stepped = any(not torch.equal(a, p.to_local()) for a, p in zip(before, model.parameters()))
with open(os.path.join(sys.argv[2], f"report_{rank}.json"), "w") as f:
    json.dump({"rank": rank, **seen, "stepped": stepped, "scales": [scale, scaler.get_scale()]}, f)
dist.destroy_process_group()
"""


def sharded_step(tmp_path, dtype: str) -> list[dict]:
    script = tmp_path / "sharded_step.py"
    script.write_text(SHARDED_STEP)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(script), dtype, str(tmp_path)], capture_output=True, text=True, cwd=ROOT, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT})
    assert r.returncode == 0, r.stderr[-3000:]
    reports = [json.loads((tmp_path / f"report_{rank}.json").read_text()) for rank in (0, 1)]
    assert [report["rank"] for report in reports] == [0, 1]
    return reports


def test_fsdp_fp16_steps_are_skipped_on_every_rank_when_one_rank_overflows(tmp_path):
    # each rank unscales only its own shards: the inf on rank 1 must still make rank 0 skip the step and back off,
    # or the ranks' weights and scales would drift apart
    for report in sharded_step(tmp_path, "float16"):
        assert not report["stepped"], report
        assert report["scales"] == [65536.0, 32768.0], report


def test_fsdp_on_a_cpu_gathers_in_fp32_under_bf16_autocast(tmp_path):
    # a CPU's autocast leaves layer_norm's weights as they are, and an fp32 input with bf16 weights is an error there
    # (the run would crash); on CUDA the Blocks are gathered in bf16, and the root always in fp32
    for report in sharded_step(tmp_path, "bfloat16"):
        assert report["block"] == report["root"] == "torch.float32" and report["stepped"], report
    assert tg.fsdp_gather_dtype(torch.device("cuda"), torch.bfloat16) == torch.bfloat16
    assert tg.fsdp_gather_dtype(torch.device("cuda"), torch.float16) is None
    assert tg.fsdp_gather_dtype(torch.device("cuda"), torch.float32) is None


# A DDP run whose ranks count their calls to dist.all_reduce (DDP's own gradient all-reduce is in C++ and not
# counted): with --val_every 0 and no FSDP, what remains is the step's loss and the stop-signal check.
COUNTED_RUN = """
import os, sys
import torch.distributed as dist
import train_gpt2 as tg

calls = []
all_reduce = dist.all_reduce
dist.all_reduce = lambda *args, **kwargs: calls.append(1) or all_reduce(*args, **kwargs)
try:
    tg.main(sys.argv[2:])
finally:
    with open(os.path.join(sys.argv[1], f"calls_{os.environ['RANK']}.txt"), "w") as f:
        f.write(str(len(calls)))
"""


def test_a_ddp_step_makes_one_all_reduce_for_its_loss_and_the_stop_signal(tmp_path):
    data = str(tmp_path / "shards")
    make_shards(data)
    script = tmp_path / "counted_run.py"
    script.write_text(COUNTED_RUN)
    argv = TINY + ["--data_dir", data, "--out_dir", str(tmp_path / "out"), "--max_steps", "3", "--val_every", "0",
                   "--batch_size", "2"]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(script), str(tmp_path), *argv], capture_output=True, text=True, cwd=ROOT, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT})
    assert r.returncode == 0, r.stderr[-3000:]
    assert [(tmp_path / f"calls_{rank}.txt").read_text() for rank in (0, 1)] == ["3", "3"]  # 3 steps on each rank


# ---------------------------------------------------------------------------------------------------------------
# DDP: 2 ranks equal 1 process


def test_ddp_two_processes_equal_one_process(data_dir, tmp_path):
    """2 gloo ranks x 2 micro-steps of 2 sequences == 1 process x 4 micro-steps: the same global batch."""
    common = TINY + ["--data_dir", data_dir, "--max_steps", "2", "--batch_size", "2", "--val_every", "2"]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    r1 = run_cli(common + ["--out_dir", one])
    assert r1.returncode == 0, r1.stderr
    r2 = run_cli(common + ["--out_dir", two], torchrun_procs=2)
    assert r2.returncode == 0, r2.stderr
    assert "world size 2" in r2.stdout and "2 micro-steps" in r2.stdout and "4 micro-steps" in r1.stdout
    a, b = load_weights(os.path.join(one, "ckpt_0000002.pt")), load_weights(os.path.join(two, "ckpt_0000002.pt"))
    for k in a:  # all-reduce sums in another order: equal up to fp32 rounding
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5)
    la, lb = read_log(one), read_log(two)
    for ra, rb in zip(la, lb):
        for key in ("train_loss", "val_loss", "grad_norm"):
            if key in ra:
                assert ra[key] == pytest.approx(rb[key], rel=1e-5)


@pytest.mark.usefixtures("global_state")
def test_ddp_two_processes_with_muon_equal_one_process(shards, tmp_path):
    """2 gloo ranks x 2 micro-steps of 2 sequences == 1 process x 4 micro-steps. The summed gradients (Muon's
    momentum, AdamW's moments) and AdamW's weights agree to fp32 rounding. torch's Muon orthogonalises in bf16, so
    an fp32-rounding difference in a gradient can move its matrices by a few bf16 steps of the update: those are
    held to a small fraction of the update instead (a 1-process run split into 2 micro-steps instead of 4 differs
    from the 4-step one by as much)."""
    common = TINY + ["--data_dir", shards[0], "--max_steps", 1, "--batch_size", 2, "--val_every", 1000,
                     "--optimizer", "muon"] + MODERN
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    r1 = ok(cli(common + ["--out_dir", one]))
    r2 = ok(run_cli(common + ["--out_dir", two], torchrun_procs=2))
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


DDP_SCRIPT = """
import sys, torch, torch.distributed as dist
import train_gpt2 as tg
dist.init_process_group("gloo")
rank = dist.get_rank()
settings = tg.parse_settings(["--model", "d2", "--recipe", "speedrun"])
config, _ = tg.model_from_settings(settings)
torch.manual_seed(0)
model = tg.GPT(config)
ddp = torch.nn.parallel.DistributedDataParallel(model)
opts = tg.configure_optimizers(model, settings, "cpu", ortho_dtype=torch.float32)
g = torch.Generator().manual_seed(100 + rank)  # each rank its own data, as in training
for step in range(3):
    idx = torch.randint(0, 50257, (2, 33), generator=g)
    ddp(idx[:, :-1], idx[:, 1:])[1].backward()
    for o in opts:
        o.step()
        o.zero_grad()
flat = torch.cat([p.detach().flatten() for p in model.parameters()])
both = [torch.empty_like(flat) for _ in range(2)]
dist.all_gather(both, flat)
torch.manual_seed(0)
moved = (flat - torch.cat([p.flatten() for p in tg.GPT(config).parameters()])).abs().max().item()
if rank == 0:
    print("identical" if torch.equal(both[0], both[1]) else "different", moved)
dist.destroy_process_group()
"""


def test_ddp_ranks_end_normuon_steps_with_identical_weights(tmp_path):
    script = tmp_path / "ddp_normuon.py"
    script.write_text(DDP_SCRIPT)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(script)], capture_output=True, text=True, timeout=300,
                       env=child_env(OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    verdict, moved = r.stdout.split()[-2:]
    assert verdict == "identical" and float(moved) > 1e-3


@pytest.mark.usefixtures("global_state")
def test_fsdp_with_normuon_is_refused(data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    r = cli(TINY + ["--data_dir", data_dir, "--out_dir", str(tmp_path / "out"), "--fsdp", "--optimizer",
                    "normuon"])
    assert_one_line_error(r, "--optimizer normuon", "--fsdp")
