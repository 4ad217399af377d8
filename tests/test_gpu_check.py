"""benchmarks/gpu_check.sh, the one-script GPU check, end to end in its --cpu-smoke mode: every check passes and its
summary carries the numbers behind the verdicts; a check that fails makes the script exit non-zero."""

import os
import re
import subprocess
import sys

import pytest

from test_train import ROOT

GPU_CHECK = os.path.join(ROOT, "benchmarks", "gpu_check.sh")


def run_gpu_check(*args, env_extra=None):
    env = {**os.environ, "PYTHON": sys.executable, **(env_extra or {})}
    return subprocess.run(["bash", GPU_CHECK, *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=420)


def summary_of(r):
    assert "gpu_check summary" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout.split("gpu_check summary", 1)[1]


@pytest.fixture(scope="module")
def smoke():
    return run_gpu_check("--cpu-smoke")


def test_cpu_smoke_passes_every_check(smoke):
    assert smoke.returncode == 0, smoke.stdout[-4000:] + smoke.stderr[-4000:]
    summary = summary_of(smoke)
    for check in ("ladder", "train", "resume"):
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


def test_a_failing_check_fails_the_script():
    # --lr 0: the weights never move, so the loss cannot fall to half; a few eager steps keep this cheap
    r = run_gpu_check("--cpu-smoke", "--only", "train",
                      env_extra={"GPU_CHECK_TRAIN_FLAGS": "--lr 0 --no-compile --max_steps 4 --warmup_steps 1"})
    assert r.returncode != 0
    summary = summary_of(r)
    m = re.search(r"^FAIL +train +train loss did not fall: loss ([\d.]+) -> ([\d.]+) ", summary, re.M)
    assert m and float(m.group(2)) > float(m.group(1)) / 2, summary
    assert re.search(r"^SKIP +ladder ", summary, re.M) and re.search(r"^SKIP +resume ", summary, re.M)
    assert summary.rstrip().endswith("RESULT: FAIL (1 of the checks run failed)")
    assert "gpu_check: FAIL train: train loss did not fall" in r.stderr  # one clear line as it happens
