"""Ray for the jobs: connect to the cluster, size the workers, check the run storage, run a plain
per-worker function on a Ray Train TorchTrainer, and the worker-side calls (report a checkpoint,
fetch the latest one, the device, the threads). Nothing here knows about CA-LoRA.

The per-worker functions (calora_ray.ray_train) call the same plain code as the single-process
path; they learn their rank from torch.distributed (calora_ray.collectives) and hand checkpoints to
Ray through `ray_report`. Distribution is configuration (config.DistributedConfig).
"""

from __future__ import annotations

import logging
import os
import re
import socket
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import pyarrow.fs
import torch

from .errors import UserError


class ClusterResourceError(UserError, RuntimeError):
    """The cluster cannot host the requested workers (checked before training, with a bounded wait)."""


class StoragePathError(UserError, PermissionError):
    """--storage-path cannot hold the run state (checked before training)."""


# ----------------------------------------------------------------------------- inside a worker


def ray_report(metrics: dict, checkpoint_dir: str | Path | None = None) -> None:
    """ray.train.report from every worker (a barrier); only rank 0 passes a checkpoint directory."""
    import ray.train  # delayed: importing Ray takes seconds, bad input fails before

    checkpoint = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
    ray.train.report(metrics, checkpoint=checkpoint)


@contextmanager
def ray_latest_checkpoint():
    """The latest checkpoint of this run as a local directory (for local storage the checkpoint
    itself, else a download removed afterwards), or None; read-only, for the `with` block."""
    import ray.train  # delayed: importing Ray takes seconds, bad input fails before

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        yield None
        return
    with checkpoint.as_directory() as directory:
        yield Path(directory)


def worker_device() -> torch.device:
    import ray.train.torch  # delayed: importing Ray takes seconds, bad input fails before

    return ray.train.torch.get_device()


def set_worker_threads() -> None:
    """Use the CPUs Ray reserved for this worker (Ray exports them as OMP_NUM_THREADS)."""
    threads = int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
    if threads > 0:
        torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- the driver side


class ClusterConnectError(UserError, ConnectionError):
    """The Ray cluster to join does not answer (checked with a bounded wait before ray.init)."""


RECORDED = "the cluster Ray recorded on this machine"
# The HTTP/2 client preface and an empty SETTINGS frame: a gRPC server (the GCS) answers with its own
# SETTINGS frame (frame type 4), so a port that accepts connections but is not a GCS is told apart.
_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


def resolve_ray_address(address: str | None = None) -> tuple[str | None, str]:
    """(the address ray.init will join, where it came from), in Ray's own order: an explicit address,
    except None and 'auto', wins over RAY_ADDRESS; then the cluster `ray start` recorded in Ray's temp
    directory (RAY_TMPDIR, else TMPDIR, else /tmp: <dir>/ray/ray_current_cluster); for 'auto' also any
    GCS process running on this machine. None: ray.init starts a new local cluster ('local', or
    nothing given and nothing recorded)."""
    from ray._private import services  # delayed: importing Ray takes seconds, bad input fails before

    source = "--address"
    env = os.environ.get("RAY_ADDRESS")
    if env and address in (None, "auto"):
        address, source = env, "RAY_ADDRESS"
    if address is not None and address != "auto":
        return (None if address == "local" else address), source
    where = ("RAY_ADDRESS=auto: " if source == "RAY_ADDRESS" else "--address auto: ") if address == "auto" else ""
    record = _address_file()
    recorded = Path(record).read_text().strip() if os.path.exists(record) else None
    if recorded:
        return recorded, f"{where}{RECORDED} in {record}"
    if address is None:
        return None, "a new local cluster"
    running = services.find_gcs_addresses()  # what ray.init('auto') falls back to
    if not running:
        raise ClusterConnectError(
            f"{where}no Ray cluster found on this machine (none recorded in {record}, no GCS "
            f"process running); start one with `ray start --head`, give its host:port, or use RAY_ADDRESS=local "
            f"(--address local) for a fresh local cluster")
    return next(iter(running)), f"{where}a Ray GCS process running on this machine"


def _address_file() -> str:
    """Where `ray start` records the cluster's address (what ray.init reads when given none):
    <RAY_TMPDIR, else TMPDIR on Linux, else /tmp>/ray/ray_current_cluster."""
    try:
        import ray._common.utils  # delayed: importing Ray takes seconds, bad input fails before

        return ray._common.utils.get_ray_address_file(None)
    except (ImportError, AttributeError):  # another Ray version: its documented rule
        base = os.environ.get("RAY_TMPDIR") or (sys.platform.startswith("linux") and os.environ.get("TMPDIR")) or "/tmp"
        return os.path.join(base, "ray", "ray_current_cluster")


