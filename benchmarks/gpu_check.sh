#!/usr/bin/env bash
# gpu_check.sh: one offline check of train_gpt2.py on a CUDA GPU, in at most 8 minutes on one H200.
#
#   bash benchmarks/gpu_check.sh                 # on a CUDA machine (needs only torch, numpy, tiktoken, tqdm)
#   bash benchmarks/gpu_check.sh --cpu-smoke     # the same steps on CPU with the d2 preset, in a few minutes
#   PYTHON=/path/to/python bash benchmarks/gpu_check.sh    # another interpreter than the `python` on PATH
#
# What it does, all on synthetic token shards written to a temporary folder (no network, no dataset):
#   preflight  torch.compile builds one small kernel on the device, with Inductor's caches off, so a machine
#           without a working C compiler fails here in one line, not in the middle of a run
#   shards  a fixed random sequence of 1009 tokens (127 in the smoke) repeated, so the loss can fall within 300
#           steps, written with gpt2_tokens.write_shard as two train shards and one val shard
#   ladder  python benchmarks/bench_step.py --ladder --model gpt2 --seq_len 1024 --batch_size 16: each
#           optimisation added in turn; its last two rows are torch.compile with the plain head and with the
#           chunked linear + cross-entropy, side by side. PASS if it runs and prints all its rows.
#   loss    the chunked head against the plain one on a small d2 model, over several chunks, with ignored
#           positions: bf16 and fp16 autocast (fp16 with GradScaler's first scale, 65536), eager and compiled.
#           PASS if each pair's losses agree to 1e-2 and the chunked gradients are as close to fp32 as the plain
#           ones (within twice their error).
#   ddp     one training step of a compiled d2 model wrapped in DDP on one rank (NCCL on a GPU, gloo in the
#           smoke), beside the same step without DDP. PASS if the losses, gradients and updated weights agree.
#   train   a 300-step compiled gpt2 run (bf16 autocast, checkpoints every 150 steps, --keep_last 1).
#           PASS if the final checkpoint is there and the last train loss in log.jsonl is below half the first.
#   fp16    a short eager run in fp16 with its GradScaler (150 steps of gpt2; 24 of d2 in the smoke).
#           PASS if the last train loss is below half the first and the saved loss scale is finite.
#   resume  an uninterrupted 40-step run, and the same run sent SIGTERM after a few steps (train_gpt2 saves a
#           checkpoint and exits cleanly) then continued with --resume auto. PASS if every step's loss and the
#           final weights agree with the uninterrupted run's: exactly on CPU; on CUDA (fp32, eager, where
#           attention's backward uses atomics) within 1e-4. Both differences are printed either way.
# then a summary: GPU, torch version, ms/step, tok/s, MFU and peak memory of the ladder rows, the training run's
# median tok/s and MFU, and PASS/FAIL per check. The exit status is non-zero if any check failed.
#
# Options:   --cpu-smoke        run on CPU with tiny settings (d2, T=32, B=4; the ladder's compile rows and the
#                               loss and ddp checks run eagerly via TORCH_COMPILE_DISABLE=1, the training run
#                               and the preflight are compiled)
#            --only LIST        run only these checks, comma-separated from ladder,loss,ddp,train,fp16,resume
#                               (others SKIP; the preflight always runs)
#            --keep             keep the temporary folder (its path is printed) instead of deleting it
# Environment: PYTHON (default python), GPU_CHECK_BATCH (ladder and training micro-batch, default 16 on GPU; lower
#   it on a GPU with less than 80 GiB), GPU_CHECK_PEAK_TFLOPS (for MFU on a GPU missing from train_gpt2's table),
#   GPU_CHECK_TRAIN_FLAGS (extra train_gpt2.py flags appended to the training run, e.g. "--lr 0" to watch the
#   loss check fail), GPU_CHECK_BUDGET_S (seconds for the whole script, default 480 on GPU, 420 with --cpu-smoke;
#   each step is stopped and FAILs once the budget is spent).
set -euo pipefail

PYTHON=${PYTHON:-python}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }

