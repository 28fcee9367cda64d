"""Toy-city render time per scene, per domain and size (what every toy dataset item and toy mask costs).

    .venv/bin/python benchmarks/toy_render_speed.py            # a few seconds

Budget: <= 5 ms per 64x64 scene on a quiet core (it was a timed assertion in tests/test_data.py,
which a loaded CI machine could fail by chance; speed targets live here). Median of --repeats
rounds of 20 scenes each, after one warm-up render.
"""

import argparse
import statistics
import time

from common import machine, print_table, setup

from calora_ray.toyworld.city import DOMAINS, render_scene


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="64,64x128,128", help="comma-separated: a side or HxW")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    setup(1)
    print(f"# {machine()}\n")
    rows = []
    for text in args.sizes.split(","):
        h, _, w = text.partition("x")
        size = (int(h), int(w or h))
        for domain in DOMAINS:
            render_scene(0, domain, size)
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                for seed in range(20):
                    render_scene(seed, domain, size)
                times.append((time.perf_counter() - start) / 20)
            rows.append([text, domain, f"{1e3 * statistics.median(times):.2f}"])
    print_table(["size (HxW)", "domain", "ms per scene"], rows)


if __name__ == "__main__":
    main()
