#!/usr/bin/env bash
# The GPU measurements in one run (the speed issue): each benchmark in the same process as its peer.
#
#   bash bench/gpu_suite.sh            # on a GPU machine: bench/results/*-<gpu>.json and a one-screen summary
#   bash bench/gpu_suite.sh --smoke    # the same steps on the CPU at tiny sizes, results in a temporary folder
#
# Steps: decode against transformers (bench/decode.py); training throughput and MFU against transformers on
# bench-1b (bench/train_throughput.py); FP8 against BF16 (bench/fp8_training.py); GRPO against TRL
# (bench/grpo_vs_trl.py; nanoseek alone where TRL is not installed); a 1-process torchrun of the parallel entry
# (nccl on a GPU, gloo with --smoke).
#
# Wheels: a machine without the network installs what it needs from a folder carried along, NANOSEEK_WHEELS
# (default bench/wheels), when it exists. Make it where there is a network, for the GPU machine's Python:
#   pip download -d bench/wheels "transformers>=5.17,<6" trl accelerate safetensors tokenizers tqdm \
#       tensorboard matplotlib math-verify numpy pyarrow pytest
# (torch itself: the machine's own CUDA build.) Sizes are set so that the whole run fits in 10 minutes on one
# H200; they have not been run on one yet.
set -euo pipefail
cd "$(dirname "$0")/.."

smoke=0
if [[ "${1:-}" == "--smoke" ]]; then
    smoke=1
elif [[ -n "${1:-}" ]]; then
    echo "usage: bash bench/gpu_suite.sh [--smoke]" >&2
    exit 2
fi

wheels="${NANOSEEK_WHEELS:-bench/wheels}"
if [[ -d "$wheels" ]]; then
    python -m pip install --quiet --no-index --find-links "$wheels" -e ".[test]"
    python -m pip install --quiet --no-index --find-links "$wheels" trl || echo "trl: not in $wheels"
fi

if (( smoke )); then
    out="$(mktemp -d)"
    tag="smoke"
    device="cpu"
else
    if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        echo "no GPU here: run with --smoke for the CPU check" >&2
        exit 2
    fi
    out="bench/results"
    tag="$(python -c "import torch; print(torch.cuda.get_device_name(0).split()[-1].lower())")"
    device="cuda"
fi
work="$(mktemp -d)"
if (( smoke )); then trap 'rm -rf "$work" "$out"' EXIT; else trap 'rm -rf "$work"' EXIT; fi
started=$SECONDS

step() {  # step NAME COMMAND...: run one benchmark, timed; a failure is reported and the suite goes on
    local name="$1"
    shift
    echo "=== $name"
    local t0=$SECONDS
    if "$@" > "$work/$name.log" 2>&1; then
        echo "    done in $((SECONDS - t0)) s"
    else
        echo "    FAILED after $((SECONDS - t0)) s; the end of its log:"
        tail -n 20 "$work/$name.log" | sed 's/^/    /'
        failed=1
    fi
}
failed=0

if (( smoke )); then
    step decode python bench/decode.py --preset tiny --batches 1 4 --prompt-len 16 --new-tokens 8 \
        --out "$out/decode-$tag.json"
    step training python bench/train_throughput.py --preset tiny --seq-len 64 --micro-batch 2 --steps 6 --warmup 2 \
        --mtp off --out "$out/train_throughput-$tag.json"
    step fp8 python bench/fp8_training.py --preset tiny --precisions fp32 fp8 --steps 4 --seq-len 64 --batch-size 2 \
        --micro-batch-size 2 --builtin-docs 400 --eval-batches 1 --timing-skip 1 --result "$out/fp8_training-$tag.json"
    grpo_size=(--preset tiny --steps 2 --prompts-per-step 2 --group-size 2 --max-new-tokens 8)
    torchrun_size=(--preset tiny --builtin-docs 400 --max-steps 3 --seq-len 64 --batch-size 2 --micro-batch-size 2)
else
    step decode python bench/decode.py --preset bench-1b --batches 1 32 --out "$out/decode-$tag.json"
    step training python bench/train_throughput.py --preset bench-1b --steps 30 --warmup 5 \
        --out "$out/train_throughput-$tag.json"
    step fp8 python bench/fp8_training.py --preset bench-1b --precisions bf16 fp8 --steps 100 --seq-len 1024 \
        --builtin-docs 50000 --eval-batches 8 --result "$out/fp8_training-$tag.json"
    grpo_size=(--preset bench-1b --steps 10)
    torchrun_size=(--preset small --builtin-docs 20000 --max-steps 30)
fi
if python -c "import trl" 2> /dev/null; then grpo_peers=both; else grpo_peers=nanoseek; fi
step grpo python bench/grpo_vs_trl.py "${grpo_size[@]}" --only "$grpo_peers" --out "$out/grpo_vs_trl-$tag.json"
step torchrun torchrun --nproc-per-node 1 -m nanoseek.parallel.train pretrain "${torchrun_size[@]}" \
    --device "$device" --eval-every 0 --no-tensorboard --out-dir "$work/torchrun"

echo "=== summary ($((SECONDS - started)) s)"
python - "$out" "$tag" <<'EOF'
import json, sys
from pathlib import Path

out, tag = Path(sys.argv[1]), sys.argv[2]
for path in sorted(out.glob(f"*-{tag}.json")):
    result = json.loads(path.read_text())
    keys = ("speedup_vs_transformers", "parity", "speedup", "nanoseek_over_trl", "summary")
    shown = {k: result[k] for k in keys if k in result}
    print(f"{path.name}: {json.dumps(shown)[:400] if shown else 'written'}")
EOF
exit $failed
