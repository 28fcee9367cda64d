#!/usr/bin/env bash
# The demo (`make demo`): a local Ray cluster on this machine (jobs/local_ray.py), and the pipeline
# submitted to it stage by stage the way a cluster user does (`ray job submit --working-dir .`):
#   1 score      concept sensitivity of every attention projection; the top 2 % selected
#   2 finetune   CA-LoRA on the selected projections, few-shot on the toy city's target domain
#   3 generate   label maps -> image/label pairs: toy-sd + the shipped ControlNet + the new LoRA,
#                Parquet shards with a dataset card (README.md) and preview.png
#   4 evaluate   a segmenter trained on the real images alone vs on real + the generated pairs
#   5 measure    samples of the base model and of the CA-LoRA against the target domain (no cluster
#                needed: run directly, after the cluster is stopped)
# jobs/configs/demo.yaml configures every stage (one section per job); the summary is the last lines.
# ~7.5 minutes on 2 cores (200 pairs at ~1.2 images/s, ~0.8 when the cores are shared: ~10 minutes).
# Outputs: ./outputs/demo.
#
# Environment: DEMO_OUT (output directory), DEMO_SMALL=1 (tiny counts: a test run of a few minutes,
# tests/test_demo.py), DEMO_DASHBOARD_PORT (job server port, default 8290), VENV (default .venv).
#
# What the local head opens (jobs/local_ray.py: ray.init(include_dashboard=True,
# dashboard_host="127.0.0.1"); Ray 2.60 on Linux, seen with `ss -ltnp` during the demo):
#   127.0.0.1:8290   the dashboard and job server (DEMO_DASHBOARD_PORT): `ray job submit --address
#                    http://127.0.0.1:8290`; loopback only.
#   52365 (fixed)    the dashboard agent's HTTP server, to which the job server hands each job; on the
#                    node address and 127.0.0.1. A second Ray head on the machine cannot bind it and
#                    then takes no job ("No available agent to submit job"): stop the other one first.
#   44227, 44217     Prometheus metrics of the dashboard and of the autoscaler monitor (fixed ports;
#   (fixed)          a second head just goes without them), on 0.0.0.0.
#   random ports     the GCS server (`ray start --head` would use 6379), the raylet (node manager and
#                    object manager), the dashboard agent (gRPC, metrics export), the runtime-env
#                    agent, and one gRPC port per process (driver, each job, worker and actor).
# On Linux the node address is the machine's outward address: 52365 and the runtime-env agent listen
# on it, the metrics ports and the random ones on every interface (0.0.0.0, *). On macOS and Windows
# Ray takes 127.0.0.1 as the node address and everything stays on loopback. With RAY_AUTH_MODE=token
# (below) Ray's RPC and HTTP entry points require the cluster's token (~/.ray/auth_token, per Ray's
# docs); the Prometheus ones serve read-only metrics. A firewall keeps them all off the network.
set -euo pipefail
CALLER_DIR=$PWD
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
[[ $VENV == /* ]] || VENV="$PWD/$VENV"
export PATH="$VENV/bin:$PATH"
# absolute: a submitted job runs in a copy of the working dir, so a relative path would land there
OUT=${DEMO_OUT:-$PWD/outputs/demo}
[[ $OUT == /* ]] || OUT="$CALLER_DIR/$OUT"
PORT=${DEMO_DASHBOARD_PORT:-8290}
ADDRESS="http://127.0.0.1:$PORT"
CONFIG=jobs/configs/demo.yaml
# Ray protects clusters with a token (~/.ray/auth_token); the CLI only sends it when the mode is
# explicit, so make it explicit for the cluster, the submit client and the jobs alike.
export RAY_AUTH_MODE=token RAY_USAGE_STATS_ENABLED=0
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
SUBMIT_LOG="$OUT/ray_submit.log"   # what the submit client says besides the job's own output
: >"$SUBMIT_LOG"

# The counts: jobs/configs/demo.yaml's, or tiny ones (DEMO_SMALL=1) that only show every stage runs.
SCORE=() FINETUNE=() GENERATE=() EVALUATE=() SAMPLE=()
if [[ ${DEMO_SMALL:-0} == 1 ]]; then
  SCORE=(--num-samples 4 --x0-steps 2)
  FINETUNE=(--steps 4 --log-every 2)
  GENERATE=(--num-samples 8 --steps 2 --rows-per-shard 4 --measure-samples 8)
  EVALUATE=(--iters 4 --val-images 8 --real-images 8)
  SAMPLE=(--num-images 2 --steps 2)
fi

RAY_PID=
stop_ray() {  # stop only the cluster this script started (not `ray stop`: that stops every one)
  [[ -n $RAY_PID ]] && kill -0 "$RAY_PID" 2>/dev/null || return 0
  kill -TERM "$RAY_PID" 2>/dev/null || true
  for _ in $(seq 60); do kill -0 "$RAY_PID" 2>/dev/null || break; sleep 1; done
  kill -KILL "$RAY_PID" 2>/dev/null || true
  wait "$RAY_PID" 2>/dev/null || true
  RAY_PID=
}
trap 'if [[ -n $RAY_PID ]]; then echo "== stopping the local Ray cluster"; stop_ray; fi' EXIT

echo "== starting a local Ray cluster (job server $ADDRESS; outputs in $OUT)"
# Ray 2.60 gives a job submitted to a head started by ray.init() (jobs/local_ray.py) the address of
# whichever cluster it finds running on the machine (its "auto" lookup), and a second head cannot
# bind the agent port 52365 (above): the demo wants to be the only Ray cluster on this machine.
others=$( (pgrep -f "ray/gcs/gcs_server" 2>/dev/null || true) | wc -l | tr -d ' ')
if ((others > 0)); then
  echo "warning: $others other Ray cluster(s) run on this machine; the demo's jobs may be sent to one of them" \
    "(Ray's 'auto' address lookup) or not accepted (port 52365): if a stage fails, stop them and run again."
fi
python jobs/local_ray.py --dashboard-port "$PORT" >"$OUT/local_ray.log" 2>&1 &
RAY_PID=$!
for _ in $(seq 90); do
  grep -q "^ready" "$OUT/local_ray.log" 2>/dev/null && break
  kill -0 $RAY_PID 2>/dev/null || { cat "$OUT/local_ray.log"; exit 1; }
  sleep 1
done
grep -q "^ready" "$OUT/local_ray.log" || { echo "Ray did not start within 90 s"; cat "$OUT/local_ray.log"; exit 1; }

# The terminal shows each job's own output; the submit client's and Ray's records (upload, "submitted
# successfully", next steps, "Connecting to existing Ray cluster", Ray Data's execution plan, core-worker
# notes) and what Ray forwards from workers other than progress lines (mmengine's config dump, Ray Train's
# internals) go to $SUBMIT_LOG only, with everything the client writes to stderr.
SHOW='
import re, sys
record = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}\s+(\w+) (\S+):\d+ -- ")
core = re.compile(r"\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [DIWEF] \d+ \d+\] \S+:\d+: ")
worker = re.compile(r"(?:\x1b\[[0-9;]*m)?\(\S+ pid=\d+(?:, ip=\S+)?\)(?:\x1b\[[0-9;]*m)? ?(.*)")
progress = re.compile(r"^step \d+/\d+ |Iter\(train\)|\d+%\|")
for line in iter(sys.stdin.readline, ""):
    line = line.rstrip("\n")
    m = record.match(line)
    if m and (m.group(1) in ("DEBUG", "INFO", "SUCC") or m.group(2) == "cli.py"):
        continue
    m = worker.match(line)
    if m:
        if not progress.search(m.group(1)):
            continue
        line = line[:200]
    if core.match(line) or line.startswith("Running entrypoint for job ") or (
            line.startswith("[transformers] ") and "requires torchvision" in line) or (
            " - mmengine - INFO - " in line and "Iter(" not in line):
        continue
    m = record.search(line)  # a record glued to a progress bar that ended without a newline
    if m and m.group(1) in ("DEBUG", "INFO"):
        line = line[:m.start()].rstrip()
    print(line, flush=True)
'
submit() {
  local stage=$1 rc=0
  shift
  echo "-- $stage: ray job submit --address $ADDRESS --working-dir . -- $*" >>"$SUBMIT_LOG"
  ray job submit --address "$ADDRESS" --working-dir . --log-style record --log-color false -- "$@" \
    2>>"$SUBMIT_LOG" | tee -a "$SUBMIT_LOG" | python -u -c "$SHOW" || rc=$?
  if ((rc != 0)); then
    echo "== $stage failed (ray job submit exit $rc): the job's output is above; everything, with the submit" \
      "client's messages, in $SUBMIT_LOG"
    grep -E "^[A-Za-z.]*(Error|Exception): " "$SUBMIT_LOG" | tail -n 1 | cut -c1-300 || true  # the client's own error
    if grep -q "No available agent" "$SUBMIT_LOG"; then
      echo "   the head's dashboard agent could not open its fixed port 52365: another Ray head on this machine" \
        "holds it (stop that one and run again); see the dashboard_agent.log of this head's session"
    fi
    exit "$rc"
  fi
}

echo "== 1/5 concept sensitivity (jobs/score.py)"
submit score python jobs/score.py --config $CONFIG ${SCORE[@]+"${SCORE[@]}"} --output "$OUT/score" --overwrite
echo "== 2/5 CA-LoRA fine-tuning on the selected projections (jobs/finetune.py)"
submit finetune python jobs/finetune.py --config $CONFIG ${FINETUNE[@]+"${FINETUNE[@]}"} --selection "$OUT/score/sensitivity.json" \
  --output "$OUT/finetune" --overwrite
echo "== 3/5 synthetic image/label pairs: toy-sd + ControlNet + the CA-LoRA (jobs/generate.py)"
submit generate python jobs/generate.py --config $CONFIG ${GENERATE[@]+"${GENERATE[@]}"} --lora "$OUT/finetune" \
  --output "$OUT/generate" --overwrite
echo "== 4/5 does it help a segmenter? real only vs real + synthetic (jobs/evaluate.py)"
submit evaluate python jobs/evaluate.py --config $CONFIG ${EVALUATE[@]+"${EVALUATE[@]}"} --synthetic "$OUT/generate" \
  --output "$OUT/evaluate" --overwrite
echo "== stopping the local Ray cluster (the last stage needs none)"
stop_ray

echo "== 5/5 samples of the base model and of the CA-LoRA, measured against the target domain (jobs/sample.py, jobs/measure.py)"
python jobs/sample.py --config $CONFIG ${SAMPLE[@]+"${SAMPLE[@]}"} --output "$OUT/samples_base" --overwrite 2>&1 \
  | python -u -c "$SHOW"
python jobs/sample.py --config $CONFIG ${SAMPLE[@]+"${SAMPLE[@]}"} --lora "$OUT/finetune" --output "$OUT/samples_lora" \
  --overwrite 2>&1 | python -u -c "$SHOW"
for run in base lora; do
  python jobs/measure.py --config $CONFIG --samples "$OUT/samples_$run" --output "$OUT/measure_$run.json" 2>&1 \
    | python -u -c "$SHOW" | sed "s/^/  [$run] /"
done

python - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
load = lambda path: json.load(open(f"{out}/{path}"))
s, f, m = load("score/sensitivity.json"), load("finetune/finetune.json"), load("generate/manifest.json")
ev = load("evaluate/metrics.json")
mmd = {r: load(f"measure_{r}.json")["domain_alignment"]["kernel_mmd2"] for r in ("base", "lora")}
real, synth = ev["summary"][0], ev["summary"][1]
selected = ", ".join(f"{name} ({s['scores'][name]:.3g})" for name in s["selected"])
print(f"""
== summary ({out})
selected   {s['num_selected']} of {s['num_candidates']} projections for '{s['concept']}' (score): {selected}
plot       {out}/score/sensitivity.png
LoRA       {out}/finetune/pytorch_lora_weights.safetensors ({f['trainable_params']} parameters, loss {f['final_loss']:.4f} after {f['steps']} steps)
MMD^2      kernel MMD^2 to toy:target: base {mmd['base']:.4f} -> CA-LoRA {mmd['lora']:.4f} (lower = closer; grids: samples_base/grid.png, samples_lora/grid.png)
shards     {out}/generate/data ({m['num_shards']} shards, {m['num_samples']} pairs; manifest.json)
preview    {out}/generate/preview.png
card       {out}/generate/README.md
report     {out}/evaluate/report.md (metrics.json, per_class_iou.png)
mIoU       real only {real['mIoU_mean']:.2f} -> real + synthetic {synth['mIoU_mean']:.2f} (delta {synth['delta_mIoU']:+.2f}; {ev['checked']['iters']} iterations, {real['runs']} seed(s))""")
PY
