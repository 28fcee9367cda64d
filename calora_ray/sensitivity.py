"""Concept sensitivity of every attention projection (docs/method.md, stage 1). Plain torch, no I/O.

    S(W) = E_{x_0, eps, c_aug} [ rms(dL_concept/dW) / (rms(dL_diff/dW) + eps) ]

For one sample, the UNet runs forward once under the base prompt c; L_diff and each L_concept
(one per augmented prompt) are then differentiated with respect to all candidate weights at once
(`torch.autograd.grad` over the list of candidate weights: one backward pass per loss, never a loop
over layers, and no gradient for any other parameter). The expectation over c_aug is estimated
with every augmented prompt per sample, or with one drawn per sample (calora_ray.scoring.augmented_indices);
either way `SensitivitySums` averages over the (sample, prompt) pairs it was given.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from diffusers.models.attention_processor import Attention
from torch import nn

from .collectives import all_reduce_sum
from .errors import UserValueError
from .losses import concept_loss, diffusion_loss

PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")
RATIO_EPS = 1e-12


def find_candidates(unet: nn.Module, self_attention_only: bool = False) -> dict[str, nn.Linear]:
    """Full module name -> nn.Linear for to_q/to_k/to_v/to_out.0 of every attention in the UNet.

    Walks the module tree (works for SD-1.x/2.x and SDXL UNets alike, whatever the block names),
    in the UNet's own order (down, mid, up). `self_attention_only` keeps attentions that are not
    cross-attention (attn1 in SD's transformer blocks).
    """
    out: dict[str, nn.Linear] = {}
    for name, module in unet.named_modules():
        if not isinstance(module, Attention):
            continue
        if self_attention_only and module.is_cross_attention:
            continue
        for proj in PROJECTIONS:
            linear = module.get_submodule(proj)
            if not isinstance(linear, nn.Linear):
                raise TypeError(f"{name}.{proj} is {type(linear).__name__}, not nn.Linear "
                                "(score the base UNet before attaching adapters)")
            out[f"{name}.{proj}"] = linear
    if not out:
        raise UserValueError("the UNet has no attention projections to score")
    # Registration order puts up_blocks before mid_block; reports read better down -> mid -> up.
    section = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}
    order = sorted(out, key=lambda n: section.get(n.split(".")[0], 3))
    return {n: out[n] for n in order}


def gradient_rms(loss: torch.Tensor, weights: list[torch.Tensor]) -> torch.Tensor:
    """RMS (Frobenius / sqrt(numel)) of d loss / d W for each W, in one backward pass. -> (M,)"""
    grads = torch.autograd.grad(loss, weights, retain_graph=True, allow_unused=True)
    return torch.stack([
        g.detach().float().pow(2).mean().sqrt() if g is not None else torch.zeros((), device=loss.device)
        for g in grads])


@contextmanager
def grad_only_for(module: nn.Module, weights: list[torch.Tensor]):
    """Within the block, only `weights` require grad (autograd builds no graph for the rest)."""
    previous = {p: p.requires_grad for p in module.parameters()}
    module.requires_grad_(False)
    for w in weights:
        w.requires_grad_(True)
    try:
        yield
    finally:
        for p, flag in previous.items():
            p.requires_grad_(flag)


def sample_gradient_norms(
    unet: nn.Module,
    weights: list[torch.Tensor],
    noisy: torch.Tensor,
    timestep: torch.Tensor,
    target: torch.Tensor,
    base_cond: dict,
    augmented_conds: list[dict],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient RMS of L_diff and of each L_concept for ONE sample.

    noisy: x_t (1, C, H, W); timestep: (1,); target: diffusion target like noisy;
    base_cond: UNet conditioning kwargs for c; augmented_conds: one per c_aug.
    Returns (diff_rms (M,), concept_rms (A, M)).

    The c_aug predictions run with the same batch shape as the c prediction, so c_aug = c gives
    a bit-identical target and exactly zero concept gradients.
    """
    with torch.no_grad():
        augmented_preds = [unet(noisy, timestep, **cond).sample for cond in augmented_conds]
    pred = unet(noisy, timestep, **base_cond).sample
    diff_rms = gradient_rms(diffusion_loss(pred, target), weights)
    concept_rms = torch.stack([gradient_rms(concept_loss(pred, aug), weights) for aug in augmented_preds])
    return diff_rms, concept_rms


@dataclass
class SensitivitySums:
    """Running sums over (sample, augmented prompt) pairs; mergeable across workers.

    ratio_sum[m]   = sum of rms(dL_concept/dW_m) / (rms(dL_diff/dW_m) + eps)   (normalised score)
    concept_sum[m] = sum of rms(dL_concept/dW_m)                                (unnormalised score)
    diff_sum[m]    = sum of rms(dL_diff/dW_m), counted once per (sample, prompt) pair
    """

    names: list[str]
    ratio_sum: torch.Tensor = None
    concept_sum: torch.Tensor = None
    diff_sum: torch.Tensor = None
    count: int = 0
    samples: int = 0
    eps: float = RATIO_EPS

    def __post_init__(self):
        m = len(self.names)
        for name in ("ratio_sum", "concept_sum", "diff_sum"):
            if getattr(self, name) is None:
                setattr(self, name, torch.zeros(m, dtype=torch.float64))

    def add(self, diff_rms: torch.Tensor, concept_rms: torch.Tensor) -> None:
        """Add one sample: diff_rms (M,), concept_rms (A, M)."""
        diff = diff_rms.double().cpu()
        concept = concept_rms.double().cpu()
        self.ratio_sum += (concept / (diff + self.eps)).sum(0)
        self.concept_sum += concept.sum(0)
        self.diff_sum += diff * concept.shape[0]
        self.count += concept.shape[0]
        self.samples += 1

    def merge(self, other: "SensitivitySums") -> "SensitivitySums":
        assert self.names == other.names
        return SensitivitySums(self.names, self.ratio_sum + other.ratio_sum,
                               self.concept_sum + other.concept_sum, self.diff_sum + other.diff_sum,
                               self.count + other.count, self.samples + other.samples, self.eps)

    def all_reduce(self, device: torch.device) -> "SensitivitySums":
        """The sums over every worker (torch.distributed); itself in a single process."""
        packed = torch.cat([self.ratio_sum, self.concept_sum, self.diff_sum,
                            torch.tensor([self.count, self.samples], dtype=torch.float64)]).to(device)
        packed = all_reduce_sum(packed).cpu()
        m = len(self.names)
        return SensitivitySums(self.names, packed[:m], packed[m:2 * m], packed[2 * m:3 * m],
                               int(packed[3 * m]), int(packed[3 * m + 1]), self.eps)

    def scores(self, normalized: bool = True) -> dict[str, float]:
        """Mean score per module: the ratio (normalised) or the concept gradient RMS alone."""
        if self.count == 0:
            raise ValueError("no samples were scored")
        values = (self.ratio_sum if normalized else self.concept_sum) / self.count
        return dict(zip(self.names, values.tolist()))

    def mean_diffusion_rms(self) -> dict[str, float]:
        return dict(zip(self.names, (self.diff_sum / max(self.count, 1)).tolist()))
