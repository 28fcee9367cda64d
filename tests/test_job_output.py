"""What a job's console shows (issue 16, item 3): the job's own progress, results, warnings and
errors, and one line naming Ray's log directory, which keeps Ray's own messages; --verbose shows
those too (calora_ray.distributed.ensure_ray).

The fast tests check the pieces in this process without a cluster: which forwarded worker lines are
Ray's, the wrapped handler Ray prints them through (a worker's traceback still gets through), and the
driver's Ray logger. The others run real jobs as a user does, each on a local cluster of its own
(--address local) in its own Ray temp dir (RAY_TMPDIR), so the machine's /tmp/ray, its recorded
cluster and any running cluster are never used; every wait is bounded.
"""

import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from calora_ray import distributed
from calora_ray.distributed import worker_line_shown

ROOT = Path(__file__).resolve().parents[1]

# What Ray says around a score job (seen in its output before this issue, and with --verbose):
# Ray Train's controller and worker INFO lines, and its C++ core's log line from the controller.
TRAIN_CHATTER = ("Requesting resources:", "Attempting to start training worker group", "Started training worker group",
                 "Setting up process group for:", "Checkpoint successfully created at:", "Reporting training result 1:",
                 "core_worker.cc:")
# The library warnings that got past cli.quiet_libraries (in the driver at import, and in the workers)
LIBRARY_CHATTER = ("requires torchvision (not installed)", "should be kept in float32")
TRACEBACK_LINE = re.compile(r"\(RayTrainWorker pid=\d+\)\S* +raise ValueError\(\"boom in the worker\"\)")


# ----------------------------------------------------------------------------- the pieces, fast


def test_rays_lines_are_told_from_the_jobs():
    worker = {"actor_name": "RayTrainWorker", "pid": 4242, "is_err": True}
    cleaner = {"actor_name": "PlacementGroupCleaner", "pid": 4243, "is_err": True}
    task = {"actor_name": None, "task_name": "train_task", "pid": 4244, "is_err": False}
    raylet = {"pid": "raylet", "is_err": False}
    hidden = [
        (worker, "[2026-11-29 17:19:26,876 E 11782 11810] core_worker.cc:2465: Actor with class name: "
                 "'PreemptionWatcher' and ID: '4aa8' has constructor arguments in the object store"),
        (worker, "[2026-11-29 17:19:26,876 W 11782 11810] gcs_client.cc:12: something Ray says"),
        (worker, "Reporting training result 1: TrainingReport(checkpoint=None, metrics={'num_pairs': 12}, "
                 "validation=False) from rank 0"),
        (cleaner, "Failed to query Ray Train Controller actor state. State API may be temporarily unavailable."),
        (cleaner, "Traceback (most recent call last):"),
    ]
    shown = [
        (worker, "scoring 'style':  40%|████      | 2/5 [00:01<00:01,  1.60sample/s]"),
        (worker, "Error in training function:"),
        (worker, "Traceback (most recent call last):"),
        (worker, '    raise ValueError("boom in the worker")'),
        (worker, "ValueError: boom in the worker"),
        (worker, "[2026-11-29 17:19:26,876 F 11782 11810] core_worker.cc:99: Check failed: the core cannot go on"),
        (worker, "UserWarning: the job's own warning"),
        (task, "11/29 17:40:01 - mmengine - INFO - Iter(train) [ 10/300]  lr: 1e-2  loss: 1.23"),
        (raylet, "A worker died or was killed while executing a task by an unexpected system error."),
    ]
    assert [line for batch, line in hidden if worker_line_shown(batch, line)] == []
    assert [line for batch, line in shown if not worker_line_shown(batch, line)] == []


@pytest.fixture
def dispatcher():
    """Ray's dispatcher of forwarded worker output, restored afterwards (as this test found it)."""
    from ray._private.ray_logging import global_worker_stdstream_dispatcher

    saved = list(global_worker_stdstream_dispatcher.handlers)
    yield global_worker_stdstream_dispatcher
    global_worker_stdstream_dispatcher.handlers = saved


