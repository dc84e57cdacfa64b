"""The routing suite (cit-trainer routing-eval), small: real data, real backbone, every step over a served registry."""
import json

from cit_registry.taskdata import read_jsonl
from cit_trainer.data import EXPORTERS, TEMPLATES, export_task
from cit_trainer.routing_eval import Grade, ReusePair, SuiteOptions, run_suite


def test_every_suite_task_exports_its_answers_and_wordings(tmp_path):
    answers = {"fashion-footwear": {"yes", "no"}, "digits-parity": {"even", "odd"},
               "printed-digits": {"zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"},
               "drawn-shapes": {"circle", "rectangle", "triangle"}}
    for name in EXPORTERS:
        task_dir, written = export_task(name, tmp_path, 12, 4)
        train, test = read_jsonl(task_dir / "train.jsonl"), read_jsonl(task_dir / "test.jsonl")
        assert written == {"train": 12, "test": 8}
        assert {s.instruction for s in train} <= set(TEMPLATES[name].train)
        assert {s.instruction for s in test if s.template == "held-out"} <= set(TEMPLATES[name].held_out)
        if name in answers:
            assert {s.output for s in train + test} <= answers[name]
    first = read_jsonl(tmp_path / "words-first-letter" / "train.jsonl")
    assert all(len(s.output) == 1 and s.output != "a" for s in first)  # "a" is an article to the judge


def test_a_small_suite_reports_routing_leave_one_out_and_reuse_and_resumes(tmp_path, backbone):
    opts = SuiteOptions(train=24, test=6, epochs=1, tasks=("digits", "digits-parity", "printed-digits"),
                        pairs=(ReusePair(Grade.REDRAW, "digits", "digits"),
                               ReusePair(Grade.NEW_QUESTION, "digits", "digits-parity")))
    report = run_suite(tmp_path, opts, backbone, log=lambda *a, **k: None)
    assert set(report["per_task"]) == set(opts.tasks)
    for name, kinds in report["per_task"].items():
        assert set(kinds) == {"train", "held-out"} and all(k["requests"] == 6 for k in kinds.values())
        assert sum(report["confusion"][name].values()) == 12  # every test row was sent over gRPC
    assert all(v["requests"] == 12 for v in report["leave_one_out"].values())
    redraw, question = report["reuse"]
    assert (redraw["second"], question["second"]) == ("digits-redraw", "digits-parity")
    assert redraw["rows"] == 12 and redraw["similarity"] > question["similarity"]  # a redraw is nearer
    assert redraw["replayed"] == {"digits": 24}
    assert [row["adapters_saved"] for row in report["sweep"]][0] == 2
    assert (tmp_path / "report.md").read_text().startswith("# Routing suite")

    stamp = {p: p.stat().st_mtime for p in tmp_path.rglob("task.json")}
    again = run_suite(tmp_path, opts, backbone, log=lambda *a, **k: None)  # resumes: nothing retrained
    assert {p: p.stat().st_mtime for p in tmp_path.rglob("task.json")} == stamp
    assert json.dumps(again["reuse"]) == json.dumps(report["reuse"])
