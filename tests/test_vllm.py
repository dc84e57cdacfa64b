"""The vLLM engine: the same requests, in one mixed batch (a base row, an EProj row, a LoRA row), give the same
greedy tokens on vLLM as on the embedded engine. vLLM runs in its own environment (.venv-vllm, made by
scripts/setup.sh via scripts/setup_vllm.sh): a real vLLM worker process, real weights, real gRPC over loopback."""
import io
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

from cit_backbone.sampling import Sampling
from cit_registry.store import Registry, TaskCard, TaskKey
from cit_server.config import ServerConfig
from cit_server.engine import Engine, Request
from cit_server.vllm_engine import WorkerError, default_worker_python

from .test_engine import synthetic_key
from .test_hf_backbone import llava_dir  # noqa: F401 (a fixture)


def png(colour) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (48, 48), colour).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def vllm_python():
    python = default_worker_python()
    found = subprocess.run([python, "-c", "import vllm, cit_server.vllm_worker"], capture_output=True)
    if found.returncode != 0:
        pytest.fail(f"vLLM's environment is missing ({python}): run scripts/setup_vllm.sh")
    return python


def make_mixed_registry(root, backbone, keys=synthetic_key, scale: float = 0.02):
    """An EProj task (a changed projection) and a LoRA task (its own projection and a LoRA with random weights,
    so that it really changes the LM's output)."""
    reg = Registry.open(root, create=True)
    gen = torch.Generator().manual_seed(0)
    eproj = backbone.base_connector().clone()
    with torch.no_grad():
        for p in eproj.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    reg.commit(TaskCard("shapes", 1, "eproj", {"action": "expanded"}), keys(0), {"adapter": eproj.save},
               backbone=backbone.identity)
    lm = backbone.lm
    lm.loras.add("fresh")
    with torch.no_grad():
        for p in lm.loras.parameters("fresh"):
            p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    reg.commit(TaskCard("words", 1, "lora", {"action": "expanded"}), keys(1),
               {"adapter": backbone.base_connector().save, "lora": lambda d: lm.loras.save("fresh", d)},
               backbone=backbone.identity)
    lm.loras.unload("fresh")
    return root


@pytest.fixture(scope="module")
def mixed_registry(tmp_path_factory, backbone):
    return make_mixed_registry(tmp_path_factory.mktemp("vllm") / "reg", backbone)


MAX_MODEL_LEN = 128  # the vLLM worker's context: LONG's prompt does not fit it
LONG = Request(png((90, 90, 90)), "Describe every detail of the image. " * 20, Sampling(max_new_tokens=4))


def answers(engine: Engine, extra: Request | None = None) -> list[tuple[str, str, int]]:
    """Three requests sent at once: routed to the base connector, forced to the EProj task, to the LoRA task (and
    `extra` with them, whose outcome is not returned)."""
    greedy = Sampling(max_new_tokens=16)
    requests = [Request(png((200, 30, 30)), "Describe the image.", greedy),
                Request(png((30, 200, 30)), "What shape is this?", greedy, task_id="shapes"),
                Request(png((30, 30, 200)), "Read the word in the image.", greedy, task_id="words")]
    with ThreadPoolExecutor(len(requests) + 1) as pool:
        done = [pool.submit(engine.generate, r) for r in requests + ([extra] if extra else [])]
        results = [d.result() for d in done[:3]]
    return [(d.adapter.task_id, c.text, c.completion_tokens) for d, c in results]


