"""Hugging Face checkpoints as backbones: tiny LLaVA, LLaVA-NeXT, LLaVA-OneVision, BLIP-2 and Idefics3 checkpoints
(random weights, SmolLM2's tokenizer) are built in the test, written to a directory, and loaded with
`Backbone.load(DIR)`. Their greedy tokens must equal transformers' own generate with the same pixels; their projection
becomes the base connector and the shape of a task's projection, served through the engine."""
import numpy as np
import pytest
import torch
from PIL import Image

from cit_backbone.adapters import Connector, ConnectorConfig, TaskAdapter
from cit_backbone.backbone import Backbone
from cit_backbone.conversion import converted_lm_dir
from cit_backbone.hf import NORMALISATION
from cit_backbone.sampling import Sampling
from cit_registry.store import Registry, TaskCard, TaskKey
from cit_server.config import ServerConfig
from cit_server.engine import Engine, Request

from .conftest import assert_training_loss_is_the_full_causal_lm_loss, run_cli

IMAGE_TOKEN = 49151  # an id of SmolLM2's vocabulary, standing for image positions in transformers' prompts


def tiny_text_config():
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=49152, max_position_embeddings=512, tie_word_embeddings=False)


# every tiny vision tower: 32 x 32 pixels in 8-pixel patches (16 patches), two 32-wide layers
TINY_VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
               "image_size": 32, "patch_size": 8}


def save_checkpoint(model, directory):
    from transformers import AutoTokenizer

    model.save_pretrained(directory)
    AutoTokenizer.from_pretrained(converted_lm_dir()).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(0)
    vision = CLIPVisionConfig(**TINY_VISION)
    config = LlavaConfig(vision_config=vision, text_config=tiny_text_config(), image_token_index=IMAGE_TOKEN,
                         vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu")
    return save_checkpoint(LlavaForConditionalGeneration(config).eval(), tmp_path_factory.mktemp("llava"))


@pytest.fixture(scope="module")
def blip2_dir(tmp_path_factory):
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2QFormerConfig, Blip2VisionConfig

    torch.manual_seed(1)
    config = Blip2Config(
        vision_config=Blip2VisionConfig(**TINY_VISION).to_dict(),
        qformer_config=Blip2QFormerConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=2, encoder_hidden_size=32, vocab_size=100).to_dict(),
        text_config=tiny_text_config().to_dict(), num_query_tokens=4, image_token_index=IMAGE_TOKEN)
    return save_checkpoint(Blip2ForConditionalGeneration(config).eval(), tmp_path_factory.mktemp("blip2"))


@pytest.fixture(scope="module")
def idefics3_dir(tmp_path_factory):
    """SmolVLM's architecture (Idefics3: SigLIP tower, pixel shuffle, a projection without bias, Llama LM)."""
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3VisionConfig

    torch.manual_seed(2)
    vision = Idefics3VisionConfig(**TINY_VISION)
    config = Idefics3Config(vision_config=vision.to_dict(), text_config=tiny_text_config().to_dict(), scale_factor=2,
                            image_token_id=IMAGE_TOKEN)
    return save_checkpoint(Idefics3ForConditionalGeneration(config).eval(), tmp_path_factory.mktemp("idefics3"))


# grid resolutions of the tiny anyres checkpoints (tower input 32): cit's tiled view is the smallest square above 32,
# 64 x 64, 2 x 2 tiles; the non-square ones are there to be passed over
TINY_PINPOINTS = [[32, 64], [64, 32], [64, 64], [96, 96]]


@pytest.fixture(scope="module")
def llava_next_dir(tmp_path_factory):
    from transformers import CLIPVisionConfig, LlavaNextConfig, LlavaNextForConditionalGeneration

    torch.manual_seed(3)
    vision = CLIPVisionConfig(**TINY_VISION)
    config = LlavaNextConfig(vision_config=vision, text_config=tiny_text_config(), image_token_index=IMAGE_TOKEN,
                             vision_feature_layer=-2, vision_feature_select_strategy="default",
                             image_grid_pinpoints=TINY_PINPOINTS)
    return save_checkpoint(LlavaNextForConditionalGeneration(config).eval(), tmp_path_factory.mktemp("llava-next"))


