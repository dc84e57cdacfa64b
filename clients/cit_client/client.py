"""A synchronous Python client for cit-server."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc

from cit_proto import cit_pb2, cit_pb2_grpc


def _image_bytes(image: bytes | str | Path) -> bytes:
    return image if isinstance(image, bytes) else Path(image).read_bytes()


class CitClient:
    """CitClient("127.0.0.1:50051").generate("cat.png", "What is this?") -> GenerateResponse."""

    def __init__(self, target: str, timeout: float | None = 120.0, max_message_bytes: int = 9 * 1024 * 1024) -> None:
        options = [("grpc.max_send_message_length", max_message_bytes),
                   ("grpc.max_receive_message_length", max_message_bytes)]
        self.channel = grpc.insecure_channel(target, options=options)
        self.stub = cit_pb2_grpc.CitStub(self.channel)
        self.timeout = timeout

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "CitClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @staticmethod
    def request(
        image: bytes | str | Path,
        instruction: str,
        task_id: str | None = None,
        *,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        seed: int | None = None,
        stop: list[str] | None = None,
    ) -> cit_pb2.GenerateRequest:
        params = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p, "top_k": top_k,
                  "seed": seed}
        sampling = cit_pb2.SamplingParams(**{k: v for k, v in params.items() if v is not None}, stop=stop or [])
        return cit_pb2.GenerateRequest(image=_image_bytes(image), instruction=instruction, task_id=task_id,
                                       sampling=sampling)

    def generate(self, image: bytes | str | Path, instruction: str, task_id: str | None = None, **sampling) -> cit_pb2.GenerateResponse:
        return self.stub.Generate(self.request(image, instruction, task_id, **sampling), timeout=self.timeout)

    def generate_stream(self, image: bytes | str | Path, instruction: str, task_id: str | None = None,
                        **sampling) -> Iterator[cit_pb2.GenerateStreamResponse]:
        return self.stub.GenerateStream(self.request(image, instruction, task_id, **sampling), timeout=self.timeout)

    def route(self, image: bytes | str | Path, instruction: str, top_k: int = 5) -> cit_pb2.RouteResponse:
        return self.stub.Route(cit_pb2.RouteRequest(image=_image_bytes(image), instruction=instruction, top_k=top_k),
                               timeout=self.timeout)

    def list_tasks(self) -> list[cit_pb2.TaskSummary]:
        return list(self.stub.ListTasks(cit_pb2.ListTasksRequest(), timeout=self.timeout).tasks)

    def get_task(self, task_id: str) -> cit_pb2.GetTaskResponse:
        return self.stub.GetTask(cit_pb2.GetTaskRequest(task_id=task_id), timeout=self.timeout)
