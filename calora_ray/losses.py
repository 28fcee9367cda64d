"""The two losses of CA-LoRA (docs/method.md), as plain torch functions.

    x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps
    L_diff    = || eps_theta(x_t, c, t) - target ||^2        (target = eps, or v for v-prediction)
    L_concept = || eps_theta(x_t, c, t) - sg[eps_theta(x_t, c_aug, t)] ||^2

Both are means over elements (as diffusers' training scripts do). A constant factor does not
change the sensitivity ratio, and the mean keeps values comparable across image sizes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


TIMESTEP_SAMPLING = ("uniform", "cubic")


def sample_timesteps(batch: int, num_train_timesteps: int, generator: torch.Generator,
                     sampling: str = "uniform") -> torch.Tensor:
    """Training timesteps (B,) in [0, T).

    uniform  every t equally often (DDPM; what L_diff and the sensitivity scores use).
    cubic    t = (1 - u^3) T with u uniform: most draws at high noise, where a sampler lays out
             the image. T2I-Adapter (Mou et al., 2023) trains its structure adapters this way,
             because a control signal that is ignored at the first, noisiest steps is lost.
    """
    if sampling == "uniform":
        return torch.randint(0, num_train_timesteps, (batch,), generator=generator)
    if sampling == "cubic":
        u = torch.rand((batch,), generator=generator)
        return ((1.0 - u**3) * num_train_timesteps).long().clamp_(0, num_train_timesteps - 1)
    raise ValueError(f"timestep sampling {sampling!r}: expected one of {TIMESTEP_SAMPLING}")


def noisy_latents(scheduler, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """x_t for latents x0 (B, C, H, W), noise like x0, integer timesteps (B,)."""
    return scheduler.add_noise(x0, noise, timesteps)


def diffusion_target(scheduler, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet is trained to predict under the scheduler's `prediction_type`."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(x0, noise, timesteps)
    if kind == "sample":
        return x0
    raise ValueError(f"unsupported prediction_type {kind!r} in the scheduler config")


def diffusion_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L_diff: mean squared error between the UNet prediction and the diffusion target."""
    return F.mse_loss(pred.float(), target.float())


def concept_loss(pred: torch.Tensor, pred_augmented: torch.Tensor) -> torch.Tensor:
    """L_concept: the prediction under c pulled towards the (stop-gradient) one under c_aug.

    `pred_augmented` is detached here, so no gradient flows through the target even if the
    caller computed it with grad enabled.
    """
    return F.mse_loss(pred.float(), pred_augmented.detach().float())
