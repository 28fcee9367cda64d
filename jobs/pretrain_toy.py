"""Pretrain the toy model `toy-sd` on the pretraining world, on CPU (see the toy world issue).

    python jobs/pretrain_toy.py --config jobs/configs/toy-sd.yaml      # the committed model, ~90 min
    python jobs/pretrain_toy.py --vae-steps 20 --unet-steps 20 --num-images 64 --output /tmp/toy

First a VAE (reconstruction + small KL), then a latent UNet with a CLIP text encoder
(v-prediction, cosine schedule, EMA), each within its time budget. Writes a standard diffusers
directory (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/) with
MODEL_CARD.md, samples.png, pretrain.json and logs/{vae,unet}/loss.{csv,png}. Running the same
command again continues from OUTPUT/checkpoint.safetensors; --overwrite starts over.
"""

import shlex
import signal
import sys

from calora_ray.cli import run_job
from calora_ray.config import PretrainConfig, parse_config
from calora_ray.toyworld.pretrain import pretrain_toy_sd


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    cfg = parse_config(PretrainConfig, argv, job="pretrain_toy", description=__doc__)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # `kill` saves a checkpoint, as Ctrl-C does
    try:
        out = run_job(pretrain_toy_sd, cfg, command=shlex.join(["python", "jobs/pretrain_toy.py", *argv]))
    except KeyboardInterrupt:
        print("interrupted: run the same command again to continue from the checkpoint", file=sys.stderr)
        sys.exit(130)
    print(f"model:   {out}  (StableDiffusionPipeline.from_pretrained / --model {out})\n"
          f"card:    {out / 'MODEL_CARD.md'}\nsamples: {out / 'samples.png'}\n"
          f"losses:  {out / 'logs' / 'vae' / 'loss.png'}, {out / 'logs' / 'unet' / 'loss.png'}")


if __name__ == "__main__":
    main()
