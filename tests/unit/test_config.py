"""Typed configs: JSON round trips, unknown keys, --set overrides with coercion, recipes and validation."""

from __future__ import annotations

import json

import pytest

from vlmkit.config import VLMConfig, apply_overrides, from_dict, parse_value, to_dict
from vlmkit.family import model_config_from_dict, processor_config_from_dict
from vlmkit.errors import ConfigError
from vlmkit.presets import PRESETS, get_preset
from vlmkit.train.recipe import Recipe, StageConfig, builtin_recipes, load_recipe


@pytest.mark.parametrize("name", PRESETS.names())
def test_preset_configs_round_trip_through_json(name):
    """config.json and processor.json come back as the family's own config types, equal to what was saved."""
    preset = get_preset(name)
    model = model_config_from_dict(json.loads(json.dumps(to_dict(preset.model))))  # tuples come back from lists
    processor = processor_config_from_dict(json.loads(json.dumps(to_dict(preset.processor))))
    assert (model, processor) == (preset.model, preset.processor)
    assert type(model) is type(preset.model) and type(processor) is type(preset.processor)
    assert isinstance(processor.image_size, tuple)
    # a family without an image tower (fuyu) has no vision section
    assert not hasattr(model, "vision") or isinstance(model.vision.image_size, tuple)


def test_files_written_before_families_had_their_own_configs_still_load():
    """vlmkit 0.1 wrote every family's sections into every config.json and processor.json."""
    legacy_model = {"family": "llava", "vision": {}, "connector": {}, "lm": {}, "image_token": "<image>",
                    "anyres": {"grid_pinpoints": []}, "text": {}, "contrastive": {}, "xattn": {}, "mllama": {}}
    assert type(model_config_from_dict(legacy_model)) is VLMConfig
    legacy_processor = {"image_processor": "fixed", "anyres": {}, "split": {}, "native": {}, "max_image_tiles": 4,
                        "text_padding": "longest", "qformer_max_length": 0, "qformer_pad_token": ""}
    assert processor_config_from_dict(legacy_processor, family="llava").family == "llava"
    with pytest.raises(ConfigError, match="names no family"):
        processor_config_from_dict(legacy_processor)
    with pytest.raises(ConfigError, match="unknown model family 'llava9'; families: .*llava"):
        model_config_from_dict({"family": "llava9"})


def test_from_dict_unknown_key_names_it_and_lists_valid_keys():
    match = r"unknown key VLMConfig\.lm\.widht\. Valid keys of VLMConfig\.lm: .*width"
    with pytest.raises(ConfigError, match=match):
        from_dict(VLMConfig, {"lm": {"widht": 64}})
    with pytest.raises(ConfigError, match=r"unknown key VLMConfig\.visoin"):
        from_dict(VLMConfig, {"visoin": {}})
    with pytest.raises(ConfigError, match=r"unknown key model\.xattn"):  # a section another family has
        model_config_from_dict({"family": "llava", "xattn": {"every": 2}})


def test_from_dict_wrong_types_are_refused():
    with pytest.raises(ConfigError, match=r"VLMConfig\.lm\.depth: expected int"):
        from_dict(VLMConfig, {"lm": {"depth": "two"}})
    with pytest.raises(ConfigError, match=r"expected 2 values"):
        from_dict(VLMConfig, {"vision": {"image_size": [1, 2, 3]}})
    with pytest.raises(ConfigError, match=r"expected a mapping"):
        from_dict(VLMConfig, {"lm": 3})


def test_apply_overrides_nested_returns_a_copy():
    cfg = get_preset("tiny-llava").model
    new = apply_overrides(cfg, {"lm.depth": 5, "vision.image_size": [32, 48], "connector.kind": "linear"})
    assert (new.lm.depth, new.vision.image_size, new.connector.kind) == (5, (32, 48), "linear")
    assert new.lm.width == cfg.lm.width
    assert cfg.lm.depth == 3 and cfg.vision.image_size == (64, 64), "the original must not change"


def test_apply_overrides_coerces_int_to_float():
    cfg = get_preset("tiny-llava").model
    new = apply_overrides(cfg, {"lm.norm_eps": 1, "lm.rope_theta": parse_value("500000")})
    assert new.lm.norm_eps == 1.0 and type(new.lm.norm_eps) is float
    assert new.lm.rope_theta == 500000.0 and type(new.lm.rope_theta) is float
    assert apply_overrides(new, {"lm.head_dim": None}).lm.head_dim is None
    assert apply_overrides(new, {"lm.head_dim": 16}).lm.head_dim == 16


def test_apply_overrides_unknown_key_names_it():
    with pytest.raises(ConfigError, match=r"'lm\.widht'.*no field 'widht' under lm.*width"):
        apply_overrides(get_preset("tiny-llava").model, {"lm.widht": 3})
    with pytest.raises(ConfigError, match=r"lm\.width\.x.*not a section"):
        apply_overrides(get_preset("tiny-llava").model, {"lm.width.x": 3})
    with pytest.raises(ConfigError, match=r"expected int, got 2\.5"):
        apply_overrides(get_preset("tiny-llava").model, {"lm.depth": 2.5})


def test_bool_is_not_accepted_for_an_int_field():
    with pytest.raises(ConfigError, match="expected int"):
        apply_overrides(get_preset("tiny-llava").model, {"lm.depth": True})


def test_set_accepts_exponent_notation_without_a_dot():
    # PyYAML (YAML 1.1) reads "1e-3" as a string; float fields must still accept it
    assert load_recipe("tiny-llava", ["stages.0.lr=1e-3"]).stages[0].lr == pytest.approx(1e-3)
    with pytest.raises(ConfigError, match=r"stages\.0\.lr.*expected float"):
        load_recipe("tiny-llava", ["stages.0.lr=fast"])