def _gcs_endpoint(address: str) -> tuple[str, int] | None:
    """(host, port) ray.init will dial for a GCS address (localhost names become this machine's
    address, as Ray does), or None when it is not host:port."""
    from ray._private import services  # delayed: importing Ray takes seconds, bad input fails before

    parsed = services.parse_address(address)
    if parsed is None or not str(parsed[1]).isdigit():
        return None
    try:
        return services.resolve_ip_for_localhost(parsed[0]), int(parsed[1])
    except Exception:  # noqa: BLE001 - Ray would fail on it too; probe the host as written
        return parsed[0], int(parsed[1])


def _gcs_answers(host: str, port: int, timeout_s: float) -> str | None:
    """None when a gRPC server answers at host:port within timeout_s, else what went wrong."""
    end = time.monotonic() + timeout_s
    try:
        conn = socket.create_connection((host, port), timeout=max(0.1, timeout_s))
    except OSError as e:
        return e.strerror or type(e).__name__
    with conn:
        if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
            return None  # a TLS GCS answers only after a handshake: the open port has to do
        try:
            conn.settimeout(max(0.1, end - time.monotonic()))
            conn.sendall(_H2_PREFACE)
            header = conn.recv(9)
        except OSError:
            header = b""
        if len(header) >= 4 and header[3] == 4:
            return None
        return "accepts connections but does not answer as a Ray GCS"


def _how_to_proceed(source: str) -> str:
    if source == "RAY_ADDRESS":  # `ray job submit` sets it: then the cluster is gone
        return ("start that cluster, point RAY_ADDRESS at a running one, or set RAY_ADDRESS=local for a fresh "
                "local cluster")
    if source == "--address":
        return ("start that cluster, give the address of a running one, or use --address local for a fresh "
                "local cluster")
    return ("if its processes died, `ray stop` clears the record, or RAY_ADDRESS=local (--address local) "
            "starts a fresh local cluster")


def wait_for_gcs(address: str, source: str, timeout_s: float) -> None:
    """Retry until a GCS answers at `address` or `timeout_s` has passed, then raise a
    ClusterConnectError naming the address, where it came from and what to do. Addresses other than
    host:port (ray://, http://) are Ray's to handle."""
    if "://" in address:
        return
    endpoint = _gcs_endpoint(address)
    if endpoint is None:
        raise ClusterConnectError(f"{source} {address!r} is not a Ray address: host:port of the cluster's GCS, "
                                  f"'auto', 'local', or ray://host:port")
    host, port = endpoint
    deadline = time.monotonic() + timeout_s
    said = False
    while True:
        problem = _gcs_answers(host, port, min(5.0, max(0.1, deadline - time.monotonic())))
        if problem is None:
            return
        if time.monotonic() >= deadline:
            dialled = "" if address.startswith(f"{host}:") else f" at {host}:{port}"
            raise ClusterConnectError(
                f"no Ray cluster answers at {address} ({source}) after {timeout_s:g} s (--ray-connect-timeout-s; "
                f"{problem}{dialled}); {_how_to_proceed(source)}")
        if not said:
            print(f"waiting up to {timeout_s:g} s for the Ray cluster at {address} ({source}): {problem}",
                  file=sys.stderr, flush=True)
            said = True
        time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))


# ----------------------------------------------------------------------------- what the console shows

