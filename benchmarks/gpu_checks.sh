#!/usr/bin/env bash
# The checks that need a CUDA device, in one go, for a session lent a GPU machine whose python3
# already holds torch, tiktoken, pluggy, tqdm and pytest (nothing is downloaded):
#
#     bash benchmarks/gpu_checks.sh                       # every step; logs in $OUT, or ./gpu-logs
#     bash benchmarks/gpu_checks.sh tests checkpoint-cost # only the steps named
#
# 1. the device-parametrized tests on CUDA (fp16 with its GradScaler, an fp16 overflow step,
#    bf16 autocast, background checkpoints staged from the GPU, a bit-exact resume);
# 2. no host sync inside a CUDA step (torch.cuda.set_sync_debug_mode("error")), then throughput and
#    MFU of the 124M model: bf16, bf16 with torch.compile, compile + the fast preset (target there:
#    45% MFU at context 1024), fp16, fp32;
# 3. the main job's checkpoint cost on the GPU (4 epochs, one round of none/sync/async), and its
#    checkpoint written and resumed by the DCP backend against the hand-made writer it replaced
#    (needs the git history: skipped without it);
# 4. strategy="fsdp" on nccl (two GPUs): training, then checkpoints saved by 2 ranks, resumed by one
#    process and again by 2 ranks (DCP reshards; --allow-changes: the plan and batches per epoch change).
# Each step has its own time limit, so one that hangs cannot eat the others' time.
set -u
cd "$(dirname "$0")/.."
out=${OUT:-gpu-logs}
mkdir -p "$out"
export PYTHONUNBUFFERED=1

only=" $* "
step() {
    local name=$1 limit=$2
    shift 2
    [[ "$only" == "  " || "$only" == *" $name "* ]] || return 0
    echo "== $name: $*"
    local start=$SECONDS
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    echo "   exit $? after $((SECONDS - start)) s"
    tail -n 6 "$out/$name.log"
}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
python3 -m pip install --no-deps --no-build-isolation --no-index -e . >"$out/install.log" 2>&1 ||
    { tail -n 20 "$out/install.log"; exit 1; }
checkpoint_tests=$(ls -d tests/test_checkpoint.py tests/checkpointing 2>/dev/null)
step tests 150 python3 -m pytest -q -p no:cacheprovider -k cuda tests/test_engine.py tests/test_precision.py $checkpoint_tests
step no-sync 90 python3 -m pytest -q -p no:cacheprovider -k cuda tests/test_hostsync.py tests/test_compiling.py tests/test_fast.py
step throughput-bf16 120 python3 benchmarks/throughput.py
step throughput-bf16-compile 180 python3 benchmarks/throughput.py --compile
step throughput-fast 180 python3 benchmarks/throughput.py --compile --fast
step throughput-fp32 120 python3 benchmarks/throughput.py --precision fp32
step throughput-fp16 120 python3 benchmarks/throughput.py --precision fp16
step checkpoint-cost 150 python3 benchmarks/checkpoint_cost.py --epochs 4 --rounds 1
if git rev-parse -q --verify d1a5f69^{commit} >/dev/null 2>&1; then
    step checkpoint-backend 240 python3 benchmarks/checkpoint_backend.py --pairs 2
else
    echo "== checkpoint-backend: skipped (no git history here: the legacy writer is read from commit d1a5f69)"
fi
# strategy="fsdp" with nccl (bf16 MixedPrecisionPolicy, SampleText on the gathered model) needs two GPUs:
# one process does not shard, so on one GPU nothing of FSDP's own paths (nor its sharded checkpoints) would run
if (( $(nvidia-smi -L | wc -l) >= 2 )); then
    step fsdp-nccl 180 python3 -m torch.distributed.run --standalone --nproc_per_node=2 examples/pretrain_verdict.py --model 124M --max-steps 20 --strategy fsdp --precision bf16 --no-checkpoint --out "$out/fsdp"
    # each resume must say where it resumed from; a run that starts from scratch instead fails the step
    step fsdp-nccl-checkpoint 420 bash -c '
        set -eo pipefail
        ck=$1; rm -rf "$ck" "$ck".resume-*.log
        run() { python3 -m torch.distributed.run --standalone --nproc_per_node="$1" examples/pretrain_verdict.py \
            --model 124M --strategy fsdp --precision bf16 --no-sample --no-progress --out "$ck" "${@:2}"; }
        run 2 --epochs 1 --save-every 2
        ls -l "$ck"/checkpoints/*/
        run 1 --epochs 2 --resume --allow-changes | tee "$ck.resume-1.log"
        grep -q "Checkpoint: resumed from ckpt-" "$ck.resume-1.log"
        run 2 --epochs 3 --resume --allow-changes | tee "$ck.resume-2.log"
        grep -q "Checkpoint: resumed from ckpt-" "$ck.resume-2.log"
        echo "fsdp checkpoints: saved by 2 ranks, resumed by 1 and by 2"' _ "$out/fsdp-checkpoint"
else
    echo "== fsdp-nccl, fsdp-nccl-checkpoint: skipped (one GPU; they need 2: one process does not shard)"
fi