@pytest.fixture(scope="module")
def llava_onevision_dir(tmp_path_factory):
    """OneVision's shape: a SigLIP tower (no CLS token, "full" selection, last layer), anyres_max_9."""
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, SiglipVisionConfig

    torch.manual_seed(4)
    vision = SiglipVisionConfig(**TINY_VISION)
    config = LlavaOnevisionConfig(vision_config=vision, text_config=tiny_text_config(), image_token_index=IMAGE_TOKEN,
                                  vision_feature_layer=-1, vision_feature_select_strategy="full",
                                  image_grid_pinpoints=TINY_PINPOINTS)
    return save_checkpoint(LlavaOnevisionForConditionalGeneration(config).eval(),
                           tmp_path_factory.mktemp("llava-onevision"))


@pytest.fixture(scope="module")
def qwen2_vl_dir(tmp_path_factory):
    """Qwen2-VL's shape: a vision transformer on flat 2 x 2-merged patches, visual.merger, a Qwen2 LM with
    multimodal RoPE (sections 2 + 3 + 3 of the 8 frequencies of a 16-wide head)."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    torch.manual_seed(5)
    text = {**tiny_text_config().to_dict(), "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                                                "mrope_section": [2, 3, 3]}}
    text = {k: v for k, v in text.items() if k not in ("model_type", "architectures")}
    vision = {"depth": 2, "embed_dim": 32, "hidden_size": 64, "num_heads": 2, "patch_size": 8, "spatial_merge_size": 2,
              "temporal_patch_size": 2, "mlp_ratio": 2}
    config = Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=IMAGE_TOKEN)
    return save_checkpoint(Qwen2VLForConditionalGeneration(config).eval(), tmp_path_factory.mktemp("qwen2-vl"))


@pytest.fixture(scope="module")
def qwen2_5_vl_dir(qwen2_vl_dir, tmp_path_factory):
    """Qwen2.5-VL's shape: Qwen2-VL's with window attention in the tower (windows of 2 x 2 merged tokens, the last
    block full) and an RMSNorm in the merger."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(6)
    import json

    text = json.loads((qwen2_vl_dir / "config.json").read_text())["text_config"]  # the same tiny M-RoPE LM
    text = {k: v for k, v in text.items() if k not in ("model_type", "architectures")}
    vision = {"depth": 2, "hidden_size": 32, "out_hidden_size": 64, "intermediate_size": 64, "num_heads": 2,
              "patch_size": 8, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 32,
              "fullatt_block_indexes": [1]}
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=IMAGE_TOKEN)
    return save_checkpoint(Qwen2_5_VLForConditionalGeneration(config).eval(), tmp_path_factory.mktemp("qwen2.5-vl"))


@pytest.fixture(scope="module")
def paligemma_dir(tmp_path_factory):
    """PaliGemma's shape: a SigLIP tower, one Linear, a Gemma LM (embeddings scaled by the square root of the width)."""
    from transformers import GemmaConfig, PaliGemmaConfig, PaliGemmaForConditionalGeneration, SiglipVisionConfig

    torch.manual_seed(7)
    vision = SiglipVisionConfig(**TINY_VISION, projection_dim=64)
    text = GemmaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16, vocab_size=49152, max_position_embeddings=512)
    config = PaliGemmaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN, projection_dim=64)
    return save_checkpoint(PaliGemmaForConditionalGeneration(config).eval(), tmp_path_factory.mktemp("paligemma"))


def images():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)) for _ in range(2)]


def family_inputs(vision, ids, image, prompt):
    """transformers' own inputs for `ids` (image-token placeholders where the visual tokens go) and `image`: its
    pixels in the family's shape and what else its forward needs. `prompt`: how many ids are prompt."""
    pixels = vision.views([image])  # [batch, views, channels, height, width]: Idefics3's and anyres' own shape
    if vision.kind == "qwen2_vl":  # flat patches, their grid, and which tokens are the image's (for M-RoPE)
        side = vision.tower.per_side
        return {"pixel_values": vision.tower.patches(pixels[:, 0]), "image_grid_thw": torch.tensor([[1, side, side]]),
                "mm_token_type_ids": (ids == IMAGE_TOKEN).int()}
    if vision.side:  # the image's size, as the family's processor reports it for cit's square tiled view
        return {"pixel_values": pixels, "image_sizes": torch.tensor([[vision.side * vision.size] * 2])}
    if vision.kind == "paligemma":  # 0: the prompt, seen both ways; 1: the answer
        types = torch.ones_like(ids)
        types[:, :prompt] = 0
        return {"pixel_values": pixels[:, 0], "token_type_ids": types}
    return {"pixel_values": pixels if vision.kind == "idefics3" else pixels[:, 0]}


