"""Checkpoints: save -> load is exact, vlmkit.load gives a working Pipeline, bad folders fail; CLI errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from PIL import Image

import vlmkit
from vlmkit.checkpoint import load_checkpoint, write_model_files
from vlmkit.cli import main
from vlmkit.errors import CheckpointError
from vlmkit.models import build_model
from vlmkit.pipeline import Pipeline

from helpers import fixed_media, forward

pytestmark = pytest.mark.usefixtures("single_thread")


def save_tiny(folder, tiny_config, make_processor, tokenizer, tie: bool = True):
    cfg = tiny_config(connector="mlp", tie=tie, qkv_bias=True, class_token=True)
    model = build_model(cfg, tokenizer.token_id("<image>")).eval()
    processor = make_processor(image_seq_len=model.image_seq_len)
    folder.mkdir(parents=True, exist_ok=True)
    write_model_files(folder, model, cfg, processor, extra={"note": "unit test"})
    return model, processor, cfg


def probe_batch(model, tokenizer):
    img = tokenizer.token_id("<image>")
    ids = torch.tensor([[10, 11] + [img] * model.image_seq_len + [12, 13, 14]])
    return ids, fixed_media(torch.randn(1, 3, 16, 16), model.image_seq_len)


@pytest.mark.parametrize("tie", [True, False])
def test_save_then_load_gives_identical_logits(tmp_path, tiny_config, make_processor, tokenizer, tie):
    torch.manual_seed(0)
    model, processor, cfg = save_tiny(tmp_path / "ckpt", tiny_config, make_processor, tokenizer, tie)
    loaded, lproc, lcfg, meta = load_checkpoint(tmp_path / "ckpt")
    assert lcfg == cfg and meta["note"] == "unit test"
    assert lproc.cfg == processor.cfg and lproc.image_token_id == processor.image_token_id
    assert (loaded.lm.lm_head.weight is loaded.lm.embed_tokens.weight) == tie
    assert not loaded.training
    ids, pixels = probe_batch(model, tokenizer)
    with torch.no_grad():
        assert torch.equal(forward(loaded, ids, pixels).logits, forward(model, ids, pixels).logits)


def test_vlmkit_load_returns_a_working_pipeline(tmp_path, tiny_config, make_processor, tokenizer):
    save_tiny(tmp_path / "ckpt", tiny_config, make_processor, tokenizer)
    pipe = vlmkit.load(tmp_path / "ckpt")
    assert isinstance(pipe, Pipeline)
    image = Image.new("RGB", (16, 16), (255, 0, 0))
    assert isinstance(pipe.chat(image, "what colour?", max_new_tokens=3), str)
    assert isinstance(pipe.generate(image, "<image> colour:", max_new_tokens=3), str)
    scores = pipe.score(image, "<image> colour:", " red")
    assert len(scores) == len(pipe.processor.tokenizer.encode(" red")) and all(s <= 0 for s in scores)


def test_folder_without_config_json_names_it(tmp_path, tiny_config, make_processor, tokenizer):
    save_tiny(tmp_path / "ckpt", tiny_config, make_processor, tokenizer)
    (tmp_path / "ckpt" / "config.json").unlink()
    with pytest.raises(CheckpointError, match="missing config.json"):
        load_checkpoint(tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="not found"):
        vlmkit.load(tmp_path / "nowhere")


def edit_config(folder, **lm):
    meta = json.loads((folder / "config.json").read_text())
    meta["model"]["lm"].update(lm)
    (folder / "config.json").write_text(json.dumps(meta))


def test_config_with_a_different_depth_than_the_weights_is_refused(tmp_path, tiny_config, make_processor,
                                                                   tokenizer):
    for depth in (1, 3):
        folder = tmp_path / f"d{depth}"
        save_tiny(folder, tiny_config, make_processor, tokenizer)
        edit_config(folder, depth=depth)
        with pytest.raises(CheckpointError, match="does not match config.json"):
            load_checkpoint(folder)


def test_config_with_a_different_width_than_the_weights_is_refused(tmp_path, tiny_config, make_processor,
                                                                   tokenizer):
    save_tiny(tmp_path / "ckpt", tiny_config, make_processor, tokenizer)
    edit_config(tmp_path / "ckpt", mlp_dim=48)
    with pytest.raises(CheckpointError, match="does not match config.json"):
        load_checkpoint(tmp_path / "ckpt")


def test_unparseable_config_json_is_a_checkpoint_error(tmp_path, tiny_config, make_processor, tokenizer):
    save_tiny(tmp_path / "ckpt", tiny_config, make_processor, tokenizer)
    (tmp_path / "ckpt" / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json is not valid JSON"):
        load_checkpoint(tmp_path / "ckpt")


# ------------------------------------------------------------------------------------------------ CLI


def test_cli_chat_without_config_json_exits_2(tmp_path, capsys, tiny_config, make_processor, tokenizer):
    save_tiny(tmp_path / "ckpt", tiny_config, make_processor, tokenizer)
    (tmp_path / "ckpt" / "config.json").unlink()
    assert main(["chat", "--model", str(tmp_path / "ckpt"), "what is it?"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vlmkit: error:") and "config.json" in err and "Traceback" not in err


def test_cli_chat_answers_with_a_checkpoint(tmp_path, capsys, tiny_config, make_processor, tokenizer):
    save_tiny(tmp_path / "ckpt", tiny_config, make_processor, tokenizer)
    path = tmp_path / "red.png"
    Image.new("RGB", (16, 16), (255, 0, 0)).save(path)
    argv = ["chat", "--model", str(tmp_path / "ckpt"), "--image", str(path), "--max-new-tokens", "2", "hi"]
    assert main(argv) == 0
    assert capsys.readouterr().err == ""


def write_shapes_data(folder):
    folder.mkdir()
    Image.new("RGB", (64, 64), (255, 0, 0)).save(folder / "a.png")
    rows = [{"id": "0", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\ncolour?"},
                                                           {"from": "gpt", "value": "red"}]}]
    (folder / "train.json").write_text(json.dumps(rows))


def test_cli_train_with_unknown_preset_exits_2(tmp_path, capsys):
    write_shapes_data(tmp_path / "data")
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(f"preset: llava-9\ndata:\n  path: {tmp_path / 'data'}\ntokenizer:\n  vocab_size: 300\n"
                      "stages:\n  - steps: 1\n")
    assert main(["train", str(recipe), "--out", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "Unknown preset 'llava-9'" in err and "tiny-llava" in err


def test_cli_train_with_unknown_preset_fails_before_reading_data(tmp_path, capsys):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(f"preset: llava-9\ndata:\n  path: {tmp_path / 'no-data-yet'}\n")
    assert main(["train", str(recipe), "--out", str(tmp_path / "run"), "--quiet"]) == 2
    assert "Unknown preset 'llava-9'" in capsys.readouterr().err


def test_cli_train_unknown_set_key_exits_2(capsys):
    assert main(["train", "--set", "train.bogus=1", "tiny-llava"]) == 2
    err = capsys.readouterr().err
    assert "train.bogus" in err and "batch_size" in err and "Traceback" not in err


def test_cli_train_unknown_recipe_exits_2(capsys):
    assert main(["train", "no-such-recipe"]) == 2
    err = capsys.readouterr().err
    assert "Unknown recipe 'no-such-recipe'" in err and "tiny-llava" in err


def test_cli_bad_arguments_exit_2_via_argparse(capsys):
    with pytest.raises(SystemExit) as e:
        main(["chat", "what?"])  # --model is required
    assert e.value.code == 2
    assert "--model" in capsys.readouterr().err


def test_checkpoint_folder_is_relocatable(tmp_path, tiny_config, make_processor, tokenizer):
    torch.manual_seed(0)
    model, _, _ = save_tiny(tmp_path / "a", tiny_config, make_processor, tokenizer)
    shutil.move(tmp_path / "a", tmp_path / "b")
    ids, pixels = probe_batch(model, tokenizer)
    with torch.no_grad():
        loaded = load_checkpoint(tmp_path / "b")[0]
        assert torch.equal(forward(loaded, ids, pixels).logits, forward(model, ids, pixels).logits)


def test_an_optional_hugging_face_json_file_is_read_or_refused_by_name(tmp_path):
    """convert/hf's reader of processor_config.json, tokenizer_config.json, ...: absent or not an object gives {},
    invalid JSON is refused naming the file."""
    from vlmkit.convert.hf.io import read_json

    path = tmp_path / "processor_config.json"
    assert read_json(path) == {}
    path.write_text("[1, 2]")
    assert read_json(path) == {}
    path.write_text('{"image_seq_len": 64}')
    assert read_json(path) == {"image_seq_len": 64}
    path.write_text('{"image_seq_len": ')
    with pytest.raises(CheckpointError, match=r"processor_config\.json: not valid JSON"):
        read_json(path)
