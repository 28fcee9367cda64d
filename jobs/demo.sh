#!/usr/bin/env bash
# The demo: a local Ray cluster on 127.0.0.1 (jobs/local_ray.py), then the two core jobs submitted
# to it the way a cluster user does (`ray job submit --working-dir .`): score -> finetune on the
# embedded default (toy-sd, toy city; jobs/configs/demo.yaml); then samples of the base model and of
# the CA-LoRA, measured against the target domain. Outputs go to ./outputs/demo.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
export PATH="$PWD/$VENV/bin:$PATH"
OUT="$PWD/outputs/demo"   # absolute: a submitted job runs in a copy of the working dir
PORT=${DEMO_DASHBOARD_PORT:-8290}
ADDRESS="http://127.0.0.1:$PORT"
# Ray protects clusters with a token (~/.ray/auth_token); the CLI only sends it when the mode is
# explicit, so make it explicit for the cluster, the submit client and the jobs alike.
export RAY_AUTH_MODE=token RAY_USAGE_STATS_ENABLED=0
mkdir -p "$OUT"

echo "== starting a local Ray cluster (job server $ADDRESS)"
python jobs/local_ray.py --dashboard-port "$PORT" >"$OUT/local_ray.log" 2>&1 &
RAY_PID=$!
trap 'echo "== stopping the local Ray cluster"; kill -TERM $RAY_PID 2>/dev/null || true; wait $RAY_PID 2>/dev/null || true' EXIT
for _ in $(seq 90); do
  grep -q "^ready" "$OUT/local_ray.log" 2>/dev/null && break
  kill -0 $RAY_PID 2>/dev/null || { cat "$OUT/local_ray.log"; exit 1; }
  sleep 1
done
grep -q "^ready" "$OUT/local_ray.log" || { echo "Ray did not start within 90 s"; cat "$OUT/local_ray.log"; exit 1; }

submit() { ray job submit --address "$ADDRESS" --working-dir . -- "$@"; }

echo "== 1/4 concept sensitivity (jobs/score.py)"
submit python jobs/score.py --config jobs/configs/demo.yaml --output "$OUT/score" --overwrite
echo "== 2/4 CA-LoRA fine-tuning on the selected projections (jobs/finetune.py)"
submit python jobs/finetune.py --config jobs/configs/demo.yaml --selection "$OUT/score/sensitivity.json" \
  --output "$OUT/finetune" --overwrite

echo "== 3/4 samples of the base model and of the CA-LoRA (jobs/sample.py)"
PROMPTS=("Photorealistic first-person urban street view" "Photorealistic first-person urban street view at night")
python jobs/sample.py --config jobs/configs/demo.yaml --prompt "${PROMPTS[@]}" --num-images 8 \
  --output "$OUT/samples_base" --overwrite
python jobs/sample.py --config jobs/configs/demo.yaml --prompt "${PROMPTS[@]}" --num-images 8 \
  --lora "$OUT/finetune" --output "$OUT/samples_lora" --overwrite
echo "== 4/4 alignment to the target domain, adherence, memorisation (jobs/measure.py)"
for run in base lora; do
  python jobs/measure.py --samples "$OUT/samples_$run" --reference toy:target --train-data toy:target \
    --output "$OUT/measure_$run.json" | sed "s/^/  [$run] /"
done

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
mmd = {r: json.load(open(f"{out}/measure_{r}.json"))["domain_alignment"]["kernel_mmd2"] for r in ("base", "lora")}
print(f"kernel MMD^2 to toy:target: base {mmd['base']:.4f} -> CA-LoRA {mmd['lora']:.4f} (lower = closer)")
print(f"grids    {out}/samples_base/grid.png  {out}/samples_lora/grid.png")
PY
