"""Concept sensitivity: the math of docs/method.md on the tiny model."""

import math

import pytest
import torch

from calora_ray.concepts import BASE_PROMPT, Concept, resolve_concept
from calora_ray.losses import concept_loss, diffusion_loss
from calora_ray.scoring import score_samples
from calora_ray.selection import num_selected, select_top_k
from calora_ray.sensitivity import find_candidates

STYLE = resolve_concept("style")


def score(components, concept=STYLE, n=2, **kw):
    candidates = find_candidates(components.unet, kw.pop("self_attention_only", False))
    return score_samples(components, candidates, concept, list(range(n)), timestep=81, seed=0,
                         x0_steps=2, progress=False, **kw)


def test_candidates_are_every_attention_projection(tiny):
    cands = find_candidates(tiny.unet)
    # 7 transformer blocks x (self + cross attention) x (q, k, v, out)
    assert len(cands) == 56
    assert all(n.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v") or n.endswith("to_out.0") for n in cands)
    assert all(isinstance(m, torch.nn.Linear) for m in cands.values())
    blocks = [n.split(".")[0] for n in cands]
    assert blocks.index("mid_block") > blocks.index("down_blocks") and blocks[-1] == "up_blocks"
    self_only = find_candidates(tiny.unet, self_attention_only=True)
    assert len(self_only) == 28 and all(".attn1." in n for n in self_only)


def test_sdxl_unet_candidates_and_scores():
    from calora_ray.models import build_tiny

    sdxl = build_tiny(0, sdxl=True)
    cands = find_candidates(sdxl.unet)
    # transformer_layers_per_block (1, 2): the walk finds the second transformer block too
    assert any(".transformer_blocks.1." in n for n in cands)
    sums = score(sdxl, n=1)
    scores = sums.scores()
    assert len(scores) == len(cands) and all(math.isfinite(v) and v > 0 for v in scores.values())


def test_concept_loss_stops_gradient():
    pred = torch.randn(2, 4, requires_grad=True)
    target = torch.randn(2, 4, requires_grad=True)
    concept_loss(pred, target).backward()
    assert target.grad is None and pred.grad is not None
    assert torch.allclose(diffusion_loss(pred, target), ((pred - target) ** 2).mean())


def test_identical_augmented_prompt_gives_zero_scores(tiny):
    same = Concept("same", BASE_PROMPT, (BASE_PROMPT,))
    sums = score(tiny, same, n=2)
    assert sums.count == 2
    assert all(v == 0.0 for v in sums.scores(normalized=True).values())
    assert all(v == 0.0 for v in sums.scores(normalized=False).values())
    # ...while the diffusion gradients themselves are not zero
    assert all(v > 0 for v in sums.mean_diffusion_rms().values())


def test_real_concept_gives_positive_scores_and_pairs(tiny):
    sums = score(tiny, n=2)
    assert sums.samples == 2 and sums.count == 2 * len(STYLE.augmented_prompts)
    assert all(v > 0 for v in sums.scores().values())


def test_one_backward_pass_per_loss_per_sample(tiny, monkeypatch):
    calls = []
    real_grad = torch.autograd.grad

    def counting_grad(outputs, inputs, *a, **kw):
        calls.append(len(inputs))
        return real_grad(outputs, inputs, *a, **kw)

    monkeypatch.setattr(torch.autograd, "grad", counting_grad)
    score(tiny, n=3)
    # per sample: 1 (L_diff) + 3 (one L_concept per augmented prompt), each over all 56 weights
    assert calls == [56] * (3 * (1 + len(STYLE.augmented_prompts)))


def test_no_gradient_reaches_other_parameters(tiny):
    tiny.unet.requires_grad_(False)
    tiny.unet.conv_in.weight.requires_grad_(True)
    score(tiny, n=1)
    assert all(p.grad is None for p in tiny.unet.parameters())
    # requires_grad flags are restored afterwards
    assert [n for n, p in tiny.unet.named_parameters() if p.requires_grad] == ["conv_in.weight"]


def test_normalisation_removes_a_planted_layer_gradient_scale(tiny):
    """Rescale one projection so its function is unchanged but its weight gradients grow 1000x.

    W -> s W with the input divided by s: the output is identical, dL/dW shrinks by s. With
    s = 1e-3 both gradients grow 1000x: the ratio (normalised score) stays, the raw concept
    gradient (unnormalised score) jumps to the top.
    """
    before = score(tiny, n=2)
    names = before.names
    ranked = select_top_k(before.scores(), 100)
    planted = ranked[-1]  # the least sensitive projection
    s = 1e-3
    module = find_candidates(tiny.unet)[planted]
    with torch.no_grad():
        module.weight.mul_(s)
    module.register_forward_pre_hook(lambda m, args: (args[0] / s,) + tuple(args[1:]))
    after = score(tiny, n=2)

    norm_b, norm_a = before.scores(), after.scores()
    for n in names:
        assert norm_a[n] == pytest.approx(norm_b[n], rel=1e-3), n
    assert select_top_k(norm_a, 100) == ranked  # the whole normalised ranking is unchanged

    raw_b, raw_a = before.scores(normalized=False), after.scores(normalized=False)
    assert raw_a[planted] == pytest.approx(raw_b[planted] / s, rel=1e-3)
    assert select_top_k(raw_a, 5)[0] == planted  # unnormalised: now ranked first
    assert select_top_k(raw_b, 100)[0] != planted


def test_same_seed_same_scores(tiny):
    from calora_ray.models import build_tiny

    a = score(tiny, n=2).scores()
    b = score(build_tiny(0), n=2).scores()
    assert a == b
    c = score_samples(tiny, find_candidates(tiny.unet), STYLE, [0, 1], timestep=81, seed=1, x0_steps=2,
                      progress=False).scores()
    assert c != a


def test_samples_split_anywhere_give_the_same_sums(tiny):
    """A sample's randomness is its own: scoring [0..3] equals [0, 1] merged with [2, 3]."""
    cands = find_candidates(tiny.unet)
    kw = dict(timestep=81, seed=0, x0_steps=2, progress=False, batch_size=2)
    whole = score_samples(tiny, cands, STYLE, [0, 1, 2, 3], **kw)
    parts = score_samples(tiny, cands, STYLE, [0, 1], **kw).merge(score_samples(tiny, cands, STYLE, [2, 3], **kw))
    assert parts.count == whole.count
    for n in whole.names:
        assert parts.scores()[n] == pytest.approx(whole.scores()[n], rel=1e-6)


def test_timestep_outside_schedule(tiny):
    with pytest.raises(ValueError, match="--timestep 1000"):
        score_samples(tiny, find_candidates(tiny.unet), STYLE, [0], timestep=1000, seed=0, progress=False)


@pytest.mark.parametrize("k,n,expected", [(2, 56, 2), (1, 56, 1), (0.1, 56, 1), (5, 100, 5), (10, 56, 6),
                                          (100, 56, 56), (2, 672, 14)])
def test_num_selected_is_ceil_with_floor_one(k, n, expected):
    assert num_selected(n, k) == expected == max(1, math.ceil(k * n / 100 - 1e-9))


def test_unknown_concept_names_it():
    with pytest.raises(ValueError, match="unknown concept 'weathr'.*style, viewpoint"):
        resolve_concept("weathr")


def test_user_defined_concept():
    c = resolve_concept("weather", {"weather": {"augmented_prompts": ["Photorealistic first-person urban "
                                                                     "street view at night"]}})
    assert c.base_prompt == BASE_PROMPT and len(c.augmented_prompts) == 1
    c = resolve_concept("x", base_prompt="a", augmented_prompts=["b", "c"])
    assert c == Concept("x", "a", ("b", "c"))
    with pytest.raises(ValueError, match="concept 'bad'"):
        resolve_concept("bad", {"bad": "not a mapping"})
