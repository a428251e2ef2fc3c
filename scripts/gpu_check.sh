#!/bin/bash
# GPU checks, for a machine with one CUDA GPU (the test suite runs on CPU; this is what it cannot show):
#   1. `esft train` in bf16 on the GPU, alone and under `torchrun --nproc_per_node=1` (NCCL process
#      group, FSDP2-sharded trainable copy, DCP checkpoints: the distributed code path with a world of
#      one), and a torchrun run interrupted after 3 steps and resumed; each with and without
#      deterministic=true, and the plain run twice (what the GPU's own non-determinism moves): losses and
#      adapters compared; `esft profile` alone and under torchrun;
#   2. benchmarks/mixed_precision.py on the GPU (bf16 + fp32 masters vs fp32 vs bf16 in place);
#   3. benchmarks/plan_vs_gpu.py: `esft plan`'s estimate against measured peak CUDA memory.
#
#   bash scripts/gpu_check.sh [OUT_DIR]        (PY=python3 by default; esft importable from it)
set -u
OUT=${1:-/tmp/gpu_check}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}   # DEVICE=cpu runs part 1 on the CPU (gloo), to try the script without a GPU
PARTS=${PARTS:-123}      # which parts to run, e.g. PARTS=1
W=$(mktemp -d)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
$PY -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)"

if [[ $PARTS == *1* ]]; then
echo "== 1. bf16 ESFT on the GPU: alone, under torchrun (NCCL), and resumed under torchrun"
$PY -m esft make-tiny --out "$W/tiny" >/dev/null
echo '{"experts": {"1": [0, 3, 9], "2": [5]}}' > "$W/sel.json"
COMMON="model=$W/tiny/model train_data=$W/tiny/train.jsonl expert_config=$W/sel.json seq_len=256 batch_size=4
        save_every=3 eval_every=3 log_every=1 lr=1e-3 dtype=bfloat16 device=$DEVICE tensorboard=false adapter_dtype=float32"
RUN="$PY -m torch.distributed.run --standalone --nproc_per_node=1 -m esft"
t0=$(date +%s)
$PY -m esft train $COMMON steps=6 output_dir="$W/plain" --quiet >"$OUT/plain.log" 2>&1 || tail -30 "$OUT/plain.log"
t1=$(date +%s)
$RUN train $COMMON steps=6 output_dir="$W/nccl" --quiet >"$OUT/nccl.log" 2>&1 || tail -30 "$OUT/nccl.log"
t2=$(date +%s)
echo "wall: plain $((t1 - t0)) s, torchrun $((t2 - t1)) s (process start, load and 6 steps each)"
# the same run again: how much do a GPU's non-deterministic kernels alone move the result?
$PY -m esft train $COMMON steps=6 output_dir="$W/plain2" --quiet >>"$OUT/plain.log" 2>&1 || tail -30 "$OUT/plain.log"
# 3 steps, then resumed to 6, under torchrun
$RUN train $COMMON steps=3 output_dir="$W/resumed" --quiet >"$OUT/resumed.log" 2>&1 || tail -30 "$OUT/resumed.log"
$RUN train $COMMON steps=6 resume=true output_dir="$W/resumed" --quiet >>"$OUT/resumed.log" 2>&1 || tail -30 "$OUT/resumed.log"
# deterministic kernels: alone, under torchrun, and resumed under torchrun
$PY -m esft train $COMMON steps=6 deterministic=true output_dir="$W/det_plain" --quiet >"$OUT/det.log" 2>&1 || tail -30 "$OUT/det.log"
$RUN train $COMMON steps=6 deterministic=true output_dir="$W/det_nccl" --quiet >>"$OUT/det.log" 2>&1 || tail -30 "$OUT/det.log"
$RUN train $COMMON steps=3 deterministic=true output_dir="$W/det_resumed" --quiet >>"$OUT/det.log" 2>&1 || tail -30 "$OUT/det.log"
$RUN train $COMMON steps=6 deterministic=true resume=true output_dir="$W/det_resumed" --quiet >>"$OUT/det.log" 2>&1 || tail -30 "$OUT/det.log"
grep -h "UserWarning" "$OUT/det.log" | sort | uniq -c | head -5
$PY - "$W" <<'EOF'
import json, sys
from pathlib import Path
from safetensors.torch import load_file
w = Path(sys.argv[1])
def losses(run):
    rows = [json.loads(l) for l in (w / run / "train_log.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r] + [r["valid_loss"] for r in rows if "valid_loss" in r]
def adapter(run):
    return load_file(str(w / run / "last" / "adapter.safetensors"))
for run, ref in [("plain2", "plain"), ("nccl", "plain"), ("resumed", "nccl"), ("det_nccl", "det_plain"),
                 ("det_resumed", "det_nccl")]:
    try:
        l, lr_, a, b = losses(run), losses(ref), adapter(run), adapter(ref)
    except Exception as e:
        print(f"{run} vs {ref}: FAILED: {e}"); continue
    rel = max(abs(x - y) / abs(y) for x, y in zip(l, lr_))
    arel = max(float(((a[k] - b[k]).abs().max() / b[k].abs().max())) for k in b)
    same = a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in b)
    print(f"{run:>11} vs {ref:<9}: losses (train + valid) max relative difference {rel:.2e}; adapter max |diff|/max|w| "
          f"{arel:.2e}; bit-identical: losses {l == lr_}, adapter {same}")
meta = json.loads((w / "nccl" / "last" / "esft_adapter.json").read_text())
print("torchrun adapter metadata: dtype", meta.get("dtype"), "trained_dtype", meta.get("trained_dtype"))
EOF
echo "profiling under torchrun ($DEVICE) against one process:"
$PY -m esft profile --model "$W/tiny/model" --data "$W/tiny/train.jsonl" --out "$W/one.json" --device $DEVICE \
  --quiet >"$OUT/profile.log" 2>&1
$RUN profile --model "$W/tiny/model" --data "$W/tiny/train.jsonl" --out "$W/tr.json" --device $DEVICE \
  --quiet >>"$OUT/profile.log" 2>&1 || tail -20 "$OUT/profile.log"
$PY - "$W/one.json" "$W/tr.json" <<'EOF'
import json, sys
a, b = (json.load(open(f)) for f in sys.argv[1:])
def flat(x):
    if isinstance(x, dict):
        for k in sorted(x):
            yield from flat(x[k])
    elif isinstance(x, list):
        for v in x:
            yield from flat(v)
    else:
        yield x
d = max(abs(x - y) for k in ("token_scores", "gate_scores") for x, y in zip(flat(a[k]), flat(b[k])))
print("profile: max |score difference|", d, "; selection counts equal:", a["selection_counts"] == b["selection_counts"])
EOF
fi
[ "$DEVICE" = cuda ] || { rm -rf "$W"; exit 0; }

if [[ $PARTS == *2* ]]; then
echo "== 2. mixed precision on the GPU"
$PY benchmarks/mixed_precision.py --device cuda 2>"$OUT/mixed_precision.err" | tee "$OUT/mixed_precision.txt" | tail -40
fi

if [[ $PARTS == *3* ]]; then
echo "== 3. esft plan against measured peak CUDA memory"
$PY benchmarks/plan_vs_gpu.py --layers 4 --seq-len 2048 --steps 8 --work "$W/plan" 2>"$OUT/plan_vs_gpu.err" \
  | tee "$OUT/plan_vs_gpu.txt" || tail -20 "$OUT/plan_vs_gpu.err"
fi
rm -rf "$W"
