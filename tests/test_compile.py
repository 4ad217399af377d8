"""The training step under torch.compile and its host synchronisations, measured in the trainer's own loop.

- compile: for the classic GPT-2, the modern (RMSNorm, RoPE, SwiGLU, grouped-query attention, no biases) and the
  speedrun variants, with the chunked and the plain loss, `train_gpt2.main([... "--compile"])` runs its real train
  loop (autocast as the trainer picks it, backward, clip_grad_norm_, that variant's optimizers) with torch.compile's
  backend swapped for aot_eager (the forward and backward graphs are traced exactly as Inductor would get them, minus
  the C++ compile). Dynamo's counters must show no graph break and no new graph after the first step.
- syncs: every host synchronisation a CUDA run would make (a scalar read: .item(), bool(), float(), int(), a
  format; .tolist(), .cpu(), .numpy(); data-dependent shapes: nonzero, boolean-mask indexing, unique, ...; and the
  trainer's synchronize(device), which is torch.cuda.synchronize there) is counted between the starts of consecutive
  optimizer steps, the step boundary being the trainer's call of lr_at. Startup, the first step and the last step
  (which saves the checkpoint) are left out; every step in between may sync at most once.

Everything runs in this process on the CPU, on a 2-layer, 64-wide model; and the command line under --compile (with
inductor, in a forked process) trains, evaluates and samples as the eager run does."""

import functools
import os
import traceback

import pytest
import torch
from torch._dynamo.utils import counters
from torch.utils._python_dispatch import TorchDispatchMode

import train_gpt2 as tg
from conftest import TINY, cli, loss_and_grads, ok, read_log, run_cli

pytestmark = pytest.mark.usefixtures("global_state")  # in-process runs: seeds and one thread, put back after

# d2's depth at a quarter of its width, 4 heads of 16; 2 micro-steps of 4 x 32 tokens per optimizer step. The
# evaluation, sampling and periodic checkpoints are off: only the final save (after the last step) happens.
BASE = ["--model", "d2", "--n_embd", "64", "--n_head", "4", "--seq_len", "32", "--batch_size", "4",
        "--total_batch_size", "256", "--val_every", "0", "--sample_every", "0", "--save_every", "0",
        "--peak_tflops", "1", "--device", "cpu"]
VARIANTS = {
    "classic": ["--warmup_steps", "2"],
    "modern": ["--warmup_steps", "2", "--norm", "rmsnorm", "--pos", "rope", "--mlp", "swiglu", "--no-bias",
               "--n_kv_head", "2"],  # grouped-query: 2 key/value heads for 4 query heads
    "speedrun": ["--recipe", "speedrun"],  # BOS-aligned rows, hence shards of documents
}
LOSSES = {"chunked": "--chunked_loss", "plain": "--no-chunked_loss"}
TRAINER = os.path.abspath(tg.__file__)


class StartList(list):
    callback = staticmethod(lambda: None)


@pytest.fixture
def step_starts(monkeypatch):
    """A list that gets a callback's value appended at the start of every optimizer step of tg.train (its lr_at
    call); the callback is settable through the list's .callback."""
    starts = StartList()
    lr_at = tg.lr_at

    def marked(*args, **kwargs):
        starts.append(starts.callback())
        return lr_at(*args, **kwargs)

    monkeypatch.setattr(tg, "lr_at", marked)
    return starts


def trainer_frame(stack) -> str:
    """The innermost line of train_gpt2.py in a stack, as 'train_gpt2.py:LINE in FUNC: code'."""
    frames = [f for f in stack if os.path.abspath(f.filename) == TRAINER]
    if not frames:
        return "(outside train_gpt2.py) " + " <- ".join(f"{os.path.basename(f.filename)}:{f.lineno}"
                                                        for f in stack[-3:])
    f = frames[-1]
    return f"train_gpt2.py:{f.lineno} in {f.name}: {f.line}"


# ---------------------------------------------------------------------------------------------------------------
# torch.compile: no graph breaks, no recompiles