def reference_tokens(cls, directory, backbone, instruction, image, max_new_tokens):
    """transformers' own generate: the same prompt with image-token placeholders, the same pixels. Its tokens and
    the logits of each step."""
    model = cls.from_pretrained(directory, dtype=torch.float32).eval()
    lm = backbone.lm
    pre, post = lm.prompt_ids(instruction)
    ids = torch.tensor([pre + [IMAGE_TOKEN] * backbone.base_connector().config.output_tokens + post])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                         **family_inputs(backbone.vision, ids, image, ids.shape[1]),
                         max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=lm.eos_id, pad_token_id=lm.eos_id,
                         output_logits=True, return_dict_in_generate=True)
    return [t for t in out.sequences[0, ids.shape[1]:].tolist() if t != lm.eos_id], [x[0] for x in out.logits]


# A template of another family's shape (Idefics3 / SmolVLM: "User:<image>...<end_of_utterance>\nAssistant:"), written
# with a token SmolLM2's vocabulary has for the end of an utterance.
OTHER_TEMPLATE = ("{% for m in messages %}{{ m['role'] | capitalize }}:{{ m['content'] }}<|endoftext|>\n{% endfor %}"
                  "{% if add_generation_prompt %}Assistant:{% endif %}")


@pytest.fixture(scope="module")
def other_template_dir(llava_dir, tmp_path_factory):
    """The tiny LLaVA checkpoint with a chat template that is not ChatML."""
    import shutil

    from transformers import AutoTokenizer

    directory = tmp_path_factory.mktemp("llava-other-template")
    for f in llava_dir.iterdir():
        shutil.copy(f, directory / f.name)
    tokenizer = AutoTokenizer.from_pretrained(llava_dir)
    tokenizer.chat_template = OTHER_TEMPLATE
    tokenizer.save_pretrained(directory)
    return directory


def test_prompts_come_from_the_checkpoints_chat_template_with_the_image_first(llava_dir, other_template_dir):
    chatml = Backbone.load(llava_dir).lm
    assert chatml.prompt.image_first and chatml.prompt.end_of_turn.startswith("<|im_end|>")
    before, after = chatml.prompt.texts("What is it?")
    assert before.startswith("<|im_start|>system\n") and before.endswith("<|im_start|>user\n")  # its system prompt
    assert after == "\nWhat is it?<|im_end|>\n<|im_start|>assistant\n"
    other = Backbone.load(other_template_dir).lm
    assert other.prompt.texts("What is it?") == ("User:", "\nWhat is it?<|endoftext|>\nAssistant:")
    assert other.eos_id == other.tokenizer.convert_tokens_to_ids("<|endoftext|>")  # answers end, labels end, there


def test_qwen2_vl_prompts_put_the_instruction_right_after_the_image(qwen2_vl_dir):
    """Qwen2-VL's processor writes <|vision_start|><|image_pad|>...<|vision_end|> and then the text, no line break
    (LLaVA's writes "<image>\n")."""
    assert Backbone.load(qwen2_vl_dir).lm.prompt.texts("What is it?")[1].startswith("What is it?<|im_end|>")


def test_a_prefix_lm_mask_lets_every_column_see_something(paligemma_dir):
    """With nothing before the image, a shorter row's padding columns see no real column; each must still see
    itself, or float16 kernels that add the mask in float16 turn the row to NaN, and the next layer spreads it."""
    lm = Backbone.load(paligemma_dir).lm
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])  # no prefix columns; row 0 padded on the left by 2
    prompt = mask.bool()
    additive = lm.attention(mask, prompt)[:, 0]
    assert (additive == 0).any(dim=-1).all()
    assert (additive[0, 2:, 2:] == 0).all() and (additive[0, 2:, :2] < 0).all()  # the prompt sees itself both ways


