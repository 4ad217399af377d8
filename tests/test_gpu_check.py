"""benchmarks/gpu_check.sh, the one-script GPU check, end to end in its --cpu-smoke mode: every check passes and its
summary carries the numbers behind the verdicts; a check that fails makes the script exit non-zero, and a machine
where torch.compile cannot build a kernel fails the preflight in one line."""

import os
import re
import subprocess
import sys

import pytest

from test_train import ROOT

GPU_CHECK = os.path.join(ROOT, "benchmarks", "gpu_check.sh")


def run_gpu_check(*args, env_extra=None):
    env = {**os.environ, "PYTHON": sys.executable, **(env_extra or {})}
    return subprocess.run(["bash", GPU_CHECK, *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)


def summary_of(r):
    assert "gpu_check summary" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout.split("gpu_check summary", 1)[1]


@pytest.fixture(scope="module")
def smoke():
    return run_gpu_check("--cpu-smoke")


def test_cpu_smoke_passes_every_check(smoke):
    assert smoke.returncode == 0, smoke.stdout[-4000:] + smoke.stderr[-4000:]
    summary = summary_of(smoke)
    for check in ("ladder", "loss", "ddp", "train", "fp16", "resume"):
        assert re.search(rf"^PASS +{check} ", summary, re.M), summary
    assert not re.search(r"^(FAIL|SKIP) ", summary, re.M)
    assert summary.rstrip().endswith("RESULT: PASS")
    assert re.search(r"^device: CPU .*torch \d", summary, re.M)


def test_cpu_smoke_summary_holds_the_numbers(smoke):
    summary = summary_of(smoke)
    # the training loss fell, by the numbers the verdict quotes
    first, last = map(float, re.search(r"^PASS +train +loss ([\d.]+) -> ([\d.]+) ", summary, re.M).groups())
    assert last < first / 2 and first > 5  # from about ln(50257) = 10.8 at initialisation
    assert re.search(r"^  60 steps: median [\d,]+ tok/s, MFU [\d.]+%", summary, re.M)
    # the ladder's 8 rows, tok/s and MFU for each timed one, and its last two rows set side by side
    rows = re.findall(r"^  ([+f].*?)\s+([\d.]+) ms\s+([\d,]+) tok/s  MFU\s+([\d.]+%|n/a)", summary, re.M)
    skipped = re.findall(r"^  \+ .*? skipped: ", summary, re.M)  # TF32 on any CPU, bf16 on one without it
    assert len(rows) + len(skipped) == 8 and "skipped: TF32 is a CUDA tensor-core mode" in summary
    assert rows[-2][0] == "+ torch.compile" and rows[-1][0] == "+ chunked linear + cross-entropy"
    assert all(float(tok.replace(",", "")) > 0 for _, _, tok, _ in rows)
    assert re.search(r"chunked vs plain head, compiled .*: [\d.]+x tok/s", summary)
    # the resumed run matched the uninterrupted one exactly (fp32 on CPU), after stopping early
    stopped = int(re.search(r"^PASS +resume +stopped at step (\d+) and resumed: losses at all 16 steps and final "
                            r"weights identical", summary, re.M).group(1))
    assert 1 <= stopped < 16
    # the chunked head beside the plain one in both half precisions, each gradient measured against fp32
    rows = re.findall(r"^  (bfloat16|float16) (eager|compiled) +loss ([\d.]+) plain, ([\d.]+) chunked; gradient off "
                      r"fp32 by ([\d.e+-]+) plain, ([\d.e+-]+) chunked$", summary, re.M)
    assert [(d, m) for d, m, *_ in rows] == [("bfloat16", "eager"), ("bfloat16", "compiled"), ("float16", "eager"),
                                             ("float16", "compiled")]
    for _, _, loss_plain, loss_chunked, err_plain, err_chunked in rows:
        assert float(loss_chunked) == pytest.approx(float(loss_plain), rel=1e-2)
        assert 0 < float(err_chunked) <= 2 * float(err_plain) + 1e-4
    ddp = re.search(r"^  gloo, float32: loss ([\d.]+) alone, ([\d.]+) under DDP", summary, re.M)
    assert ddp and ddp.group(1) == ddp.group(2)
    fp16 = re.search(r"^  loss ([\d.]+) -> ([\d.]+) over 24 steps, loss scale ([\d.e+]+) at the end$", summary, re.M)
    assert fp16 and float(fp16.group(2)) < float(fp16.group(1)) / 2 and float(fp16.group(3)) > 0


def test_a_failing_check_fails_the_script():
    # --lr 0: the weights never move, so the loss cannot fall to half; a few eager steps keep this cheap
    r = run_gpu_check("--cpu-smoke", "--only", "train",
                      env_extra={"GPU_CHECK_TRAIN_FLAGS": "--lr 0 --no-compile --max_steps 4 --warmup_steps 1"})
    assert r.returncode != 0
    summary = summary_of(r)
    m = re.search(r"^FAIL +train +train loss did not fall: loss ([\d.]+) -> ([\d.]+) ", summary, re.M)
    assert m and float(m.group(2)) > float(m.group(1)) / 2, summary
    for check in ("ladder", "loss", "ddp", "fp16", "resume"):
        assert re.search(rf"^SKIP +{check} ", summary, re.M), check
    assert summary.rstrip().endswith("RESULT: FAIL (1 of the checks run failed)")
    assert "gpu_check: FAIL train: train loss did not fall" in r.stderr  # one clear line as it happens


def test_a_machine_that_cannot_compile_fails_the_preflight_in_one_line():
    # Inductor builds CPU kernels with $CXX: one that does not exist is a machine without a C++ compiler
    r = run_gpu_check("--cpu-smoke", "--only", "train", env_extra={"CXX": "/nonexistent/g++"})
    assert r.returncode != 0
    assert "gpu_check summary" not in r.stdout  # it stopped before any check
    lines = [line for line in r.stderr.splitlines() if line.startswith("gpu_check:")]
    assert len(lines) == 1, r.stderr
    assert "torch.compile cannot build a kernel" in lines[0] and "--no-compile" in lines[0], r.stderr