def test_vllm_gives_the_embedded_engines_greedy_tokens_in_one_mixed_batch_and_outlives_its_worker(mixed_registry, backbone, vllm_python):
    # margin 1 (the maximum): unforced requests go to the base connector; a long window: they start together
    config = dict(registry=mixed_registry, routing_margin=1.0, batch_window_ms=2000, adapter_cache_size=5,
                  max_batch_size=5)
    embedded = Engine(ServerConfig(**config), backbone=backbone)
    try:
        expected = answers(embedded)
    finally:
        embedded.close()
        for adapter in embedded.adapters.resident():  # its LoRA leaves the shared LM
            embedded.adapters.evict(adapter)
    vllm = Engine(ServerConfig(**config, engine="vllm", vllm_python=vllm_python, vllm_max_model_len=MAX_MODEL_LEN),
                  backbone=backbone)
    try:
        assert backbone.lm.prompt_tokens(LONG.instruction, 1) > MAX_MODEL_LEN
        # one row the worker refuses (its prompt is over max_model_len) fails alone: the others answer as before
        got = answers(vllm, extra=LONG)
        with pytest.raises(ValueError, match="refused the request: .*maximum context length"):
            vllm.generate(LONG)
        batches = vllm.metrics.batch_size.collect()[0].samples
        # the worker dies: the next requests wait for a new one and get the same answers
        first = vllm.supervisor.worker.proc
        first.kill()
        first.wait()
        assert not vllm.ready()  # health says NOT_SERVING until the supervisor's new worker is up ...
        t0 = time.monotonic()
        with pytest.raises(WorkerError):  # ... and requests meanwhile are told to retry, at once
            vllm.generate(Request(png((1, 2, 3)), "Describe the image.", Sampling(max_new_tokens=2)))
        assert time.monotonic() - t0 < 10, "the restart blocked the scheduler"
        deadline = time.monotonic() + 300
        while not vllm.ready() and time.monotonic() < deadline:
            time.sleep(0.5)
        again = answers(vllm)
        assert vllm.supervisor.worker.proc is not first and vllm.supervisor.worker.proc.poll() is None
    finally:
        vllm.close()
        for adapter in vllm.adapters.resident():
            vllm.adapters.evict(adapter)
    assert [task for task, _, _ in expected] == ["", "shapes", "words"]
    assert got == expected and again == expected
    # the adapters matter (three different answers), and the rows joined the running batch together
    assert len({text for _, text, _ in expected}) == 3 and sum(n for _, _, n in got) >= 20
    steps = next(s.value for s in batches if s.name.endswith("_count"))
    at_most_two = next(s.value for s in batches if s.name.endswith("_bucket") and s.labels["le"] == "2.0")
    assert steps > at_most_two, "the three requests never ran in one batch"


def test_a_worker_with_two_data_parallel_replicas_answers_as_the_embedded_engine_does(mixed_registry, backbone,
                                                                                      vllm_python):
    """--vllm-data-parallel-size reaches vLLM: two replicas of the LM in one worker (vLLM's CPU build runs them as
    two engine cores), base, EProj and LoRA rows answered with the embedded engine's greedy tokens."""
    config = dict(registry=mixed_registry, routing_margin=1.0, batch_window_ms=2000, adapter_cache_size=5,
                  max_batch_size=5)
    results = {}
    for engine_kind, extra in (("embedded", {}), ("vllm", dict(engine="vllm", vllm_python=vllm_python,
                                                               vllm_max_model_len=MAX_MODEL_LEN,
                                                               vllm_data_parallel_size=2))):
        engine = Engine(ServerConfig(**config, **extra), backbone=backbone)
        try:
            if engine_kind == "vllm":
                import psutil

                cores = [p for p in psutil.Process(engine.supervisor.worker.proc.pid).children(recursive=True)
                         if "EngineCore" in " ".join(p.cmdline()) or "EngineCore" in p.name()]
                assert len(cores) == 2, [p.name() for p in cores]
            results[engine_kind] = answers(engine)
        finally:
            engine.close()
            for adapter in engine.adapters.resident():
                engine.adapters.evict(adapter)
    assert results["vllm"] == results["embedded"] and len({text for _, text, _ in results["embedded"]}) == 3