def test_a_connectors_family_options_belong_to_its_projector():
    """A newline grid on a merger (which would write fewer tokens than it promises), or a merger's options on
    another projector (silently unused), are refused when the config is made."""
    ConnectorConfig(feature_dim=8, hidden_size=4, num_tokens=4, projector="token_mlp", grid_rows=2, grid_columns=2)
    for bad in ({"projector": "merger", "merged_patches": 2, "grid_rows": 2, "grid_columns": 2},
                {"projector": "token_mlp", "merged_patches": 2}, {"projector": "token_linear", "norm": "rms"}):
        with pytest.raises(ValueError):
            ConnectorConfig(**{"feature_dim": 8, "hidden_size": 4, "num_tokens": 4, **bad})


def test_each_familys_image_normalisation_is_its_image_processors():
    """cit resizes to the tower's square itself (and to the tiled square, no padding) but normalises as the family
    does: with the checkpoint's preprocessor_config.json where it has one, else the family's defaults."""
    from transformers import (
        BlipImageProcessor,
        CLIPImageProcessor,
        Idefics3ImageProcessor,
        LlavaNextImageProcessor,
        LlavaOnevisionImageProcessor,
    )

    for kind, processor in (("llava", CLIPImageProcessor()), ("blip2", BlipImageProcessor()),
                            ("idefics3", Idefics3ImageProcessor()), ("llava_next", LlavaNextImageProcessor()),
                            ("llava_onevision", LlavaOnevisionImageProcessor())):
        assert NORMALISATION[kind] == (tuple(processor.image_mean), tuple(processor.image_std)), kind


def test_qwen2_vl_images_are_patched_as_its_image_processor_patches_them(qwen2_vl_dir):
    """cit's square (16 x 16 merged tokens: 256 pixels at the tiny tower's 8-pixel patches), cut into the flat
    patches Qwen2VLImageProcessor writes for that image: merge blocks in a row, each patch twice in time."""
    from transformers import Qwen2VLImageProcessor

    vision = Backbone.load(qwen2_vl_dir).vision
    square = images()[0].convert("RGB").resize((vision.size, vision.size), Image.Resampling.BICUBIC)
    processor = Qwen2VLImageProcessor(do_resize=False, patch_size=8, merge_size=2, temporal_patch_size=2)
    theirs = processor(square, return_tensors="pt")
    assert theirs.image_grid_thw.tolist() == [[1, 32, 32]]
    ours = vision.tower.patches(vision.views([square])[:, 0])
    assert ours.shape == theirs.pixel_values.shape and torch.allclose(ours, theirs.pixel_values, atol=1e-5)