MODE=gpu
ONLY=ladder,loss,ddp,train,fp16,resume
KEEP=0
while (($#)); do
    case $1 in
        --cpu-smoke) MODE=cpu ;;
        --only) [[ $# -ge 2 ]] || { echo "gpu_check: --only needs a list, e.g. --only train,resume" >&2; exit 2; }
                ONLY=$2; shift ;;
        --keep) KEEP=1 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "gpu_check: unknown option '$1' (see --help)" >&2; exit 2 ;;
    esac
    shift
done
CHECKS=(ladder loss ddp train fp16 resume)
for c in ${ONLY//,/ }; do
    [[ " ${CHECKS[*]} " == *" $c "* ]] || { echo "gpu_check: unknown check '$c' in --only (choose from ${CHECKS[*]})" >&2; exit 2; }
done
wanted() { [[ ",$ONLY," == *",$1,"* ]]; }

# ---- settings: the GPU run, and the CPU smoke that walks the same code paths in a few minutes
if [[ $MODE == gpu ]]; then
    DEVICE=cuda
    MODEL=gpt2 T=1024 B=${GPU_CHECK_BATCH:-16}
    PERIOD=1009 TRAIN_TOKENS=1000000 VAL_TOKENS=100000   # two train shards of this size each
    BENCH_STEPS=10 BENCH_WARMUP=3 LADDER_ENV=()
    LOSS_B=8 LOSS_T=256 EAGER_ENV=()   # 2,048 positions: two of a GPU's 1,024-row loss chunks
    TRAIN_STEPS=300 TRAIN_WARMUP=30 TRAIN_LR=6e-4 TRAIN_DTYPE=auto
    FP16_STEPS=150 FP16_WARMUP=15
    RESUME_STEPS=40 RESUME_B=$((B / 2 > 0 ? B / 2 : 1)) RESUME_ACCUM=2 RESUME_LR=6e-4 RESUME_TOL=1e-4 RESUME_PEAK=()
    BUDGET=${GPU_CHECK_BUDGET_S:-480}
    LADDER_CAP=270 LOSS_CAP=150 DDP_CAP=120 TRAIN_CAP=180 FP16_CAP=120 RESUME_CAP=120   # per step: a hang guard
else
    DEVICE=cpu
    MODEL=d2 T=32 B=4
    PERIOD=127 TRAIN_TOKENS=20000 VAL_TOKENS=4000
    BENCH_STEPS=2 BENCH_WARMUP=1 LADDER_ENV=(TORCH_COMPILE_DISABLE=1)   # inductor on 2 cores: ~15 s a compile
    LOSS_B=4 LOSS_T=64 EAGER_ENV=(TORCH_COMPILE_DISABLE=1)
    TRAIN_STEPS=60 TRAIN_WARMUP=5 TRAIN_LR=3e-3 TRAIN_DTYPE=fp32
    FP16_STEPS=24 FP16_WARMUP=2   # fp16 matmuls are emulated on a CPU, far slower than fp32
    RESUME_STEPS=16 RESUME_B=4 RESUME_ACCUM=2 RESUME_LR=3e-3 RESUME_TOL=0
    RESUME_PEAK=(--peak_tflops 1)   # no CPU matmul probe (1.5 s a process) for runs whose MFU is not reported
    BUDGET=${GPU_CHECK_BUDGET_S:-420}
    LADDER_CAP=120 LOSS_CAP=120 DDP_CAP=120 TRAIN_CAP=120 FP16_CAP=120 RESUME_CAP=60
fi
PEAK=()
[[ -n ${GPU_CHECK_PEAK_TFLOPS:-} ]] && PEAK=(--peak_tflops "$GPU_CHECK_PEAK_TFLOPS")
read -r -a TRAIN_EXTRA <<< "${GPU_CHECK_TRAIN_FLAGS:-}"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
cleanup() {
    if ((KEEP)); then echo "gpu_check: kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'echo "gpu_check: interrupted" >&2; exit 130' INT TERM
DATA=$WORK/data

# ---- helpers. A check runs in a subshell with errexit on; it ends by calling pass or fail, which record its
# verdict in $WORK/<check>.result; lines for the summary go to $WORK/<check>.info.
pass() { printf 'PASS\t%s\n' "$1" > "$WORK/$CHECK.result"; exit 0; }
fail() {
    printf 'FAIL\t%s\n' "$1" > "$WORK/$CHECK.result"
    echo "gpu_check: FAIL $CHECK: $1" >&2
    exit 1
}
# verdict FILE: pass or fail with the PASS/FAIL<tab>detail line a Python step wrote to FILE
verdict() {
    local v d
    IFS=$'\t' read -r v d < "$1" || true
    [[ $v == PASS ]] && pass "$d"
    fail "${d:-no verdict in $1}"
}

# seconds a step may run: its cap, or what is left of the budget
allowance() {
    local left=$((BUDGET - SECONDS))
    ((left < $1)) && echo "$left" || echo "$1"
}

# run_logged CAP LOG CMD...: run CMD (output shown and kept in LOG) under a time limit; fail the check on a timeout
# or a non-zero exit, naming the step and showing its last lines
run_logged() {
    local cap=$1 log=$2 t rc
    shift 2
    t=$(allowance "$cap")
    ((t > 0)) || fail "no time left in the ${BUDGET}s budget for $(basename "$log" .out)"
    set +e
    timeout --kill-after=20 "$t" "$@" 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
    set -e
    if ((rc == 124 || rc == 137)); then
        fail "$(basename "$log" .out) timed out after ${t}s (budget ${BUDGET}s for the whole script)"
    elif ((rc != 0)); then
        echo "---- last lines of $log ----" >&2
        tail -n 15 "$log" >&2
        fail "$(basename "$log" .out) exited with status $rc: $(grep -m1 '^error:' "$log" || tail -n 1 "$log")"
    fi
}

run_check() {
    CHECK=$1
    echo
    echo "==== $CHECK ($((SECONDS))s elapsed) ===="
    set +e
    (set -e; "check_$CHECK")
    local rc=$?
    set -e
    if [[ ! -s $WORK/$CHECK.result ]]; then
        printf 'FAIL\t%s\n' "stopped with status $rc before reporting a result (see the output above)" > "$WORK/$CHECK.result"
    fi
}

# ---- the checks

make_shards() {
    "$PYTHON" - "$DATA" "$PERIOD" "$TRAIN_TOKENS" "$VAL_TOKENS" <<'EOF'
import os, sys
import numpy as np
import gpt2_tokens
import train_gpt2 as tg

data, period, n_train, n_val = sys.argv[1], *map(int, sys.argv[2:])
os.makedirs(data, exist_ok=True)
pattern = np.random.default_rng(0).integers(0, tg.GPT2_VOCAB_SIZE, period, dtype=np.uint16)
stream = np.resize(pattern, 2 * n_train)  # the pattern over and over, across the shard boundary
for i, part in enumerate((stream[:n_train], stream[n_train:]), start=1):
    gpt2_tokens.write_shard(os.path.join(data, f"gpucheck_train_{i:06d}.bin"), part)
gpt2_tokens.write_shard(os.path.join(data, "gpucheck_val_000000.bin"), np.resize(pattern, n_val))
assert len(tg.TokenStream(data, "train")) == 2 * n_train and tg.find_shards(data, "val")
print(f"shards: 2 x {n_train:,} train + {n_val:,} val tokens in {data} (a random {period}-token sequence, repeated)")
EOF
}

check_ladder() {
    run_logged "$LADDER_CAP" "$WORK/ladder.out" env ${LADDER_ENV[@]+"${LADDER_ENV[@]}"} "$PYTHON" -u \
        benchmarks/bench_step.py --ladder --model "$MODEL" --seq_len "$T" --batch_size "$B" --device "$DEVICE" \
        --steps "$BENCH_STEPS" --warmup "$BENCH_WARMUP" --data_dir "$DATA" ${PEAK[@]+"${PEAK[@]}"}
    "$PYTHON" - "$WORK/ladder.out" "$MODE" "$WORK/ladder.info" > "$WORK/ladder.verdict" <<'EOF' \
        || fail "reading the ladder's table crashed (see above)"
import math, sys

out, mode, info = sys.argv[1:4]
rows, loader = [], ""
for line in open(out):
    if line.startswith("loader:"):
        loader = line.strip()
    if not line.startswith("| ") or line.startswith("| step |"):
        continue
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    if cells[1].startswith("skipped"):
        rows.append({"name": cells[0], "skipped": cells[1]})
    else:
        rows.append({"name": cells[0], "ms": float(cells[1]), "tok": float(cells[2].replace(",", "")),
                     "mfu": cells[3], "mem": cells[4]})
timed = [r for r in rows if "tok" in r]
compiled = rows[-2:] if len(rows) == 8 else []
with open(info, "a") as f:
    for r in rows:
        if "skipped" in r:
            f.write(f"  {r['name']:<56} {r['skipped']}\n")
        else:
            f.write(f"  {r['name']:<56} {r['ms']:9.1f} ms {r['tok']:>12,.0f} tok/s  MFU {r['mfu']:>6}  {r['mem']:>10}\n")
    if loader:
        f.write(f"  {loader}\n")
    if compiled and all("tok" in r for r in compiled):
        plain, chunked = compiled
        note = " (--cpu-smoke: compile disabled, both eager)" if mode == "cpu" else ""
        f.write(f"  chunked vs plain head, compiled{note}: {chunked['tok'] / plain['tok']:.2f}x tok/s "
                f"({plain['tok']:,.0f} -> {chunked['tok']:,.0f}), peak memory {plain['mem']} -> {chunked['mem']}\n")
if len(rows) != 8:
    print(f"FAIL\tthe ladder printed {len(rows)} rows, expected 8")
elif not all("tok" in r for r in compiled):
    print("FAIL\tits last two rows (torch.compile with the plain head, the chunked loss) were not timed")
elif not all(math.isfinite(r["tok"]) and r["tok"] > 0 for r in timed):
    print("FAIL\ta row has no positive, finite tok/s")
else:
    print(f"PASS\t{len(timed)} of {len(rows)} rows timed; chunked vs plain head: "
          f"{compiled[1]['tok'] / compiled[0]['tok']:.2f}x tok/s")
EOF
    verdict "$WORK/ladder.verdict"
}

# short_run CAP NAME STEPS WARMUP FLAGS...: a train_gpt2.py run of the model on the shards, one micro-step a step, no
# evaluation, its output in $WORK/NAME.out and its out_dir $WORK/NAME; FLAGS come last, so they can override
short_run() {
    local cap=$1 name=$2 steps=$3 warmup=$4
    shift 4
    run_logged "$cap" "$WORK/$name.out" "$PYTHON" -u train_gpt2.py --model "$MODEL" --seq_len "$T" \
        --batch_size "$B" --total_batch_size $((B * T)) --max_steps "$steps" --warmup_steps "$warmup" \
        --lr "$TRAIN_LR" --device "$DEVICE" --val_every 0 --sample_every 0 --data_dir "$DATA" --out_dir "$WORK/$name" \
        "$@"
}

check_train() {
    local out=$WORK/train
    short_run "$TRAIN_CAP" train "$TRAIN_STEPS" "$TRAIN_WARMUP" --dtype "$TRAIN_DTYPE" --compile \
        --save_every $((TRAIN_STEPS / 2)) --keep_last 1 ${PEAK[@]+"${PEAK[@]}"} ${TRAIN_EXTRA[@]+"${TRAIN_EXTRA[@]}"}
    "$PYTHON" - "$out" "$WORK/train.info" > "$WORK/train.verdict" <<'EOF' || fail "reading the run's log crashed (see above)"
import json, math, os, statistics, sys
import torch
import train_gpt2 as tg

out, info = sys.argv[1], sys.argv[2]
steps = [r for r in map(json.loads, open(os.path.join(out, "log.jsonl"))) if "train_loss" in r]
if not steps:
    sys.exit(print("FAIL\tlog.jsonl has no train_loss records"))
first, last = steps[0]["train_loss"], steps[-1]["train_loss"]
timed = steps[max(1, len(steps) // 10):] or steps  # past step 1, which compiles
mfus = [r["mfu"] for r in timed if r.get("mfu") is not None]
mfu = f"{100 * statistics.median(mfus):.1f}%" if mfus else "n/a"
saved = tg.list_checkpoints(out)
with open(info, "a") as f:
    f.write(f"  {len(steps)} steps: median {statistics.median(r['tok_per_s'] for r in timed):,.0f} tok/s, MFU {mfu}, "
            f"{statistics.median(r['dt_ms'] for r in timed):.1f} ms/step over steps {timed[0]['step']}-{timed[-1]['step']}; "
            f"first step (with the compile) {steps[0]['dt_ms'] / 1000:.1f} s\n")
    f.write(f"  train loss {first:.4f} -> {last:.4f}; checkpoints left: "
            f"{', '.join(map(os.path.basename, saved)) or 'none'}\n")
numbers = f"loss {first:.4f} -> {last:.4f} (must end below half the first: {first / 2:.4f})"
if not (math.isfinite(first) and math.isfinite(last) and last < first / 2):
    sys.exit(print(f"FAIL\ttrain loss did not fall: {numbers}"))
if not saved:
    sys.exit(print("FAIL\tno checkpoint in the output folder"))
ckpt = torch.load(saved[-1], map_location="cpu", weights_only=True, mmap=True)
if len(saved) != 1 or ckpt["step"] != steps[-1]["step"] or ckpt["step"] != ckpt["settings"]["max_steps"]:
    sys.exit(print(f"FAIL\tcheckpoints {[os.path.basename(p) for p in saved]} do not match the {steps[-1]['step']} "
                   f"steps logged of --max_steps {ckpt['args']['max_steps']} with --keep_last 1"))
print(f"PASS\t{numbers}; {os.path.basename(saved[-1])} reads back")
EOF
    verdict "$WORK/train.verdict"
}

check_loss() {
    run_logged "$LOSS_CAP" "$WORK/loss.out" env ${EAGER_ENV[@]+"${EAGER_ENV[@]}"} "$PYTHON" - "$DEVICE" "$MODE" \
        "$LOSS_B" "$LOSS_T" "$WORK/loss.info" "$WORK/loss.verdict" <<'EOF'
import math, sys
import torch
import train_gpt2 as tg

device, mode, B, T, info, verdict = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), *sys.argv[5:7]
if mode == "cpu":
    tg.LOSS_CHUNK_ROWS_CPU = 96  # several chunks at this small batch, as a GPU run has
torch.manual_seed(0)
config = tg.model_config("d2")
model = tg.GPT(config).to(device)
idx = torch.randint(0, config.vocab_size, (B, T), device=device)
targets = torch.randint(0, config.vocab_size, (B, T), device=device)
targets[0, : T // 4] = -1  # ignored positions, as document-aligned batches have


def loss_and_grads(forward, chunked, dtype):
    model.zero_grad(set_to_none=True)
    model.chunked_loss = chunked
    scale = 65536.0 if dtype == torch.float16 else 1.0  # GradScaler's first scale
    with torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype != torch.float32):
        _, loss = forward(idx, targets)
    (loss * scale).backward()
    return loss.item(), torch.cat([p.grad.double().flatten() / scale for p in model.parameters()])


_, reference = loss_and_grads(model, False, torch.float32)
compiled = torch.compile(model)
failures = []
with open(info, "a") as f:
    for dtype in (torch.bfloat16, torch.float16):
        for name, forward in (("eager", model), ("compiled", compiled)):
            (loss_p, grad_p), (loss_c, grad_c) = (loss_and_grads(forward, c, dtype) for c in (False, True))
            err_p, err_c = ((g - reference).norm().item() / reference.norm().item() for g in (grad_p, grad_c))
            dloss = abs(loss_c - loss_p) / abs(loss_p)
            row = f"{str(dtype)[6:]} {name}"
            f.write(f"  {row:<17} loss {loss_p:.4f} plain, {loss_c:.4f} chunked; gradient off fp32 by "
                    f"{err_p:.2e} plain, {err_c:.2e} chunked\n")
            if not (math.isfinite(loss_c) and dloss < 1e-2 and err_c <= 2 * err_p + 1e-4):
                failures.append(f"{row}: loss {loss_p:.4f} vs {loss_c:.4f}, gradient error {err_p:.2e} vs {err_c:.2e}")
    if mode == "cpu":
        f.write("  (--cpu-smoke: 'compiled' ran eagerly, TORCH_COMPILE_DISABLE=1)\n")
with open(verdict, "w") as f:
    if failures:
        f.write("FAIL\tchunked head off the plain one: " + "; ".join(failures) + "\n")
    else:
        f.write("PASS\tchunked = plain head in bf16 and fp16, eager and compiled (losses to 1e-2, gradients as close "
                "to fp32)\n")
EOF
    verdict "$WORK/loss.verdict"
}

check_ddp() {
    run_logged "$DDP_CAP" "$WORK/ddp.out" env ${EAGER_ENV[@]+"${EAGER_ENV[@]}"} "$PYTHON" - "$DEVICE" \
        "$WORK/ddp.store" "$WORK/ddp.info" "$WORK/ddp.verdict" <<'EOF'
import copy, sys
import torch
import torch.distributed as dist
import torch.nn as nn
import train_gpt2 as tg
from torch._dynamo.utils import counters

device_type, store_path, info, verdict = sys.argv[1:5]
cuda = device_type == "cuda"
dist.init_process_group("nccl" if cuda else "gloo", store=dist.FileStore(store_path, 1), rank=0, world_size=1)
device = torch.device("cuda", 0) if cuda else torch.device("cpu")
dtype = torch.bfloat16 if cuda else torch.float32
torch.manual_seed(0)
config = tg.model_config("d2")
alone = tg.GPT(config).to(device)
wrapped = copy.deepcopy(alone)
idx = torch.randint(0, config.vocab_size, (4, 128), device=device)
targets = torch.randint(0, config.vocab_size, (4, 128), device=device)
results = {}
for name, model, forward in (("alone", alone, torch.compile(alone)),
                             ("ddp", wrapped, nn.parallel.DistributedDataParallel(
                                 torch.compile(wrapped), device_ids=[0] if cuda else None))):
    graphs = counters["stats"]["unique_graphs"]
    optimizer = tg.adamw(list(model.parameters()), 1e-3, 0.1, device_type)
    with torch.autocast(device_type, dtype=dtype, enabled=dtype != torch.float32):
        _, loss = forward(idx, targets)
    loss.backward()
    grads = torch.cat([p.grad.double().flatten() for p in model.parameters()])
    optimizer.step()
    results[name] = (loss.item(), grads, torch.cat([p.detach().double().flatten() for p in model.parameters()]),
                     counters["stats"]["unique_graphs"] - graphs)
dist.destroy_process_group()
(loss_a, grad_a, w_a, graphs_a), (loss_d, grad_d, w_d, graphs_d) = results["alone"], results["ddp"]
dgrad = (grad_d - grad_a).norm().item() / grad_a.norm().item()
dw = (w_d - w_a).abs().max().item()
with open(info, "a") as f:
    f.write(f"  {'nccl' if cuda else 'gloo'}, {str(dtype)[6:]}: loss {loss_a:.5f} alone, {loss_d:.5f} under DDP; "
            f"gradients differ by {dgrad:.2e} (relative), weights after the step by {dw:.2e}; "
            f"graphs compiled: {graphs_a} alone, {graphs_d} under DDP\n")
good = abs(loss_d - loss_a) <= 1e-3 * abs(loss_a) and dgrad < 1e-2 and dw < 1e-3
with open(verdict, "w") as f:
    f.write(f"{'PASS' if good else 'FAIL'}\tone compiled DDP step: loss {loss_a:.5f} vs {loss_d:.5f}, gradients "
            f"{dgrad:.2e} apart, weights {dw:.2e}\n")
EOF
    verdict "$WORK/ddp.verdict"
}

check_fp16() {
    local out=$WORK/fp16
    short_run "$FP16_CAP" fp16 "$FP16_STEPS" "$FP16_WARMUP" --dtype fp16 --no-compile --save_every 0 \
        ${RESUME_PEAK[@]+"${RESUME_PEAK[@]}"}
    "$PYTHON" - "$out" "$WORK/fp16.info" > "$WORK/fp16.verdict" <<'EOF' || fail "reading the fp16 run crashed (see above)"
import json, math, os, sys
import torch
import train_gpt2 as tg

out, info = sys.argv[1], sys.argv[2]
steps = [r for r in map(json.loads, open(os.path.join(out, "log.jsonl"))) if "train_loss" in r]
saved = tg.list_checkpoints(out)
if not steps or not saved:
    sys.exit(print("FAIL\tthe fp16 run left no train_loss records or no checkpoint"))
scaler = torch.load(saved[-1], map_location="cpu", weights_only=True, mmap=True)["scaler"]
scale = scaler.get("scale", float("nan"))
first, last = steps[0]["train_loss"], steps[-1]["train_loss"]
numbers = f"loss {first:.4f} -> {last:.4f} over {len(steps)} steps, loss scale {scale:g} at the end"
with open(info, "a") as f:
    f.write(f"  {numbers}\n")
good = math.isfinite(first) and math.isfinite(last) and last < first / 2 and math.isfinite(scale) and scale > 0
print(f"{'PASS' if good else 'FAIL'}\t{numbers} (the loss must end below half the first)")
EOF
    verdict "$WORK/fp16.verdict"
}

check_resume() {
    local full=$WORK/resume_full cut=$WORK/resume_cut t pid n rc saved stopped
    local run=("$PYTHON" -u train_gpt2.py --model "$MODEL" --seq_len "$T" --batch_size "$RESUME_B"
               --total_batch_size $((RESUME_B * T * RESUME_ACCUM)) --max_steps "$RESUME_STEPS" --warmup_steps 1
               --lr "$RESUME_LR" --dtype fp32 --no-compile --device "$DEVICE" --val_every 0 --sample_every 0
               --save_every 0 --data_dir "$DATA" ${RESUME_PEAK[@]+"${RESUME_PEAK[@]}"})
    echo "---- uninterrupted: $RESUME_STEPS steps ----"
    run_logged "$RESUME_CAP" "$WORK/resume_full.out" "${run[@]}" --out_dir "$full"

    echo "---- the same run, sent SIGTERM once it has logged 3 steps ----"
    t=$(allowance "$RESUME_CAP")
    ((t > 0)) || fail "no time left in the ${BUDGET}s budget for the interrupted run"
    "${run[@]}" --out_dir "$cut" > "$WORK/resume_cut.out" 2>&1 &
    pid=$!
    trap 'kill -KILL $pid 2>/dev/null || true' EXIT
    n=0
    while kill -0 "$pid" 2>/dev/null && ((n < 3 && SECONDS < BUDGET)); do
        sleep 0.05
        if [[ -f $cut/log.jsonl ]]; then n=$(wc -l < "$cut/log.jsonl"); fi
    done
    kill -TERM "$pid" 2>/dev/null || true
    local deadline=$((SECONDS + t))
    while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then fail "the interrupted run did not exit within ${t}s of SIGTERM"; fi
    set +e; wait "$pid"; rc=$?; set -e
    trap - EXIT
    cat "$WORK/resume_cut.out"
    ((rc == 0)) || fail "the run sent SIGTERM exited with status $rc, not 0: $(tail -n 1 "$WORK/resume_cut.out")"
    grep -q "stopping after SIGTERM" "$WORK/resume_cut.out" \
        || fail "the run sent SIGTERM did not report 'stopping after SIGTERM' (did it finish all $RESUME_STEPS steps first?)"
    saved=$(cd "$cut" && ls ckpt_*.pt 2>/dev/null | tr '\n' ' ' || true)
    [[ $saved =~ ^ckpt_([0-9]{7})\.pt\ $ ]] && ((10#${BASH_REMATCH[1]} < RESUME_STEPS)) \
        || fail "after SIGTERM expected one checkpoint before step $RESUME_STEPS, found: ${saved:-none}"
    stopped=$((10#${BASH_REMATCH[1]}))

    echo "---- resumed with --resume auto from step $stopped ----"
    run_logged "$RESUME_CAP" "$WORK/resume_resumed.out" "${run[@]}" --out_dir "$cut" --resume auto
    grep -q "resumed from .* at step $stopped\$" "$WORK/resume_resumed.out" \
        || fail "the resumed run did not report 'resumed from ... at step $stopped'"

    "$PYTHON" - "$full" "$cut" "$RESUME_STEPS" "$stopped" "$RESUME_TOL" "$WORK/resume.info" > "$WORK/resume.verdict" \
        <<'EOF' || fail "comparing the runs crashed (see above)"
import json, os, sys
import torch

full, cut, info = sys.argv[1], sys.argv[2], sys.argv[6]
steps, stopped, tol = int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])


def losses(out):
    return {r["step"]: r["train_loss"] for r in map(json.loads, open(os.path.join(out, "log.jsonl"))) if "train_loss" in r}


def weights(out):
    return torch.load(os.path.join(out, f"ckpt_{steps:07d}.pt"), map_location="cpu", weights_only=True, mmap=True)["model"]


a, b = losses(full), losses(cut)
if sorted(a) != list(range(1, steps + 1)) or sorted(b) != sorted(a):
    sys.exit(print(f"FAIL\tlogged steps differ: uninterrupted {sorted(a)[:1]}..{sorted(a)[-1:]} ({len(a)}), "
                   f"interrupted + resumed {sorted(b)[:1]}..{sorted(b)[-1:]} ({len(b)})"))
wa, wb = weights(full), weights(cut)
if wa.keys() != wb.keys():
    sys.exit(print("FAIL\tthe final checkpoints hold different tensors"))
dloss = max(abs(a[s] - b[s]) for s in a)
dw = max((wa[k].double() - wb[k].double()).abs().max().item() for k in wa)
exact = dloss == 0 and all(torch.equal(wa[k], wb[k]) for k in wa)
what = (f"losses at all {steps} steps and final weights identical" if exact
        else f"max |loss diff| {dloss:.3g}, max |weight diff| {dw:.3g} over {steps} steps (tolerance {tol:g})")
with open(info, "a") as f:
    f.write(f"  SIGTERM at step {stopped} of {steps}, then --resume auto: {what}\n")
ok = exact or (dloss <= tol and dw <= tol)
print(f"{'PASS' if ok else 'FAIL'}\tstopped at step {stopped} and resumed: {what}")
EOF
    verdict "$WORK/resume.verdict"
}

# ---- preflight: what runs where
echo "gpu_check: mode $MODE, work folder $WORK, python $(command -v "$PYTHON" || echo "$PYTHON")"
if ! DEVICE_INFO=$("$PYTHON" - "$MODE" <<'EOF'
import os, sys
import torch

if sys.argv[1] == "gpu":
    if not torch.cuda.is_available():
        print("torch sees no CUDA GPU (run with --cpu-smoke on a machine without one)")
        sys.exit(1)
    p = torch.cuda.get_device_properties(0)
    print(f"GPU {torch.cuda.get_device_name(0)} ({p.total_memory / 2**30:.0f} GiB, {torch.cuda.device_count()} visible), "
          f"torch {torch.__version__}, CUDA {torch.version.cuda}")
else:
    print(f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads), torch {torch.__version__}")
EOF
); then
    echo "gpu_check: FAIL: $DEVICE_INFO" >&2
    exit 1
fi
echo "gpu_check: $DEVICE_INFO"
# Inductor's caches off: a kernel built on another day must not hide a machine that cannot build one now
if ! COMPILE_INFO=$(TORCHINDUCTOR_FORCE_DISABLE_CACHES=1 "$PYTHON" - "$DEVICE" 2> "$WORK/preflight.err" <<'EOF'
import sys
import torch

x = torch.randn(64, device=sys.argv[1])
try:
    y = torch.compile(lambda t: torch.sin(t) * 2 + 1)(x)
    torch.testing.assert_close(y, torch.sin(x) * 2 + 1)
except Exception as e:
    said = next((line.strip() for line in str(e).splitlines() if line.strip()), "")[:200]
    print(f"torch.compile cannot build a kernel on this machine ({type(e).__name__}: {said}); install a C compiler "
          "(e.g. apt-get install build-essential), or train with --no-compile")
    sys.exit(1)
print("torch.compile builds kernels here")
EOF
); then
    echo "gpu_check: FAIL: $COMPILE_INFO" >&2
    exit 1
fi
echo "gpu_check: $COMPILE_INFO"

CHECK=shards
make_shards

for c in "${CHECKS[@]}"; do
    wanted "$c" && run_check "$c"
done

# ---- summary
echo
echo "==================== gpu_check summary ===================="
echo "device: $DEVICE_INFO"
echo "mode:   $MODE ($MODEL, T=$T, B=$B), $((SECONDS))s in all"
for c in "${CHECKS[@]}"; do
    if [[ -s $WORK/$c.info ]]; then
        echo "$c:"
        cat "$WORK/$c.info"
    fi
done
failed=0
for c in "${CHECKS[@]}"; do
    if ! wanted "$c"; then
        printf '%-4s  %-7s %s\n' SKIP "$c" "not in --only $ONLY"
        continue
    fi
    IFS=$'\t' read -r v detail < "$WORK/$c.result"
    printf '%-4s  %-7s %s\n' "$v" "$c" "$detail"
    [[ $v == PASS ]] || failed=$((failed + 1))
done
if ((failed)); then
    echo "RESULT: FAIL ($failed of the checks run failed)"
    exit 1
fi
echo "RESULT: PASS"
