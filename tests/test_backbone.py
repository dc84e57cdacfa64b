"""The shared backbone on its real weights: per-row connectors, decoding, sampling, image decoding."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from cit_backbone.adapters import Connector, TaskAdapter
from cit_backbone.decode_batch import KvSlab
from cit_backbone.images import InvalidImage, decode_image
from cit_backbone.sampling import Sampling

from .conftest import assert_training_loss_is_the_full_causal_lm_loss


def png(img: Image.Image, fmt="PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def features(backbone):
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(3)]
    return backbone.encode_images(images)


def test_vision_tower_gives_one_pooled_feature_per_image(features):
    assert features.shape == (3, 1280) and torch.isfinite(features).all()


def test_per_row_connectors_in_one_batch_match_single_rows(backbone, features):
    base = backbone.base_connector()
    other = base.clone()
    with torch.no_grad():
        other.proj.weight.mul_(-1.0)
    connectors = [TaskAdapter(base), TaskAdapter(other), TaskAdapter(base)]
    instructions = ["Describe the image.", "What is this?", "What colour is it?"]
    greedy = [Sampling(max_new_tokens=8)] * 3
    batch = backbone.generate(features, connectors, instructions, greedy)
    for i in range(3):
        alone = backbone.generate(features[i : i + 1], [connectors[i]], instructions[i : i + 1], greedy[:1])[0]
        assert alone.token_ids == batch[i].token_ids
    assert batch[0].token_ids != batch[1].token_ids or batch[0].text != batch[1].text


@pytest.mark.parametrize("spare", [KvSlab.SPARE, 1])
def test_rows_join_and_leave_a_running_batch_and_answer_as_alone(backbone, features, spare, monkeypatch):
    """Continuous batching: a row that joins mid-decode, or runs beside one that leaves, answers as it would alone
    (also when the keys and values outgrow their buffer at every step)."""
    monkeypatch.setattr(KvSlab, "SPARE", spare)
    base = backbone.base_connector()
    other = base.clone()
    with torch.no_grad():
        other.proj.weight.mul_(-1.0)
    adapters = [TaskAdapter(base), TaskAdapter(other), TaskAdapter(base)]
    instructions = ["Describe the image in detail.", "What is this?", "Tell me a story about it."]
    sampling = [Sampling(max_new_tokens=10), Sampling(max_new_tokens=12), Sampling(max_new_tokens=14, temperature=0.8,
                                                                                  seed=3)]
    alone = [backbone.generate(features[i : i + 1], adapters[i : i + 1], instructions[i : i + 1], sampling[i : i + 1])[0]
             for i in range(3)]
    batch = backbone.decode_batch()
    first = backbone.join(batch, features[:2], adapters[:2], instructions[:2], sampling[:2])
    for _ in range(3):
        batch.step()
    late = backbone.join(batch, features[2:], adapters[2:], instructions[2:], sampling[2:])[0]
    assert len(batch) == 3
    batch.step()
    batch.remove(first[1])  # its client went away: the row leaves at once
    assert len(batch) == 2
    left_with = list(first[1].token_ids)
    while len(batch):
        batch.step()
    assert first[0].token_ids == alone[0].token_ids and late.token_ids == alone[2].token_ids
    assert first[1].token_ids == left_with == alone[1].token_ids[: len(left_with)] and first[1].finish_reason is None


def test_stop_string_ends_generation_and_is_cut(backbone, features):
    base = TaskAdapter(backbone.base_connector())
    full = backbone.generate(features[:1], [base], ["Describe the image in detail."], [Sampling(max_new_tokens=12)])[0]
    assert len(full.text) > 4
    stop = full.text[2:4]
    cut = backbone.generate(features[:1], [base], ["Describe the image in detail."],
                            [Sampling(max_new_tokens=12, stop=(stop,))])[0]
    assert cut.finish_reason == "stop" and cut.text == full.text[: full.text.find(stop)]


def test_max_new_tokens_gives_finish_reason_length(backbone, features):
    out = backbone.generate(features[:1], [TaskAdapter(backbone.base_connector())], ["Tell me a long story."],
                            [Sampling(max_new_tokens=3)])[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 3


def test_seeded_sampling_is_reproducible_and_differs_from_other_seeds(backbone, features):
    base = TaskAdapter(backbone.base_connector())
    run = lambda seed: backbone.generate(  # noqa: E731
        features[:1], [base], ["Tell me a story."], [Sampling(max_new_tokens=12, temperature=1.5, seed=seed)]
    )[0].token_ids
    assert run(1) == run(1)
    assert len({tuple(run(s)) for s in range(2, 6)}) > 1


@pytest.mark.parametrize(
    "kwargs", [{"max_new_tokens": 0}, {"max_new_tokens": 10_000}, {"temperature": -1.0}, {"temperature": float("nan")},
               {"top_p": 0.0}, {"top_p": 1.5}, {"top_k": -1}, {"stop": ("",)}],
)
def test_invalid_sampling_is_refused(kwargs):
    with pytest.raises(ValueError):
        Sampling(**kwargs)


def test_connector_round_trips_bit_identical(tmp_path, backbone):
    c = backbone.base_connector()
    c.save(tmp_path / "a")
    again = Connector.load(tmp_path / "a")
    for k, v in c.state_dict().items():
        assert torch.equal(v, again.state_dict()[k])


def test_decode_accepts_png_and_jpeg():
    img = Image.new("RGB", (40, 30), (10, 200, 30))
    assert decode_image(png(img)).size == (40, 30)
    assert decode_image(png(img, "JPEG")).size == (40, 30)


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "empty"),
        (b"not an image at all", "could not be decoded"),
        (png(Image.new("RGB", (64, 64)))[:60], "could not be decoded"),
        (png(Image.new("RGB", (8, 8)), "GIF"), "as PNG or JPEG"),
    ],
)
def test_decode_refuses_bad_bytes(data, message):
    with pytest.raises(InvalidImage, match=message):
        decode_image(data)


def test_phone_photos_are_decoded_upright_and_multi_frame_files_give_their_first_frame():
    """Phones write MPO (a JPEG with a second picture) and rotate by EXIF orientation; APNGs animate."""
    tall = Image.new("RGB", (40, 20), (250, 0, 0))
    exif = tall.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to view
    buf = io.BytesIO()
    tall.save(buf, format="JPEG", exif=exif)
    assert decode_image(buf.getvalue()).size == (20, 40)
    buf = io.BytesIO()
    tall.save(buf, format="MPO", save_all=True, append_images=[Image.new("RGB", (40, 20), (0, 0, 250))])
    assert Image.open(io.BytesIO(buf.getvalue())).format == "MPO"
    r, g, b = decode_image(buf.getvalue()).getpixel((5, 5))
    assert r > 200 and b < 50  # the first picture
    frames = [Image.new("RGB", (8, 8), (0, 250, 0)) for _ in range(3)]
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (250, 0, 0)).save(buf, format="PNG", save_all=True, append_images=frames)
    assert decode_image(buf.getvalue()).getpixel((0, 0)) == (250, 0, 0)
    many = io.BytesIO()
    frames[0].save(many, format="PNG", save_all=True, append_images=[Image.new("RGB", (8, 8), (i, 0, 0))
                                                                     for i in range(100)])
    with pytest.raises(InvalidImage, match="frames"):
        decode_image(many.getvalue())


def test_decode_refuses_bombs_and_oversized_bytes():
    big = png(Image.new("L", (3000, 3000)))
    with pytest.raises(InvalidImage, match="pixels"):
        decode_image(big, max_pixels=1000 * 1000)
    with pytest.raises(InvalidImage, match="bytes"):
        decode_image(big, max_bytes=100)


def test_training_loss_equals_the_full_causal_lm_loss(backbone, features):
    """The loss reuses a cached prompt prefix per instruction and computes logits only at answer positions; loss and
    gradient must equal transformers' own loss over the whole sequences."""
    lm, connector = backbone.lm, backbone.base_connector()
    instructions = ["What is it?", "Which digit is written in the image?", "What is it?"]
    answers = ["a dress", "seven", "x"]
    with torch.no_grad():
        visual = connector(features.clone())  # clone: the fixture's features are inference-mode tensors
    assert_training_loss_is_the_full_causal_lm_loss(lm, visual, instructions, answers)
