"""benchmarks/: bench_step.py's manual-attention baseline computes what SDPA does, the memory probe sees an
allocation, MFU shares one yardstick and never exceeds 100%, and the ladder's ratios follow from its own rows; then
the chunked head + cross-entropy against the plain one; and gpu_check.sh, the one-script GPU check, end to end in its
--cpu-smoke mode: every check passes and its summary carries the numbers behind the verdicts; a check that fails
makes the script exit non-zero, and a machine where torch.compile cannot build a kernel fails the preflight in one
line. (memory_table.py is tested in test_memory.py.)"""

import functools
import os
import re
import subprocess
import sys

import pytest
import torch

import bench_step
import train_gpt2 as tg
from conftest import ROOT, cli, loss_and_grads, make_shards, tiny_config

bench = functools.partial(cli, main=bench_step.main)  # bench_step.py's command line in this process


@pytest.mark.parametrize("overrides", [{}, dict(pos="rope", n_kv_head=1, mlp="swiglu", norm="rmsnorm", bias=False),
                                       dict(n_kv_head=2)], ids=["classic", "modern", "gqa"])
def test_manual_attention_computes_what_sdpa_does(overrides):
    torch.manual_seed(0)
    model = tg.GPT(tiny_config(gpt2_vocab=True, block_size=32, **overrides))
    idx = torch.randint(0, 50257, (2, 24))
    targets = torch.randint(0, 50257, (2, 24))
    _, loss = model(idx, targets)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    with bench_step.attention_kernel(sdpa=False):
        _, manual_loss = model(idx, targets)
        manual_loss.backward()
    assert abs(manual_loss.item() - loss.item()) < 1e-5
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, grads[n], atol=1e-6), n
    # with a KV cache too: one token at a time after a prefill, against the full forward
    model.eval()
    with torch.no_grad(), bench_step.attention_kernel(sdpa=False):
        full, _ = model(idx)
        cache = tg.KVCache(model.config, 2)
        parts = [model(idx[:, :10], cache=cache)[0]] + [model(idx[:, t:t + 1], cache=cache)[0] for t in range(10, 24)]
    assert (torch.cat(parts, dim=1) - full)[..., :50257].abs().max().item() < 1e-5


