"""One typed config: defaults < YAML < flags, with errors that name the key."""

import pytest

from calora_ray.config import ConfigError, FinetuneConfig, ScoreConfig, build_config, load_yaml, parse_config


def test_flags_fill_the_job_config_and_its_shared_options():
    cfg = parse_config(ScoreConfig, ["--model", "tiny", "--top-k-percent", "5", "--self-attention-only",
                                     "--augmented-prompts", "a", "b", "--resolution", "32"], "score")
    assert cfg.model == "tiny" and cfg.top_k_percent == 5.0 and cfg.self_attention_only
    assert cfg.augmented_prompts == ["a", "b"] and cfg.resolution == 32


def test_yaml_sections_and_precedence(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: tiny\nseed: 3\nsteps: 7\nscore:\n  concept: viewpoint\n  top_k_percent: 10\n"
                    "finetune:\n  learning_rate: 1e-4\n  rank: 8\n"
                    "concepts:\n  weather:\n    augmented_prompts: [a b]\n")
    score = parse_config(ScoreConfig, ["--config", str(path), "--top-k-percent", "3"], "score")
    assert score.concept == "viewpoint" and score.top_k_percent == 3.0 and score.seed == 3
    assert score.concepts == {"weather": {"augmented_prompts": ["a b"]}}
    ft = parse_config(FinetuneConfig, ["--config", str(path)], "finetune")
    assert ft.learning_rate == 1e-4 and ft.rank == 8 and ft.steps == 7 and ft.lora_alpha == 8.0
    assert ft.data == "toy:target"  # the job's own default survives


def test_shipped_configs_parse():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "jobs" / "configs"
    for name in ("demo.yaml", "sd15-cityscapes.yaml"):
        s = parse_config(ScoreConfig, ["--config", str(root / name)], "score")
        f = parse_config(FinetuneConfig, ["--config", str(root / name)], "finetune")
        assert s.top_k_percent == 2 and s.timestep == 81
        assert f.selection.endswith("sensitivity.json")
    sd = parse_config(FinetuneConfig, ["--config", str(root / "sd15-cityscapes.yaml")], "finetune")
    assert (sd.rank, sd.lora_alpha, sd.learning_rate, sd.steps) == (64, 64.0, 1e-4, 10000)


def test_unknown_yaml_key_names_file_and_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("score:\n  top_k_percnt: 2\n")
    with pytest.raises(ConfigError, match=r"bad.yaml \[score\]: unknown key 'top_k_percnt'"):
        load_yaml(path, ScoreConfig, "score")


def test_wrong_type_in_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("num_samples: many\n")
    with pytest.raises(ConfigError, match="'num_samples' must be of type int"):
        load_yaml(path, ScoreConfig, "score")


@pytest.mark.parametrize("values,match", [
    ({"top_k_percent": 0.0}, r"--top-k-percent must be in \(0, 100\]"),
    ({"top_k_percent": 150.0}, r"--top-k-percent must be in \(0, 100\]"),
    ({"selection_mode": "best"}, "--selection-mode: 'best' is not one of"),
    ({"num_samples": 0}, "--num-samples must be >= 1"),
])
def test_bad_values(values, match):
    with pytest.raises(ConfigError, match=match):
        build_config(ScoreConfig, values)


def test_bad_flag_exits_with_usage(capsys):
    with pytest.raises(SystemExit) as e:
        parse_config(ScoreConfig, ["--top-k-percent", "0"], "score")
    assert e.value.code == 2
    assert "--top-k-percent must be in (0, 100]" in capsys.readouterr().err


def test_help_lists_every_flag(capsys):
    with pytest.raises(SystemExit):
        parse_config(ScoreConfig, ["--help"], "score")
    out = capsys.readouterr().out
    for flag in ("--model", "--data", "--concept", "--top-k-percent", "--timestep", "--num-samples", "--x0",
                 "--self-attention-only", "--k-by", "--selection-mode", "--output", "--config"):
        assert flag in out


def test_one_yaml_for_every_job(tmp_path):
    """Top-level keys of any job are accepted by all (each job takes its own); a typo is still refused."""
    from calora_ray.config import JOB_CONFIGS, GenerateConfig, MeasureConfig, SampleConfig, ServeConfig

    assert set(JOB_CONFIGS) >= {"score", "finetune", "sample", "pretrain_toy", "measure", "train_controlnet",
                                "generate", "serve"}
    f = tmp_path / "all.yaml"
    f.write_text("model: toy-sd\nrows_per_shard: 7\nreference: toy:world\nmax_batch_size: 3\n")
    assert parse_config(SampleConfig, ["--config", str(f)], job="sample").model == "toy-sd"
    assert parse_config(GenerateConfig, ["--config", str(f)], job="generate").rows_per_shard == 7
    assert parse_config(MeasureConfig, ["--config", str(f)], job="measure").reference == "toy:world"
    assert parse_config(ServeConfig, ["--config", str(f)], job="serve").max_batch_size == 3
    f.write_text("rows_per_shrd: 7\n")
    with pytest.raises(ConfigError, match="unknown key 'rows_per_shrd'"):
        load_yaml(f, GenerateConfig, "generate")


def test_control_palette_is_a_checked_choice_of_the_three_controlnet_jobs(capsys):
    from calora_ray.config import ControlNetConfig, GenerateConfig, ServeConfig
    from calora_ray.outputs import run_identity

    for cls, job in ((GenerateConfig, "generate"), (ServeConfig, "serve"), (ControlNetConfig, "train_controlnet")):
        assert cls().control_palette == "cityscapes"
        assert parse_config(cls, ["--control-palette", "ade20k"], job).control_palette == "ade20k"
        with pytest.raises(ConfigError, match="--control-palette: 'coco' is not one of cityscapes, ade20k"):
            build_config(cls, {"control_palette": "coco"})
        with pytest.raises(SystemExit):
            parse_config(cls, ["--control-palette", "coco"], job)
        with pytest.raises(SystemExit):
            parse_config(cls, ["--help"], job)
        assert "lllyasviel/control_v11p_sd15_seg" in capsys.readouterr().out
    # part of a run's identity only when not the default: runs recorded before the option still resume
    assert "control_palette" not in run_identity(GenerateConfig())
    assert run_identity(GenerateConfig(control_palette="ade20k"))["control_palette"] == "ade20k"