# Library verbosity in the job's workers, as cli.quiet_libraries sets it in the driver. Environment
# variables (the job's runtime_env), so a worker has them before it imports the libraries, whose
# imports warn too (transformers' torchvision fallback). A key the driver's environment has already is
# left to it: a submitted job's runtime_env sets its variables in the driver's environment as well, and
# ray.init refuses a variable that both set.
WORKER_QUIET_ENV = {"TRANSFORMERS_VERBOSITY": "error", "DIFFUSERS_VERBOSITY": "error",
                    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1", "PYTHONWARNINGS": "ignore::FutureWarning"}
# Ray's own lines among what the workers write, left out of the console unless --verbose (each stays in
# its worker's log files): its C++ core's log lines below FATAL ("[time L pid tid] file.cc:N: ..."; e.g.
# core_worker.cc's note that an actor's constructor arguments are in the object store), Ray Train's
# INFO line for each report (its logger, named after its file in ray/train/v2/_internal/execution/
# context.py, is outside `ray.train`, so run_trainer's LoggingConfig does not reach it) ...
_RAY_LINE = re.compile(r"\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [DIWE] \d+ \d+\] \S+:\d+: "
                       r"|Reporting training result \d+: TrainingReport\(")
# ... and everything from Ray's helper actors that write about Ray only: Ray Train's placement group
# cleaner polls the State API, which a cluster without a dashboard (ensure_ray's local one) lacks, and
# says so every few seconds.
_RAY_HELPER_ACTORS = frozenset({"PlacementGroupCleaner"})
_PRINT_LOGS = "ray_print_logs"  # the name of the handler ray.init(log_to_driver=True) adds (below)
DRIVER_LOG = "calora-driver-{pid}.log"  # in the session's log directory: the driver's Ray records


def worker_line_shown(batch: dict, line: str) -> bool:
    """Whether a line a worker wrote reaches the console (unless --verbose): everything the job's own
    code writes (prints, progress bars, warnings, tracebacks), not Ray's own lines (above). `batch`: the
    metadata Ray forwards it with (actor_name, task_name, pid, is_err)."""
    return batch.get("actor_name") not in _RAY_HELPER_ACTORS and not _RAY_LINE.match(line)


def _filter_forwarded_logs() -> bool:
    """Print only the worker lines `worker_line_shown` keeps; returns whether the filter is in place.

    The one private hook here, because no public knob tells Ray's lines from the job's: the driver
    prints what the workers write (every worker's stdout/stderr, published by each node's log monitor)
    through the handler that ray.init(log_to_driver=True) adds as "ray_print_logs" to
    ray._private.ray_logging.global_worker_stdstream_dispatcher (ray._private.worker.connect; the thread
    is Worker.print_logs, the handler print_to_stdstream: dedup, then the "(Actor pid=...)" prefix);
    ray.shutdown removes it. This wraps that handler. log_to_driver=False would hide the job's progress
    bars and worker tracebacks too; RAY_DEDUP_LOGS_SKIP_REGEX is read once, when Ray is imported, and
    sees the text only, not which actor wrote it. Where the dispatcher or the handler is missing (another
    Ray version) nothing is filtered: the full output, as with --verbose."""
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher  # delayed: Ray
        handlers = list(dispatcher.handlers)
    except (ImportError, AttributeError):
        return False
    original = next((handler for name, handler in handlers if name == _PRINT_LOGS), None)
    if original is None:
        return False

    def print_logs(batch):
        try:
            lines = [line for line in batch["lines"] if worker_line_shown(batch, line)]
        except Exception:  # noqa: BLE001 - a batch of another shape: print it as Ray would
            original(batch)
            return
        if lines:
            original({**batch, "lines": lines})

    # one assignment: the dispatcher's emit iterates the list it holds, so no batch misses a handler
    dispatcher.handlers = [(name, print_logs if handler is original else handler) for name, handler in handlers]
    return True


class _ConsoleErrorsOnly(logging.Filter):
    """On the console handlers of the driver's "ray" logger (unless --verbose): errors only."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR


class _DriverLog(logging.Handler):
    """The driver's Ray records (what ray.init(logging_level="WARNING") lets through, e.g. the token
    authentication notice) in a file: ray.init warns before its session directory exists, so records
    until `write_to` are held, then written first; `print_held` prints them instead when ray.init failed."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.setFormatter(logging.Formatter("%(asctime)s\t%(levelname)s %(filename)s:%(lineno)s -- %(message)s"))
        self.path: Path | None = None
        self._held: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if self.path is None:
            self._held.append(record)
            return
        try:
            with open(self.path, "a", encoding="utf-8") as f:  # rare records: no descriptor kept open
                f.write(self.format(record) + "\n")
        except Exception:  # noqa: BLE001 - logging's own rule: a handler never raises
            self.handleError(record)

    def write_to(self, path: Path) -> None:
        with self.lock:
            self.path, held, self._held = path, self._held, []
        for record in held:
            self.handle(record)

    def print_held(self) -> None:
        with self.lock:
            held, self._held = self._held, []
        for record in held:
            print(self.format(record), file=sys.stderr, flush=True)


def _route_ray_logger(verbose: bool) -> _DriverLog | None:
    """The driver's "ray" logger: unless `verbose`, its console handlers show errors only and a
    _DriverLog gets the warnings (returned). Undoes what an earlier call set up."""
    ray_logger = logging.getLogger("ray")
    for handler in list(ray_logger.handlers):
        if isinstance(handler, _DriverLog):
            ray_logger.removeHandler(handler)
        for f in [f for f in handler.filters if isinstance(f, _ConsoleErrorsOnly)]:
            handler.removeFilter(f)
    if verbose:
        return None
    for handler in ray_logger.handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.addFilter(_ConsoleErrorsOnly())
    driver_log = _DriverLog()
    ray_logger.addHandler(driver_log)
    return driver_log


