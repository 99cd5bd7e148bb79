"""Shared fixtures: a byte-level BPE trained on a few sentences, tiny model configs, processors, and the tiny
Hugging Face folders of tests/hf_folders.py, each built once per session (``hf_folder`` and the named
fixtures after it)."""

from __future__ import annotations

import pytest
import torch

from vlmkit.config import ConnectorConfig, LanguageConfig, ProcessorConfig, VisionConfig, VLMConfig
from vlmkit.processing import Processor, TextTokenizer, train_bpe

SENTENCES = [
    "what shape is in the image?",
    "a red circle and a blue square.",
    "how many triangles are there? two.",
    "the green square is left of the yellow circle.",
    "describe the picture in one sentence.",
    "there are three objects: a circle, a square and a triangle.",
]


@pytest.fixture(scope="session")
def tokenizer() -> TextTokenizer:
    return TextTokenizer(train_bpe(SENTENCES, vocab_size=320))


@pytest.fixture(scope="session")
def tiny_config(tokenizer):
    """Factory: a VLMConfig with 16x16 images (4x4 patches of 4 px), width 32 ViT and a 2-layer GQA LM."""

    def make(connector: str = "mlp", layers: int = 2, tie: bool = True, class_token: bool = False,
             pre_norm: bool = False, qkv_bias: bool = False) -> VLMConfig:
        vision = VisionConfig(image_size=(16, 16), patch_size=4, width=32, depth=1, heads=2, mlp_dim=64,
                              class_token=class_token, pre_norm=pre_norm)
        lm = LanguageConfig(vocab_size=tokenizer.vocab_size, width=32, depth=2, heads=4, kv_heads=2,
                            mlp_dim=64, max_seq_len=256, tie_embeddings=tie, qkv_bias=qkv_bias)
        conn = ConnectorConfig(kind=connector, scale_factor=2, layers=layers)
        return VLMConfig(vision=vision, connector=conn, lm=lm)

    return make


@pytest.fixture(scope="session")
def make_processor(tokenizer):
    """Factory: a Processor for 16x16 images with ``image_seq_len`` tokens per image."""

    def make(image_seq_len: int = 4, max_length: int = 512) -> Processor:
        cfg = ProcessorConfig(family="llava", image_size=(16, 16), image_seq_len=image_seq_len, max_length=max_length)
        return Processor(cfg, tokenizer)

    return make


