"""The paths only a GPU run takes, proved on a CPU where the logic allows: the RNG state of this process's GPU alone,
the dtype --dtype auto picks from the GPU's capability, the fp16 chunked loss against fp32, the MFU peak table,
one-line out-of-memory errors, the process group's timeout, and memory-mapped checkpoints."""

import datetime
import os
import subprocess
import sys
import types

import pytest
import torch

import train_gpt2 as tg
from conftest import ROOT, TINY, make_shards

# ---------------------------------------------------------------------------------------------------------------
# RNG state: this process's GPU only


class FakeGPUs:
    """torch.cuda's RNG functions over `count` GPUs, this process on `current`. A GPU index past the count fails as
    CUDA's 'invalid device ordinal' does; the *_all functions loop over the devices as torch's do."""

    def __init__(self, count: int, current: int, seed: int):
        self.count, self.current = count, current
        self.states = {i: torch.tensor([seed, i], dtype=torch.uint8) for i in range(count)}

    def index(self, device) -> int:
        if isinstance(device, torch.device):
            device = device.index
        i = self.current if device in (None, "cuda") else int(device)
        if i >= self.count:
            raise RuntimeError("CUDA error: invalid device ordinal")
        return i

    def install(self, monkeypatch) -> None:
        cuda = torch.cuda
        monkeypatch.setattr(cuda, "is_available", lambda: True)
        monkeypatch.setattr(cuda, "device_count", lambda: self.count)
        monkeypatch.setattr(cuda, "current_device", lambda: self.current)
        monkeypatch.setattr(cuda, "get_rng_state", lambda device="cuda": self.states[self.index(device)].clone())
        monkeypatch.setattr(cuda, "set_rng_state",
                            lambda state, device="cuda": self.states.__setitem__(self.index(device), state.clone()))
        monkeypatch.setattr(cuda, "get_rng_state_all", lambda: [cuda.get_rng_state(i) for i in range(self.count)])
        monkeypatch.setattr(cuda, "set_rng_state_all",
                            lambda states: [cuda.set_rng_state(s, i) for i, s in enumerate(states)])


def test_a_run_saved_with_8_gpus_visible_resumes_where_1_is(monkeypatch):
    saved_on = FakeGPUs(count=8, current=0, seed=1)
    saved_on.install(monkeypatch)
    state = tg.rng_state()
    resumed_on = FakeGPUs(count=1, current=0, seed=2)
    resumed_on.install(monkeypatch)
    tg.set_rng_state(state)
    assert torch.equal(resumed_on.states[0], saved_on.states[0])


def test_each_rank_saves_and_restores_its_own_gpu(monkeypatch):
    rank3 = FakeGPUs(count=4, current=3, seed=1)
    rank3.install(monkeypatch)
    state = tg.rng_state()
    later = FakeGPUs(count=4, current=3, seed=2)
    later.install(monkeypatch)
    untouched = {i: later.states[i].clone() for i in range(3)}
    tg.set_rng_state(state)
    assert torch.equal(later.states[3], rank3.states[3])
    assert all(torch.equal(later.states[i], untouched[i]) for i in range(3))


def test_a_checkpoint_holding_every_gpus_state_restores_this_process_gpu(monkeypatch):
    # the layout written before: a list with one state per visible GPU
    old = FakeGPUs(count=8, current=0, seed=1)
    state = {**tg.rng_state(), "cuda": [old.states[i] for i in range(8)]}
    now = FakeGPUs(count=2, current=1, seed=2)
    now.install(monkeypatch)
    tg.set_rng_state(state)
    assert torch.equal(now.states[1], old.states[1]) and not torch.equal(now.states[0], old.states[0])


# ---------------------------------------------------------------------------------------------------------------
# --dtype auto from the GPU's capability


