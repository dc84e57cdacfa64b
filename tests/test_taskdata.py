"""The task format's instruction wordings and how answers are judged (no model needed)."""
import json
import time

import pytest

from cit_proto import cit_pb2
from cit_registry.taskdata import Verdict, accuracy_by_template, judge, normalise_answer, read_jsonl
from cit_trainer.data import EXPORTERS, TEMPLATES, export_task


@pytest.mark.parametrize("prediction, expected, verdict", [
    ("The T-shirt.", "t-shirt", Verdict.CORRECT),        # articles, case, punctuation
    ('"Four"', "four", Verdict.CORRECT),                  # quotes are punctuation
    ("  ankle   boot!\n", "ankle boot", Verdict.CORRECT),
    ("ｆｏｕｒ", "four", Verdict.CORRECT),                  # full-width letters (NFKC)
    ("four\nfour\nax", "four", Verdict.FORMAT),           # a turn that goes on past the label
    ("It is a sneaker, I think", "sneaker", Verdict.FORMAT),
    ("sneakers", "sneaker", Verdict.KNOWLEDGE),           # whole words only
    ("five", "four", Verdict.KNOWLEDGE),
    ("", "four", Verdict.KNOWLEDGE),
])
def test_answers_are_judged_after_the_documented_normalisation(prediction, expected, verdict):
    assert judge(prediction, expected) is verdict
    assert (normalise_answer(prediction) == normalise_answer(expected)) == (verdict is Verdict.CORRECT)


def test_every_exported_task_has_eight_wordings_and_its_test_rows_carry_both_kinds(tmp_path):
    assert set(TEMPLATES) == set(EXPORTERS)
    for name, t in TEMPLATES.items():
        assert len(t.train) + len(t.held_out) >= 8 and len(t.held_out) >= 3, name
        assert not set(t.train) & set(t.held_out), name
    task_dir, written = export_task("digits", tmp_path, 60, 20)
    train, test = read_jsonl(task_dir / "train.jsonl"), read_jsonl(task_dir / "test.jsonl")
    assert written == {"train": 60, "test": 40}
    assert {s.template for s in train} == {"train"} and {s.instruction for s in train} <= set(TEMPLATES["digits"].train)
    assert len({s.instruction for s in train}) == len(TEMPLATES["digits"].train)  # every training wording is used
    # each test image twice, in a row: a training wording, then a held-out one, the same answer
    for a, b in zip(test[::2], test[1::2]):
        assert a.image == b.image and a.output == b.output
        assert (a.template, b.template) == ("train", "held-out")
        assert a.instruction in TEMPLATES["digits"].train and b.instruction in TEMPLATES["digits"].held_out
    assert accuracy_by_template(test, [s.template == "train" for s in test]) == {"train": 1.0, "held-out": 0.0}


def test_a_template_mark_other_than_train_or_held_out_is_refused(tmp_path):
    (tmp_path / "t.jsonl").write_text(json.dumps({"image": "x.png", "instruction": "q", "output": "a",
                                                  "template": "test"}) + "\n")
    with pytest.raises(ValueError, match="t.jsonl:1: template must be one of train, held-out"):
        read_jsonl(tmp_path / "t.jsonl")


def test_cit_evaluate_counts_each_wording_kind_and_saves_every_prediction(tmp_path):
    """The client's evaluation over a stand-in client: routing and answers per wording kind, misses by kind."""
    import io
    from types import SimpleNamespace

    from cit_client.evaluate import evaluate_dataset

    task_dir, _ = export_task("digits", tmp_path, 4, 3)
    rows = read_jsonl(task_dir / "test.jsonl")
    answers = [rows[0].output, rows[1].output + "\nmore", "wrong", rows[3].output, "x", "y"]
    routes = ["digits", "digits", "digits", "", "digits", "other"]
    row_of = {(str(r.image), r.instruction): i for i, r in enumerate(rows)}

    class Client:  # answers in flight at once finish in another order than they were sent
        def generate(self, image, instruction, max_new_tokens):
            i = row_of[str(image), instruction]
            time.sleep(0.05 * (len(rows) - i))
            return SimpleNamespace(text=answers[i], route=cit_pb2.RouteDecision(
                task_id=routes[i], score=1.2, fell_back=not routes[i], fell_back_because=0 if routes[i] else 3))
    out = io.StringIO()
    s = evaluate_dataset(Client(), task_dir, owners={"digits": "digits"}, predictions=out, concurrency=4)
    assert (s.requests, s.routed, s.correct) == (6, 4, 2) and s.errors == {"format": 1, "knowledge": 3}
    assert {k: (t.requests, t.routed, t.correct) for k, t in s.by_template.items()} == {
        "train": (3, 3, 1), "held-out": (3, 1, 1)}
    saved = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [p["verdict"] for p in saved] == ["correct", "format", "knowledge", "correct", "knowledge", "knowledge"]
    assert saved[3]["fell_back"] == "instruction unlike" and saved[1]["template"] == "held-out"
    assert [p["instruction"] for p in saved] == [r.instruction for r in rows]  # in the rows' order