@pytest.fixture
def single_thread():
    """One intra-op thread: tiny tensors gain nothing from a pool, and on a busy 2-core machine every op of a
    2-thread pool waits a scheduler tick for its second thread (15 ms per 32-wide matmul measured)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


TINY_DUAL = ["model.vision.image_size=[32, 32]", "model.vision.patch_size=8", "model.vision.width=32",
             "model.vision.depth=1", "model.vision.heads=2", "model.vision.mlp_dim=64", "model.text.width=32",
             "model.text.depth=1", "model.text.heads=2", "model.text.mlp_dim=64", "model.text.context_length=32",
             "model.contrastive.embed_dim=32", "tokenizer.vocab_size=400", "data.train=[pairs_train.csv]",
             "data.val=pairs_val.csv", "data.val_samples=16", "train.batch_size=16", "train.eval_every=1000",
             "train.save_every=1000", "stages.0.steps=30", "stages.0.lr=2e-3", "stages.0.warmup=0.05",
             "stages.0.train=[all]", "stages.0.objective=contrastive"]


@pytest.fixture(scope="session")
def tiny_dual_encoder(tmp_path_factory):
    """(a tiny-clip checkpoint trained 30 steps with 32-d embeddings and a 32-token context, its ShapesWorld folder):
    objects_val/ has 30 colour_shape classes of one image each, captions_val.json 10 images with 3 captions each."""
    from vlmkit.data.shapes import generate_shapes
    from vlmkit.train.loop import train
    from vlmkit.train.recipe import load_recipe, only_stages, override_recipe

    root = tmp_path_factory.mktemp("dual")
    generate_shapes(root / "shapes", n=100, seed=1, size=32, progress=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # session fixtures come before the function-scoped single_thread
    try:
        recipe = override_recipe(only_stages(load_recipe("tiny-clip"), "contrastive"),
                                 [f"data.path={root / 'shapes'}", *TINY_DUAL])
        res = train(recipe, root / "run", progress=False, log=lambda m: None)
    finally:
        torch.set_num_threads(threads)
    return res.checkpoint, root / "shapes"


@pytest.fixture(scope="session")
def hf_folder(tmp_path_factory):
    """Factory: ``get(name)`` -> (folder, the transformers model, its processor) for each tiny Hugging Face folder of
    tests/hf_folders.py (``hf_folders.BUILDERS`` names them), built at most once per session and shared by every
    test that asks: tests copy a folder before editing it and leave the model and processor as they found them."""
    pytest.importorskip("transformers", reason="transformers (a test extra) is needed for parity")
    import hf_folders

    built: dict[str, tuple] = {}

    def get(name: str) -> tuple:
        if name not in built:
            if name not in hf_folders.BUILDERS:
                raise KeyError(f"no Hugging Face test folder {name!r}: there are {sorted(hf_folders.BUILDERS)}")
            bases = [get(base) for base in hf_folders.BASES.get(name, ())]
            folder = tmp_path_factory.mktemp(name)
            threads = torch.get_num_threads()
            torch.set_num_threads(1)  # session fixtures come before the function-scoped single_thread
            try:
                built[name] = (folder, *hf_folders.BUILDERS[name](folder, *bases))
            finally:
                torch.set_num_threads(threads)
        return built[name]

    return get


# the Hugging Face folders under the names the family tests know them by: (folder, model, processor)

@pytest.fixture(scope="session")
def llava_folder(hf_folder):
    return hf_folder("llava")


@pytest.fixture(scope="session")
def next_folder(hf_folder):
    return hf_folder("llava_next")


@pytest.fixture(scope="session")
def ov_folder(hf_folder):
    return hf_folder("llava_onevision")


@pytest.fixture(scope="session")
def qwen_folder(hf_folder):
    return hf_folder("qwen2_vl")


@pytest.fixture(scope="session")
def qwen25_folder(hf_folder):
    return hf_folder("qwen2_5_vl")


@pytest.fixture(scope="session")
def idefics3(hf_folder):
    return hf_folder("idefics3")


@pytest.fixture(scope="session")
def idefics3_nosplit(hf_folder):
    return hf_folder("idefics3_nosplit")


@pytest.fixture(scope="session")
def idefics2(hf_folder):
    return hf_folder("idefics2")


@pytest.fixture(scope="session")
def idefics2_nosplit(hf_folder):
    return hf_folder("idefics2_nosplit")


@pytest.fixture(scope="session")
def smolvlm(hf_folder):
    return hf_folder("smolvlm")


@pytest.fixture(scope="session")
def paligemma_folder(hf_folder):
    return hf_folder("paligemma")


@pytest.fixture(scope="session")
def paligemma2_folder(hf_folder):
    return hf_folder("paligemma2")


@pytest.fixture(scope="session")
def mllama_folder(hf_folder):
    return hf_folder("mllama")


@pytest.fixture(scope="session")
def idefics_folder(hf_folder):
    return hf_folder("idefics")


@pytest.fixture(scope="session")
def blip2_folder(hf_folder):
    return hf_folder("blip2")


@pytest.fixture(scope="session")
def instructblip_folder(hf_folder):
    return hf_folder("instructblip")


@pytest.fixture(scope="session")
def fuyu_folder(hf_folder):
    return hf_folder("fuyu")


@pytest.fixture(scope="session")
def internvl_folder(hf_folder):
    return hf_folder("internvl")


@pytest.fixture(scope="session")
def mistral3_folder(hf_folder):
    return hf_folder("mistral3")


@pytest.fixture(scope="session")
def gemma3_folder(hf_folder):
    return hf_folder("gemma3")


@pytest.fixture(scope="session")
def clip_folders(hf_folder):
    """{"eos" | "legacy": (folder, model, processor)}: CLIP pooling at the end-of-text token, and at the highest id."""
    return {"eos": hf_folder("clip_eos"), "legacy": hf_folder("clip_legacy")}


@pytest.fixture(scope="session")
def siglip_folder(hf_folder):
    return hf_folder("siglip")
