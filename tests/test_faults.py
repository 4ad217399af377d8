"""Faults a long run meets: preemption signals, a damaged newest checkpoint, diverging steps, bad flags.
Each case checks the outcome against an uninterrupted run or the files that must survive."""

import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, SCRIPT, TINY, load_weights, run_cli

STEPS = 24
RUN = TINY + ["--max_steps", str(STEPS), "--val_every", "0"]


@pytest.fixture(scope="module")
def uninterrupted(data_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("uninterrupted"))
    r = run_cli(RUN + ["--data_dir", data_dir, "--out_dir", out])
    assert r.returncode == 0, r.stderr
    return load_weights(os.path.join(out, f"ckpt_{STEPS:07d}.pt"))


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def checkpoints(out):
    return sorted(os.path.basename(p) for p in glob.glob(os.path.join(out, "ckpt_*.pt")))


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGUSR1"])
def test_signal_saves_exits_cleanly_and_resumes_exactly(data_dir, uninterrupted, tmp_path, sig):
    out = str(tmp_path / "o")
    log = os.path.join(out, "log.jsonl")
    proc = subprocess.Popen([sys.executable, SCRIPT, *RUN, "--data_dir", data_dir, "--out_dir", out],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while time.time() < deadline and not (os.path.exists(log) and len(open(log).readlines()) >= 3):
        time.sleep(0.05)
    proc.send_signal(getattr(signal, sig))
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert f"stopping after {sig}" in stdout
    saved = checkpoints(out)
    assert len(saved) == 1 and saved[0] != f"ckpt_{STEPS:07d}.pt"  # stopped early, with a checkpoint
    stopped_at = int(saved[0][5:12])
    assert [json.loads(line)["step"] for line in open(log)][-1] == stopped_at
    r = run_cli(RUN + ["--data_dir", data_dir, "--out_dir", out, "--resume", "auto"])
    assert r.returncode == 0, r.stderr
    assert_same_weights(load_weights(os.path.join(out, f"ckpt_{STEPS:07d}.pt")), uninterrupted)


def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(data_dir, uninterrupted, tmp_path):
    out = str(tmp_path / "o")
    r = run_cli(RUN + ["--data_dir", data_dir, "--out_dir", out, "--save_every", "4", "--stop_at_step", "8"])
    assert r.returncode == 0, r.stderr
    assert checkpoints(out) == ["ckpt_0000004.pt", "ckpt_0000008.pt"]
    with open(os.path.join(out, "ckpt_0000008.pt"), "r+b") as f:
        f.truncate(5000)  # as a copy cut short or a disk that filled up behind our back would leave it
    r = run_cli(RUN + ["--data_dir", data_dir, "--out_dir", out, "--resume", "auto", "--save_every", "4",
                       "--keep_last", "2"])
    assert r.returncode == 0, r.stderr
    assert "warning: checkpoint" in r.stdout and "ckpt_0000008.pt" in r.stdout and "resumed from" in r.stdout
    assert "at step 4" in r.stdout
    assert checkpoints(out) == [f"ckpt_{STEPS - 4:07d}.pt", f"ckpt_{STEPS:07d}.pt"]  # --keep_last 2
    assert_same_weights(load_weights(os.path.join(out, f"ckpt_{STEPS:07d}.pt")), uninterrupted)


def test_no_readable_checkpoint_is_an_error_not_a_fresh_start(data_dir, tmp_path):
    out = str(tmp_path / "o")
    assert run_cli(RUN + ["--data_dir", data_dir, "--out_dir", out, "--stop_at_step", "2"]).returncode == 0
    path = os.path.join(out, "ckpt_0000002.pt")
    with open(path, "r+b") as f:
        f.truncate(100)
    r = run_cli(RUN + ["--data_dir", data_dir, "--out_dir", out, "--resume", "auto"])
    assert r.returncode != 0 and "none of the 1 checkpoints" in r.stderr
    assert os.path.getsize(path) == 100 and checkpoints(out) == ["ckpt_0000002.pt"]


def test_diverging_run_skips_updates_then_stops_naming_the_step(data_dir, tmp_path):
    out = str(tmp_path / "o")
    r = run_cli(RUN + ["--data_dir", data_dir, "--out_dir", out, "--lr", "1e4", "--grad_clip", "0",
                       "--max_bad_steps", "3", "--save_every", "1"])
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: stopping at step") and "3 steps in a row" in lines[0]
    assert "update skipped (1 in a row)" in r.stdout
    bad_step = int(lines[0].split("stopping at step ")[1].split(":")[0])
    # every checkpoint written holds finite weights, and none was written for the failing step
    assert checkpoints(out) and f"ckpt_{bad_step:07d}.pt" not in checkpoints(out)
    for name in checkpoints(out):
        assert all(torch.isfinite(t).all() for t in load_weights(os.path.join(out, name)).values())


@pytest.mark.parametrize("flags, fragment", [
    (["--model", "gpt5"], "unknown --model 'gpt5'"),
    (["--resume", "/nonexistent/ckpt.pt"], "does not exist"),
    (["--keep_last", "-1"], "--keep_last"),
    (["--hellaswag_every", "1", "--hellaswag_limit", "0"], "--hellaswag_limit"),
])
def test_bad_flags_give_one_line(data_dir, tmp_path, flags, fragment):
    r = run_cli(RUN + ["--data_dir", data_dir, "--out_dir", str(tmp_path / "o")] + flags)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], r.stderr
    assert not (tmp_path / "o").exists()


