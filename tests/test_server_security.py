"""Who gets in, and how the server stops: bearer tokens, TLS with client certificates made in the test, client
deadlines that stop generation, and a graceful SIGTERM. Real cit-server processes over loopback."""
import asyncio
import datetime
import io
import ipaddress
import json
import re
import signal
import threading
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from cit_backbone.embedder import TextEmbedder
from cit_client import AsyncCitClient, CitClient
from cit_registry.store import Registry, TaskCard, TaskKey
from cit_server.process import ServerProcess

TOKEN = "correct-horse-battery-staple"
ADMIN = "admin-horse-battery-staple"
STORY = "Write a very long story about a dragon who learns to read, with many chapters."


def png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


def make_pki(directory):
    """A CA, a server certificate for 127.0.0.1 and a client certificate, all signed by the CA (PEM files)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def cert(name, key, issuer_name, issuer_key, ca=False, san=None):
        builder = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
                   .issuer_name(issuer_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    def write(name, key, certificate):
        (directory / f"{name}.key").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        (directory / f"{name}.pem").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cit test CA")])
    write("ca", ca_key, cert("cit test CA", ca_key, ca_name, ca_key, ca=True))
    for name, san in (("server", [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), ("client", None)):
        key = ec.generate_private_key(ec.SECP256R1())
        write(name, key, cert(name, key, ca_name, ca_key, san=san))
    return directory


@pytest.fixture(scope="module")
def empty_registry(tmp_path_factory):
    return Registry.open(tmp_path_factory.mktemp("secure") / "reg", create=True).root


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def secure_server(empty_registry, pki):
    srv = ServerProcess(empty_registry, "--tls-cert", str(pki / "server.pem"), "--tls-key", str(pki / "server.key"),
                        "--tls-client-ca", str(pki / "ca.pem"), env={"CIT_AUTH_TOKEN": TOKEN, "CIT_ADMIN_TOKEN": ADMIN})
    assert "TLS + client certificates, bearer token, admin token" in srv.banner
    yield srv
    srv.stop()


def test_tls_with_a_client_certificate_and_the_token_gets_in(secure_server, pki):
    with CitClient(secure_server.target, token=TOKEN, tls_ca=pki / "ca.pem", tls_cert=pki / "client.pem",
                   tls_key=pki / "client.key") as c:
        assert c.list_tasks() == []
        r = c.generate(png(), "What colour is this?", max_new_tokens=4)
        assert r.route.fell_back and r.completion_tokens >= 1


@pytest.mark.parametrize("token, message", [(None, "missing bearer token"), ("wrong-" + TOKEN, "wrong bearer token")])
def test_a_missing_or_wrong_token_is_unauthenticated_for_unary_and_streaming_rpcs(secure_server, pki, token, message):
    with CitClient(secure_server.target, token=token, tls_ca=pki / "ca.pem", tls_cert=pki / "client.pem",
                   tls_key=pki / "client.key") as c:
        with pytest.raises(grpc.RpcError) as err:
            c.list_tasks()
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED and message in err.value.details()
        with pytest.raises(grpc.RpcError) as err:
            list(c.generate_stream(png(), "What is this?"))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # Health stays open without a token (TLS still applies).
        health = health_pb2_grpc.HealthStub(c.channel).Check(health_pb2.HealthCheckRequest(service="cit.v1.Cit"))
        assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_admin_rpcs_take_only_the_admin_token_which_also_opens_the_others(secure_server, pki, empty_registry,
                                                                          backbone):
    """And a task committed while the server runs is routed over gRPC at once after ReloadRegistry."""
    def client(token):
        return CitClient(secure_server.target, token=token, tls_ca=pki / "ca.pem", tls_cert=pki / "client.pem",
                         tls_key=pki / "client.key")

    with client(TOKEN) as c:
        for admin_rpc in (c.reload_registry, lambda: c.change_task("added", "retire"), c.history):
            with pytest.raises(grpc.RpcError) as err:
                admin_rpc()
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED and "admin token" in err.value.details()
    with client(ADMIN) as c:
        assert c.list_tasks() == []  # the admin token opens the other RPCs too
        instruction = "Name the shade of this picture."
        text = TextEmbedder().embed([instruction, "red"])
        key = TaskKey.from_embeddings(backbone.encode_images([Image.open(io.BytesIO(png()))]).numpy(), text[:1],
                                      text[1:])
        other = TaskKey.from_embeddings(np.ones((1, key.image.shape[1])), text[1:], text[:1])
        card = TaskCard("added", 1, "eproj", {"action": "expanded"}, datasets=[
            {"name": "shades", "train": "/data/of/the/trainer/train.jsonl", "test": "/data/of/the/trainer/test.jsonl"}])
        Registry.open(empty_registry).commit(card, key.merged(other), {"adapter": backbone.base_connector().save})
        reloaded = c.reload_registry()
        assert (reloaded.tasks, reloaded.changed) == (1, True)
        assert c.reload_registry().changed is False
        routed = c.generate(png(), instruction, max_new_tokens=2).route
        assert (routed.task_id, routed.version, routed.fell_back) == ("added", 1, False)
        [listed] = c.list_tasks()
        assert listed.centroids == 2  # one data set, two routing centroids
        assert json.loads(c.get_task("added").card_json)["datasets"][0]["train"].startswith("/data")
        # retired over the wire: the very next request is routed without it (ChangeTask reloads before answering)
        assert c.change_task("added", "retire").serving_version == 0
        assert c.generate(png(), instruction, max_new_tokens=2).route.fell_back and c.list_tasks() == []
        assert c.change_task("added", "restore").serving_version == 1
        assert c.generate(png(), instruction, max_new_tokens=2).route.task_id == "added"
        assert [e.action for e in c.history("added")] == ["commit", "retire", "restore"]
    with client(TOKEN) as c:  # where the trainer's data lies is for operators only
        assert json.loads(c.get_task("added").card_json)["datasets"] == [{"name": "shades"}]


def test_the_async_client_does_what_the_sync_one_does_with_the_same_options(secure_server, pki):
    """AsyncCitClient over TLS with a client certificate and the token: every RPC answers as CitClient's does, a
    stream's deltas add up to the unary answer, and the server's statuses arrive as AioRpcError."""
    options = {"tls_ca": pki / "ca.pem", "tls_cert": pki / "client.pem", "tls_key": pki / "client.key"}
    with CitClient(secure_server.target, token=ADMIN, **options) as sync:
        expected = sync.generate(png(), "What colour is this?", max_new_tokens=6)
        tasks = [t.task_id for t in sync.list_tasks()]

    async def run():
        async with AsyncCitClient(secure_server.target, token=TOKEN, **options) as c:
            answer = await c.generate(png(), "What colour is this?", max_new_tokens=6)
            assert (answer.text, answer.route) == (expected.text, expected.route)
            streamed = [m async for m in c.generate_stream(png(), "What colour is this?", max_new_tokens=6)]
            assert streamed[0].HasField("route") and streamed[-1].finish_reason == expected.finish_reason
            assert "".join(m.delta for m in streamed) == expected.text
            assert "".join([d async for d in c.stream_text(png(), "What colour is this?", max_new_tokens=6)]) \
                == expected.text
            assert (await c.route(png(), "What colour is this?", top_k=3)).route.fell_back == expected.route.fell_back
            assert [t.task_id for t in await c.list_tasks()] == tasks
            for task in tasks:
                assert (await c.get_task(task)).task.task_id == task
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await c.get_task("no-such-task")
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await c.reload_registry()
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED and "admin token" in err.value.details()
        async with AsyncCitClient(secure_server.target, token=ADMIN, **options) as admin:
            assert (await admin.reload_registry()).tasks == len(tasks)
        async with AsyncCitClient(secure_server.target, token="wrong-" + TOKEN, **options) as c:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                [m async for m in c.generate_stream(png(), "What is this?")]
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED

    asyncio.run(run())


def test_cancelling_an_async_stream_stops_its_generation_on_the_server(secure_server, pki):
    """The client cancels after the first delta (by `cancel()` and by leaving stream_text's loop): the server
    stops decoding that row at once, long before its 400 tokens."""
    async def run():
        async with AsyncCitClient(secure_server.target, token=TOKEN, tls_ca=pki / "ca.pem",
                                  tls_cert=pki / "client.pem", tls_key=pki / "client.key") as c:
            stream = c.generate_stream(png(), STORY, max_new_tokens=400)
            messages = aiter(stream)
            await anext(messages)  # the route
            await anext(messages)  # a first delta: the row is decoding
            stream.cancel()
            with pytest.raises(asyncio.CancelledError):
                await anext(messages)
            async for _ in c.stream_text(png(), STORY, max_new_tokens=400):
                break  # leaving the loop cancels the call

    stopped_before = len(re.findall(r"generation stopped after", "".join(secure_server.lines)))
    asyncio.run(run())
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        stops = re.findall(r"generation stopped after (\d+) of at most 400 tokens", "".join(secure_server.lines))
        if len(stops) >= stopped_before + 2:
            break
        time.sleep(0.2)
    assert len(stops) == stopped_before + 2 and all(int(n) < 100 for n in stops[stopped_before:]), stops


def test_no_client_certificate_or_plaintext_does_not_get_in(secure_server, pki):
    with CitClient(secure_server.target, token=TOKEN, tls_ca=pki / "ca.pem", timeout=10) as c:
        with pytest.raises(grpc.RpcError) as err:
            c.list_tasks()
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    with CitClient(secure_server.target, token=TOKEN, timeout=10) as c:
        with pytest.raises(grpc.RpcError) as err:
            c.list_tasks()
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert secure_server.alive()


def refusal(client: CitClient, seconds: float = 10.0) -> grpc.RpcError | None:
    """How a new request is refused once the stop has begun (just after health turns NOT_SERVING)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            client.list_tasks()
        except grpc.RpcError as exc:
            return exc
        time.sleep(0.05)
    return None


def test_deadline_stops_generation_and_sigterm_drains_gracefully(empty_registry):
    srv = ServerProcess(empty_registry, "--grace-seconds", "60")
    try:
        with CitClient(srv.target, timeout=1.5) as c:
            with pytest.raises(grpc.RpcError) as err:
                c.generate(png(), STORY, max_new_tokens=400)
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        with CitClient(srv.target) as c:
            # The server is free again at once: the stopped request no longer holds the model.
            assert c.generate(png(), "What colour is this?", max_new_tokens=2).completion_tokens >= 1

            watch = health_pb2_grpc.HealthStub(c.channel).Watch(health_pb2.HealthCheckRequest(service="cit.v1.Cit"))
            statuses = iter(watch)
            assert next(statuses).status == health_pb2.HealthCheckResponse.SERVING
            in_flight: dict = {}
            thread = threading.Thread(target=lambda: in_flight.update(
                r=c.generate(png(), STORY, max_new_tokens=48)))
            thread.start()
            stream = c.generate_stream(png(), STORY, max_new_tokens=48)
            next(iter(stream))  # the route message: this request is in flight
            srv.proc.send_signal(signal.SIGTERM)
            assert next(statuses).status == health_pb2.HealthCheckResponse.NOT_SERVING
            watch.cancel()
            refused = refusal(c)
            assert refused is not None, "new requests are still accepted after SIGTERM"
            # grpc answers UNAVAILABLE once the port is closed; a call caught while it closes is CANCELLED
            assert refused.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED), refused.details()
            rest = list(stream)
            assert rest[-1].finish_reason in ("stop", "length")  # the in-flight requests finish
            thread.join(timeout=120)
            assert in_flight["r"].finish_reason in ("stop", "length")
        assert srv.proc.wait(timeout=60) == 0
    finally:
        output = srv.stop()
    stopped = re.search(r"generation stopped after (\d+) of at most 400 tokens", output)
    assert stopped and int(stopped.group(1)) < 400, output[-2000:]
    assert "cit-server stopped" in output


