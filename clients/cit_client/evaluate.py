"""Held-out evaluation over gRPC: does the server route each test request to its task, and answer it right?"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from cit_registry.taskdata import normalise_answer, read_jsonl, resolve_task_files

from .client import CitClient


@dataclass
class TaskScore:
    dataset: str
    expected_task: str | None
    requests: int = 0
    routed: int = 0
    correct: int = 0
    served_by: dict = field(default_factory=dict)

    @property
    def routing_accuracy(self) -> float:
        return self.routed / self.requests if self.requests else 0.0

    @property
    def answer_accuracy(self) -> float:
        return self.correct / self.requests if self.requests else 0.0


def dataset_owners(client: CitClient) -> dict[str, str]:
    """Data set name -> the task whose adapter was trained on it (a reused task owns several)."""
    owners = {}
    for summary in client.list_tasks():
        card = json.loads(client.get_task(summary.task_id).card_json)
        for dataset in card.get("datasets", []):
            owners[dataset["name"]] = summary.task_id
    return owners


def evaluate_dataset(client: CitClient, task_dir: Path, limit: int | None = None,
                     owners: dict[str, str] | None = None) -> TaskScore:
    _, test_file = resolve_task_files(task_dir)
    if test_file is None:
        raise FileNotFoundError(f"{task_dir} has no test.jsonl")
    name = test_file.parent.name
    owners = dataset_owners(client) if owners is None else owners
    score = TaskScore(name, owners.get(name))
    for sample in read_jsonl(test_file)[:limit]:
        r = client.generate(sample.image, sample.instruction, max_new_tokens=16)
        served = r.route.task_id or "(base)"
        score.requests += 1
        score.routed += served == score.expected_task
        score.correct += normalise_answer(r.text) == normalise_answer(sample.output)
        score.served_by[served] = score.served_by.get(served, 0) + 1
    return score
