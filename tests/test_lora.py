"""LoRA adapters on the real language model: PEFT's own format, per-row LoRAs in one batch, training through them."""
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from cit_backbone.adapters import TaskAdapter
from cit_backbone.conversion import converted_lm_dir
from cit_backbone.sampling import Sampling

from .conftest import full_sequence_loss


@pytest.fixture(scope="module")
def lm_with_lora(backbone):
    """The session LM with two LoRAs whose B matrices are random (a fresh LoRA is the identity: B = 0)."""
    lm = backbone.lm
    gen = torch.Generator().manual_seed(0)
    for name in ("alpha", "beta"):
        lm.loras.add(name)
        with torch.no_grad():
            for n, p in lm.model.named_parameters():
                if f"lora_B.{lm.loras.adapter_name(name)}." in n:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
        lm.loras.set_trainable(name, False)
    yield lm
    for name in ("alpha", "beta"):
        lm.loras.unload(name)


@pytest.fixture(scope="module")
def features(backbone):
    rng = np.random.default_rng(1)
    return backbone.encode_images([Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(3)])


def test_rows_of_different_slot_loras_and_base_rows_match_each_lora_alone(tmp_path, lm_with_lora):
    """Rows whose LoRAs all sit in slots run batched (one gather and two batched matmuls per layer, not PEFT's loop
    over the adapters): each row must equal its LoRA run alone through PEFT, and a base row the plain LM."""
    lm = lm_with_lora
    for name in ("alpha", "beta"):
        lm.loras.save(name, tmp_path / name)
    lm.loras.slots(3)
    lm.loras.load("alpha-slot", tmp_path / "alpha")
    lm.loras.load("beta-slot", tmp_path / "beta")
    try:
        assert all(lm.loras.adapter_name(n).startswith("slot") for n in ("alpha-slot", "beta-slot"))
        ids = torch.tensor([lm.encode("<|im_start|>user\nWhat is in the image?<|im_end|>\n")] * 4)
        rows, alone = ["alpha-slot", None, "beta-slot", "alpha-slot"], ["alpha", None, "beta", "alpha"]
        with torch.inference_mode():
            with lm.loras.rows(rows):
                mixed = lm.model(input_ids=ids).logits
            with lm.loras.rows(["beta-slot"] * 2):  # no base row among them
                every = lm.model(input_ids=ids[:2]).logits
            own = {}
            for name in ("alpha", None, "beta"):
                with lm.loras.rows([name]):
                    own[name] = lm.model(input_ids=ids[:1]).logits
        for i, name in enumerate(alone):
            torch.testing.assert_close(mixed[i : i + 1], own[name], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(every, own["beta"].expand(2, -1, -1), rtol=1e-4, atol=1e-4)
        assert (own["alpha"] - own["beta"]).abs().max() > 1e-2  # the two LoRAs do differ
    finally:
        lm.loras.unload("alpha-slot")
        lm.loras.unload("beta-slot")


def test_lora_directory_loads_with_plain_peft(tmp_path, lm_with_lora):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    lm = lm_with_lora
    lm.loras.save("alpha", tmp_path / "alpha")
    weights = load_file(str(tmp_path / "alpha" / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in weights  # PEFT's key names
    assert all("alpha" not in k for k in weights)  # adapter names are not part of the saved format

    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(converted_lm_dir()), tmp_path / "alpha").eval()
    ids = torch.tensor([lm.encode("<|im_start|>user\nWhat is in the image?<|im_end|>\n")])
    with torch.no_grad():
        theirs = plain(input_ids=ids).logits
        with lm.loras.rows(["alpha"]):
            ours = lm.model(input_ids=ids).logits
        with lm.loras.rows([None]):
            base = lm.model(input_ids=ids).logits
    assert torch.allclose(ours, theirs, atol=1e-4)
    assert (ours - base).abs().max() > 1e-2  # the LoRA does change the model


def test_rows_with_different_loras_in_one_batch_match_single_rows(backbone, lm_with_lora, features):
    base = backbone.base_connector()
    adapters = [TaskAdapter(base, "alpha"), TaskAdapter(base), TaskAdapter(base, "beta")]
    instructions = ["Describe the image.", "Describe the image.", "What is this?"]
    greedy = [Sampling(max_new_tokens=8)] * 3
    batch = backbone.generate(features, adapters, instructions, greedy)
    for i in range(3):
        alone = backbone.generate(features[i : i + 1], adapters[i : i + 1], instructions[i : i + 1], greedy[:1])[0]
        assert alone.token_ids == batch[i].token_ids
    plain = backbone.generate(features[:1], [TaskAdapter(base)], instructions[:1], greedy[:1])[0]
    assert plain.token_ids != batch[0].token_ids  # the LoRA row is not the base row


def test_training_loss_through_a_lora_equals_the_full_peft_loss(backbone, features):
    """With a LoRA in training the prompt prefix is recomputed with gradients; loss and LoRA gradients must equal
    PEFT's whole-sequence loss."""
    lm, connector = backbone.lm, backbone.base_connector()
    lm.loras.add("training")
    try:
        with torch.no_grad():
            for p in lm.loras.parameters("training"):
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(2)) * 0.05)
        instructions, answers = ["What is it?", "Which digit is it?", "What is it?"], ["a dress", "seven", "x"]
        with torch.no_grad():
            visual = connector(features.clone())
        params = lm.loras.parameters("training")
        assert params and all(p.requires_grad for p in params)
        reference = full_sequence_loss(lm, visual, instructions, answers, lora="training")
        ref_grads = torch.autograd.grad(reference, params)
        loss = lm.loss(visual, instructions, answers, "training")
        grads = torch.autograd.grad(loss, params)
        assert loss.item() == pytest.approx(reference.item(), rel=1e-5)
        for g, r in zip(grads, ref_grads):
            assert (g - r).abs().max() <= 1e-3 * max(r.abs().max(), 1e-8)
    finally:
        lm.loras.unload("training")
    assert "training" not in lm.loras.names() and not any(p.requires_grad for p in lm.model.parameters())


def test_a_lora_loaded_into_a_serving_slot_answers_as_the_lora_itself(tmp_path, backbone, lm_with_lora, features):
    """Serving copies LoRAs into pre-injected slots (vLLM's habit); a freed slot takes the next LoRA whole."""
    lm = lm_with_lora
    for name in ("alpha", "beta"):
        lm.loras.save(name, tmp_path / name)
    visual = backbone.project(features, [TaskAdapter(backbone.base_connector())] * 3)
    instructions, answers = ["What is this?"] * 3, ["a cat", "the number seven", "blue"]
    own = {n: lm.answer_logits(visual, instructions, answers, lora=n)[0] for n in ("alpha", "beta")}
    lm.loras.slots(1)
    lm.loras.load("alpha-served", tmp_path / "alpha")
    slot = lm.loras.adapter_name("alpha-served")
    assert slot.startswith("slot")
    torch.testing.assert_close(lm.answer_logits(visual, instructions, answers, lora="alpha-served")[0], own["alpha"])
    lm.loras.unload("alpha-served")
    lm.loras.load("beta-again", tmp_path / "beta")  # the freed slot, with beta's weights now
    assert lm.loras.adapter_name("beta-again") == slot
    torch.testing.assert_close(lm.answer_logits(visual, instructions, answers, lora="beta-again")[0], own["beta"])
    lm.loras.unload("beta-again")