def compiled_run(monkeypatch, step_starts, argv):
    """main(argv) with torch.compile on aot_eager; returns (graphs at the start of each step, graphs at the end, the
    graph-break reasons, the guard failures that made dynamo recompile, AOTAutograd's counters)."""
    torch._dynamo.reset()
    counters.clear()
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    step_starts.callback = lambda: (counters["stats"]["unique_graphs"], counters["frames"]["total"])
    ok(cli(argv))
    end = (counters["stats"]["unique_graphs"], counters["frames"]["total"])
    breaks = {reason.split("\n")[0]: n for reason, n in counters["graph_break"].items()}
    aot = dict(counters["aot_autograd"])
    recompiles = {}  # the first line of each distinct guard failure, per recompiled function
    for code, reasons in torch._dynamo.utils.guard_failures.items():
        lines = dict.fromkeys(str(r).split("\n")[0].split(": ", 1)[-1] for r in reasons)
        recompiles[f"{os.path.basename(code.co_filename)}:{code.co_firstlineno} {code.co_name}"] = list(lines)[:5]
    torch._dynamo.reset()
    return list(step_starts), end, breaks, recompiles, aot


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_training_step_compiles_to_one_graph_without_recompiles(monkeypatch, step_starts, docs, tmp_path, variant,
                                                                loss):
    argv = BASE + VARIANTS[variant] + [LOSSES[loss], "--compile", "--max_steps", "4", "--data_dir", docs,
                                       "--out_dir", str(tmp_path / "out")]
    starts, end, breaks, recompiles, aot = compiled_run(monkeypatch, step_starts, argv)
    assert len(starts) == 4
    assert starts[0] == (0, 0), "nothing is compiled before the first step"
    assert breaks == {}, f"graph breaks (reason: count; TORCH_LOGS=graph_breaks shows the line): {breaks}"
    assert recompiles == {}, f"recompiles (function: guard failures): {recompiles}"
    # the forward and backward were traced by AOTAutograd, not left to run eagerly after a failed trace
    assert aot.get("total", 0) >= 1 and aot.get("ok") == aot["total"], f"AOTAutograd: {aot}"
    graphs_after_step_1, graphs_after_step_3 = starts[1], starts[3]
    assert graphs_after_step_1[0] == 1, f"(graphs, frames) after step 1: {graphs_after_step_1}: expected one graph"
    assert graphs_after_step_3 == graphs_after_step_1 == end, \
        f"(graphs, frames) at the start of steps 1-4: {starts}, at the end: {end}: steps 2-4 compiled again"


def test_evaluation_between_steps_compiles_once_and_then_reuses_both_graphs(monkeypatch, step_starts, docs, tmp_path):
    """The trainer's validation shares the compiled model (eval mode, no grad): one more graph, compiled at the
    first evaluation; switching back and forth after that compiles nothing."""
    argv = BASE + VARIANTS["classic"] + ["--compile", "--max_steps", "6", "--val_every", "2", "--val_tokens", "256",
                                         "--data_dir", docs, "--out_dir", str(tmp_path / "out")]
    starts, end, breaks, _, _ = compiled_run(monkeypatch, step_starts, argv)
    assert breaks == {}, f"graph breaks (reason: count; TORCH_LOGS=graph_breaks shows the line): {breaks}"
    # step 0's evaluation compiles the eval graph before the first step, step 1 the training graph
    assert starts[1][0] == 2 and starts[1] == end, f"(graphs, frames) at the start of steps 1-6: {starts}, end: {end}"


def traced(model: tg.GPT, idx: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, dict, set[str]]:
    """Loss and gradients of model compiled with a backend that runs dynamo's graph as traced, and the names of the
    functions that graph calls."""
    calls = set()

    def backend(gm, example_inputs):
        calls.update(getattr(n.target, "__name__", str(n.target)) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    torch._dynamo.reset()
    _, loss, grads = loss_and_grads(model, idx, targets, forward=torch.compile(model, backend=backend, fullgraph=True))
    torch._dynamo.reset()
    return loss, grads, calls


@pytest.mark.parametrize("seq_len", [32, tg.CPU_EXPLICIT_ATTENTION_MAX_LEN + 8])
def test_compiled_cpu_forms_give_the_eager_loss_and_gradients(seq_len):
    """Compiled on a CPU, GPT-2's tanh-GELU is written as x sigmoid(2u) and short sequences attend through the
    explicit softmax(QK^T)V (both faster under Inductor there): the traced graph must use those forms, and only up to
    CPU_EXPLICIT_ATTENTION_MAX_LEN positions, and give the eager model's F.gelu + SDPA loss and gradients (fp32)."""
    torch.manual_seed(0)
    model = tg.GPT(tg.GPTConfig(block_size=seq_len, n_layer=2, n_head=4, n_embd=64))
    idx, targets = torch.randint(0, 50257, (2, 2, seq_len))
    _, loss, grads = loss_and_grads(model, idx, targets)
    compiled_loss, compiled_grads, calls = traced(model, idx, targets)
    assert "gelu" not in calls and "sigmoid" in calls, sorted(calls)
    explicit = seq_len <= tg.CPU_EXPLICIT_ATTENTION_MAX_LEN
    assert ("scaled_dot_product_attention" in calls) != explicit, sorted(calls)
    assert compiled_loss.item() == pytest.approx(loss.item(), rel=1e-6)
    for n, g in grads.items():
        torch.testing.assert_close(compiled_grads[n], g, rtol=1e-4, atol=1e-6, msg=n)


# ---------------------------------------------------------------------------------------------------------------
# host synchronisations: at most one per training step

SYNC_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "_unique", "_unique2", "unique_dim",
            "unique_consecutive", "equal", "allclose", "is_nonzero"}


