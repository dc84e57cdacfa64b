"""End to end on the real backbone: `cit-trainer add-task` builds a registry of real-data tasks, `cit-server`
serves it, and everything below goes over real gRPC on loopback."""
import hashlib
import io
import json

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from PIL import Image

from cit_client.evaluate import dataset_owners, evaluate_dataset
from cit_proto import cit_pb2
from cit_registry.snapshots import REPLAY_SAMPLES
from cit_registry.store import Registry
from cit_registry.taskdata import read_jsonl

from .conftest import E2E_TASKS, TRAIN_SAMPLES, run_cli

# Chance is 10 % (clothing, digits) and 5 % (20 words). CI trains on 400 samples x 3 epochs only, spread over five
# training wordings per task (test rows: half training, half held-out wordings), where this backbone measured
# 52 / 69 / 8 % at add-task (100 test rows) and 48 / 69 / 12 % over gRPC (200 rows). The words LoRA task is barely
# learnt at this budget (18 % with one wording): its floor only says "above chance and above zero-shot". The
# clothing adapter is then reused (one epoch on 64 other clothing images and its 400 replayed ones): its first data
# set may lose at most MAX_REUSE_DROP (100 test rows). The documented defaults (3,000 samples) measured
# 86 / 92 / 96 % with one wording: see docs/USAGE.md.
MIN_ANSWER_ACCURACY = {"fashion-mnist": 0.35, "digits": 0.6, "words": 0.06}
LEARNT_OVER_ZERO_SHOT = 0.05
MIN_SERVED_ACCURACY = {**MIN_ANSWER_ACCURACY, "fashion-mnist": 0.2}  # served by the reused version 2
MAX_REUSE_DROP = 0.1


def first_test_sample(task_dirs, name="fashion-mnist"):
    return read_jsonl(task_dirs[name] / "test.jsonl")[0]


def test_distinct_tasks_expand_and_a_similar_one_is_reused(registry):
    reg = Registry.open(registry)
    assert reg.task_ids() == sorted(E2E_TASKS)  # "fashion-more" made no task of its own
    for name in ("digits", "words"):
        card = reg.get(name).card
        assert card.decision["action"] == "expanded" and card.version == 1
        assert card.decision["similarity"] < card.decision["threshold"]
    reused = reg.get("fashion-mnist")
    assert reused.version == 2 and reused.card.decision["action"] == "reused"
    assert reused.card.decision["dataset"] == "fashion-more"
    assert reused.card.decision["similarity"] >= reused.card.decision["threshold"]
    assert [d["name"] for d in reused.card.datasets] == ["fashion-mnist", "fashion-more"]
    assert len(reused.key().image) == 2  # one routing centroid per data set
    # it trained on the new data and on every training sample of its first data set that its version kept
    assert reused.card.training["replayed"] == {"fashion-mnist": min(TRAIN_SAMPLES, REPLAY_SAMPLES)}
    kept = reused.card.metrics["forgetting"]["fashion-mnist"]
    assert kept["now"] >= kept["when_trained"] - MAX_REUSE_DROP, kept
    first = reg.get("fashion-mnist", 1)
    assert hashlib.sha256((first.adapter_dir / "adapter_model.safetensors").read_bytes()).digest() != \
        hashlib.sha256((reused.adapter_dir / "adapter_model.safetensors").read_bytes()).digest()


def test_training_later_tasks_leaves_earlier_answers_unchanged(registry):
    """EProj: each task owns its projection, so re-measured accuracy of earlier tasks equals what they had."""
    reg = Registry.open(registry)
    for later in ("digits", "words"):
        forgetting = reg.get(later).card.metrics["forgetting"]
        assert "fashion-mnist" in forgetting
        for dataset, f in forgetting.items():
            assert f["now"] == pytest.approx(f["when_trained"]), (later, dataset, f)