def test_parse_value_reads_yaml_scalars():
    assert parse_value("8") == 8 and parse_value("2.0e-3") == 0.002 and parse_value("true") is True
    assert parse_value("[vision, lm]") == ["vision", "lm"] and parse_value("abc") == "abc"


# ------------------------------------------------------------------------------------------------ recipes


def test_builtin_recipes_include_tiny_llava():
    assert "tiny-llava" in builtin_recipes()


def test_load_recipe_applies_plain_and_stage_overrides():
    base = load_recipe("tiny-llava")
    r = load_recipe("tiny-llava", ["train.batch_size=8", "stages.1.steps=3", "stages.1.train=[vision, lm]",
                                   "model.lm.depth=2"])
    assert r.train.batch_size == 8 and base.train.batch_size == 32
    assert r.stages[1].steps == 3 and r.stages[0].steps == base.stages[0].steps
    assert r.stages[1].train == ["vision", "lm"]
    assert r.model == {"lm.depth": 2}
    assert r.total_steps == base.stages[0].steps + 3
    assert r.name == "tiny-llava" and r.preset == "tiny-llava"


@pytest.mark.parametrize("override,match", [
    ("stages.9.steps=1", r"stages\.9\.steps: address a stage as stages\.N\.field with N in 0\.\.1"),
    ("stages.x.steps=1", r"stages\.N\.field"),
    ("stages.0.bogus=1", r"no field 'bogus' under stages\.0\. Valid: .*steps"),
    ("train.bogus=1", r"'train\.bogus'.*Valid: .*batch_size"),
    ("train.batch_size", r"key=value"),
])
def test_bad_overrides_raise_config_error(override, match):
    with pytest.raises(ConfigError, match=match):
        load_recipe("tiny-llava", [override])


def test_unknown_stage_key_error_quotes_the_full_key():
    with pytest.raises(ConfigError, match=r"unknown --set key 'stages\.0\.bogus'"):
        load_recipe("tiny-llava", ["stages.0.bogus=1"])


def test_unknown_recipe_lists_builtins():
    with pytest.raises(ConfigError, match=r"Unknown recipe 'nope'\. Built-in recipes: .*tiny-llava"):
        load_recipe("nope")
    with pytest.raises(ConfigError, match="recipe file not found"):
        load_recipe("missing.yaml")


@pytest.mark.parametrize("override,match", [
    ("stages.0.train=[vision, decoder]", r"stages\[0\]\.train: \['decoder'\].*valid: all, vision, connector, lm, text, logits"),
    ("stages.1.train=[]", r"stages\[1\]\.train"),
    ("stages.1.lr_scale={vison: 0.5}", r"stages\[1\]\.lr_scale: unknown module 'vison'"),
    ("stages.0.steps=0", r"stages\[0\]\.steps must be >= 1"),
    ("stages.1.objective=vqa", r"stages\[1\]\.objective: Unknown objective 'vqa'\. Available: cell_labels, contrastive, diffusion, lm, qformer"),
    ("stages.1.batch_size=16", r"stages\[1\]\.batch_size: 16; lm stages use train.batch_size \(only cell_labels, qformer stages take their own"),
    ("stages.1.optimizer=sgd", r"stages\[1\]\.optimizer: 'sgd'; valid: adamw, muon"),
    ("stages.0.optimizer=muon", r"stages\[0\]\.optimizer: muon does not train cell_labels stages; valid: adamw"),
    ("stages.1.where=true", r"stages\[1\]\.where: lm stages do not read it \(only cell_labels stages do\)"),
    ("stages.0.pairs=p.csv", r"stages\[0\]\.pairs: cell_labels stages do not read it \(only diffusion, qformer, unified stages do\)"),
    ("train.batch_size=0", "batch_size"),
])
def test_recipe_validation_rejects_bad_stages(override, match):
    with pytest.raises(ConfigError, match=match):
        load_recipe("tiny-llava", [override])


def test_recipe_yaml_file_with_unknown_section_is_refused(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("preset: tiny-llava\ntrian:\n  batch_size: 4\n")
    with pytest.raises(ConfigError, match=r"unknown key recipe\.trian"):
        load_recipe(str(path))
    path.write_text("preset: tiny-llava\nstages:\n  - {name: a, steps: 2}\n"
                    "  - {name: b, steps: 1, train: [lm]}\n")
    r = load_recipe(str(path))
    assert r.name == "r" and [s.name for s in r.stages] == ["a", "b"] and r.total_steps == 3
    assert isinstance(r.stages[0], StageConfig) and r.stages[0].train == list(Recipe().stages[0].train)


def test_stage_index_finds_the_first_stage_with_an_objective():
    r = load_recipe("tiny-llava")
    assert (r.stage_index("cell_labels"), r.stage_index("lm")) == (0, 1)
    with pytest.raises(ConfigError, match="has no stage with objective 'lm'"):
        load_recipe("tiny-llava", ["stages.1.objective=cell_labels", "stages.1.train=[vision]",
                                    "stages.1.optimizer=adamw"]).stage_index("lm")


def test_only_stages_keeps_the_stages_of_one_objective():
    from vlmkit.train.recipe import only_stages

    r = only_stages(load_recipe("tiny-clip"), "contrastive")
    assert [s.objective for s in r.stages] == ["contrastive"] and r.total_steps == r.stages[0].steps
    with pytest.raises(ConfigError, match="recipe 'tiny-clip' has no stage with objective 'lm'"):
        only_stages(load_recipe("tiny-clip"), "lm")