def test_peak_rss_sees_an_allocation_made_inside_the_block():
    with bench_step.PeakRSS() as idle:
        torch.zeros(1).add_(1)
    with bench_step.PeakRSS() as busy:
        block = torch.ones(64 * 2**20 // 4 * 4)  # 256 MiB, every page touched
        del block
    assert busy.peak - idle.peak > 200 * 2**20


def test_mfu_shares_one_peak_per_dtype_and_never_exceeds_one(monkeypatch):
    monkeypatch.setattr(tg, "device_peak_flops",
                        lambda device, dtype, override: 100.0 if override is None else override * 1e12)
    rows = [{"dtype": torch.float32, "flops_per_s": f} for f in (50.0, 150.0, 75.0)]
    bench_step.add_mfu(rows, torch.device("cpu"), None)
    assert [r["mfu"] for r in rows] == [50.0 / 150.0, 1.0, 75.0 / 150.0]  # the probe is raised to the best row
    given = [{"dtype": torch.float32, "flops_per_s": 3e12}]
    bench_step.add_mfu(given, torch.device("cpu"), 6.0)
    assert given[0]["mfu"] == 0.5  # a stated peak is taken as it is


def test_unpadded_vocabulary_and_switches_reach_the_model(monkeypatch):
    seen = {}
    real_gpt = tg.GPT

    def spy(config):
        model = real_gpt(config)
        seen["config"] = config
        seen["model"] = model
        return model

    monkeypatch.setattr(tg, "GPT", spy)
    calls = []
    real_manual = bench_step.manual_attention
    monkeypatch.setattr(bench_step, "manual_attention", lambda *a, **k: calls.append(1) or real_manual(*a, **k))
    config = tiny_config(gpt2_vocab=True, block_size=32)
    result = bench_step.time_training_step(config, torch.device("cpu"), batch_size=2, seq_len=16, steps=2,
                                           warmup=1, sdpa=False, padded=False, fused=False)
    assert seen["config"].padded_vocab_size == seen["config"].vocab_size == 50257
    assert len(calls) == (1 + 2) * 2  # each of the 3 steps, in both layers, went through the manual attention
    assert result["tok_per_s"] == pytest.approx(2 * 16 / (result["ms"] / 1000))


def test_ladder_rows_ratios_and_skips(tmp_path):
    result = bench(["--model", "d2", "--seq_len", "32", "--batch_size", "2", "--device", "cpu", "--ladder",
                    "--steps", "2", "--warmup", "1"])
    assert result.returncode == 0, result.stderr
    out = result.stdout
    rows = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| step")]
    assert [r.split(" | ")[0][2:] for r in rows] == [name for name, _ in bench_step.LADDER]
    assert "skipped: TF32 is a CUDA tensor-core mode" in rows[1]
    timed = [r for r in rows if "skipped" not in r]
    parsed = []
    for r in timed:
        cells = [c.strip() for c in r.strip("|").split("|")]
        parsed.append(dict(ms=float(cells[1]), tok=float(cells[2].replace(",", "")), mfu=float(cells[3].rstrip("%")),
                           prev=float(cells[5].rstrip("x")), first=float(cells[6].rstrip("x"))))
    assert parsed[0]["prev"] == parsed[0]["first"] == 1.0
    for before, row in zip(parsed, parsed[1:]):
        assert row["prev"] == pytest.approx(row["tok"] / before["tok"], rel=0.02, abs=0.011)
        assert row["first"] == pytest.approx(row["tok"] / parsed[0]["tok"], rel=0.02, abs=0.011)
    assert max(p["mfu"] for p in parsed) <= 100.0
    assert all(p["tok"] == pytest.approx(2 * 32 / (p["ms"] / 1000), rel=0.01) for p in parsed)
    assert re.search(r"\| \+ torch.compile \| [\d.]+ \|", out)


@pytest.mark.parametrize("overrides", [{}, dict(pos="rope", n_kv_head=1, mlp="swiglu", norm="rmsnorm", bias=False,
                                                tie_embeddings=False)], ids=["classic-tied", "modern-untied"])
def test_chunked_loss_gives_the_plain_loss_and_gradients(monkeypatch, overrides):
    for name in ("LOSS_CHUNK_ROWS", "LOSS_CHUNK_ROWS_CPU"):
        monkeypatch.setattr(tg, name, 7)  # 48 positions: 6 full chunks and a ragged one
    torch.manual_seed(0)
    model = tg.GPT(tiny_config(gpt2_vocab=True, block_size=32, **overrides))
    idx = torch.randint(0, 50257, (2, 24))
    targets = torch.randint(0, 50257, (2, 24))
    targets[0, 5:9] = -1  # ignored positions carry neither loss nor gradient
    logits, loss, grads = loss_and_grads(model, idx, targets, chunked=False)
    none, chunked_loss, chunked_grads = loss_and_grads(model, idx, targets, chunked=True)
    assert logits is not None and none is None
    assert chunked_loss.item() == pytest.approx(loss.item(), rel=1e-6)
    for n in grads:  # fp32 sums in another order: within 1e-5 of each gradient's largest entry
        assert (chunked_grads[n] - grads[n]).abs().max().item() <= 1e-5 * grads[n].abs().max().item(), n
    # a hand-rolled reference for the loss: log-sum-exp over the real vocabulary minus the target's logit
    z = logits.double().view(48, -1)[:, :50257]
    t = targets.view(48)
    keep = t != -1
    reference = (torch.logsumexp(z[keep], dim=-1) - z[keep, t[keep]]).mean()
    assert loss.item() == pytest.approx(reference.item(), abs=1e-5)
    # bf16 autocast: matmuls in bf16, softmax in fp32, on both paths
    _, loss16, grads16 = loss_and_grads(model, idx, targets, chunked=False, autocast_dtype=torch.bfloat16)
    _, chunked16, chunked_grads16 = loss_and_grads(model, idx, targets, chunked=True, autocast_dtype=torch.bfloat16)
    assert chunked16.item() == pytest.approx(loss16.item(), rel=1e-3)
    for n in grads16:
        scale = grads16[n].abs().max().item()
        assert (chunked_grads16[n] - grads16[n]).abs().max().item() <= 2e-2 * scale + 1e-8, n
    # without gradients (evaluation) the same loss, and nothing is computed for a backward
    model.eval()
    with torch.no_grad():
        model.chunked_loss = True
        _, eval_loss = model(idx, targets)
    assert eval_loss.item() == pytest.approx(loss.item(), rel=1e-6) and eval_loss.grad_fn is None


@pytest.mark.parametrize("cap", [0.0, 5.0])
@pytest.mark.parametrize("kernel", ["xent_chunk", "xent_chunk_traced"])
def test_chunk_kernels_give_the_reference_loss_and_gradient(kernel, cap):
    """Both formulations of a chunk's loss (the in-place one run eagerly, the pure one torch.compile traces)
    against float64 autograd: sum(scale * cross-entropy) of softcap(z) + bias, where the bias puts the padding ids
    (37 on) at -inf, ignored targets contributing nothing."""
    torch.manual_seed(0)
    logits = torch.randn(6, 40) * 4
    bias = torch.zeros(40)
    bias[37:] = float("-inf")  # padding ids
    targets = torch.tensor([3, -1, 36, 0, -1, 17])
    valid = targets != -1
    scale = valid / valid.sum()
    loss, grad = getattr(tg, kernel)(logits.clone(), targets, scale, 37, cap)
    z = logits.double().requires_grad_()
    capped = cap * torch.tanh(z / cap) if cap else z
    logp = torch.log_softmax(capped + bias.double(), dim=-1)
    reference = -(logp[valid, targets[valid]] * scale[valid].double()).sum()
    reference.backward()
    assert loss.item() == pytest.approx(reference.item(), rel=1e-6)
    assert grad.dtype == logits.dtype
    assert torch.allclose(grad.double(), z.grad, atol=1e-6)
    assert grad[~valid].abs().max().item() == 0 and grad[:, 37:].abs().max().item() == 0


def test_chunked_loss_lowers_peak_memory(monkeypatch):
    """2,048 positions x 50,304 logits: the plain path holds several fp32 copies of that 412 MB tensor at once
    (logits, log-probabilities, their gradient); the chunked one never more than a 1,024-position chunk's (the
    GPU's chunk; a CPU's default of 2,048 rows would make this one chunk)."""
    monkeypatch.setattr(tg, "LOSS_CHUNK_ROWS_CPU", tg.LOSS_CHUNK_ROWS)
    torch.manual_seed(0)
    model = tg.GPT(tiny_config(gpt2_vocab=True, block_size=256))
    idx = torch.randint(0, 50257, (8, 256))
    peaks = {}
    for chunked in (True, False):
        model.chunked_loss = chunked
        model.zero_grad(set_to_none=True)
        with bench_step.PeakRSS() as rss:
            _, loss = model(idx, idx)
            loss.backward()
        del loss
        peaks[chunked] = rss.peak - rss._rss()  # above the level the process returns to afterwards
    logits_bytes = 8 * 256 * 50304 * 4
    assert peaks[False] - peaks[True] > logits_bytes, {k: v / 2**20 for k, v in peaks.items()}


def test_compiled_chunk_has_no_matmul_bias_copy():
    """Inductor on a CPU folds `mm + broadcast bias` into an addmm that first copies the bias into the whole
    (rows x vocabulary) output; the chunked loss masks the padding ids by column index instead, so its compiled fp32
    forward is plain matmuls and fused kernels: no addmm and no copy of a logits-sized tensor, with the eager loss."""
    torch.manual_seed(0)
    x = torch.randn(64, 32, requires_grad=True)
    weight = (torch.randn(512, 32) * 0.1).requires_grad_()
    targets = torch.randint(0, 500, (64,))

    def loss_of(x, weight):
        return tg.ChunkedCrossEntropy.apply(x, weight, 500, targets, 64, True, 0.0)

    compiled = torch.compile(loss_of, backend="inductor", fullgraph=True)
    compiled(x, weight)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        loss = compiled(x, weight)
    ops = [(e.name, e.input_shapes) for e in prof.events()]
    assert not [op for op in ops if op[0] == "aten::addmm"], ops
    assert not [op for op in ops if op[0] == "aten::copy_" and [64, 512] in op[1]], ops
    assert loss.item() == pytest.approx(loss_of(x, weight).item(), rel=1e-5)


def test_loader_speed_is_set_beside_the_step(tmp_path):
    data = str(tmp_path / "shards")
    make_shards(data)
    result = bench(["--model", "d2", "--seq_len", "32", "--batch_size", "2", "--device", "cpu", "--steps", "2",
                    "--warmup", "1", "--data_dir", data])
    assert result.returncode == 0, result.stderr
    step = re.search(r"([\d,]+) tok/s \| MFU", result.stdout)
    loader = re.search(r"loader: ([\d,]+) tok/s from (\S+) vs ([\d,]+) tok/s for the fastest step above "
                       r"\(([\d,]+)x\): reading batches takes ([\d.]+)% of a step", result.stdout)
    assert step and loader, result.stdout
    num = lambda text: float(text.replace(",", ""))  # noqa: E731
    assert loader.group(2) == data and num(loader.group(3)) == num(step.group(1))
    ratio = num(loader.group(1)) / num(loader.group(3))
    assert num(loader.group(4)) == pytest.approx(ratio, rel=0.01, abs=1)
    assert float(loader.group(5)) == pytest.approx(100 / ratio, rel=0.01, abs=0.01)
    # without shards the step is still timed, and the loader line says why it was not
    result = bench(["--model", "d2", "--seq_len", "32", "--batch_size", "2", "--device", "cpu", "--steps", "1",
                    "--warmup", "0", "--data_dir", str(tmp_path / "none")])
    assert result.returncode == 0 and "loader: not timed (data directory" in result.stdout


# ---------------------------------------------------------------------------------------------------------------
# benchmarks/gpu_check.sh --cpu-smoke: every check passes, with its numbers; a failing check fails the script

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