def test_tasks_learn_above_zero_shot(registry):
    reg = Registry.open(registry)
    for name in E2E_TASKS:
        metrics = reg.get(name, 1).card.metrics
        assert metrics["accuracy_after"] >= max(MIN_ANSWER_ACCURACY[name],
                                                metrics["accuracy_before"] + LEARNT_OVER_ZERO_SHOT), (name, metrics)


def test_held_out_requests_are_routed_and_answered_over_grpc(client, task_dirs, capsys):
    owners = dataset_owners(client)
    results = {name: evaluate_dataset(client, task_dirs[name], owners=owners) for name in E2E_TASKS}
    with capsys.disabled():
        for s in results.values():
            print(f"\n  over gRPC: {s.dataset:<14} {s.requests} requests, routing {s.routing_accuracy:.1%}, "
                  f"answers {s.answer_accuracy:.1%}, served by {s.served_by}, misses {s.errors}")
            for kind, t in s.by_template.items():
                print(f"    {kind:<9} wordings: {t.requests} requests, routing {t.routing_accuracy:.1%}, "
                      f"answers {t.answer_accuracy:.1%}")
    total_routed = sum(s.routed for s in results.values()) / sum(s.requests for s in results.values())
    assert total_routed >= 0.95
    for name, s in results.items():
        assert set(s.by_template) == {"train", "held-out"}, name  # the exported test rows carry both wordings
        assert s.routing_accuracy >= 0.95 and s.by_template["held-out"].routing_accuracy >= 0.95, (name, s.served_by)
        assert s.answer_accuracy >= MIN_SERVED_ACCURACY[name], (name, s.answer_accuracy)


def test_response_names_the_task_version_and_counts(client, task_dirs):
    sample = first_test_sample(task_dirs, "digits")
    r = client.generate(sample.image, sample.instruction)
    assert r.route.task_id == "digits" and r.route.version == 1 and not r.route.fell_back
    assert r.route.candidates[0].task_id == "digits" and len(r.route.candidates) == 3
    assert r.finish_reason == "stop" and r.completion_tokens >= 1 and r.prompt_tokens > 10


def test_stream_deltas_add_up_to_the_unary_answer(client, task_dirs):
    sample = first_test_sample(task_dirs)
    unary = client.generate(sample.image, sample.instruction, max_new_tokens=16)
    messages = list(client.generate_stream(sample.image, sample.instruction, max_new_tokens=16))
    assert messages[0].HasField("route") and messages[0].route.task_id == unary.route.task_id
    assert "".join(m.delta for m in messages) == unary.text
    assert messages[-1].finish_reason == unary.finish_reason
    assert messages[-1].completion_tokens == unary.completion_tokens


def test_forced_task_skips_routing(client, task_dirs):
    sample = first_test_sample(task_dirs)  # a clothing image, forced onto the digits adapter
    r = client.generate(sample.image, sample.instruction, task_id="digits")
    assert r.route.forced and r.route.task_id == "digits"


# Wordings written for this test only (neither the exporters' templates nor cit_trainer.data.PARAPHRASES, which
# were looked at while the routing rule was chosen): what an application might send.
UNSEEN_PARAPHRASES = {"fashion-mnist": ["What sort of clothing is in this photo?", "garment type?"],
                      "digits": ["Spell out the digit that is drawn here.", "which number, in words?"],
                      "words": ["Which word does this image show?", "read me the text"]}
UNSEEN_QUESTIONS = {"fashion-mnist": ["Does this item have buttons?", "Is it clean?"],
                    "digits": ["Is this digit written in ink?", "How old was the writer?"],
                    "words": ["Is the word longer than five letters?", "Is the text centred?"]}


