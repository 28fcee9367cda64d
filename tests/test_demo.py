"""`make demo` end to end: the real jobs/demo.sh with tiny counts (DEMO_SMALL=1) in a temporary directory.

Its own head on 127.0.0.1 (jobs/local_ray.py, token auth, a free port), every stage through
`ray job submit`, the head stopped before the summary, and the summary as the last lines, with the
paths of the artefacts and the numbers in their JSON files.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SUMMARY_LINES = 10  # "== summary" and the nine lines below it


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """Run jobs/demo.sh once: (exit code, output, output directory, job server port)."""
    pytest.importorskip("mmseg")  # the evaluate stage needs the seg extra (make install-seg)
    out = tmp_path_factory.mktemp("demo") / "out"
    port = free_port()
    env = {**os.environ, "DEMO_SMALL": "1", "DEMO_OUT": str(out), "DEMO_DASHBOARD_PORT": str(port),
           "VENV": str(BIN.parent), "PATH": f"{BIN}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    # a session of its own: on a timeout the whole group (bash, the head, its jobs) is stopped, not leaked
    proc = subprocess.Popen(["bash", str(ROOT / "jobs" / "demo.sh")], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=1200)  # bounded: ~3-5 minutes on 2 shared cores
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)  # local_ray.py's SIGTERM handler stops its cluster
        try:
            output, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
        pytest.fail(f"jobs/demo.sh did not finish within 20 minutes:\n{output[-6000:]}")
    return proc.returncode, output, out, port


@pytest.mark.timeout(1500)
def test_demo_runs_every_stage_under_ray_job_submit(demo):
    code, output, out, port = demo
    assert code == 0, output[-6000:]
    for header in ("== starting a local Ray cluster", "== 1/5", "== 2/5", "== 3/5", "== 4/5",
                   "== stopping the local Ray cluster", "== 5/5"):
        assert header in output, header
    # each job's own result lines are shown ...
    assert f"report: {out}/score/sensitivity.json" in output
    assert f"LoRA:   {out}/finetune/pytorch_lora_weights.safetensors" in output
    assert "samples: 8 (8 generated now" in output
    assert f"metrics: {out}/evaluate/metrics.json" in output
    # ... and the submit client's chatter goes to its log
    for chatter in ("submitted successfully", "Tailing logs until the job exits", "Next steps"):
        assert chatter not in output
        assert chatter in (out / "ray_submit.log").read_text()
    # the head is stopped: nothing listens on its job server port any more
    deadline = time.time() + 30
    while port_open(port) and time.time() < deadline:
        time.sleep(1)
    assert not port_open(port), f"the job server on 127.0.0.1:{port} is still up after the demo"


@pytest.mark.timeout(1500)
def test_demo_writes_every_artefact(demo):
    code, output, out, _ = demo
    assert code == 0, output[-6000:]
    for path in ("score/sensitivity.json", "score/sensitivity.png", "finetune/pytorch_lora_weights.safetensors",
                 "finetune/finetune.json", "generate/manifest.json", "generate/preview.png", "generate/README.md",
                 "evaluate/metrics.json", "evaluate/report.md", "evaluate/per_class_iou.png",
                 "samples_base/grid.png", "samples_lora/grid.png", "measure_base.json", "measure_lora.json"):
        assert (out / path).is_file() and (out / path).stat().st_size > 0, path
    manifest = json.loads((out / "generate" / "manifest.json").read_text())
    assert manifest["num_samples"] == 8 and manifest["num_shards"] == 2  # --rows-per-shard 4
    assert len(list((out / "generate" / "data").glob("shard-*.parquet"))) == 2
    metrics = json.loads((out / "evaluate" / "metrics.json").read_text())
    assert [row["set"] for row in metrics["summary"]] == ["real", "real+generate"]
    assert metrics["checked"]["iters"] == 4 and metrics["config"]["seeds"] == 1


@pytest.mark.timeout(1500)
def test_demo_ends_with_its_summary(demo):
    code, output, out, _ = demo
    assert code == 0, output[-6000:]
    lines = output.rstrip("\n").splitlines()
    summary = lines[-SUMMARY_LINES:]
    assert summary[0] == f"== summary ({out})", "\n".join(lines[-2 * SUMMARY_LINES:])
    text = "\n".join(summary)

    score = json.loads((out / "score" / "sensitivity.json").read_text())
    finetune = json.loads((out / "finetune" / "finetune.json").read_text())
    manifest = json.loads((out / "generate" / "manifest.json").read_text())
    metrics = json.loads((out / "evaluate" / "metrics.json").read_text())
    mmd = {run: json.loads((out / f"measure_{run}.json").read_text())["domain_alignment"]["kernel_mmd2"]
           for run in ("base", "lora")}
    real, synthetic = metrics["summary"]

    # where everything is
    for path in ("score/sensitivity.png", "finetune/pytorch_lora_weights.safetensors", "generate/data",
                 "generate/preview.png", "generate/README.md", "evaluate/report.md"):
        assert f"{out}/{path}" in text, path
    # the numbers, as in the files
    assert f"{score['num_selected']} of {score['num_candidates']} projections for 'style'" in text
    for name in score["selected"]:
        assert f"{name} ({score['scores'][name]:.3g})" in text
    assert f"{finetune['trainable_params']} parameters" in text and f"after {finetune['steps']} steps" in text
    assert f"base {mmd['base']:.4f} -> CA-LoRA {mmd['lora']:.4f}" in text
    assert f"{manifest['num_shards']} shards, {manifest['num_samples']} pairs" in text
    assert (f"real only {real['mIoU_mean']:.2f} -> real + synthetic {synthetic['mIoU_mean']:.2f} "
            f"(delta {synthetic['delta_mIoU']:+.2f};") in text