class SyncRecorder(TorchDispatchMode):
    """Every op that makes a CUDA device hand a value to the host, with the trainer line it came from; `step` is the
    step the events are filed under."""

    def __init__(self):
        super().__init__()
        self.step = 0
        self.events: list[tuple[int, str, str]] = []

    def note(self, what: str) -> None:
        self.events.append((self.step, what, trainer_frame(traceback.extract_stack()[:-2])))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name in SYNC_OPS:
            self.note(f"aten.{name}")
        elif name in ("index", "index_put", "index_put_") and any(
                isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in (args[1] or ())):
            self.note(f"aten.{name} with a boolean mask")
        elif name == "repeat_interleave" and func._overloadname == "Tensor" and kwargs.get("output_size") is None:
            self.note("aten.repeat_interleave with tensor repeats and no output_size")
        return func(*args, **kwargs)


@pytest.mark.parametrize("variant", VARIANTS)
def test_at_most_one_host_sync_per_training_step(monkeypatch, step_starts, docs, tmp_path, variant):
    recorder = SyncRecorder()
    for method in ("tolist", "cpu", "numpy"):  # these read the data without an aten op the mode would see
        original = getattr(torch.Tensor, method)

        def counted(self, *args, _original=original, _method=method, **kwargs):
            recorder.note(f"Tensor.{_method}()")
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, method, counted)
    to = torch.Tensor.to

    def counted_to(self, *args, **kwargs):
        # a copy to the host, written as .to("cpu"): here `device` is the CPU too, so .to(device) (a host-to-device
        # copy on CUDA) cannot be told apart and is not counted
        if "cpu" in (*args, kwargs.get("device")) and not kwargs.get("non_blocking", False):
            recorder.note('Tensor.to("cpu")')
        return to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", counted_to)
    synchronize = tg.synchronize

    def counted_synchronize(device):
        recorder.note("synchronize(device) (torch.cuda.synchronize on CUDA)")
        return synchronize(device)

    monkeypatch.setattr(tg, "synchronize", counted_synchronize)

    def next_step():
        recorder.step += 1
        return recorder.step

    step_starts.callback = next_step
    n_steps = 5
    argv = BASE + VARIANTS[variant] + ["--max_steps", str(n_steps), "--data_dir", docs,
                                       "--out_dir", str(tmp_path / "out")]
    with recorder:
        ok(cli(argv))
    assert list(step_starts) == list(range(1, n_steps + 1))
    steady = range(2, n_steps)  # not the first step (optimizer state is created), nor the last (the final save)
    per_step = {s: [(what, where) for step, what, where in recorder.events if step == s] for s in steady}
    worst = max(per_step.values(), key=len)
    assert all(len(events) <= 1 for events in per_step.values()), (
        f"host syncs per steady-state step: {[len(e) for e in per_step.values()]} (at most 1 allowed); one step's:\n"
        + "\n".join(f"  {what} at {where}" for what, where in worst))


# ---------------------------------------------------------------------------------------------------------------
# the command line under --compile, with inductor: the eager run's numbers


def test_compiled_run_trains_evaluates_and_samples_like_eager(data_dir, tmp_path):
    common = TINY + ["--data_dir", data_dir, "--max_steps", "2", "--val_every", "2", "--sample_every", "2"]
    eager, compiled = str(tmp_path / "eager"), str(tmp_path / "compiled")
    r1 = run_cli(common + ["--out_dir", eager, "--no-compile"])
    r2 = run_cli(common + ["--out_dir", compiled, "--compile"])
    assert r1.returncode == 0 and r2.returncode == 0, r1.stderr + r2.stderr
    assert "compile True" in r2.stdout and "sample:" in r2.stdout
    for a, b in zip(read_log(eager), read_log(compiled)):
        for key in ("train_loss", "val_loss", "grad_norm"):
            if key in a:  # inductor fuses differently: equal up to fp32 rounding
                assert a[key] == pytest.approx(b[key], rel=1e-4)
    assert "val_loss" in read_log(compiled)[-1]
