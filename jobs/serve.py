"""Serve the generator over HTTP: Ray Serve + FastAPI, OpenAPI docs at /docs.

    python jobs/serve.py --model toy-sd --lora outputs/finetune --controlnet outputs/controlnet
    python jobs/serve.py ... --host 0.0.0.0 --port 8000 --max-batch-size 8 --num-replicas 2

POST /v1/generate (a train-id mask as a base64 PNG -> images), GET /healthz, GET /v1/info.
Binds 127.0.0.1 unless --host says otherwise. A local Ray starts by itself (or RAY_ADDRESS is
used); Ctrl-C stops the app. examples/client.py shows the calls; cluster/serve.yaml deploys it.
"""

from calora_ray.cli import run_job
from calora_ray.config import ServeConfig, parse_config
from calora_ray.serve import run_serve


def main(argv=None):
    cfg = parse_config(ServeConfig, argv, job="serve", description=__doc__)
    url = run_job(run_serve, cfg)
    print(f"stopped serving on {url}")


if __name__ == "__main__":
    main()
