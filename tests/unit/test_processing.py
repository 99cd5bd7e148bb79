"""Processor, label masks, image transform and loading, conversation files, grouping, collate."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from vlmkit.data.collate import Item, collate
from vlmkit.nn import document_mask
from vlmkit.data.conversations import ReadReport, Sample, group_by_image, read_conversations
from vlmkit.errors import DataError
from vlmkit.processing import IGNORE, ImageTransform, load_image

from helpers import encode_chat, encode_conversation, encode_prompt, fixed_media

pytestmark = pytest.mark.usefixtures("single_thread")


def runs(ids: list[int], value: int) -> list[tuple[int, int]]:
    """(start, length) of each maximal run of ``value`` in ``ids``."""
    out, i = [], 0
    while i < len(ids):
        if ids[i] == value:
            j = i
            while j < len(ids) and ids[j] == value:
                j += 1
            out.append((i, j - i))
            i = j
        else:
            i += 1
    return out


def labelled_spans(labels: list[int]) -> list[list[int]]:
    """Maximal runs of supervised (!= IGNORE) label ids."""
    spans, cur = [], []
    for t in labels + [IGNORE]:
        if t != IGNORE:
            cur.append(t)
        elif cur:
            spans.append(cur)
            cur = []
    return spans


# -------------------------------------------------------------------------------------------- placeholders


def test_each_placeholder_expands_to_image_seq_len_tokens(make_processor):
    proc = make_processor(image_seq_len=4)
    img = proc.image_token_id
    ids = encode_prompt(proc, "look <image> here", 1)
    assert runs(ids, img) == [(ids.index(img), 4)]
    ids = encode_prompt(proc, "<image> left and <image> right", 2)
    assert [n for _, n in runs(ids, img)] == [4, 4]
    assert ids.count(img) == 8
    assert proc.decode([t for t in ids if t != img]) == " left and  right"


def test_chat_prompt_ends_with_generation_prompt(make_processor, tokenizer):
    proc = make_processor()
    ids = encode_chat(proc, "<image>\nwhat shape?", 1)
    text = tokenizer.decode(ids, skip_special_tokens=False)
    assert text.startswith("<|user|>\n")
    assert text.endswith("what shape?<|end|>\n<|assistant|>\n")


@pytest.mark.parametrize("text,n_images,n_ph", [("<image> and <image>", 1, 2), ("no image here", 1, 0),
                                                 ("<image>", 0, 1)])
def test_placeholder_count_mismatch_is_refused_with_counts(make_processor, text, n_images, n_ph):
    proc = make_processor()
    with pytest.raises(DataError, match=rf"placeholder count {n_ph} != images {n_images} in row 7"):
        encode_prompt(proc, text, n_images, where="row 7")
    conv = [{"from": "human", "value": text}, {"from": "gpt", "value": "ok"}]
    with pytest.raises(DataError, match=rf"placeholder count {n_ph} != images {n_images}"):
        encode_conversation(proc, conv, n_images)


# ------------------------------------------------------------------------------------------------ labels


def test_labels_cover_only_assistant_replies_and_their_end_marker(make_processor, tokenizer):
    proc = make_processor(image_seq_len=4)
    conv = [
        {"from": "human", "value": "<image>\nwhat shape is it?"},
        {"from": "gpt", "value": "a red circle."},
        {"from": "human", "value": "how many?"},
        {"from": "gpt", "value": "two"},
    ]
    ids, labels = encode_conversation(proc, conv, 1)
    assert len(ids) == len(labels)
    assert all(label in (IGNORE, t) for t, label in zip(ids, labels))
    spans = [tokenizer.decode(s, skip_special_tokens=False) for s in labelled_spans(labels)]
    assert spans == ["a red circle.<|end|>", "two<|end|>"]
    # everything else is the template and the user turns, never trained
    untrained = [t for t, lab in zip(ids, labels) if lab == IGNORE and t != proc.image_token_id]
    assert tokenizer.decode(untrained, skip_special_tokens=False) == (
        "<|user|>\n\nwhat shape is it?<|end|>\n<|assistant|>\n\n"
        "<|user|>\nhow many?<|end|>\n<|assistant|>\n\n")


def test_system_turn_and_openai_style_roles_are_not_trained(make_processor, tokenizer):
    proc = make_processor()
    conv = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"}]
    _, labels = encode_conversation(proc, conv, 0)
    spans = [tokenizer.decode(s, skip_special_tokens=False) for s in labelled_spans(labels)]
    assert spans == ["hello<|end|>"]


@pytest.mark.parametrize("conv,match", [
    ([], "non-empty list"),
    ([{"from": "human", "value": "hi"}], "no assistant"),
    ([{"from": "robot", "value": "hi"}, {"from": "gpt", "value": "x"}], "turn 0 has role 'robot'"),
    ([{"from": "human", "value": 3}, {"from": "gpt", "value": "x"}], "turn 0 needs a text"),
])
def test_unusable_conversations_raise_data_error(make_processor, conv, match):
    with pytest.raises(DataError, match=match):
        encode_conversation(make_processor(), conv, 0, where="row 3 of x.json")


def test_max_length_exceeded_raises(make_processor):
    proc = make_processor(image_seq_len=4, max_length=10)
    conv = [{"from": "human", "value": "<image>\ndescribe"}, {"from": "gpt", "value": "a circle"}]
    with pytest.raises(DataError, match=r"exceed max_length 10"):
        encode_conversation(proc, conv, 1)


def test_processor_requires_image_seq_len(tokenizer):
    from vlmkit.config import ProcessorConfig
    from vlmkit.processing import Processor

    with pytest.raises(ValueError, match="image_seq_len"):
        Processor(ProcessorConfig(family="llava", image_size=(16, 16)), tokenizer)


# ------------------------------------------------------------------------------------------------ images


def test_image_transform_shape_dtype_and_normalisation():
    colour = (255, 51, 102)
    mean, std = (0.5, 0.4, 0.3), (0.5, 0.25, 0.2)
    t = ImageTransform((16, 24), mean, std, resample="bicubic")
    x = t(Image.new("RGB", (40, 10), colour))  # PIL sizes are (width, height)
    assert x.shape == (3, 16, 24) and x.dtype == torch.float32
    for c in range(3):
        expected = (colour[c] / 255 - mean[c]) / std[c]
        torch.testing.assert_close(x[c], torch.full((16, 24), expected), atol=1e-5, rtol=0)


def test_image_transform_keeps_orientation():
    im = Image.new("RGB", (24, 16), (0, 0, 0))
    im.paste((255, 255, 255), (0, 0, 24, 8))  # top half white
    x = ImageTransform((16, 24), (0, 0, 0), (1, 1, 1))(im)
    assert torch.allclose(x[:, :8], torch.ones(3, 8, 24)) and torch.allclose(x[:, 8:], torch.zeros(3, 8, 24))


def test_image_transform_rejects_unknown_resample():
    with pytest.raises(ValueError, match="resample"):
        ImageTransform((8, 8), (0, 0, 0), (1, 1, 1), resample="cubic")


def test_load_image_missing_and_corrupt_files_name_the_path(tmp_path):
    missing = tmp_path / "nope.png"
    with pytest.raises(DataError, match=str(missing)):
        load_image(missing)
    corrupt = tmp_path / "x.png"
    corrupt.write_bytes(b"this is not a png at all" * 10)
    with pytest.raises(DataError, match=str(corrupt)):
        load_image(corrupt, where="row 4 of train.json")
    truncated = tmp_path / "t.png"
    Image.new("RGB", (32, 32), (1, 2, 3)).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:60])
    with pytest.raises(DataError, match=str(truncated)):
        load_image(truncated)


def test_load_image_converts_to_rgb(tmp_path):
    path = tmp_path / "g.png"
    Image.new("L", (5, 4), 7).save(path)
    im = load_image(path)
    assert im.mode == "RGB" and im.size == (5, 4)


def test_prepare_images_stacks_and_handles_none(make_processor, tmp_path):
    proc = make_processor()
    path = tmp_path / "a.png"
    Image.new("RGB", (20, 20), (10, 20, 30)).save(path)
    media = proc.prepare_images([path, Image.new("RGB", (8, 8))])
    assert media.pixel_values.shape == (2, 3, 16, 16) and media.tokens == [4, 4]
    assert proc.prepare_images([]).pixel_values.shape == (0, 3, 16, 16)
    text_only = proc.placeholders([path, path])  # what the text needs: token counts, no pixels read
    assert text_only.tokens == [4, 4] and text_only.pixel_values.numel() == 0


# ------------------------------------------------------------------------------------------------ files


def write_dataset(folder, rows) -> object:
    Image.new("RGB", (16, 16), (255, 0, 0)).save(folder / "a.png")
    Image.new("RGB", (16, 16), (0, 0, 255)).save(folder / "b.png")
    path = folder / "train.json"
    path.write_text(json.dumps(rows))
    return path


GOOD = {"id": "g", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nq?"},
                                                       {"from": "gpt", "value": "a."}]}


@pytest.mark.parametrize("bad,match", [
    ({"image": "a.png", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
     "placeholder count 0 != images 1"),
    ({"image": "missing.png", "conversations": GOOD["conversations"]}, "image file not found"),
    ({"image": "a.png"}, "conversations"),
    ("not an object", "expected an object"),
])
def test_read_conversations_bad_row_names_row_and_file(tmp_path, bad, match):
    path = write_dataset(tmp_path, [GOOD, bad, GOOD])
    with pytest.raises(DataError, match=match) as e:
        read_conversations(path)
    assert "row 1 of" in str(e.value) and str(path) in str(e.value)

    report = ReadReport()
    samples = read_conversations(path, skip_bad=True, report=report)
    assert len(samples) == 2 and [s.source for s in samples] == [f"row 0 of {path}", f"row 2 of {path}"]
    assert (report.rows, report.skipped) == (3, 1)
    assert "row 1 of" in report.reasons[0]


def test_read_conversations_resolves_images_relative_to_file(tmp_path):
    two = {"id": "two", "images": ["a.png", "b.png"], "conversations": [
        {"from": "human", "value": "<image><image> same?"}, {"from": "gpt", "value": "no"}]}
    path = write_dataset(tmp_path, [GOOD, two])
    samples = read_conversations(path)
    assert samples[0].images == [tmp_path / "a.png"]
    assert samples[1].images == [tmp_path / "a.png", tmp_path / "b.png"]


def test_read_conversations_invalid_json_names_file(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text("[{")
    with pytest.raises(DataError, match="broken.json is not valid JSON"):
        read_conversations(path)


def qa(i: int, image: str) -> Sample:
    return Sample(id=f"{image}{i}", images=[image], conversations=[
        {"from": "human", "value": f"<image>\nquestion {i} about {image}?"},
        {"from": "gpt", "value": f"answer {i}"},
    ])


def test_group_by_image_merges_turns_with_one_placeholder(make_processor):
    multi = Sample(id="m", images=["A", "B"], conversations=[
        {"from": "human", "value": "<image><image> diff?"}, {"from": "gpt", "value": "yes"}])
    samples = [qa(i, "A") for i in range(5)] + [qa(i, "B") for i in range(2)] + [multi]
    out = group_by_image(samples, max_turns=2, seed=0)

    assert multi in out
    grouped = [s for s in out if s is not multi]
    assert sorted(len(s.conversations) // 2 for s in grouped if s.images == ["A"]) == [1, 2, 2]
    assert [len(s.conversations) // 2 for s in grouped if s.images == ["B"]] == [2]
    pairs = set()
    for s in grouped:
        humans = [t["value"] for t in s.conversations[0::2]]
        assert [t["from"] for t in s.conversations] == ["human", "gpt"] * (len(s.conversations) // 2)
        assert humans[0].count("<image>") == 1 and all("<image>" not in h for h in humans[1:])
        assert len(s.conversations) // 2 <= 2
        pairs |= {(h.replace("<image>\n", ""), g["value"]) for h, g in zip(humans, s.conversations[1::2])}
        encode_conversation(make_processor(), s.conversations, 1)  # a valid one-image conversation
    expected = {(f"question {i} about {im}?", f"answer {i}") for im, n in (("A", 5), ("B", 2))
                for i in range(n)}
    assert pairs == expected


def test_group_by_image_never_merges_captions():
    """A caption states the answers, so in the same sequence the questions after it could be copied."""
    caption = lambda i: Sample(id=f"c{i}", images=["A"], type="caption", conversations=[
        {"from": "human", "value": "<image>\nDescribe the image."}, {"from": "gpt", "value": f"caption {i}"}])
    caps = [caption(i) for i in range(3)]
    out = group_by_image([qa(0, "A"), caps[0], qa(1, "A"), caps[1], caps[2]], max_turns=8, seed=0)
    assert [s for s in out if s.type == "caption"] == caps
    merged = [s for s in out if s.type != "caption"]
    assert len(merged) == 1 and len(merged[0].conversations) == 4
    assert all("caption" not in t["value"] for t in merged[0].conversations)


def test_group_by_image_is_deterministic_per_seed():
    samples = [qa(i, "A") for i in range(6)]
    ids = lambda seed: [s.id for s in group_by_image(samples, max_turns=3, seed=seed)]
    assert ids(0) == ids(0)
    assert ids(0) != ids(1) or ids(0) != ids(2)


def test_collate_right_pads_ids_labels_and_concatenates_images():
    a = Item(torch.tensor([5, 6, 7]), torch.tensor([-100, 6, 7]), prompt_len=1,
             media=fixed_media(torch.ones(1, 3, 4, 4), 1))
    b = Item(torch.tensor([8, 9, 10, 11, 12]), torch.tensor([-100, -100, 10, 11, 12]), prompt_len=2,
             media=fixed_media(torch.zeros(0, 3, 4, 4), 1))
    batch = collate([a, b], pad_id=0)
    assert torch.equal(batch.input_ids, torch.tensor([[5, 6, 7, 0, 0], [8, 9, 10, 11, 12]]))
    assert torch.equal(batch.labels, torch.tensor([[-100, 6, 7, -100, -100], [-100, -100, 10, 11, 12]]))
    assert batch.attention_mask is None and batch.real_tokens == 8  # right padding: causal attention ignores it
    assert batch.prompt_mask.tolist() == [[True, False, False, False, False], [True, True, False, False, False]]
    assert batch.media.pixel_values.shape == (1, 3, 4, 4)


def test_grouped_questions_train_exactly_as_single_turn_samples(tiny_config, make_processor, tokenizer, tmp_path):
    """Each grouped question sees the image and itself only, at its single-turn positions: same loss per
    token as the separate samples, and one question cannot give away another's answer."""
    from vlmkit.data.conversations import ConversationDataset
    from vlmkit.models import build_model

    torch.manual_seed(0)
    model = build_model(tiny_config(connector="pixel_shuffle"), tokenizer.token_id("<image>")).eval()
    processor = make_processor(image_seq_len=model.image_seq_len)
    Image.new("RGB", (16, 16), (200, 30, 30)).save(tmp_path / "a.png")
    questions = [("is the red circle left of the blue square?", "yes"),
                 ("is the blue square left of the red circle?", "no"), ("how many objects?", "2")]
    singles = [Sample(id=str(i), images=[tmp_path / "a.png"], conversations=[
        {"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a}]) for i, (q, a) in enumerate(questions)]
    (grouped,) = group_by_image(singles, max_turns=8, seed=0)
    assert grouped.independent_turns

    def token_losses(samples):
        batch = collate([ConversationDataset(samples, processor)[i] for i in range(len(samples))], pad_id=0)
        mask = None if batch.document_ids is None else document_mask(batch.document_ids, batch.segment_ids)
        h = model.lm(model.embed(batch.input_ids, model.encode_media(batch.media)),
                     position_ids=batch.position_ids, mask=mask)
        logits = model.lm.lm_head(h)[:, :-1]
        keep = batch.labels[:, 1:] != IGNORE
        nll = torch.nn.functional.cross_entropy(logits[keep], batch.labels[:, 1:][keep], reduction="none")
        return sorted(nll.tolist()), batch

    alone, batch = token_losses(singles)
    together, gbatch = token_losses([grouped])
    assert batch.document_ids is None and gbatch.document_ids is not None  # plain samples: fast causal path
    assert len(together) == len(alone) > 3  # answer tokens and end markers of the three questions
    assert together == pytest.approx(alone, abs=1e-5)  # so no answer can be read from another question
    # the shared prefix holds the image once; the layout is shorter than the three samples end to end
    ids = gbatch.input_ids[0].tolist()
    assert ids.count(tokenizer.token_id("<image>")) == model.image_seq_len
    assert len(ids) < batch.real_tokens


def test_shortest_edge_smaller_than_the_crop_is_refused():
    with pytest.raises(ValueError, match=r"shortest_edge 20 is smaller than the crop \(24, 24\)"):
        ImageTransform((24, 24), (0.5,) * 3, (0.5,) * 3, shortest_edge=20)
    t = ImageTransform((24, 16), (0.5,) * 3, (0.5,) * 3, shortest_edge=32)
    assert t(Image.new("RGB", (80, 40))).shape == (3, 24, 16)  # 80x40 -> 64x32, centre 16 wide, 24 high


def test_share_prefix_refuses_a_sample_supervised_from_its_first_token():
    from vlmkit.data.conversations import share_prefix

    from vlmkit.batch import Encoded

    with pytest.raises(ValueError, match="supervised from its first token"):
        share_prefix([Encoded([5, 6, 7], [IGNORE, 6, 7]), Encoded([5, 8], [5, 8])])
    out = share_prefix([Encoded([5, 6, 7, 9], [IGNORE, IGNORE, 7, 9]), Encoded([5, 6, 8], [IGNORE, IGNORE, 8])])
    assert (out.ids, out.positions, out.segments) == ([5, 6, 7, 9, 6, 8], [0, 1, 2, 3, 1, 2], [0, 1, 1, 1, 2, 2])
    assert out.labels == [IGNORE, IGNORE, 7, 9, IGNORE, 8]  # the token before each answer stays in its own segment
    assert out.prompt_len == 1  # the shared prefix


def test_processor_refuses_an_unknown_text_mode_and_a_broken_jinja_template(tokenizer):
    from vlmkit.config import ProcessorConfig
    from vlmkit.errors import ConfigError
    from vlmkit.processing import Processor
    from vlmkit.processing.chat import JinjaTemplate

    from vlmkit.processing.text import TextProcessorConfig

    with pytest.raises(ConfigError, match=r"processor text_mode must be 'segments' or 'whole', got 'joint'"):
        Processor(ProcessorConfig(family="llava", image_size=(16, 16), image_seq_len=4, text_mode="joint"), tokenizer)
    with pytest.raises(ConfigError, match=r"processor text_padding must be 'longest' or 'max_length', got 'left'"):
        TextProcessorConfig(family="clip", image_size=(16, 16), text_padding="left")
    with pytest.raises(DataError, match=r"the chat template is not valid Jinja"):
        JinjaTemplate("{% for m in messages %}{{ m", "<image>", None, "</s>")
    failing = JinjaTemplate("{{ raise_exception('only user turns') }}", "<image>", None, "</s>")
    with pytest.raises(DataError, match=r"the chat template failed on this conversation: only user turns"):
        failing.render([{"role": "user", "content": "hi"}])
