"""The OpenAI-compatible HTTP API (`cit-server --http-port`), driven as applications drive it: the `openai` SDK
(sync, async, streaming) and plain HTTP for bad input. The registry of real tasks is the end-to-end one; the
answers are compared with the same requests over gRPC on the same server."""
import asyncio
import base64
import io
import re
import time

import httpx
import openai
import pytest
from PIL import Image

from cit_client import CitClient
from cit_registry.store import Registry
from cit_server.process import ServerProcess

from .test_end_to_end import first_test_sample

STORY = "Write a very long story about a dragon who learns to read, with many chapters."


def data_url(image: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(image).decode()


def messages(image: bytes, instruction: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": instruction},
                                         {"type": "image_url", "image_url": {"url": data_url(image)}}]}]


def png(colour=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), colour).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def base_url(server):
    return f"http://{server.http_address}/v1"


@pytest.fixture(scope="module")
def bare(tmp_path_factory):
    """A server on an empty registry: for what needs no trained task (bad input, limits)."""
    with ServerProcess(Registry.open(tmp_path_factory.mktemp("bare") / "reg", create=True).root,
                       "--http-port", "0") as srv:
        yield srv


@pytest.fixture(scope="module")
def sdk(base_url):
    with openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0) as c:
        yield c


def test_the_sdk_routes_and_answers_as_grpc_does(sdk, client, task_dirs):
    sample = first_test_sample(task_dirs, "digits")
    image = sample.image.read_bytes()
    expected = client.generate(image, sample.instruction)
    raw = sdk.chat.completions.with_raw_response.create(model="auto", messages=messages(image, sample.instruction))
    response = raw.parse()
    assert response.choices[0].message.content == expected.text
    assert response.choices[0].finish_reason == expected.finish_reason
    assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (expected.prompt_tokens,
                                                                                  expected.completion_tokens)
    route = response.model_extra["cit_route"]
    assert (route["task_id"], route["version"], route["fell_back"], route["forced"]) == ("digits", 1, False, False)
    assert (raw.headers["x-cit-task"], raw.headers["x-cit-task-version"], raw.headers["x-cit-fell-back"]) == \
        ("digits", "1", "no")
    assert response.model == "auto" and response.object == "chat.completion"


def test_model_names_a_task_and_skips_routing(sdk, task_dirs):
    sample = first_test_sample(task_dirs)  # a clothing image, forced onto the digits adapter
    response = sdk.chat.completions.create(model="digits", messages=messages(sample.image.read_bytes(),
                                                                                sample.instruction))
    assert response.model_extra["cit_route"]["forced"] and response.model_extra["cit_route"]["task_id"] == "digits"
    with pytest.raises(openai.NotFoundError) as err:
        sdk.chat.completions.create(model="no-such-task", messages=messages(png(), "What is this?"))
    assert err.value.code == "model_not_found" and "no-such-task" in err.value.message


