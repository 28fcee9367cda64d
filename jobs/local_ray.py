"""Hold a local Ray cluster with a job server on 127.0.0.1 until interrupted (Ctrl-C / SIGTERM).

    python jobs/local_ray.py --dashboard-port 8290 &
    ray job submit --address http://127.0.0.1:8290 --working-dir . -- python jobs/score.py ...

Unlike `ray start` + `ray stop` (which stops every Ray process on the machine), stopping this
process stops only the cluster it started. The demo and the job-submission tests use it.
"""

import argparse
import shutil
import signal
import sys
import tempfile
import time


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dashboard-port", type=int, default=8265, help="job server port (default: 8265)")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs to offer (default: all)")
    args = parser.parse_args(argv)

    import ray
    from ray._private.utils import write_ray_address

    # SIGTERM -> normal exit, so ray's atexit shutdown stops the processes it started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    # Its own temp dir, with this cluster's address recorded in it: Ray's job supervisor gives each
    # submitted job a RAY_ADDRESS found by an "auto" lookup in the cluster's temp dir, and without a
    # record there it takes the first GCS process on the machine -- another cluster's, when the
    # machine runs two (a test beside a demo), so the job ran, or hung, on the wrong one.
    temp_dir = tempfile.mkdtemp(prefix="calora-ray-", dir="/tmp")  # short: Ray's socket paths live in it
    try:
        context = ray.init(include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=args.dashboard_port,
                           num_cpus=args.num_cpus, logging_level="WARNING", _temp_dir=temp_dir)
        write_ray_address(context.address_info["gcs_address"], temp_dir)
        print(f"ready: http://127.0.0.1:{args.dashboard_port}", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
