"""P4: the Serve endpoint under load. requests/s at 8 concurrent clients with @serve.batch against
the same deployment with batching off (max batch size 1), and p50 latency of 1 client against a
direct in-process MaskGenerator call; side by side in one run, loopback only, bounded duration.

    .venv/bin/python benchmarks/p4_serve.py                  # tiny model, 64x64 masks, 10 steps
    .venv/bin/python benchmarks/p4_serve.py --quick          # smoke run

One local Ray (2 CPUs), one Serve HTTP proxy on 127.0.0.1, two apps from calora_ray.serve.application:
/b (max_batch_size 8, batch_wait_timeout_s 0.05: the shipped defaults; --batch-wait-timeout-s) and /u (max_batch_size 1),
one replica each with one torch thread; the direct call uses one thread in this process. Phases
are interleaved (u b u b ...) so load drift on the shared machine hits both. Every request: the
same mask, settings and its own seed. Prints a markdown table and the two ratios.
"""

from __future__ import annotations

import argparse
import base64
import io
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path


PORT = 8393


def closed_loop(url: str, body: dict, clients: int, duration: float) -> tuple[float, list[float]]:
    """`clients` threads post back to back for `duration` s: (requests/s, latencies of those done in time)."""
    import requests

    latencies, lock, stop_at = [], threading.Lock(), time.perf_counter() + duration
    errors = []

    def client(k):
        with requests.Session() as s:
            i = 0
            while True:
                start = time.perf_counter()
                if start >= stop_at:
                    return
                r = s.post(url, json={**body, "seed": k * 100000 + i}, timeout=300)
                i += 1
                end = time.perf_counter()
                if not r.ok:
                    errors.append(r.status_code)
                elif end <= stop_at:
                    with lock:
                        latencies.append(end - start)

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"{len(errors)} failed requests: {errors[:5]}")
    return len(latencies) / (stop_at - started), latencies


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per throughput phase")
    parser.add_argument("--rounds", type=int, default=2, help="u/b throughput phase pairs")
    parser.add_argument("--latency-requests", type=int, default=15, help="per side, 1 client")
    parser.add_argument("--batch-wait-timeout-s", type=float, default=0.05, help="of the batched app (/b)")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.duration, args.rounds, args.latency_requests = 2, 5.0, 1, 5

    import numpy as np
    import ray
    import requests
    import torch
    from PIL import Image
    from ray import serve

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import machine
    from p3_generation import make_controlnet

    from calora_ray.config import ServeConfig, build_config
    from calora_ray.generation import MaskGenerator
    from calora_ray.serve import application

    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="p4-"))
    make_controlnet(tmp / "cn")
    label = np.zeros((args.size, args.size), np.uint8)
    label[: args.size // 3] = 10
    label[args.size // 2:] = 0
    label[args.size * 5 // 8:, args.size // 4: args.size // 2] = 13
    buf = io.BytesIO()
    Image.fromarray(label).save(buf, format="PNG")
    body = {"mask": base64.b64encode(buf.getvalue()).decode(), "num_inference_steps": args.steps, "condition": "clear"}

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": PORT})
        common = {"model": "tiny", "controlnet": str(tmp / "cn"), "threads": 1, "num_cpus": 1.0, "max_steps": 50}
        batched = {**common, "max_batch_size": 8, "batch_wait_timeout_s": args.batch_wait_timeout_s}
        serve.run(application(build_config(ServeConfig, batched)), name="b", route_prefix="/b")
        serve.run(application(build_config(ServeConfig, {**common, "max_batch_size": 1})), name="u", route_prefix="/u")
        url = {m: f"http://127.0.0.1:{PORT}/{m}/v1/generate" for m in ("b", "u")}
        for m in url:  # warm-up: the first call of a replica pays one-off costs
            closed_loop(url[m], body, args.clients, 3.0)

        gen = MaskGenerator("tiny", controlnet=str(tmp / "cn"))
        prompt = requests.post(url["b"], json={**body, "seed": 0}, timeout=300).json()["prompt"]

        def direct(seed):
            start = time.perf_counter()
            gen.generate([label], [prompt], [seed], steps=args.steps)
            return time.perf_counter() - start

        direct(0)
        rps = {"u": [], "b": []}
        for _ in range(args.rounds):
            for m in ("u", "b"):
                rps[m].append(closed_loop(url[m], body, args.clients, args.duration)[0])
        lat = {"direct": [], "b": [], "u": []}
        with requests.Session() as s:
            for i in range(args.latency_requests):  # interleaved: direct, batched, unbatched
                lat["direct"].append(direct(1000 + i))
                for m in ("b", "u"):
                    start = time.perf_counter()
                    s.post(url[m], json={**body, "seed": 1000 + i}, timeout=300).raise_for_status()
                    lat[m].append(time.perf_counter() - start)
        info = requests.get(f"http://127.0.0.1:{PORT}/b/v1/info", timeout=30).json()["batching"]
    finally:
        serve.shutdown()
        ray.shutdown()

    tput = {m: statistics.median(v) for m, v in rps.items()}
    p50 = {m: statistics.median(v) for m, v in lat.items()}
    print(f"machine: {machine()}")
    print(f"tiny model + random ControlNet, {args.size}x{args.size} mask, {args.steps} steps, 1 torch thread per side; "
          f"{args.clients} clients x {args.duration:.0f} s x {args.rounds} round(s); {args.latency_requests} latency requests")
    print(f"batched replica: {info['batches']} batches, size histogram {info['batch_size_histogram']}\n")
    print(f"| measure | batching on (max 8, {args.batch_wait_timeout_s} s) | batching off | direct MaskGenerator | ratio |")
    print("|---|---|---|---|---|")
    print(f"| requests/s, {args.clients} clients | {tput['b']:.2f} | {tput['u']:.2f} | - | "
          f"{tput['b'] / tput['u']:.2f}x (on ÷ off; target >= 1.5x) |")
    print(f"| p50 latency, 1 client (ms) | {p50['b'] * 1e3:.0f} | {p50['u'] * 1e3:.0f} | {p50['direct'] * 1e3:.0f} | "
          f"{p50['b'] / p50['direct']:.2f}x on ÷ direct, {p50['u'] / p50['direct']:.2f}x off ÷ direct (target <= 1.10x) |")
    print(f"\nthroughput ratio (batched / unbatched): {tput['b'] / tput['u']:.2f}x")
    print(f"latency ratio (1 client, batched endpoint / direct call): {p50['b'] / p50['direct']:.2f}x")


if __name__ == "__main__":
    main()