def test_an_unseen_paraphrase_routes_to_its_task_and_an_unseen_question_falls_back(client, task_dirs, capsys):
    """Over the Route RPC with the real backbone: each task's test images asked in wordings no one tuned on. First
    run (at 318f93c, this CI registry): paraphrases 30 / 36 routed (83 %, below bench/routing_scores.py's 97 % on
    the set the rule was chosen with: the issue's 98 % goal is missed), questions 30 / 36 fell back (83 %). The
    bounds guard those levels against regression; they were set after that run, below it."""
    routed = fell = total = 0
    for name in E2E_TASKS:
        for sample in read_jsonl(task_dirs[name] / "test.jsonl")[:12:2]:
            for wording in UNSEEN_PARAPHRASES[name]:
                routed += client.route(sample.image, wording).route.task_id == name
            for question in UNSEEN_QUESTIONS[name]:
                fell += client.route(sample.image, question).route.fell_back
            total += 2
    with capsys.disabled():
        print(f"\n  unseen paraphrases routed {routed}/{total}, unseen questions fell back {fell}/{total}")
    assert routed >= 0.75 * total and fell >= 0.6 * total


def test_unrelated_request_falls_back_to_the_base_connector(client):
    buf = io.BytesIO()
    Image.new("RGB", (200, 120), (250, 120, 30)).save(buf, format="PNG")
    r = client.generate(buf.getvalue(), "Compose a limerick about tax law in medieval Venice.")
    assert r.route.fell_back and r.route.task_id == ""
    # the reason agrees with the candidates: no image clears its floor, or the instruction is below the floor of
    # the best candidate whose image does (an orange rectangle may pass for a rendered word's background)
    passing = [c for c in r.route.candidates if c.image_similarity >= c.image_floor]
    if r.route.fell_back_because == cit_pb2.FALL_BACK_IMAGE_UNLIKE:
        assert not passing
    else:
        assert r.route.fell_back_because == cit_pb2.FALL_BACK_INSTRUCTION_UNLIKE
        assert passing[0].instruction_similarity < passing[0].instruction_floor


def test_route_is_a_dry_run_with_top_k(client, task_dirs):
    sample = first_test_sample(task_dirs, "words")
    r = client.route(sample.image, sample.instruction, top_k=2).route
    assert r.task_id == "words" and len(r.candidates) == 2
    assert r.candidates[0].score >= r.candidates[1].score


def test_a_lora_task_is_in_peft_format_and_served_like_an_eproj_task(registry, client, task_dirs):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from cit_backbone.conversion import converted_lm_dir

    words = Registry.open(registry).get("words")
    assert words.card.adapter_kind == "lora"
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(converted_lm_dir()), words.lora_dir)
    trained_b = [p for n, p in plain.named_parameters() if "lora_B" in n]
    assert trained_b and all(p.abs().max() > 0 for p in trained_b)  # B starts at 0: it was trained and saved
    assert [t.adapter_kind for t in client.list_tasks() if t.task_id == "words"] == ["lora"]
    sample = first_test_sample(task_dirs, "words")
    r = client.generate(sample.image, sample.instruction)
    assert (r.route.task_id, r.route.version, r.route.fell_back) == ("words", 1, False)