def test_a_cancelled_stream_frees_its_slot_for_a_waiting_request(empty_registry):
    """Two slots, both taken by long streams; one is cancelled; a third request is answered while the other long
    stream still runs (with batch-at-a-time decoding it would wait for that stream to end)."""
    srv = ServerProcess(empty_registry, "--max-batch-size", "2", "--adapter-cache-size", "2")
    try:
        with CitClient(srv.target) as c:
            gone = c.generate_stream(png(), STORY, max_new_tokens=400)
            kept = c.generate_stream(png(), STORY, max_new_tokens=150)
            kept_messages = iter(kept)
            for stream in (iter(gone), kept_messages):
                next(stream)  # the route: both rows hold a slot
                next(stream)  # and are decoding
            gone.cancel()
            answered = c.generate(png(), "What colour is this?", max_new_tokens=2)
            answered_at = time.monotonic()
            rest = list(kept_messages)
            kept_done_at = time.monotonic()
            assert answered.completion_tokens >= 1
            assert rest[-1].finish_reason == "length"  # the kept stream ran long, to its limit ...
            # ... and was still decoding when the third request had its answer
            assert answered_at < kept_done_at - 1.0, (answered_at, kept_done_at)
    finally:
        output = srv.stop()
    assert re.search(r"generation stopped after \d+ of at most 400 tokens", output), output[-2000:]