def test_a_workers_traceback_still_reaches_the_console(dispatcher):
    """The filter wraps the handler ray.init(log_to_driver=True) prints worker output with: a failing
    worker's traceback goes through it whole (and in order), Ray's own lines of the same batch do not."""
    printed = []
    dispatcher.add_handler("ray_print_logs", lambda batch: printed.append(batch))
    dispatcher.add_handler("another", lambda batch: printed.append(("another", batch["lines"])))
    assert distributed._filter_forwarded_logs()
    traceback = ["Error in training function:", "Traceback (most recent call last):",
                 '  File "/work/calora_ray/ray_train.py", line 44, in score_worker',
                 '    raise ValueError("boom in the worker")', "ValueError: boom in the worker", ""]
    core = "[2026-11-29 17:26:30,877 E 14382 14412] core_worker.cc:2465: Actor with class name: 'PreemptionWatcher'"
    batch = {"ip": "10.0.0.1", "pid": 4242, "job": "01000000", "is_err": True, "actor_name": "RayTrainWorker",
             "task_name": None, "lines": [core, *traceback[:3], core, *traceback[3:]]}
    dispatcher.emit(batch)
    dispatcher.emit({**batch, "actor_name": "PlacementGroupCleaner", "lines": ["Failed to query Ray Train"]})
    assert printed[0] == {**batch, "lines": traceback}  # the same metadata: Ray's prefix and stream
    assert printed[1] == ("another", batch["lines"])  # other handlers (Ray Client's) get everything
    assert printed[2:] == [("another", ["Failed to query Ray Train"])]  # nothing printed for the cleaner


def test_without_rays_print_handler_nothing_is_filtered(dispatcher):
    """Another Ray version without that handler (or log_to_driver=False): the output is Ray's own."""
    dispatcher.handlers = [pair for pair in dispatcher.handlers if pair[0] != "ray_print_logs"]
    before = list(dispatcher.handlers)
    assert distributed._filter_forwarded_logs() is False
    assert dispatcher.handlers == before


def test_the_drivers_ray_warnings_go_to_the_log_file(tmp_path, capsys):
    """Unless --verbose, the driver's "ray" logger shows errors only on the console; its warnings go to
    the driver log, also those from before the session directory exists (ray.init warns early), or to
    the console when ray.init fails. Verbose undoes it."""
    import ray  # noqa: F401 - sets up the "ray" logger and its console handler, as a job's import does

    ray_logger, log = logging.getLogger("ray"), logging.getLogger("ray.calora_test")
    # its console handlers (Ray's own PlainRayHandler); a file handler an earlier test left is not one
    console = [h for h in ray_logger.handlers
               if isinstance(h, logging.StreamHandler) and not isinstance(h, (logging.FileHandler, distributed._DriverLog))]
    assert console
    warning, error = (log.makeRecord(log.name, level, __file__, 1, "a Ray message", (), None)
                      for level in (logging.WARNING, logging.ERROR))
    log.setLevel(logging.WARNING)  # an earlier ray.init(logging_level="ERROR") in this process set the parent's
    try:
        driver_log = distributed._route_ray_logger(verbose=False)
        assert [h.filter(warning) for h in console] == [False] * len(console)
        assert [h.filter(error) for h in console] == [True] * len(console)
        log.warning("an early Ray warning")
        driver_log.write_to(tmp_path / "driver.log")
        log.warning("a later Ray warning")
        log.error("a Ray error")
        text = (tmp_path / "driver.log").read_text()
        assert text.index("an early Ray warning") < text.index("a later Ray warning") < text.index("a Ray error")
        assert "WARNING" in text and "\n" in text

        driver_log = distributed._route_ray_logger(verbose=False)  # again: a second job in this process
        log.warning("before a failed ray.init")
        capsys.readouterr()
        driver_log.print_held()
        assert "before a failed ray.init" in capsys.readouterr().err
        assert sum(isinstance(h, distributed._DriverLog) for h in ray_logger.handlers) == 1
        assert [h.filter(warning) for h in console] == [False] * len(console)
    finally:
        log.setLevel(logging.NOTSET)
        assert distributed._route_ray_logger(verbose=True) is None
    assert [h.filter(warning) for h in console] == [True] * len(console)
    assert not [h for h in ray_logger.handlers if isinstance(h, distributed._DriverLog)]


