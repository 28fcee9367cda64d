#!/usr/bin/env bash
# The demo: a local Ray head on 127.0.0.1, then the two core jobs submitted to it the way a
# cluster user does (`ray job submit --working-dir .`): score -> finetune on the embedded
# default (tiny model, toy city; jobs/configs/demo.yaml). Outputs go to ./outputs/demo.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
export PATH="$PWD/$VENV/bin:$PATH"
OUT="$PWD/outputs/demo"   # absolute: a submitted job runs in a copy of the working dir
PORT=${DEMO_RAY_PORT:-6390}
DASH=${DEMO_DASHBOARD_PORT:-8290}
ADDRESS="http://127.0.0.1:$DASH"

started=0
if ! ray status --address "127.0.0.1:$PORT" >/dev/null 2>&1; then
  echo "== starting a local Ray head on 127.0.0.1:$PORT (dashboard $ADDRESS)"
  ray start --head --node-ip-address 127.0.0.1 --port "$PORT" --dashboard-host 127.0.0.1 \
    --dashboard-port "$DASH" --num-cpus 2 --disable-usage-stats >/dev/null
  started=1
fi
cleanup() { if [ "$started" = 1 ]; then echo "== stopping the local Ray head"; ray stop >/dev/null 2>&1 || true; fi; }
trap cleanup EXIT

submit() { ray job submit --address "$ADDRESS" --working-dir . -- "$@"; }

echo "== 1/2 concept sensitivity (jobs/score.py)"
submit python jobs/score.py --config jobs/configs/demo.yaml --output "$OUT/score" --overwrite
echo "== 2/2 CA-LoRA fine-tuning on the selected projections (jobs/finetune.py)"
submit python jobs/finetune.py --config jobs/configs/demo.yaml --selection "$OUT/score/sensitivity.json" \
  --output "$OUT/finetune" --overwrite

python - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
s = json.load(open(f"{out}/score/sensitivity.json"))
f = json.load(open(f"{out}/finetune/finetune.json"))
print(f"\nselected {s['num_selected']} of {s['num_candidates']} projections for '{s['concept']}':")
for name in s["selected"]:
    print(f"  {name}  score {s['scores'][name]:.4g}")
print(f"LoRA: {f['trainable_params']} trainable parameters, loss {f['final_loss']:.4f} after {f['steps']} steps")
print(f"\nreport   {out}/score/sensitivity.json\nplot     {out}/score/sensitivity.png")
print(f"LoRA     {out}/finetune/pytorch_lora_weights.safetensors\nloss     {out}/finetune/loss.png")
PY
