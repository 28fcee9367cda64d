"""Joining Ray (calora_ray.distributed.ensure_ray): a dead or unreachable cluster fails within
--ray-connect-timeout-s with one line that names the address, where it came from and what to do;
a live cluster is still joined. Every Ray process here gets its own temp directory (RAY_TMPDIR), so
the machine's /tmp/ray, its recorded cluster and any running cluster are never used; every wait is
bounded."""

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from calora_ray.config import ConfigError, ScoreConfig, parse_config

ROOT = Path(__file__).resolve().parents[1]


def ray_env(tmpdir: Path, **extra) -> dict:
    """This test's own Ray state: temp dir, no auth token files, no usage stats, no RAY_ADDRESS."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_TMPDIR=str(tmpdir), RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", **extra)
    return env


@pytest.fixture
def ray_tmp():
    """A short temp dir (Ray's socket paths must stay under 107 characters), removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="rc-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def closed_port() -> int:
    """A local port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def score_job(tmp: Path, env: dict, *flags) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    proc = subprocess.run([sys.executable, str(ROOT / "jobs" / "score.py"), "--model", "tiny", "--output",
                           str(tmp / "out"), "--ray-connect-timeout-s", "3", *flags],
                          capture_output=True, text=True, timeout=120, env=env, cwd=ROOT, check=False)
    return proc, time.monotonic() - started


@pytest.mark.parametrize("given", ["recorded", "RAY_ADDRESS", "--address"])
def test_an_unreachable_cluster_fails_in_bounded_time_naming_it(ray_tmp, given):
    """The issue's case (a `ray start --head` whose processes died, recorded in Ray's temp dir), and the
    same dead address given by RAY_ADDRESS or --address: exit 2 within the timeout, one error line."""
    address = f"127.0.0.1:{closed_port()}"
    env, flags = ray_env(ray_tmp), []
    if given == "recorded":
        (ray_tmp / "ray").mkdir()
        (ray_tmp / "ray" / "ray_current_cluster").write_text(address)
    elif given == "RAY_ADDRESS":
        env["RAY_ADDRESS"] = address
    else:
        flags = ["--address", address]
    proc, elapsed = score_job(ray_tmp, env, *flags)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    error = errors[0]
    assert f"no Ray cluster answers at {address}" in error and "after 3 s (--ray-connect-timeout-s" in error
    assert "Traceback" not in proc.stderr and "Failed to connect to GCS" not in proc.stderr
    if given == "recorded":
        assert f"the cluster Ray recorded on this machine in {ray_tmp / 'ray' / 'ray_current_cluster'}" in error
        assert "`ray stop`" in error and "RAY_ADDRESS=local" in error
    elif given == "RAY_ADDRESS":
        assert f"{address} (RAY_ADDRESS)" in error and "RAY_ADDRESS=local" in error
    else:
        assert f"{address} (--address)" in error and "--address local" in error
    assert elapsed < 100, elapsed  # the wait is the 3 s given, plus starting Python
    assert not (ray_tmp / "out").exists()


def test_a_port_that_is_not_a_gcs_does_not_count_as_one():
    """A listener that accepts connections but never speaks gRPC (a hung process, another service on a
    reused port) is not a cluster: ray.init would retry against it for minutes."""
    from calora_ray.distributed import _gcs_answers

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        accepted = []
        thread = threading.Thread(target=lambda: accepted.append(server.accept()[0]), daemon=True)
        thread.start()
        assert _gcs_answers("127.0.0.1", port, 1.0) == "accepts connections but does not answer as a Ray GCS"
        thread.join(timeout=5)
        for conn in accepted:
            conn.close()
    assert _gcs_answers("127.0.0.1", closed_port(), 1.0) is not None


def test_config_flags():
    cfg = parse_config(ScoreConfig, ["--address", "10.0.0.1:6379", "--ray-connect-timeout-s", "5"], "score")
    assert (cfg.address, cfg.ray_connect_timeout_s) == ("10.0.0.1:6379", 5.0)
    assert parse_config(ScoreConfig, ["--address", "none"], "score").address is None
    with pytest.raises(ConfigError, match="--ray-connect-timeout-s must be > 0"):
        ScoreConfig(ray_connect_timeout_s=0)


JOIN = """
import os, sys, ray
from calora_ray.distributed import ensure_ray
gcs, record = sys.argv[1], sys.argv[2]

def joined(how):
    ctx = ray.get_runtime_context()
    print(how, ctx.gcs_address, int(ray.cluster_resources().get("CPU", 0)), flush=True)
    ray.shutdown()

os.environ["RAY_ADDRESS"] = gcs  # what `ray job submit` sets for the entrypoint
assert ensure_ray(None, 30) is False
joined("RAY_ADDRESS")
del os.environ["RAY_ADDRESS"]
assert ensure_ray(gcs, 30) is False
joined("address")
os.makedirs(os.path.dirname(record), exist_ok=True)
with open(record, "w") as f:  # what `ray start --head` records
    f.write(gcs)
assert ensure_ray(None, 30) is False
joined("recorded")
"""

HEAD = """
import sys, ray
ray.init(num_cpus=1, include_dashboard=False, logging_level="WARNING")
print(ray.get_runtime_context().gcs_address, flush=True)
sys.stdin.read()  # until the test closes stdin (or terminates us)
"""


def test_a_live_cluster_is_joined(ray_tmp):
    """A reachable cluster is joined as before, whichever way its address comes (RAY_ADDRESS as under
    `ray job submit`, the address option, the recorded cluster), not replaced by a new local one."""
    from calora_ray.distributed import _gcs_answers

    env = ray_env(ray_tmp)
    head = subprocess.Popen([sys.executable, "-c", HEAD], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=env, cwd=ROOT)
    try:
        lines = []
        reader = threading.Thread(target=lambda: lines.append(head.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout=90)  # bounded: the head comes up or the test fails
        assert lines and lines[0].strip(), "the local Ray head did not start within 90 s"
        gcs = lines[0].strip()
        assert _gcs_answers("127.0.0.1", int(gcs.rsplit(":", 1)[1]), 5.0) is None  # the probe sees a GCS
        record = ray_tmp / "ray" / "ray_current_cluster"
        proc = subprocess.run([sys.executable, "-c", JOIN, gcs, str(record)], capture_output=True, text=True,
                              timeout=180, env=env, cwd=ROOT, check=False)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        # every join reached the head's cluster (1 CPU), none started a local one of its own
        assert proc.stdout.split() == [word for how in ("RAY_ADDRESS", "address", "recorded")
                                       for word in (how, gcs, "1")], proc.stdout + proc.stderr
    finally:
        head.stdin.close()
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.terminate()  # SIGTERM: ray.init's handler exits and Ray stops the processes it started
            try:
                head.wait(timeout=30)
            except subprocess.TimeoutExpired:
                head.kill()
                head.wait(timeout=10)