@pytest.fixture(scope="module")
def checkpoint_backbone(tmp_path_factory):
    """A tiny random LLaVA checkpoint whose chat template is not ChatML (the image first in the user turn), its
    LM's heads 32 wide (vLLM's CPU attention has no kernel for narrower ones)."""
    from transformers import AutoTokenizer, CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    from cit_backbone.backbone import Backbone

    from .test_hf_backbone import IMAGE_TOKEN, OTHER_TEMPLATE, save_checkpoint, tiny_text_config

    torch.manual_seed(3)
    text = tiny_text_config()
    text.hidden_size, text.intermediate_size, text.head_dim = 128, 256, 32  # 4 heads of 32
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=8)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN,
                         vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu")
    directory = save_checkpoint(LlavaForConditionalGeneration(config).eval(), tmp_path_factory.mktemp("llava-vllm"))
    tokenizer = AutoTokenizer.from_pretrained(directory)
    tokenizer.chat_template = OTHER_TEMPLATE
    tokenizer.save_pretrained(directory)
    return Backbone.load(directory)


def test_vllm_serves_a_checkpoint_backbone_with_its_own_chat_template_as_the_embedded_engine_does(
        checkpoint_backbone, tmp_path, vllm_python):
    backbone = checkpoint_backbone
    assert not backbone.lm.prompt_ids("Describe the image.")[0][-1:] == []  # the template writes text before the image
    width = backbone.routing_features(backbone.encode_images([Image.new("RGB", (8, 8))])).shape[1]

    def keys(seed: int):
        rng = np.random.default_rng(seed)
        return TaskKey.from_embeddings(rng.random((4, width)), rng.normal(size=(4, 384)), rng.normal(size=(4, 384)))

    registry = make_mixed_registry(tmp_path / "reg", backbone, keys, scale=0.5)
    config = dict(registry=registry, routing_margin=1.0, batch_window_ms=2000, adapter_cache_size=5, max_batch_size=5)
    results = {}
    for engine_kind in ("embedded", "vllm"):
        extra = dict(engine="vllm", vllm_python=vllm_python, vllm_max_model_len=MAX_MODEL_LEN) \
            if engine_kind == "vllm" else {}
        engine = Engine(ServerConfig(**config, **extra), backbone=backbone)
        try:
            results[engine_kind] = answers(engine)
            if engine_kind == "vllm":
                results["after its engine core died"] = answers_after_the_engine_core_dies(engine)
        finally:
            engine.close()
            for adapter in engine.adapters.resident():
                engine.adapters.evict(adapter)
    assert [task for task, _, _ in results["embedded"]] == ["", "shapes", "words"]
    assert results["vllm"] == results["after its engine core died"] == results["embedded"]
    assert len({text for _, text, _ in results["embedded"]}) == 3, results  # each adapter changes the answer


def answers_after_the_engine_core_dies(engine: Engine) -> list[tuple[str, str, int]]:
    """vLLM's engine core (a process of its own) is killed, as the OOM killer would: the worker finds its engine
    dead at the next request, fails it, and exits, so that the server starts a new one; then answers again."""
    import psutil

    worker = engine.supervisor.worker.proc
    for child in psutil.Process(worker.pid).children(recursive=True):
        child.kill()
    with pytest.raises(WorkerError):
        engine.generate(Request(png((1, 2, 3)), "Describe the image.", Sampling(max_new_tokens=2)))
    deadline = time.monotonic() + 300
    while (engine.supervisor.worker.proc is worker or not engine.ready()) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert engine.supervisor.worker.proc is not worker, "the worker with a dead engine never exited"
    return answers(engine)


def test_a_model_vllm_cannot_run_fails_the_workers_start_with_the_reason(llava_dir, vllm_python):  # noqa: F811
    """The tiny LLaVA's LM has 16-wide attention heads, which vLLM's CPU attention cannot run: the worker's start
    fails (its warm-up generation), instead of a worker that says it serves and fails every request."""
    from cit_backbone.backbone import Backbone
    from cit_server.vllm_engine import WorkerProcess

    with pytest.raises(WorkerError, match=r"exited while starting \(code 1\): \w+"):
        WorkerProcess(vllm_python, Backbone.load(llava_dir).lm.path, max_loras=1, max_model_len=MAX_MODEL_LEN)
