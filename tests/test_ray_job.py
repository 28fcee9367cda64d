"""`ray job submit --working-dir . -- python jobs/score.py ...` against a local head on 127.0.0.1."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PORT, DASHBOARD = 6391, 8291


def ray(*args, timeout=180, check=True):
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PATH": f"{BIN}:{os.environ['PATH']}"}
    proc = subprocess.run([str(BIN / "ray"), *args], capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"ray {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def head():
    if shutil.which("ray", path=str(BIN)) is None:
        pytest.fail("the ray CLI is not installed in this environment")
    ray("start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(PORT), "--dashboard-host",
        "127.0.0.1", "--dashboard-port", str(DASHBOARD), "--num-cpus", "2", "--disable-usage-stats")
    address = f"http://127.0.0.1:{DASHBOARD}"
    deadline = time.time() + 60  # the job server comes up shortly after the head
    while ray("job", "list", "--address", address, check=False, timeout=30).returncode != 0:
        if time.time() > deadline:
            raise AssertionError("the local Ray job server did not come up within 60 s")
        time.sleep(2)
    yield address
    ray("stop", "--force", check=False)


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
