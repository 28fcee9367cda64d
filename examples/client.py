"""Call the mask-conditioned sampling endpoint (jobs/serve.py) from Python.

    python jobs/serve.py --model tiny --controlnet outputs/controlnet &   # or toy-sd + your LoRA
    python examples/client.py --url http://127.0.0.1:8000 --out /tmp/client

The same with curl (`base64 -w0` on Linux):

    curl -s http://127.0.0.1:8000/healthz
    curl -s http://127.0.0.1:8000/v1/info | python -m json.tool
    MASK=$(base64 -w0 mask.png)   # mode L PNG of train ids 0..18, 255 = ignore; sides multiples of /v1/info's side_multiple
    curl -s -X POST http://127.0.0.1:8000/v1/generate -H 'Content-Type: application/json' \
         -d "{\"mask\": \"$MASK\", \"condition\": \"night\", \"seed\": 1, \"num_images\": 2}" > out.json
    curl -s -X POST http://127.0.0.1:8000/v1/generate -H 'Content-Type: application/json' -H 'Accept: image/png' \
         -d "{\"mask\": \"$MASK\", \"seed\": 1}" -o image.png
"""

import argparse
import base64
import io
import json
from pathlib import Path

import numpy as np
import requests
from PIL import Image


def png_b64(array: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def example_mask(size: int) -> np.ndarray:
    """A street in train ids: sky (10) over buildings (2), road (0) below, a car (13)."""
    label = np.full((size, size), 2, np.uint8)
    label[: size // 4] = 10
    label[size // 2:] = 0
    label[size * 5 // 8: size * 7 // 8, size // 4: size // 2] = 13
    return label


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--mask", help="a mode L PNG of train ids (default: a drawn street)")
    parser.add_argument("--condition", default="clear")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-images", type=int, default=2)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--out", default="client_out")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    info = requests.get(f"{args.url}/v1/info", timeout=30).json()
    print(f"model {info['model']}, LoRA sha256 {info['lora_sha256'][:12] or '-'}, limits {info['limits']}")
    if args.mask:
        mask_b64 = base64.b64encode(Path(args.mask).read_bytes()).decode("ascii")
    else:
        mask_b64 = png_b64(example_mask(info["native_resolution"]))

    body = {"mask": mask_b64, "condition": args.condition, "seed": args.seed, "num_images": args.num_images}
    if args.steps:
        body["num_inference_steps"] = args.steps
    r = requests.post(f"{args.url}/v1/generate", json=body, timeout=600)
    if not r.ok:  # 4xx: {"detail": "<field>: <what is wrong>", "field": "<field>"}
        raise SystemExit(f"{r.status_code}: {r.json().get('detail', r.text)}")
    result = r.json()
    for seed, image in zip(result["seeds"], result["images"]):
        (out / f"seed{seed}.png").write_bytes(base64.b64decode(image))
    print(f"prompt: {result['prompt']}\nseeds:  {result['seeds']} -> {out}/seed*.png")

    # One raw PNG instead of JSON.
    raw = requests.post(f"{args.url}/v1/generate", json={**body, "num_images": 1},
                        headers={"Accept": "image/png"}, timeout=600)
    raw.raise_for_status()
    (out / "raw.png").write_bytes(raw.content)
    print(f"raw:    {out}/raw.png (seed {raw.headers['X-Seed']})")
    (out / "info.json").write_text(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