def metric(server, name: str, absent: float | None = None, **labels) -> float:
    """One sample of the server's /metrics; a sample the server does not export fails the test unless `absent`
    says what it means (a labelled counter that has not counted yet)."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    assert absent is not None, f"the server exports no {name} {labels}"
    return absent


def test_a_mixed_batch_answers_as_requests_served_one_at_a_time(client, server, task_dirs):
    from concurrent.futures import ThreadPoolExecutor

    samples = [s for name in E2E_TASKS for s in read_jsonl(task_dirs[name] / "test.jsonl")[1:3]]
    ask = lambda s: client.generate(s.image, s.instruction, max_new_tokens=8)  # noqa: E731
    alone = [ask(s) for s in samples]
    batches, batched_rows = metric(server, "cit_batch_size_count"), metric(server, "cit_batch_size_sum")
    with ThreadPoolExecutor(len(samples)) as pool:
        together = list(pool.map(ask, samples))
    assert [(r.route.task_id, r.text) for r in together] == [(r.route.task_id, r.text) for r in alone]
    assert {r.route.task_id for r in together} == set(E2E_TASKS)  # EProj and LoRA rows alike
    # Some decode steps ran several of these requests together (rows per step is the batch size).
    steps, rows = metric(server, "cit_batch_size_count") - batches, metric(server, "cit_batch_size_sum") - batched_rows
    assert rows > steps > 0


def test_evicted_adapters_reload_transparently_and_metrics_count_it(client, server, task_dirs):
    first = first_test_sample(task_dirs, "digits")
    before = client.generate(first.image, first.instruction, max_new_tokens=8)
    evictions = metric(server, "cit_adapter_cache_evictions_total")
    for name in ("fashion-mnist", "words"):  # two other tasks fill the two resident slots
        s = first_test_sample(task_dirs, name)
        client.generate(s.image, s.instruction, max_new_tokens=2)
    again = client.generate(first.image, first.instruction, max_new_tokens=8)
    assert (again.route.task_id, again.text) == (before.route.task_id, before.text)
    assert metric(server, "cit_adapter_cache_evictions_total") >= evictions + 1
    assert metric(server, "cit_adapter_cache_misses_total") >= 4


def test_metrics_count_requests_errors_latency_tokens_and_routes_per_task(client, server, task_dirs):
    ok = metric(server, "cit_requests_total", absent=0.0, method="Generate", status="OK")
    bad = metric(server, "cit_requests_total", absent=0.0, method="Generate", status="INVALID_ARGUMENT")
    tokens = metric(server, "cit_generated_tokens_total")
    sample = first_test_sample(task_dirs, "digits")
    r = client.generate(sample.image, sample.instruction, max_new_tokens=4)
    with pytest.raises(grpc.RpcError):
        client.generate(b"", sample.instruction)
    buf = io.BytesIO()
    Image.new("RGB", (50, 50), (0, 0, 250)).save(buf, format="PNG")
    fell = client.generate(buf.getvalue(), "Compose a limerick about tax law in medieval Venice.", max_new_tokens=2)
    assert metric(server, "cit_requests_total", method="Generate", status="OK") == ok + 2
    assert metric(server, "cit_requests_total", method="Generate", status="INVALID_ARGUMENT") == bad + 1
    assert metric(server, "cit_generated_tokens_total") >= tokens + r.completion_tokens + 1
    served = {"task": "digits", "version": str(r.route.version)}
    assert metric(server, "cit_task_requests_total", outcome="ok", **served) >= 1
    assert metric(server, "cit_task_latency_seconds_count", **served) >= 1
    assert metric(server, "cit_task_generated_tokens_total", **served) >= r.completion_tokens
    assert metric(server, "cit_task_requests_total", task="base", version="", outcome="ok") >= 1  # the fall-back
    reason = cit_pb2.FallBack.Name(fell.route.fell_back_because).removeprefix("FALL_BACK_").lower()
    assert fell.route.fell_back and metric(server, "cit_fell_back_total", reason=reason) >= 1
    assert metric(server, "cit_task_fell_back_total", task=fell.route.candidates[0].task_id, reason=reason) >= 1
    for phase in ("queue", "route", "first_token", "total"):
        assert metric(server, "cit_latency_seconds_count", phase=phase) >= 2, phase
    assert 1 <= metric(server, "cit_adapter_cache_resident") <= 2


def test_list_and_get_task(client, task_dirs):
    sample = first_test_sample(task_dirs, "digits")
    client.generate(sample.image, sample.instruction, task_id="digits", max_new_tokens=1)
    tasks = {t.task_id: t for t in client.list_tasks()}
    assert set(tasks) == set(E2E_TASKS) and tasks["fashion-mnist"].version == 2
    # two resident adapters for three tasks: the one just used is resident, at least one other is cold
    residency = {name: cit_pb2.Residency.Name(t.residency) for name, t in tasks.items()}
    assert residency["digits"] == "RESIDENCY_RESIDENT" and "RESIDENCY_COLD" in residency.values(), residency
    card = json.loads(client.get_task("digits").card_json)
    assert card["task_id"] == "digits" and card["adapter_kind"] == "eproj"


def test_health_and_reflection_are_on(server):
    with grpc.insecure_channel(server.target) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="cit.v1.Cit"))
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        reply = next(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        names = {s.name for s in reply.list_services_response.service}
        assert {"cit.v1.Cit", "grpc.health.v1.Health"} <= names


def test_admin_rpcs_are_off_without_an_admin_token(client):
    with pytest.raises(grpc.RpcError) as err:
        client.reload_registry()
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED and "--admin-token" in err.value.details()


def _png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height pixels: a decompression bomb's calling card."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def _bad(task_dirs):
    """Each case: raw request bytes (some no client would build), the status and a piece of the message."""
    good = first_test_sample(task_dirs)
    image, instr = good.image.read_bytes(), good.instruction
    req = lambda **kw: cit_pb2.GenerateRequest(**{"image": image, "instruction": instr, **kw})  # noqa: E731
    s = cit_pb2.SamplingParams
    limit = 8 * 1024 * 1024  # the server's default image limit; its message limit is 64 KiB above
    not_utf8 = cit_pb2.GenerateRequest(image=image).SerializeToString() + b"\x12\x02\xff\xfe"  # field 2: instruction
    cases = {
        "decompression bomb": (req(image=_png_claiming(100_000, 100_000)), grpc.StatusCode.INVALID_ARGUMENT, "pixels"),
        "image over the size limit": (req(image=image + b"\x00" * (limit + 1 - len(image))),
                                      grpc.StatusCode.INVALID_ARGUMENT, "the limit is"),
        "message over the grpc limit": (req(image=b"\x00" * (limit + 256 * 1024)),
                                        grpc.StatusCode.RESOURCE_EXHAUSTED, "larger than max"),
        "instruction not utf-8": (not_utf8, grpc.StatusCode.INVALID_ARGUMENT, "could not be decoded"),
        "empty image": (req(image=b""), grpc.StatusCode.INVALID_ARGUMENT, "empty"),
        "undecodable image": (req(image=b"\x89PNG garbage"), grpc.StatusCode.INVALID_ARGUMENT, "decoded"),
        "truncated png": (req(image=image[: len(image) // 2]), grpc.StatusCode.INVALID_ARGUMENT, "decoded"),
        "empty instruction": (req(instruction="   "), grpc.StatusCode.INVALID_ARGUMENT, "instruction is empty"),
        "oversized instruction": (req(instruction="x" * 5000), grpc.StatusCode.INVALID_ARGUMENT, "limit"),
        "unknown task": (req(task_id="no-such-task"), grpc.StatusCode.NOT_FOUND, "no-such-task"),
        "task id traversal": (req(task_id="../../etc"), grpc.StatusCode.NOT_FOUND, "no task"),
        "max_new_tokens 0": (req(sampling=s(max_new_tokens=0)), grpc.StatusCode.INVALID_ARGUMENT, "max_new_tokens"),
        "temperature < 0": (req(sampling=s(temperature=-1)), grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
        "top_p 0": (req(sampling=s(top_p=0.0)), grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
        "empty stop": (req(sampling=s(stop=[""])), grpc.StatusCode.INVALID_ARGUMENT, "stop"),
    }
    return {k: (r if isinstance(r, bytes) else r.SerializeToString(), code, msg) for k, (r, code, msg) in cases.items()}


@pytest.mark.parametrize("case", [
    "empty image", "undecodable image", "truncated png", "decompression bomb", "image over the size limit",
    "message over the grpc limit", "instruction not utf-8", "empty instruction", "oversized instruction",
    "unknown task", "task id traversal", "max_new_tokens 0", "temperature < 0", "top_p 0", "empty stop"])
@pytest.mark.parametrize("rpc", ["Generate", "GenerateStream"])
def test_bad_input_gets_a_clear_status_and_the_server_keeps_serving(client, server, task_dirs, case, rpc):
    request, code, message = _bad(task_dirs)[case]
    # Raw bytes over a channel that sends up to 64 MiB: the server, not the client, must refuse them.
    with grpc.insecure_channel(server.target, options=[("grpc.max_send_message_length", 64 << 20)]) as channel:
        call = (channel.unary_stream if rpc == "GenerateStream" else channel.unary_unary)(
            f"/cit.v1.Cit/{rpc}", response_deserializer=lambda b: b)
        with pytest.raises(grpc.RpcError) as err:
            result = call(request, timeout=60)
            if rpc == "GenerateStream":
                list(result)
    assert err.value.code() == code, err.value.details()
    assert message in err.value.details()
    assert server.alive()
    good = first_test_sample(task_dirs)
    assert client.generate(good.image, good.instruction, max_new_tokens=4).route.task_id == "fashion-mnist"


def test_route_refuses_too_many_candidates(client, task_dirs):
    sample = first_test_sample(task_dirs)
    with pytest.raises(grpc.RpcError) as err:
        client.route(sample.image, sample.instruction, top_k=1000)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_cli_client_generates_and_routes(server, task_dirs):
    sample = first_test_sample(task_dirs, "digits")
    out = run_cli("cit", "generate", str(sample.image), sample.instruction, "--server", server.target)
    assert "digits v1" in out.stderr and out.stdout.strip()
    out = run_cli("cit", "route", str(sample.image), sample.instruction, "--server", server.target)
    assert out.stdout.startswith("[digits v1, routed")


def test_registry_cli_lists_verifies_and_compares(registry, task_dirs):
    listing = run_cli("cit-registry", "list", "--registry", str(registry)).stdout
    assert all(name in listing for name in E2E_TASKS) and "reused" in listing
    assert "agree" in run_cli("cit-registry", "verify", "--registry", str(registry)).stdout
    matrix = json.loads(run_cli("cit-registry", "similarity", "--json", "--registry", str(registry)).stdout)
    assert matrix["digits"]["digits"] == pytest.approx(1.0, abs=1e-4)
    assert matrix["digits"]["words"] < 0.6
    card = json.loads(run_cli("cit-registry", "show", "digits", "--registry", str(registry)).stdout.split("files:")[0])
    assert card["task_id"] == "digits"
    sample = first_test_sample(task_dirs, "words")
    routed = run_cli("cit-registry", "route", str(sample.image), sample.instruction, "--registry", str(registry))
    assert "-> words v1" in routed.stdout


def test_registry_cli_routes_with_the_servers_own_query(registry, client, task_dirs):
    """`cit-registry route` shows what the server would do: the same decision, the same candidates with the same
    cosines and floors."""
    for name in E2E_TASKS:
        for sample in read_jsonl(task_dirs[name] / "test.jsonl")[1:2]:  # a held-out wording
            served = client.route(sample.image, sample.instruction, top_k=3).route
            decision, _, *shown = run_cli("cit-registry", "route", str(sample.image), sample.instruction, "--top-k",
                                          "3", "--registry", str(registry)).stdout.splitlines()
            assert decision == (f"-> {served.task_id} v{served.version}" if served.task_id else
                                "-> base connector: " + decision.split(": ", 1)[1])
            rows = [line.replace("(", " ").replace(")", " ").split() for line in shown]
            assert [(r[0], int(r[1][1:])) for r in rows] == [(c.task_id, c.version) for c in served.candidates]
            assert [[float(x) for x in r[2:7]] for r in rows] == [pytest.approx(
                [c.score, c.image_similarity, c.image_floor, c.instruction_similarity, c.instruction_floor], abs=6e-3)
                for c in served.candidates]