def ensure_ray(address: str | None = None, timeout_s: float = 60.0, verbose: bool = False) -> bool:
    """Join the Ray cluster (`address`, else RAY_ADDRESS as `ray job submit` sets it, else the cluster
    `ray start` recorded on this machine) or start a local one ('local', or none of them), unless this
    process is connected already. A cluster that does not answer within `timeout_s` fails with a
    ClusterConnectError instead of Ray's unbounded retries. Returns True when it started a local cluster
    (which this process then owns).

    What the console shows (the job's stdout/stderr; under `ray job submit` its job log): the job's own
    output, and what the workers write (progress bars, prints, warnings, tracebacks; Ray Data's
    driver-side progress is the driver's own), except Ray's own messages, which stay in Ray's log
    directory, named on one line at the start ("ray logs: <session>/logs"):
    - the driver's Ray warnings (e.g. the token authentication notice): its "ray" logger shows errors
      only; the rest is in DRIVER_LOG there;
    - Ray's lines among the workers' (worker_line_shown: its C++ core's, its helper actors'): each
      worker's stdout/stderr stays in worker-*.out/.err there (C++ lines also in python-core-worker-*.log);
    - Ray Train's INFO lines (resources, worker group, process group, checkpoints, reports): run_trainer
      sets its public LoggingConfig to WARNING; they stay in train/ray-train-sys-*.log there.
    The log directory is the session's on the node that runs the driver (the head under `ray job
    submit`); workers on other nodes keep theirs in their node's. Left as they are: Ray Data's driver-side
    log lines (its progress, when stderr is not a terminal), and the few lines the driver's own C++ core
    writes straight to its stderr (e.g. core_worker.cc's note when Ray Data starts its actor pool). `verbose`
    restores Ray's full output.
    Library noise in the workers (WORKER_QUIET_ENV) is silenced either way, as cli.quiet_libraries
    does in the driver."""
    import ray  # delayed: importing Ray takes seconds, bad input fails before

    if ray.is_initialized():
        return False
    target, source = resolve_ray_address(address)
    if target is not None:
        wait_for_gcs(target, source, timeout_s)
    env = {key: value for key, value in WORKER_QUIET_ENV.items() if key not in os.environ}
    driver_log = _route_ray_logger(verbose)
    try:
        # the address as given: Ray resolves it again the same way (and turns token auth on only for one it found)
        context = ray.init(address=address, include_dashboard=False, log_to_driver=True,
                           logging_level="WARNING", configure_logging=True,
                           runtime_env={"env_vars": env} if env else None)
    except BaseException:
        if driver_log is not None:  # what Ray said before it failed belongs with the error
            driver_log.print_held()
            _route_ray_logger(verbose=True)
        raise
    if driver_log is not None:
        session = (getattr(context, "address_info", None) or {}).get("session_dir")  # None under Ray Client
        logs = Path(session) / "logs" if session else Path(tempfile.gettempdir())
        driver_log.write_to(logs / DRIVER_LOG.format(pid=os.getpid()))
        _filter_forwarded_logs()
        where = logs if session else f"on the cluster's nodes (`ray logs`); this driver's in {logs}"
        print(f"ray logs: {where} (Ray's own messages; --verbose shows them here)", file=sys.stderr, flush=True)
    return target is None


def check_storage_path(storage_path: str) -> str:
    """Fail early, naming the path, if the run state cannot be written there. Returns it normalised."""
    if "://" not in storage_path:
        storage_path = str(Path(storage_path).expanduser().resolve())
    try:
        fs, path = pyarrow.fs.FileSystem.from_uri(storage_path)
        fs.create_dir(path, recursive=True)
        probe = f"{path.rstrip('/')}/.write-probe-{uuid.uuid4().hex[:8]}"
        with fs.open_output_stream(probe) as f:
            f.write(b"ok")
        fs.delete_file(probe)
    except Exception as e:  # noqa: BLE001 - any failure here means "cannot use it"
        raise StoragePathError(f"--storage-path {storage_path}: cannot write the run state there ({e})") from None
    return storage_path


def delete_run(storage_path: str, name: str) -> None:
    """Remove a run's state (its checkpoints) under storage_path/name, if there is any."""
    fs, path = pyarrow.fs.FileSystem.from_uri(storage_path)
    target = f"{path.rstrip('/')}/{name}"
    if fs.get_file_info(target).type != pyarrow.fs.FileType.NotFound:
        fs.delete_dir(target)


