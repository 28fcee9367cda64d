"""Concept sensitivity: the math of docs/method.md on the tiny model."""

import math

import pytest
import torch

from calora_ray.concepts import BASE_PROMPT, Concept, resolve_concept
from calora_ray.config import ConfigError, ScoreConfig, build_config, parse_config
from calora_ray.losses import concept_loss, diffusion_loss
from calora_ray.scoring import augmented_indices, build_report, sample_norms, score_samples, shard_indices
from calora_ray.selection import num_selected, select_top_k
from calora_ray.sensitivity import SensitivitySums, find_candidates

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


def norms(components, indices, concept=STYLE, **kw):
    """{index: (prompts, diff_rms, concept_rms)} of `sample_norms` (x_0 from 2 DDIM steps, seed 0)."""
    kw = dict(timestep=81, seed=0, x0_steps=2, **kw)
    return {i: rest for i, *rest in sample_norms(components, find_candidates(components.unet), concept, indices, **kw)}


def test_one_prompt_per_sample_is_the_all_run_for_the_prompt_it_drew(tiny):
    """--augmented-per-sample one: the same x_0 and noise as 'all' (diff gradients equal), and each
    sample's concept gradients are exactly the 'all' run's for the one prompt it drew."""
    indices = list(range(5))
    every = norms(tiny, indices, batch_size=2)
    one = norms(tiny, indices, batch_size=2, augmented_per_sample="one")
    assert list(one) == indices
    expected = SensitivitySums(list(find_candidates(tiny.unet)))
    for i in indices:
        prompts, diff, concept = one[i]
        assert prompts == augmented_indices(0, i, len(STYLE.augmented_prompts), "one")
        assert every[i][0] == [0, 1, 2] and concept.shape[0] == 1
        assert torch.equal(diff, every[i][1])
        assert torch.equal(concept[0], every[i][2][prompts[0]])
        expected.add(every[i][1], every[i][2][prompts])
    sums = score(tiny, n=5, batch_size=2, augmented_per_sample="one")
    assert sums.samples == 5 and sums.count == 5
    for field in ("ratio_sum", "concept_sum", "diff_sum"):
        assert torch.equal(getattr(sums, field), getattr(expected, field)), field


def test_drawn_prompt_depends_only_on_seed_and_index(tiny):
    """The batch size, the sharding over workers and the set of other samples do not move a sample's
    prompt (nor its numbers); the seed does."""
    n, batch = 6, 2
    whole = norms(tiny, list(range(n)), batch_size=batch, augmented_per_sample="one")
    assert {i: r[0] for i, r in norms(tiny, list(range(n)), batch_size=3, augmented_per_sample="one").items()} \
        == {i: r[0] for i, r in whole.items()}
    shards = [norms(tiny, shard_indices(n, batch, rank, 2), batch_size=batch, augmented_per_sample="one")
              for rank in range(2)]
    merged = {**shards[0], **shards[1]}
    assert sorted(merged) == list(range(n))
    for i in range(n):
        assert merged[i][0] == whole[i][0]
        assert torch.equal(merged[i][2], whole[i][2])
    # Over many indices the draw reaches every prompt, and another seed draws differently.
    draws = [augmented_indices(0, i, 3, "one")[0] for i in range(64)]
    assert set(draws) == {0, 1, 2}
    assert draws != [augmented_indices(1, i, 3, "one")[0] for i in range(64)]
    assert augmented_indices(0, 7, 3, "all") == [0, 1, 2]


def test_single_augmented_prompt_one_equals_all(tiny):
    single = Concept("single", BASE_PROMPT, (STYLE.augmented_prompts[0],))
    a = score(tiny, single, n=3, batch_size=2)
    b = score(tiny, single, n=3, batch_size=2, augmented_per_sample="one")
    assert (a.count, a.samples) == (b.count, b.samples) == (3, 3)
    for field in ("ratio_sum", "concept_sum", "diff_sum"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field


def test_one_prompt_encodes_and_differentiates_only_what_it_uses(tiny, monkeypatch):
    import calora_ray.scoring as scoring

    calls, encoded = [], []
    real_grad, real_encode = torch.autograd.grad, scoring.encode_prompts

    def counting_grad(outputs, inputs, *a, **kw):
        calls.append(len(inputs))
        return real_grad(outputs, inputs, *a, **kw)

    def recording_encode(components, prompts, *a, **kw):
        encoded.extend(prompts)
        return real_encode(components, prompts, *a, **kw)

    monkeypatch.setattr(torch.autograd, "grad", counting_grad)
    monkeypatch.setattr(scoring, "encode_prompts", recording_encode)
    score(tiny, n=3, augmented_per_sample="one")
    assert calls == [56] * (3 * 2)  # per sample: L_diff + the one L_concept
    drawn = {augmented_indices(0, i, 3, "one")[0] for i in range(3)}
    assert encoded == [STYLE.base_prompt] + [STYLE.augmented_prompts[k] for k in sorted(drawn)]


def test_augmented_per_sample_choices(tiny):
    assert ScoreConfig().augmented_per_sample == "one"  # the default since the estimator study (docs/benchmarks.md)
    assert build_config(ScoreConfig, {"augmented_per_sample": "all"}).augmented_per_sample == "all"
    with pytest.raises(ConfigError, match="--augmented-per-sample: 'two'"):
        build_config(ScoreConfig, {"augmented_per_sample": "two"})
    with pytest.raises(SystemExit):
        parse_config(ScoreConfig, ["--augmented-per-sample", "two"], job="score")
    assert parse_config(ScoreConfig, ["--augmented-per-sample", "one"], job="score").augmented_per_sample == "one"
    with pytest.raises(ValueError, match="--augmented-per-sample 'two'"):
        score(tiny, n=1, augmented_per_sample="two")


def test_report_says_which_estimator_ran(tiny):
    cfg = build_config(ScoreConfig, {"augmented_per_sample": "one"})
    candidates = find_candidates(tiny.unet)
    sums = score(tiny, n=2, augmented_per_sample="one")
    report = build_report(cfg, tiny, STYLE, candidates, sums, elapsed=0.0)
    assert report["augmented_per_sample"] == report["config"]["augmented_per_sample"] == "one"
    assert report["num_samples"] == report["num_pairs"] == 2


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
