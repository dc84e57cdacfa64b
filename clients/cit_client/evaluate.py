"""Held-out evaluation over gRPC: does the server route each test request to its task, and answer it right?"""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from cit_registry.taskdata import TEMPLATE_KINDS, Verdict, judge, read_jsonl, resolve_task_files

from .client import CitClient, fell_back_reason

# Requests in flight while evaluating: the server's default running batch (8 rows), so its batches stay full; well
# under its default admission bound (64). Answers do not depend on it: a row's greedy answer is the same in any batch.
EVALUATION_CONCURRENCY = 8


@dataclass
class Tally:
    requests: int = 0
    routed: int = 0
    correct: int = 0

    @property
    def routing_accuracy(self) -> float:
        return self.routed / self.requests if self.requests else 0.0

    @property
    def answer_accuracy(self) -> float:
        return self.correct / self.requests if self.requests else 0.0


@dataclass
class TaskScore(Tally):
    """A data set's test rows over gRPC: the totals, and the same per wording kind."""

    dataset: str = ""
    expected_task: str | None = None
    served_by: dict = field(default_factory=dict)
    by_template: dict[str, Tally] = field(default_factory=dict)  # "train" / "held-out" rows, where marked
    errors: dict[str, int] = field(default_factory=lambda: {Verdict.FORMAT.value: 0, Verdict.KNOWLEDGE.value: 0})


def dataset_owners(client: CitClient) -> dict[str, str]:
    """Data set name -> the task whose adapter was trained on it (a reused task owns several)."""
    owners = {}
    for summary in client.list_tasks():
        card = json.loads(client.get_task(summary.task_id).card_json)
        for dataset in card.get("datasets", []):
            owners[dataset["name"]] = summary.task_id
    return owners


def evaluate_dataset(client: CitClient, task_dir: Path, limit: int | None = None,
                     owners: dict[str, str] | None = None, predictions=None,
                     concurrency: int = EVALUATION_CONCURRENCY) -> TaskScore:
    """Every test row over gRPC, routed by the server, `concurrency` requests in flight. `predictions`: a text file
    to write one JSON line per row to (request, answer, verdict, route), in the rows' order, so that format errors
    and knowledge errors can be read apart."""
    _, test_file = resolve_task_files(task_dir)
    if test_file is None:
        raise FileNotFoundError(f"{task_dir} has no test.jsonl")
    name = test_file.parent.name
    owners = dataset_owners(client) if owners is None else owners
    score = TaskScore(dataset=name, expected_task=owners.get(name))
    samples = read_jsonl(test_file)[:limit]
    with ThreadPoolExecutor(max(1, concurrency)) as pool:
        responses = list(pool.map(
            lambda sample: client.generate(sample.image, sample.instruction, max_new_tokens=16), samples))
    for sample, r in zip(samples, responses):
        served = r.route.task_id or "(base)"
        verdict = judge(r.text, sample.output)
        routed, correct = served == score.expected_task, verdict is Verdict.CORRECT
        tallies = [score] + ([score.by_template.setdefault(sample.template, Tally())] if sample.template else [])
        for t in tallies:
            t.requests += 1
            t.routed += routed
            t.correct += correct
        if not correct:
            score.errors[verdict.value] += 1
        score.served_by[served] = score.served_by.get(served, 0) + 1
        if predictions is not None:
            predictions.write(json.dumps({
                "dataset": name, "image": str(sample.image), "instruction": sample.instruction,
                "template": sample.template, "expected": sample.output, "prediction": r.text,
                "verdict": verdict.value, "task": r.route.task_id or None, "score": round(r.route.score, 4),
                "fell_back": fell_back_reason(r.route) if r.route.fell_back else None}) + "\n")
    score.by_template = {k: score.by_template[k] for k in TEMPLATE_KINDS if k in score.by_template}
    return score