def test_a_stream_adds_up_to_the_unary_answer_and_reports_usage(sdk, task_dirs):
    sample = first_test_sample(task_dirs, "words")
    request = {"model": "auto", "messages": messages(sample.image.read_bytes(), sample.instruction), "max_tokens": 12}
    unary = sdk.chat.completions.create(**request)
    chunks = list(sdk.chat.completions.create(**request, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[0].model_extra["cit_route"] == unary.model_extra["cit_route"]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == unary.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
        [unary.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == unary.usage.completion_tokens


def test_the_async_sdk_runs_requests_concurrently_with_the_same_answers(sdk, base_url, task_dirs):
    samples = [first_test_sample(task_dirs, name) for name in ("fashion-mnist", "digits", "words")]
    requests = [{"model": "auto", "messages": messages(s.image.read_bytes(), s.instruction), "max_tokens": 8}
                for s in samples]
    expected = [sdk.chat.completions.create(**r).choices[0].message.content for r in requests]

    async def run():
        async with openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0) as c:
            unary = await asyncio.gather(*(c.chat.completions.create(**r) for r in requests))

            async def streamed(r):
                return "".join([chunk.choices[0].delta.content or ""
                                async for chunk in await c.chat.completions.create(**r, stream=True)
                                if chunk.choices])
            streams = await asyncio.gather(*(streamed(r) for r in requests))
            return [u.choices[0].message.content for u in unary], streams

    unary, streams = asyncio.run(run())
    assert unary == expected and streams == expected


def test_models_lists_auto_and_every_task(sdk, client):
    models = sdk.models.list().data
    assert models[0].id == "auto" and sorted(m.id for m in models[1:]) == sorted(t.task_id for t in client.list_tasks())
    assert {m.model_extra["cit"]["residency"] for m in models[1:]} <= {"cold", "resident", "pinned"}


def _chat(**body):
    return {"model": "auto", "messages": messages(png(), "What colour is this?"), **body}


BAD_REQUESTS = {
    "no image": ({"model": "auto", "messages": [{"role": "user", "content": "What is this?"}]}, 400,
                 "messages[0].content", "an image is required"),
    "two images": ({"model": "auto", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "Compare."}, {"type": "image_url", "image_url": {"url": data_url(png())}},
        {"type": "image_url", "image_url": {"url": data_url(png())}}]}]}, 400, "messages[0].content", "exactly one image_url"),
    "bad base64": ({"model": "auto", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "What?"}, {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}]}]},
        400, "messages[0].content[1].image_url.url", "not valid base64"),
    "remote URL": ({"model": "auto", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "What?"}, {"type": "image_url", "image_url": {"url": "http://169.254.169.254/x.png"}}]}]},
        400, "messages[0].content[1].image_url.url", "fetches nothing"),
    "not an image": ({"model": "auto", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "What?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(b"GIF89a....").decode()}}]}]},
        400, None, "image"),
    "unknown model": (_chat(model="no-such-task"), 404, None, "no-such-task"),
    "no model": ({"messages": messages(png(), "What?")}, 400, "model", "model"),
    "temperature too high": (_chat(temperature=9), 400, "temperature", "temperature must be in"),
    "temperature not a number": (_chat(temperature="hot"), 400, "temperature", "temperature"),
    "top_p zero": (_chat(top_p=0), 400, "top_p", "top_p must be in"),
    "max_tokens zero": (_chat(max_tokens=0), 400, "max_tokens", "max_tokens must be in"),
    "max_tokens huge": (_chat(max_completion_tokens=10**9), 400, "max_completion_tokens", "max_completion_tokens must be"),
    "n > 1": (_chat(n=2), 400, "n", "one choice"),
    "logprobs": (_chat(logprobs=True), 400, "logprobs", "not supported"),
    "tools": (_chat(tools=[{"type": "function", "function": {"name": "f"}}]), 400, "tools", "not supported"),
    "penalty": (_chat(presence_penalty=0.5), 400, "presence_penalty", "only 0"),
    "history": ({"model": "auto", "messages": [*messages(png(), "What?"), {"role": "assistant", "content": "red"},
                                               *messages(png(), "And now?")]}, 400, "messages[1].role", "not supported"),
    "temperature with 400 digits": (_chat(temperature=10**400), 400, None, "out of range"),
    "seed over 64 bits": (_chat(seed=1 << 70), 400, "seed", "64-bit"),
    "stop not strings": (_chat(stop=[1, 2]), 400, "stop", "stop"),
    "stream_options without stream": (_chat(stream_options={"include_usage": True}), 400, "stream_options", "stream: true"),
    "instruction too long": ({"model": "auto", "messages": messages(png(), "x" * 5000)}, 400, None, "instruction"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(bare, case):
    body, status, param, says = BAD_REQUESTS[case]
    url = f"http://{bare.http_address}/v1/chat/completions"
    r = httpx.post(url, json=body, timeout=60)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["message"] and error["type"] in ("invalid_request_error", "not_found_error")
    assert error["param"] == param and says in error["message"], error
    assert httpx.post(url, json=_chat(max_tokens=2), timeout=60).status_code == 200


def test_bodies_that_are_not_json_or_too_large_are_refused(bare):
    url = f"http://{bare.http_address}/v1/chat/completions"
    r = httpx.post(url, content=b"{not json", headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 400 and "not JSON" in r.json()["error"]["message"]
    r = httpx.post(url, content=b"[" * 200_000, headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 400 and "nested too deeply" in r.json()["error"]["message"]

    def chunks():  # no content-length: the limit holds for a chunked body too
        for _ in range(40):
            yield b"x" * (1 << 20)
    r = httpx.post(url, content=chunks(), timeout=60)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert httpx.get(f"http://{bare.http_address}/health", timeout=10).status_code == 200


def test_a_system_message_is_accepted_and_not_used(sdk, client, task_dirs):
    sample = first_test_sample(task_dirs, "digits")
    image = sample.image.read_bytes()
    plain = sdk.chat.completions.create(model="auto", messages=messages(image, sample.instruction))
    raw = sdk.chat.completions.with_raw_response.create(model="auto", messages=[
        {"role": "system", "content": "You are a pirate."}, *messages(image, sample.instruction)])
    assert raw.parse().choices[0].message.content == plain.choices[0].message.content
    assert raw.headers["x-cit-system-message"] == "ignored"


def test_http_and_grpc_share_admission_and_a_client_that_hangs_up_stops_generating(tmp_path):
    """One engine behind both doors: with --max-requests 2 held by two gRPC streams an HTTP request is refused at
    once (429); a client that drops an HTTP stream, or hangs up on a unary request, frees its row; health over
    HTTP answers throughout."""
    registry = Registry.open(tmp_path / "reg", create=True).root
    srv = ServerProcess(registry, "--max-requests", "2", "--max-batch-size", "2", "--adapter-cache-size", "2",
                        "--http-port", "0")
    url = f"http://{srv.http_address}"
    try:
        with CitClient(srv.target, timeout=300) as c:
            streams = [c.generate_stream(png(), STORY, max_new_tokens=400) for _ in range(2)]
            for stream in streams:
                next(iter(stream))  # routed: both hold their admission slots
            t0 = time.monotonic()
            refused = httpx.post(f"{url}/v1/chat/completions", json=_chat(max_tokens=2), timeout=60)
            assert refused.status_code == 429 and time.monotonic() - t0 < 1.0, refused.text
            assert refused.json()["error"]["type"] == "rate_limit_error"
            assert httpx.get(f"{url}/v1/models", timeout=10).status_code == 429  # it reads the registry: admitted too
            assert httpx.get(f"{url}/health", timeout=1).status_code == 200
            for stream in streams:
                stream.cancel()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # the cancelled rows leave at the next step
            answered = httpx.post(f"{url}/v1/chat/completions", json=_chat(max_tokens=2), timeout=60)
            if answered.status_code == 200:
                break
            time.sleep(0.2)
        assert answered.status_code == 200, answered.text

        before = len(re.findall(r"generation stopped after", "".join(srv.lines)))
        with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=60,
                          json={"model": "auto", "messages": messages(png(), STORY), "max_tokens": 400,
                                "stream": True}) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")  # the role chunk
            for line in lines:
                if '"content"' in line and '"content": ""' not in line:
                    break  # a first token: the row is decoding; leaving closes the connection
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            stops = re.findall(r"generation stopped after (\d+) of at most 400", "".join(srv.lines))
            if len(stops) > before:
                break
            time.sleep(0.2)
        assert len(stops) == before + 1 and int(stops[-1]) < 100, stops

        # a unary request whose client hangs up (here: its read timeout) stops generating too
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/chat/completions", json={"model": "auto", "messages": messages(png(), STORY),
                                                           "max_tokens": 400}, timeout=httpx.Timeout(60, read=1.5))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            stops = re.findall(r"generation stopped after (\d+) of at most 400", "".join(srv.lines))
            if len(stops) > before + 1:
                break
            time.sleep(0.2)
        assert len(stops) == before + 2 and int(stops[-1]) < 100, stops
    finally:
        srv.stop()


def test_the_http_api_takes_the_grpc_servers_tls_and_tokens(tmp_path):
    """Same certificate, client-certificate check and bearer tokens as gRPC; /health is open (TLS still applies)."""
    from .test_server_security import ADMIN, TOKEN, make_pki

    pki = make_pki(tmp_path)
    registry = Registry.open(tmp_path / "reg", create=True).root
    srv = ServerProcess(registry, "--tls-cert", str(pki / "server.pem"), "--tls-key", str(pki / "server.key"),
                        "--tls-client-ca", str(pki / "ca.pem"), "--http-port", "0",
                        env={"CIT_AUTH_TOKEN": TOKEN, "CIT_ADMIN_TOKEN": ADMIN})
    base = f"https://{srv.http_address}"
    try:
        import ssl

        context = ssl.create_default_context(cafile=str(pki / "ca.pem"))
        context.load_cert_chain(str(pki / "client.pem"), str(pki / "client.key"))
        with httpx.Client(verify=context, timeout=60) as http:
            assert http.get(f"{base}/health").status_code == 200
            for token, message in ((None, "missing bearer token"), ("wrong-" + TOKEN, "wrong bearer token")):
                headers = {"authorization": f"Bearer {token}"} if token else {}
                r = http.post(f"{base}/v1/chat/completions", json=_chat(max_tokens=2), headers=headers)
                assert r.status_code == 401 and message in r.json()["error"]["message"], r.text
            with openai.OpenAI(base_url=f"{base}/v1", api_key=TOKEN, http_client=http, max_retries=0) as sdk:
                assert sdk.chat.completions.create(**_chat(max_tokens=2)).choices[0].message.content is not None
                assert [m.id for m in sdk.models.list()] == ["auto"]
        plain_tls = ssl.create_default_context(cafile=str(pki / "ca.pem"))  # no client certificate
        with pytest.raises((httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError)):
            httpx.get(f"{base}/health", verify=plain_tls, timeout=10).raise_for_status()
        with pytest.raises((httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError)):
            httpx.get(f"http://{srv.http_address}/health", timeout=10).raise_for_status()
    finally:
        srv.stop()