def test_a_burst_beyond_admission_is_refused_at_once_while_health_answers(empty_registry):
    """The fast version of `bench/load.py --overload`: 4 admitted, 16 clients at once. Each call is answered or
    refused with RESOURCE_EXHAUSTED within 100 ms; health answers within its 1 s deadline throughout."""
    srv = ServerProcess(empty_registry, "--max-requests", "4", "--max-batch-size", "2", "--adapter-cache-size", "2",
                        "--host", "0.0.0.0", "--metrics-port", "0")
    # gRPC on every interface; the unauthenticated metrics stay on loopback unless --metrics-host says otherwise
    assert srv.metrics_url.startswith("http://127.0.0.1:")
    outcomes: list[tuple[str, float]] = []
    probes: list[float | str] = []
    done = threading.Event()

    def probe():
        with grpc.insecure_channel(srv.target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while not done.is_set():
                t0 = time.monotonic()
                try:
                    stub.Check(health_pb2.HealthCheckRequest(service="cit.v1.Cit"), timeout=1.0)
                    probes.append(time.monotonic() - t0)
                except grpc.RpcError as exc:
                    probes.append(exc.code().name)
                time.sleep(0.05)

    try:
        with CitClient(srv.target, timeout=300) as c:
            def one(_):
                t0 = time.monotonic()
                try:
                    c.generate(png(), STORY, max_new_tokens=12)
                    outcomes.append(("OK", time.monotonic() - t0))
                except grpc.RpcError as exc:
                    outcomes.append((exc.code().name, time.monotonic() - t0))
            prober = threading.Thread(target=probe)
            prober.start()
            threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=300)
            done.set()
            prober.join()
    finally:
        srv.stop()
    codes = [code for code, _ in outcomes]
    assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"} and len(codes) == 16, codes
    assert 4 <= codes.count("OK") < 16, codes
    assert max(t for code, t in outcomes if code == "RESOURCE_EXHAUSTED") <= 0.1, outcomes
    assert probes and all(isinstance(p, float) and p < 1.0 for p in probes), probes
