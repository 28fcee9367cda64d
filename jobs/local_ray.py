"""Hold a local Ray cluster with a job server on 127.0.0.1 until interrupted (Ctrl-C / SIGTERM).

    python jobs/local_ray.py --dashboard-port 8290 &
    ray job submit --address http://127.0.0.1:8290 --working-dir . -- python jobs/score.py ...

Unlike `ray start` + `ray stop` (which stops every Ray process on the machine), stopping this
process stops only the cluster it started. The demo and the job-submission tests use it.
"""

import argparse
import signal
import sys
import time


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dashboard-port", type=int, default=8265, help="job server port (default: 8265)")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs to offer (default: all)")
    args = parser.parse_args(argv)

    import ray

    # SIGTERM -> normal exit, so ray's atexit shutdown stops the processes it started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    ray.init(include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=args.dashboard_port,
             num_cpus=args.num_cpus, logging_level="WARNING")
    print(f"ready: http://127.0.0.1:{args.dashboard_port}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
