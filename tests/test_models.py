"""Model loading: the tiny presets are deterministic, a diffusers directory round-trips, and a model
that cannot be loaded fails fast with a message that says what to pass instead."""

import os

import pytest
import torch

from calora_ray.models import (ModelLoadError, build_tiny, build_tokenizer, encode_prompts, load_components,
                               save_components)


def test_tiny_is_deterministic_by_seed():
    a, b, c = build_tiny(0), build_tiny(0), build_tiny(1)
    sa, sb, sc = a.unet.state_dict(), b.unet.state_dict(), c.unet.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    ta, tb = a.text_encoder.state_dict(), b.text_encoder.state_dict()
    assert all(torch.equal(ta[k], tb[k]) for k in ta)


def test_tokenizer_knows_the_caption_words():
    tok = build_tokenizer()
    ids = tok("Photorealistic first-person urban street view with road and car in foggy weather").input_ids
    tokens = tok.convert_ids_to_tokens(ids)
    assert tokens[1:4] == ["photorealistic</w>", "first</w>", "-</w>"]
    assert "foggy</w>" in tokens and "weather</w>" in tokens and len(ids) == 16
    # every caption word is one token, even where words share letter pairs ("the" / "weather")
    from calora_ray.models import TOKENIZER_WORDS

    assert all(len(tok(w).input_ids) == 3 for w in TOKENIZER_WORDS)
    # any text still tokenizes (byte-level fallback)
    assert tok("zebra crossing").input_ids[0] == 0


def test_directory_round_trip_through_from_pretrained(tiny_dir):
    loaded = load_components(str(tiny_dir))
    built = build_tiny(0)
    assert loaded.name == str(tiny_dir) and not loaded.is_sdxl
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    cond_l = encode_prompts(loaded, ["Sketch of urban street in top-down view"], 64, 64)
    cond_b = encode_prompts(built, ["Sketch of urban street in top-down view"], 64, 64)
    with torch.no_grad():
        assert torch.allclose(loaded.unet(x, 81, **cond_l).sample, built.unet(x, 81, **cond_b).sample, atol=1e-6)
    assert not any(p.requires_grad for p in loaded.unet.parameters())


def test_sdxl_preset_round_trips(tmp_path):
    sdxl = build_tiny(0, sdxl=True)
    save_components(sdxl, tmp_path / "xl")
    loaded = load_components(str(tmp_path / "xl"))
    assert loaded.is_sdxl and type(loaded.pipeline()).__name__ == "StableDiffusionXLPipeline"
    cond = encode_prompts(loaded, ["a", "b"], 64, 64)
    assert cond["added_cond_kwargs"]["time_ids"].shape == (2, 6)
    assert cond["encoder_hidden_states"].shape == (2, 77, 64)


def test_missing_path_says_what_to_pass(tmp_path):
    with pytest.raises(ModelLoadError, match="no such path.*--model tiny"):
        load_components(str(tmp_path / "nothing-here"))


def test_directory_without_model_index(tmp_path):
    (tmp_path / "unet").mkdir()
    with pytest.raises(ModelLoadError, match="no model_index.json"):
        load_components(str(tmp_path))


def test_hub_id_offline_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="not in the local cache.*--model toy-sd"):
        load_components("someone/not-a-real-model")


@pytest.mark.skipif(os.environ.get("HF_HUB_OFFLINE") == "1", reason="checks the online path")
def test_unreachable_hub_id_says_what_to_pass():
    # No network here: the hub cannot be reached (and the id does not exist anyway).
    with pytest.raises(ModelLoadError, match="could not be loaded.*--model tiny"):
        load_components("calora-ray-tests/no-such-model")