def test_out_dir_that_is_a_file(data_dir, tmp_path):
    target = tmp_path / "taken"
    target.write_text("not a directory")
    r = run_cli(RUN + ["--data_dir", data_dir, "--out_dir", str(target)])
    assert r.returncode != 0 and "is not a directory" in r.stderr
    assert target.read_text() == "not a directory"


def test_disk_full_while_saving_keeps_the_previous_checkpoint(data_dir, tmp_path, monkeypatch, capsys):
    import errno

    import train_gpt2 as tg

    out = str(tmp_path / "o")
    real_save, calls = torch.save, []

    def save_until_the_disk_fills(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(tg.torch, "save", save_until_the_disk_fills)
    with pytest.raises(SystemExit) as exit_info:
        tg.main(RUN + ["--data_dir", data_dir, "--out_dir", out, "--save_every", "2", "--peak_tflops", "1"])
    assert exit_info.value.code != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device" in err[0] and "ckpt_0000004.pt" in err[0]
    assert sorted(os.listdir(out)) == ["ckpt_0000002.pt", "log.jsonl"]  # no half-written file, under any name
    monkeypatch.setattr(tg.torch, "save", real_save)
    assert tg.load_checkpoint(os.path.join(out, "ckpt_0000002.pt"))["step"] == 2


def test_dtype_the_device_cannot_run(monkeypatch):
    import train_gpt2 as tg

    monkeypatch.setattr(tg, "native_bf16", lambda device: False)
    with pytest.raises(tg.UserError, match="--dtype bf16 is not supported"):
        tg.resolve_dtype("bf16", torch.device("mps"))
    assert tg.resolve_dtype("auto", torch.device("cuda")) == torch.float16  # older GPUs: fp16 + GradScaler
    assert tg.resolve_dtype("auto", torch.device("cpu")) == torch.float32  # no native bf16: fp32, not emulation


def _torchrun(args, extra=()):
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             *extra, SCRIPT, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})


def _workers(parent_pid):
    with open(f"/proc/{parent_pid}/task/{parent_pid}/children") as f:
        return [int(p) for p in f.read().split()]


def _wait_for_log(log, n_lines, proc):
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(log) and len(open(log).readlines()) >= n_lines:
            return
        time.sleep(0.05)
    raise AssertionError("the run did not reach the expected step")


@pytest.fixture(scope="module")
def uninterrupted_ddp(data_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("uninterrupted_ddp"))
    proc = _torchrun(RUN + ["--data_dir", data_dir, "--out_dir", out])
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    return load_weights(os.path.join(out, f"ckpt_{STEPS:07d}.pt"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds torchrun's workers through /proc")
def test_signal_to_one_rank_stops_every_rank_at_the_same_step(data_dir, uninterrupted_ddp, tmp_path):
    out = str(tmp_path / "o")
    proc = _torchrun(RUN + ["--data_dir", data_dir, "--out_dir", out])
    _wait_for_log(os.path.join(out, "log.jsonl"), 3, proc)
    os.kill(max(_workers(proc.pid)), signal.SIGTERM)  # one rank only: the other learns of it by all-reduce
    stdout, stderr = proc.communicate(timeout=180)
    assert proc.returncode == 0, stderr
    assert len(checkpoints(out)) == 1 and "stopping after" in stdout
    proc = _torchrun(RUN + ["--data_dir", data_dir, "--out_dir", out, "--resume", "auto"])
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    assert_same_weights(load_weights(os.path.join(out, f"ckpt_{STEPS:07d}.pt")), uninterrupted_ddp)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds torchrun's workers through /proc")
def test_rank_crash_restarts_from_the_last_checkpoint(data_dir, uninterrupted_ddp, tmp_path):
    out = str(tmp_path / "o")
    proc = _torchrun(RUN + ["--data_dir", data_dir, "--out_dir", out, "--resume", "auto", "--save_every", "4"],
                     extra=["--max_restarts=1"])
    _wait_for_log(os.path.join(out, "log.jsonl"), 7, proc)  # step 6: a checkpoint at step 4 exists
    os.kill(max(_workers(proc.pid)), signal.SIGKILL)  # a rank dies without any chance to save
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    assert "resumed from" in stdout
    assert_same_weights(load_weights(os.path.join(out, f"ckpt_{STEPS:07d}.pt")), uninterrupted_ddp)


def test_empty_data_dir(tmp_path):
    (tmp_path / "empty").mkdir()
    r = run_cli(RUN + ["--data_dir", str(tmp_path / "empty"), "--out_dir", str(tmp_path / "o")])
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and len(lines) == 1
    assert "no 'train' shards" in lines[0] and "prepare_fineweb.py" in lines[0]
    assert not (tmp_path / "o").exists()
