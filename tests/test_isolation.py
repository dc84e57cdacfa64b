"""One request never fails another: on the real backbone, requests that fail by themselves (a poisoned adapter,
a temperature that overflows a division) join a running batch of good streams, and every good stream finishes
with the text it has when served alone. And the prefix cache stays inside its byte bound."""
import io
import math
import threading

import pytest
import torch
from PIL import Image

from cit_backbone.sampling import Sampling
from cit_registry.store import Registry, TaskCard
from cit_server.config import ServerConfig
from cit_server.engine import Completion, Delta, Engine, Request

from .test_engine import synthetic_key

TINY = math.ldexp(1.0, -149)  # the smallest float32 a proto float carries (1.4e-45)


def png(colour) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (48, 48), colour).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def engine(tmp_path_factory, backbone):
    """A registry with a good task and a poisoned one (NaN projection weights: every logit of its rows is NaN,
    which sampling at a temperature refuses)."""
    root = tmp_path_factory.mktemp("isolation") / "reg"
    reg = Registry.open(root, create=True)
    reg.commit(TaskCard("good", 1, "eproj", {"action": "expanded"}), synthetic_key(0),
               {"adapter": backbone.base_connector().save})
    poisoned = backbone.base_connector().clone()
    with torch.no_grad():
        poisoned.proj.weight.fill_(float("nan"))
    reg.commit(TaskCard("poisoned", 1, "eproj", {"action": "expanded"}), synthetic_key(1), {"adapter": poisoned.save})
    # a wide batching window: requests sent together join in one prefill
    engine = Engine(ServerConfig(registry=root, adapter_cache_size=8, max_batch_size=8, batch_window_ms=300),
                    backbone=backbone)
    yield engine
    engine.close()


GOOD = [Request(png((200, 30, 30)), "Describe the image in detail.", Sampling(max_new_tokens=24), task_id="good"),
        Request(png((30, 200, 30)), "Tell a story about this picture.", Sampling(max_new_tokens=24), task_id="good"),
        Request(png((30, 30, 200)), "What colour is this?", Sampling(max_new_tokens=24))]


def run_together(engine: Engine, bad: Request, joins_running: bool) -> tuple[list, object]:
    """The good requests stream; `bad` joins them in one prefill (their batching window) or, when
    `joins_running`, once each good stream is decoding (it joins the running batch)."""
    results: list = [None] * len(GOOD)
    decoding = threading.Barrier(len(GOOD) + 1)

    def stream(i: int) -> None:
        waited = not joins_running
        for output in engine.stream(GOOD[i]):
            if isinstance(output, Delta) and not waited:
                decoding.wait(timeout=120)
                waited = True
            elif isinstance(output, Completion):
                results[i] = output.text
    threads = [threading.Thread(target=stream, args=(i,)) for i in range(len(GOOD))]
    for t in threads:
        t.start()
    if joins_running:
        decoding.wait(timeout=120)  # every good stream is decoding now
    try:
        outcome = engine.generate(bad)[1].text
    except Exception as exc:  # noqa: BLE001 - what the bad request got
        outcome = exc
    for t in threads:
        t.join(timeout=300)
    return results, outcome


@pytest.fixture(scope="module")
def alone(engine) -> list[str]:
    texts = [engine.generate(r)[1].text for r in GOOD]
    assert all(texts) and len(set(texts)) > 1
    return texts


@pytest.mark.parametrize("joins_running", [True, False], ids=["joins-a-running-batch", "joins-with-them"])
def test_a_temperature_that_overflows_is_greedy_and_harms_nobody(engine, alone, joins_running):
    """A temperature that passes validation but overflows logits / temperature is greedy, as in vLLM."""
    tiny = Request(png((90, 90, 90)), "What is it?", Sampling(max_new_tokens=8, temperature=TINY), task_id="good")
    greedy = engine.generate(Request(tiny.image, tiny.instruction, Sampling(max_new_tokens=8), task_id="good"))
    results, outcome = run_together(engine, tiny, joins_running)
    assert results == alone
    assert outcome == greedy[1].text


@pytest.mark.parametrize("joins_running", [True, False], ids=["joins-a-running-batch", "joins-with-them"])
def test_a_row_whose_sampling_fails_fails_alone(engine, alone, joins_running):
    """A poisoned adapter: its row's sampling fails; the request gets the error, nobody else does."""
    poisoned = Request(png((90, 90, 90)), "What is it?", Sampling(max_new_tokens=8, temperature=0.8, seed=1),
                       task_id="poisoned")
    results, outcome = run_together(engine, poisoned, joins_running)
    assert results == alone
    assert isinstance(outcome, RuntimeError) and "probability" in str(outcome), outcome
    assert engine.generate(GOOD[0])[1].text == alone[0]  # and the engine goes on serving


def test_prompt_limits_are_counted_in_tokens(engine):
    """2,000 characters pass the character limit, but these take several tokens each: refused, by token count."""
    rare = "\U0001f9ec\u9f98\u7f4e" * 600  # emoji and rare CJK: 1,800 characters
    assert len(rare) <= engine.config.max_instruction_chars
    with pytest.raises(ValueError, match=r"the prompt has \d+ tokens; the limit is 512"):
        engine.submit(Request(png((1, 2, 3)), rare, Sampling()), out=None)
    fits = "Describe the image. " * 20
    assert engine.generate(Request(png((1, 2, 3)), fits, Sampling(max_new_tokens=2)))[1].completion_tokens >= 1


def test_the_prefix_cache_stays_inside_its_byte_bound(backbone):
    lm = backbone.lm
    bound = lm.prefix_cache_bytes
    try:
        lm.prefix_cache_bytes = 3 * 1024 * 1024  # ~ 70 tokens of keys/values
        for i in range(40):
            lm.prefix(lm.prompt_ids(f"Question {i}: " + "describe it " * (i % 7))[0], None)
            assert lm.prefix_bytes() <= lm.prefix_cache_bytes
        assert 0 < len(lm._prefixes) < 40
        huge = lm.prompt_ids("word " * 200)[0]  # larger than the whole cache: computed, used, not kept
        assert lm.prefix(huge, None)[0][0].shape[2] == len(huge)
        assert lm.prefix_bytes() <= lm.prefix_cache_bytes
    finally:
        lm.prefix_cache_bytes = bound
