#!/bin/bash
# GPU checks, for a machine with one CUDA GPU (the test suite runs on CPU; this is what it cannot show):
#   1. `esft train` in bf16 on the GPU, alone and under `torchrun --nproc_per_node=1` (NCCL process
#      group, FSDP2-sharded trainable copy, DCP checkpoints: the distributed code path with a world of
#      one), and a torchrun run interrupted after 3 steps and resumed: losses and adapters compared;
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
$PY -m esft train $COMMON steps=6 output_dir="$W/plain" --quiet >"$OUT/plain.log" 2>&1 || { tail -30 "$OUT/plain.log"; }
t1=$(date +%s)
$RUN train $COMMON steps=6 output_dir="$W/nccl" --quiet >"$OUT/nccl.log" 2>&1 || { tail -30 "$OUT/nccl.log"; }
t2=$(date +%s)
$RUN train $COMMON steps=3 output_dir="$W/resumed" --quiet >"$OUT/resumed.log" 2>&1 || { tail -30 "$OUT/resumed.log"; }
$RUN train $COMMON steps=6 resume=true output_dir="$W/resumed" --quiet >>"$OUT/resumed.log" 2>&1 || { tail -30 "$OUT/resumed.log"; }
echo "wall: plain $((t1 - t0)) s, torchrun $((t2 - t1)) s (process start, load and 6 steps each)"
$PY - "$W" <<'EOF'
import json, sys
from pathlib import Path
from safetensors.torch import load_file
w = Path(sys.argv[1])
def losses(run):
    rows = [json.loads(l) for l in (w / run / "train_log.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r], [r["valid_loss"] for r in rows if "valid_loss" in r]
def adapter(run):
    return load_file(str(w / run / "last" / "adapter.safetensors"))
base_l, base_v = losses("plain")
print("plain   losses", [f"{x:.5f}" for x in base_l], "valid", [f"{x:.5f}" for x in base_v])
for run in ("nccl", "resumed"):
    try:
        l, v = losses(run)
        a, b = adapter("plain"), adapter(run)
    except Exception as e:
        print(run, "FAILED:", e); continue
    rel = max(abs(x - y) / abs(y) for x, y in zip(l + v, base_l + base_v))
    arel = max(float(((a[k] - b[k]).abs().max() / a[k].abs().max())) for k in a)
    same = all(bool((a[k] == b[k]).all()) for k in a) and a.keys() == b.keys()
    print(f"{run:<7} losses", [f"{x:.5f}" for x in l], "valid", [f"{x:.5f}" for x in v])
    print(f"{run:<7} vs plain: max relative loss difference {rel:.2e}; adapter max |diff|/max|w| {arel:.2e}; "
          f"adapter bit-identical: {same}")
meta = json.loads((w / "nccl" / "last" / "esft_adapter.json").read_text())
print("nccl adapter metadata: dtype", meta.get("dtype"), "trained_dtype", meta.get("trained_dtype"))
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
$PY benchmarks/plan_vs_gpu.py --layers 4 --seq-len 2048 --steps 3 --work "$W/plan" 2>"$OUT/plan_vs_gpu.err" \
  | tee "$OUT/plan_vs_gpu.txt" || tail -20 "$OUT/plan_vs_gpu.err"
fi
rm -rf "$W"