def cpus_per_gpu(nodes: list[dict]) -> int:
    """The CPUs a one-GPU worker can have on every GPU node: min over the alive nodes with GPUs of
    floor(CPUs / GPUs), at least 1 (`nodes`: ray.nodes()). CPU-only nodes do not count: a worker with
    a GPU runs on a GPU node, however many CPUs the rest of the cluster has."""
    shares = [int(n["Resources"].get("CPU", 0) // n["Resources"]["GPU"]) for n in nodes
              if n.get("Alive", True) and n.get("Resources", {}).get("GPU", 0) >= 1]
    return max(1, min(shares)) if shares else 1


def resolve_resources(num_workers: int, use_gpu: str, cpus_per_worker: int | None,
                      wait_s: float) -> tuple[bool, int]:
    """(use GPUs?, CPUs per worker) that this cluster can host; waits at most `wait_s` for them.

    use_gpu 'auto' takes GPUs when the cluster has one per worker. cpus_per_worker None: with GPUs,
    the CPUs per GPU of the GPU nodes (cpus_per_gpu: a worker must fit on one of them); without,
    the cluster's CPUs shared between the workers (so one worker on a laptop uses every core, like
    the plain single-process path does).
    """
    import ray  # delayed: importing Ray takes seconds, bad input fails before

    deadline = time.monotonic() + wait_s
    while True:
        total = ray.cluster_resources()
        cpus, gpus = int(total.get("CPU", 0)), int(total.get("GPU", 0))
        gpu = gpus >= num_workers if use_gpu == "auto" else use_gpu == "true"
        per_worker = cpus_per_worker or (cpus_per_gpu(ray.nodes()) if gpu and gpus else max(1, cpus // num_workers))
        missing = []
        if gpu and gpus < num_workers:
            missing.append(f"{num_workers} GPU(s) (one per worker); the cluster has {gpus}")
        if per_worker * num_workers > cpus:
            missing.append(f"{per_worker * num_workers} CPU(s) ({num_workers} workers x {per_worker}); "
                           f"the cluster has {cpus}")
        if not missing:
            return gpu, per_worker
        if time.monotonic() >= deadline:
            raise ClusterResourceError(
                f"--num-workers {num_workers} --use-gpu {use_gpu} needs " + " and ".join(missing)
                + f" (waited {wait_s:g} s for the autoscaler; lower --num-workers, use --use-gpu false, "
                  f"or raise --resource-wait-s)")
        time.sleep(min(2.0, max(0.0, deadline - time.monotonic())))


def run_trainer(worker_fn: Callable[[dict], None], worker_config: dict[str, Any], *, name: str,
                storage_path: str, num_workers: int, use_gpu: str = "auto", cpus_per_worker: int | None = None,
                max_failures: int = 0, resource_wait_s: float = 60.0, num_to_keep: int | None = 2,
                address: str | None = None, ray_connect_timeout_s: float = 60.0, verbose: bool = False):
    """Run `worker_fn(worker_config)` on `num_workers` Ray Train workers; returns the ray Result.

    Resume is Ray's: a run with the same `name` and `storage_path` restores its checkpoint
    manager, and `ray.train.get_checkpoint()` in the workers returns the latest checkpoint.
    `address`, `ray_connect_timeout_s`, `verbose`: the cluster to join and what the console shows
    (ensure_ray); unless `verbose`, Ray Train logs its INFO lines to its files only.
    """
    from ray.train import (CheckpointConfig, FailureConfig, LoggingConfig, RunConfig,  # delayed: Ray takes seconds
                           ScalingConfig)
    from ray.train.torch import TorchTrainer  # delayed: importing Ray takes seconds

    ensure_ray(address, ray_connect_timeout_s, verbose=verbose)
    gpu, per_worker = resolve_resources(num_workers, use_gpu, cpus_per_worker, resource_wait_s)
    resources = {"CPU": per_worker, **({"GPU": 1} if gpu else {})}
    trainer = TorchTrainer(
        worker_fn,
        train_loop_config={**worker_config, "cpus_per_worker": per_worker},
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=name, storage_path=storage_path,
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=num_to_keep),
            # the level of Ray Train's `ray.train` records on the console (its controller's and workers'
            # stderr); its system log files (train/ray-train-sys-*.log in the session's logs) keep them all
            logging_config=LoggingConfig(log_level="INFO" if verbose else "WARNING")),
    )
    return trainer.fit()