def test_a_checkpoints_own_image_processor_normalises_its_images(llava_onevision_dir, tmp_path):
    """OneVision's released checkpoints normalise with 0.5, not their processor class's CLIP defaults."""
    import shutil

    from transformers import LlavaOnevisionImageProcessor

    for f in llava_onevision_dir.iterdir():
        shutil.copy(f, tmp_path / f.name)
    LlavaOnevisionImageProcessor(image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(tmp_path)
    picture = images()[:1]
    default, own = Backbone.load(llava_onevision_dir).vision, Backbone.load(tmp_path).vision
    assert default.normalisation == NORMALISATION["llava_onevision"]
    assert own.normalisation == ((0.5,) * 3, (0.5,) * 3)
    expected = torch.from_numpy(np.asarray(picture[0].convert("RGB").resize((32, 32), Image.Resampling.BICUBIC),
                                           dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)
    assert torch.allclose(own.views(picture)[0, 0], expected, atol=1e-6)
    assert not torch.allclose(default.views(picture)[0, 0], expected, atol=1e-2)


def test_anyres_checkpoints_give_every_image_one_tiled_view_of_fixed_size(llava_next_dir):
    """The base view, then 2 x 2 tiles of the image at 64 x 64, cut row by row as the family's processor cuts them;
    the projection writes 16 base tokens, then 8 rows of 8 grid tokens each followed by image_newline."""
    backbone = Backbone.load(llava_next_dir)
    picture = images()[:1]
    views = backbone.vision.views(picture)
    assert views.shape == (1, 5, 3, 32, 32)
    from transformers import LlavaNextImageProcessor

    processor = LlavaNextImageProcessor(size={"shortest_edge": 32}, crop_size=32, image_grid_pinpoints=TINY_PINPOINTS,
                                        do_center_crop=False, resample=Image.Resampling.BICUBIC)
    square = picture[0].convert("RGB").resize((64, 64), Image.Resampling.BICUBIC)
    theirs = processor(square, return_tensors="pt").pixel_values[0]
    assert theirs.shape == views[0].shape and torch.allclose(theirs[1:], views[0, 1:], atol=0.05)
    base = backbone.base_connector()
    assert (base.config.num_tokens, base.config.grid_rows, base.config.output_tokens) == (80, 8, 88)
    with torch.inference_mode():
        out = base(backbone.encode_images(picture))[0]
    newline = base.image_newline
    assert all(torch.equal(out[16 + 9 * row + 8], newline) for row in range(8))
    assert not any(torch.equal(out[i], newline) for i in range(88) if i < 16 or (i - 16) % 9 != 8)


def test_a_checkpoint_without_a_usable_chat_template_is_refused(llava_dir, tmp_path):
    import shutil

    from transformers import AutoTokenizer

    for f in llava_dir.iterdir():
        shutil.copy(f, tmp_path / f.name)
    tokenizer = AutoTokenizer.from_pretrained(llava_dir)
    tokenizer.chat_template = None
    tokenizer.save_pretrained(tmp_path)
    config = tmp_path / "tokenizer_config.json"  # save_pretrained may keep an old chat_template.jinja beside it
    for leftover in tmp_path.glob("chat_template.*"):
        leftover.unlink()
    assert config.exists()
    with pytest.raises(ValueError, match="has no chat template"):
        Backbone.load(tmp_path)


@pytest.mark.parametrize("kind", ["llava", "blip2", "llava-other-template", "idefics3", "llava_next",
                                  "llava_onevision", "qwen2_vl", "qwen2_5_vl", "paligemma"])
def test_a_checkpoint_backbone_decodes_as_transformers_does(kind, request):
    import transformers

    directory = request.getfixturevalue("other_template_dir" if kind == "llava-other-template" else f"{kind}_dir")
    cls = getattr(transformers, {"llava": "LlavaForConditionalGeneration", "blip2": "Blip2ForConditionalGeneration",
                                 "llava-other-template": "LlavaForConditionalGeneration",
                                 "idefics3": "Idefics3ForConditionalGeneration",
                                 "llava_next": "LlavaNextForConditionalGeneration",
                                 "llava_onevision": "LlavaOnevisionForConditionalGeneration",
                                 "qwen2_vl": "Qwen2VLForConditionalGeneration",
                                 "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
                                 "paligemma": "PaliGemmaForConditionalGeneration"}[kind])
    backbone = Backbone.load(directory)
    base = backbone.base_connector()
    assert base.config.projector == {"blip2": "token_linear", "idefics3": "token_linear", "qwen2_vl": "merger",
                                     "qwen2_5_vl": "merger", "paligemma": "token_linear"}.get(kind, "token_mlp")
    # LLaVA: 16 patches; BLIP-2: 4 queries; Idefics3: 16 patches, pixel-shuffled 2 x 2 into 4 tokens of 4 x 32;
    # NeXT / OneVision: 16 base patches and 4 tiles' 64 as an 8 x 8 grid (+ 8 newlines in the prompt);
    # Qwen2(.5)-VL: 32 x 32 patches merged 2 x 2 into a 16 x 16 grid
    tokens = {"blip2": 4, "idefics3": 4, "llava_next": 80, "llava_onevision": 80, "qwen2_vl": 256,
              "qwen2_5_vl": 256}.get(kind, 16)
    assert base.config.num_tokens == tokens and base.config.hidden_size == 64
    assert base.config.bias == (kind != "idefics3")
    # two instructions of different lengths after the image: one batch, each row's part padded to a common width
    pictures, instructions = images(), ["Describe the image.", "What is in this picture, if anything at all?"]
    assert len(set(map(len, (backbone.lm.prompt_ids(i)[1] for i in instructions)))) == 2
    features = backbone.encode_images(pictures)
    assert features.shape == (2, base.config.num_tokens * base.config.feature_dim)
    assert backbone.routing_features(features).shape == (2, base.config.feature_dim)
    logits: list[torch.Tensor] = []  # each forward pass's last logits, [rows alive, vocab]
    head = backbone.lm.model.get_output_embeddings().register_forward_hook(lambda m, i, out: logits.append(out[:, -1]))
    try:
        ours = backbone.generate(features, [TaskAdapter(base)] * 2, instructions, [Sampling(max_new_tokens=8)] * 2)
    finally:
        head.remove()
    for row, (state, instruction, picture) in enumerate(zip(ours, instructions, pictures)):
        tokens, steps = reference_tokens(cls, directory, backbone, instruction, picture, 8)
        assert state.token_ids == tokens and len(tokens) >= 1
        # the same numbers, not only the same argmax: a tiny random LM's greedy tokens hardly depend on positions
        both = [(ours, theirs) for ours, theirs in zip(logits, steps) if len(ours) == 2]
        assert len(both) >= 2
        for at, (mine, theirs) in enumerate(both):
            assert torch.allclose(mine[row], theirs, atol=2e-4, rtol=1e-4), (kind, row, at)


def test_the_training_loss_with_an_image_first_prompt_equals_the_full_causal_lm_loss(other_template_dir):
    """The instruction after the image: each row's prompt differs after the image, and the loss must still equal
    transformers' over the whole sequences."""
    backbone = Backbone.load(other_template_dir)
    lm, connector = backbone.lm, backbone.base_connector()
    instructions, answers = ["What is it?", "Which digit is written in the image, if any?"], ["a dress", "seven"]
    with torch.no_grad():
        visual = connector(backbone.encode_images(images()).clone())
    assert_training_loss_is_the_full_causal_lm_loss(lm, visual, instructions, answers)


@pytest.mark.parametrize("kind", ["qwen2_vl", "qwen2_5_vl", "paligemma"])
def test_training_logits_equal_the_models_own_where_positions_or_attention_are_the_familys(kind, request):
    """Training places and shows the visual tokens as the family's forward does: Qwen2(.5)-VL's multimodal RoPE
    (grid positions, the text after them from the grid's side on), PaliGemma's prompt seen both ways and positions
    from 1. The prefix-cached logits at two rows' answer positions equal the model's own."""
    import transformers

    directory = request.getfixturevalue(f"{kind}_dir")
    cls = getattr(transformers, {"qwen2_vl": "Qwen2VLForConditionalGeneration",
                                 "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
                                 "paligemma": "PaliGemmaForConditionalGeneration"}[kind])
    backbone = Backbone.load(directory)
    lm, connector = backbone.lm, backbone.base_connector()
    pictures, instructions, answers = images(), ["What is it?", "Which digit is written here, if any?"], ["a dress", "7"]
    with torch.no_grad():
        ours, targets = lm.answer_logits(connector(backbone.encode_images(pictures)), instructions, answers)
    model = cls.from_pretrained(directory, dtype=torch.float32).eval()
    theirs = []
    for picture, instruction, answer in zip(pictures, instructions, answers):
        pre, post = lm.prompt_ids(instruction)
        ans = lm.answer_ids(answer)
        ids = torch.tensor([pre + [IMAGE_TOKEN] * connector.config.output_tokens + post + ans])
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids),
                           **family_inputs(backbone.vision, ids, picture, ids.shape[1] - len(ans))).logits[0]
        theirs.append(logits[-len(ans) - 1 : -1])  # the positions that predict the answer's tokens
    assert targets.tolist() == [t for a in answers for t in lm.answer_ids(a)]
    assert torch.allclose(ours, torch.cat(theirs), atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["qwen2_vl", "paligemma"])
