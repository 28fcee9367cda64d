"""`ray job submit --working-dir . -- python jobs/score.py ...` against a local head on 127.0.0.1."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DASHBOARD = 8291


def ray(*args, timeout=180, check=True):
    # Token auth made explicit for cluster, client and job (see jobs/demo.sh).
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token",
           "PATH": f"{BIN}:{os.environ['PATH']}"}
    proc = subprocess.run([str(BIN / "ray"), *args], capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"ray {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """A local cluster held by jobs/local_ray.py; terminating it stops only that cluster."""
    log = tmp_path_factory.mktemp("ray") / "local_ray.log"
    # PATH: a job's entrypoint `python` must be this environment's
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token",
           "PATH": f"{BIN}:{os.environ['PATH']}"}
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, str(ROOT / "jobs" / "local_ray.py"), "--dashboard-port",
                                 str(DASHBOARD), "--num-cpus", "2"], stdout=f, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.time() + 90  # bounded: the cluster and its job server come up or the test fails
        while "ready" not in log.read_text():
            if proc.poll() is not None or time.time() > deadline:
                raise AssertionError(f"the local Ray cluster did not start:\n{log.read_text()}")
            time.sleep(1)
        yield f"http://127.0.0.1:{DASHBOARD}"
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def test_score_job_under_ray_job_submit(head, tmp_path):
    out = tmp_path / "score"  # absolute: the job runs in a copy of the working directory
    proc = ray("job", "submit", "--address", head, "--working-dir", ".", "--",
               "python", "jobs/score.py", "--model", "tiny", "--num-samples", "2", "--x0-steps", "2",
               "--concept", "viewpoint", "--output", str(out), timeout=600)
    assert "succeeded" in proc.stdout + proc.stderr
    report = json.loads((out / "sensitivity.json").read_text())
    assert report["concept"] == "viewpoint" and len(report["selected"]) == 2 and report["num_samples"] == 2
    assert (out / "sensitivity.png").stat().st_size > 0


def test_failed_job_reports_the_error(head, tmp_path):
    proc = ray("job", "submit", "--address", head, "--working-dir", ".", "--",
               "python", "jobs/score.py", "--concept", "nope", "--output", str(tmp_path / "x"),
               timeout=300, check=False)
    assert proc.returncode != 0
    assert "unknown concept 'nope'" in proc.stdout + proc.stderr
    assert not (tmp_path / "x").exists()