# ----------------------------------------------------------------------------- real jobs


@pytest.fixture
def ray_tmp():
    """A short temp dir (Ray's socket paths must stay under 107 characters), removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="jo-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def run(ray_tmp: Path, *command) -> tuple[int, str, str]:
    """Run a job on a local cluster of its own: (exit status, stdout, stderr)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_TMPDIR=str(ray_tmp), RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", HF_HUB_OFFLINE="1",
               PYTHONPATH="")
    proc = subprocess.run([sys.executable, *map(str, command)], capture_output=True, text=True, timeout=400,
                          env=env, cwd=ROOT, check=False)
    return proc.returncode, proc.stdout, proc.stderr


def score(ray_tmp: Path, *flags):
    return run(ray_tmp, ROOT / "jobs" / "score.py", "--model", "tiny", "--data", "toy", "--concept", "style",
               "--top-k-percent", "2", "--num-samples", "2", "--x0-steps", "2", "--address", "local",
               "--output", ray_tmp / "score", *flags)


@pytest.mark.timeout(450)
def test_a_job_shows_its_own_output_and_where_rays_is(ray_tmp):
    code, out, err = score(ray_tmp)
    both = out + err
    assert code == 0, both
    assert f"report: {ray_tmp / 'score' / 'sensitivity.json'}" in out
    assert re.search(r"scoring 'style': +\d+%\|", err), both  # the worker's progress bar
    for chatter in (*TRAIN_CHATTER, *LIBRARY_CHATTER, "PlacementGroupCleaner", "TrainController"):
        assert chatter not in both, chatter
    logs = [line.split(" ", 3)[2] for line in err.splitlines() if line.startswith("ray logs: ")]
    assert len(logs) == 1, both
    logs = Path(logs[0])
    assert logs.parent.parent == ray_tmp / "ray" and logs.is_dir(), logs
    # what the console left out is in there: Ray Train's INFO lines and the C++ core's line
    kept = "\n".join(path.read_text(errors="replace") for path in logs.rglob("*")
                     if path.is_file() and path.suffix in (".log", ".err"))
    for chatter in ("Setting up process group for:", "Checkpoint successfully created at:",
                    "Reporting training result 1:", "core_worker.cc:"):
        assert chatter in kept, chatter


@pytest.mark.timeout(450)
def test_verbose_shows_rays_messages_too(ray_tmp):
    code, out, err = score(ray_tmp, "--verbose")
    both = out + err
    assert code == 0, both
    assert f"report: {ray_tmp / 'score' / 'sensitivity.json'}" in out
    assert re.search(r"scoring 'style': +\d+%\|", err), both
    for chatter in TRAIN_CHATTER:
        assert chatter in both, chatter
    assert "(TrainController pid=" in both and "ray logs: " not in both


FAILING = """
import sys
from calora_ray.distributed import run_trainer

def worker(config):
    raise ValueError("boom in the worker")

run_trainer(worker, {}, name="fails", storage_path=sys.argv[1], num_workers=1, use_gpu="false", address="local")
"""


@pytest.mark.timeout(450)
def test_a_failing_workers_traceback_reaches_the_console(ray_tmp):
    script = ray_tmp / "failing_job.py"  # a file, so that the tracebacks show its lines
    script.write_text(FAILING)
    code, out, err = run(ray_tmp, script, ray_tmp / "storage")
    both = out + err
    assert code == 1, both
    assert TRACEBACK_LINE.search(err), both  # the worker's own traceback, forwarded
    # and the driver's, with the worker's snippet (lines without a worker's prefix)
    assert re.search(r"^ray\.train\.WorkerGroupError: ", err, re.M) and re.search(
        r"^ValueError: boom in the worker$", err, re.M), both
    for chatter in ("Requesting resources:", "Setting up process group for:", "[FailurePolicy]", "core_worker.cc:"):
        assert chatter not in both, chatter