def test_the_vllm_engine_refuses_a_backbone_it_cannot_place_clearly(kind, request, tmp_path):
    """vLLM takes prompt embeddings with one position per token under causal attention: Qwen2-VL's image positions
    and PaliGemma's prompt seen both ways cannot reach it."""
    reg = Registry.open(tmp_path / "reg", create=True)
    with pytest.raises(ValueError, match="serve it with --engine embedded"):
        Engine(ServerConfig(registry=reg.root, engine="vllm"), backbone=Backbone.load(request.getfixturevalue(f"{kind}_dir")))


def test_a_registry_trained_on_the_earlier_chatml_prompt_is_refused_by_name(llava_dir, tmp_path):
    """Checkpoint backbones wrote cit's ChatML prompt (image last) before they wrote their own template: their
    tasks must not be served with another prompt."""
    backbone = Backbone.load(llava_dir)
    assert backbone.identity.endswith(":chat-template")
    reg = Registry.open(tmp_path / "reg", create=True)
    key = TaskKey.from_embeddings(np.ones((1, backbone.routing_dim), np.float32), np.ones((1, 384), np.float32),
                                  np.ones((1, 384), np.float32))
    reg.commit(TaskCard("old", 1, "eproj", {"action": "expanded"}), key, {"adapter": backbone.base_connector().save},
               backbone=backbone.identity.removesuffix(":chat-template"))
    with pytest.raises(ValueError, match="trained on another backbone"):
        Engine(ServerConfig(registry=reg.root), backbone=backbone)