def fake_gpu(monkeypatch, major: int) -> torch.device:
    """A CUDA GPU of compute capability major.0 that, like every GPU since Kepler, can hold bf16 tensors: below 8.0
    its bf16 matmuls are emulated."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: types.SimpleNamespace(major=major))
    monkeypatch.setattr(torch.cuda, "_check_bf16_tensor_supported", lambda device: True)
    monkeypatch.setattr(torch.version, "hip", None)
    return torch.device("cuda", 0)


@pytest.mark.parametrize("major, name, expected", [(6, "P100", torch.float16), (7, "V100 or T4", torch.float16),
                                                   (8, "A100", torch.bfloat16), (9, "H100", torch.bfloat16)])
def test_auto_dtype_is_bf16_only_where_the_gpu_computes_it(monkeypatch, major, name, expected):
    assert tg.resolve_dtype("auto", fake_gpu(monkeypatch, major)) == expected, name


def test_asking_for_emulated_bf16_on_a_gpu_warns_and_runs(monkeypatch, capsys):
    assert tg.resolve_dtype("bf16", fake_gpu(monkeypatch, 7)) == torch.bfloat16
    out = capsys.readouterr().out
    assert "no native bf16" in out and "--dtype fp16" in out


# ---------------------------------------------------------------------------------------------------------------
# the chunked loss under fp16 autocast


def head_gradient(model, idx, targets, chunked: bool, dtype: torch.dtype, loss_scale: float) -> torch.Tensor:
    """The tied head's gradient of the mean loss, as a GradScaler run computes it: the loss multiplied by the scale
    before backward, the gradient divided by it after (in float64 here, so the division adds no error)."""
    model.zero_grad(set_to_none=True)
    model.chunked_loss = chunked
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        _, loss = model(idx, targets)
    (loss * loss_scale).backward()
    return model.lm_head.weight.grad.double() / loss_scale


def test_fp16_chunked_head_gradient_is_as_close_to_fp32_as_the_plain_heads():
    torch.manual_seed(0)
    config = tg.GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=64, vocab_size=500, padded_vocab_size=512)
    model = tg.GPT(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(5)  # a peaked softmax, as a trained model's: most entries far below 1/vocab
    # 8,192 positions: the mean's 1/N is 1.2e-4, which fp16 holds only as a subnormal
    idx, targets = (torch.randint(0, config.vocab_size, (128, 64)) for _ in range(2))
    reference = head_gradient(model, idx, targets, chunked=False, dtype=torch.float32, loss_scale=1.0)

    def error(chunked: bool) -> float:
        grad = head_gradient(model, idx, targets, chunked, torch.float16, loss_scale=65536.0)  # GradScaler's first
        return ((grad - reference).norm() / reference.norm()).item()

    plain, chunked = error(False), error(True)
    assert plain < 1e-3  # the comparison means something: fp16 autocast's own rounding
    assert chunked < 2 * plain, f"fp16 head gradient off fp32 by {chunked:.2e} chunked, {plain:.2e} plain"


# ---------------------------------------------------------------------------------------------------------------
# the MFU peak table


@pytest.mark.parametrize("name, dtype, tflops", [
    ("NVIDIA L40", torch.bfloat16, 181.0),
    ("NVIDIA L40S", torch.bfloat16, 362.0),
    ("NVIDIA L4", torch.bfloat16, 121.0),
    ("NVIDIA H100 PCIe", torch.bfloat16, 756.0),
    ("NVIDIA H100 80GB HBM3", torch.bfloat16, 989.0),
    ("NVIDIA H100 NVL", torch.float16, 835.0),
    ("NVIDIA H200", torch.float32, 495.0),
    ("NVIDIA A100-SXM4-80GB", torch.float32, 156.0),
    ("Tesla V100-SXM2-16GB", torch.float16, 125.0),
    ("Tesla V100-SXM2-16GB", torch.float32, 15.7),  # no TF32 before Ampere
    ("Tesla T4", torch.float32, 8.1),
    ("NVIDIA GeForce RTX 4090", torch.bfloat16, 165.0),
    ("NVIDIA B200", torch.bfloat16, None),
])
def test_peak_table_matches_whole_words_of_the_device_name(name, dtype, tflops):
    assert tg.gpu_peak_tflops(name, dtype) == tflops


# ---------------------------------------------------------------------------------------------------------------
# out of memory, the process group's timeout, memory-mapped checkpoints


def test_out_of_memory_is_one_line_naming_the_batch_size(monkeypatch, capsys, tmp_path):
    data = str(tmp_path / "shards")
    make_shards(data)

    def forward(self, idx, targets=None, cache=None):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.50 GiB. GPU 0 has a total capacity of "
                                     "23.55 GiB of which 1.02 GiB is free. Of the allocated memory 20.1 GiB is ...")

    monkeypatch.setattr(tg.GPT, "forward", forward)
    with pytest.raises(SystemExit) as exit_info:
        tg.main(TINY + ["--data_dir", data, "--out_dir", str(tmp_path / "out"), "--max_steps", "2", "--val_every", "0"])
    assert exit_info.value.code != 0
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    for fragment in ("out of memory", "--batch_size 4", "1.50 GiB", "23.55 GiB", "benchmarks/memory_table.py"):
        assert fragment in lines[0], (fragment, lines[0])


def test_dist_timeout_reaches_the_process_group(monkeypatch):
    seen = {}
    monkeypatch.setattr(tg.dist, "rendezvous", lambda url: iter([(tg.dist.HashStore(), 0, 2)]))
    monkeypatch.setattr(tg.dist, "init_process_group", lambda **kwargs: seen.update(kwargs))
    for argv, minutes in (([], 30), (["--dist_timeout", "90"], 90)):
        trainer = types.SimpleNamespace(distributed=True, device=torch.device("cpu"), dtype=torch.float32, rank=0,
                                        world_size=2, settings=tg.parse_settings(argv))
        tg.Trainer.start_processes(trainer)
        assert seen["timeout"] == datetime.timedelta(minutes=minutes) and seen["backend"] == "gloo"


def test_a_checkpoint_is_memory_mapped_not_read_whole(tmp_path):
    """Every rank of a node loads the checkpoint: mapped, they share the page cache instead of each holding a copy.
    In a fresh process, loading a 400 MB checkpoint must not add 400 MB to the resident set until it is used."""
    path = str(tmp_path / "ckpt_0000001.pt")
    torch.save({"model": {"w": torch.arange(100_000_000, dtype=torch.float32)}, "step": 1}, path)
    probe = (
        "import sys, train_gpt2 as tg\n"
        "def rss(): return int(open('/proc/self/statm').read().split()[1]) * 4096\n"
        "before = rss(); ckpt = tg.load_checkpoint(sys.argv[1]); after = rss()\n"
        "print(after - before, ckpt['step'], float(ckpt['model']['w'][12_345_678]))\n"
    )
    r = subprocess.run([sys.executable, "-c", probe, path], capture_output=True, text=True, cwd=ROOT, timeout=300,
                       env={**os.environ, "PYTHONPATH": ROOT})
    assert r.returncode == 0, r.stderr
    added, step, last = r.stdout.split()
    assert int(step) == 1 and float(last) == 12_345_678  # the data reads back
    assert int(added) < 100_000_000, f"loading added {int(added) / 1e6:.0f} MB resident"