@pytest.mark.parametrize("kind", ["llava", "idefics3", "llava_next", "qwen2_vl", "paligemma"])
def test_a_task_projection_of_a_checkpoint_backbone_trains_saves_and_serves(kind, request, tmp_path, backbone):
    checkpoint = request.getfixturevalue(f"{kind}_dir")
    default, backbone = backbone, Backbone.load(checkpoint)
    base = backbone.base_connector()
    pictures = images()
    features = backbone.encode_images(pictures).clone()  # a plain tensor, as embed_task's torch.cat makes it
    # the projection trains: a few steps lower the answer loss through the frozen LM
    task = base.clone().train()
    opt = torch.optim.AdamW(task.parameters(), lr=1e-2)
    losses = []
    for _ in range(5):
        loss = backbone.lm.loss(task(features), ["Name the picture."] * 2, ["noise", "static"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    task.save(tmp_path / "adapter")
    loaded = Connector.load(tmp_path / "adapter")
    assert loaded.config == base.config
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in task.state_dict().items())

    # served: a registry task with that projection and a key of this backbone's routing dimensions
    reg = Registry.open(tmp_path / "reg", create=True)
    engine = Engine(ServerConfig(registry=reg.root, refresh_seconds=0.0), backbone=backbone)
    try:
        text = engine.front.embedder.embed(["Name the picture.", "noise"])
        key = TaskKey.from_embeddings(backbone.routing_features(features[:1]).numpy(), text[:1], text[1:])
        reg.commit(TaskCard("noise", 1, "eproj", {"action": "expanded"}), key, {"adapter": task.save})
        # routable now (the registry watcher may have picked it up already: whether reload changed it is a race)
        assert engine.front.reload()[0] == 1
        import io

        buf = io.BytesIO()
        pictures[0].save(buf, format="PNG")
        decision, done = engine.generate(Request(buf.getvalue(), "Name the picture.", Sampling(max_new_tokens=4)))
        assert decision.adapter.task_id == "noise" and done.completion_tokens >= 1  # routed by the pooled key
        alone = backbone.generate(features[:1], [TaskAdapter(task.eval())], ["Name the picture."],
                                  [Sampling(max_new_tokens=4)])[0]
        assert done.text == alone.text
        # `cit-registry route` builds the server's query for this backbone too (it once took the unpooled
        # feature width of cit's own tower): the same task, the same score
        served = engine.front.route(engine.front.embed(buf.getvalue(), "Name the picture.")).candidates[0]
        (tmp_path / "picture.png").write_bytes(buf.getvalue())
        shown = run_cli("cit-registry", "route", str(tmp_path / "picture.png"), "Name the picture.",
                        "--registry", str(reg.root), "--backbone", str(checkpoint)).stdout.splitlines()[2].split()
        assert shown[0] == served.task_id and float(shown[2]) == pytest.approx(served.score, abs=2e-3)
    finally:
        engine.close()
    with pytest.raises(ValueError, match="trained on another backbone"):
        Engine(ServerConfig(registry=reg.root), backbone=default)  # cit's default backbone cannot serve this task
