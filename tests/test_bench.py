"""The benchmark: its metrics by hand, and a tiny end-to-end run on real data and the real backbone."""
import json

import numpy as np
import pytest
import torch

from cit_trainer.bench import Preset, metrics, run_benchmark, transfer


def test_average_accuracy_and_forgetting_by_hand():
    nan = np.nan
    acc = np.array([[0.8, 0.1, nan],
                    [0.6, 0.9, 0.2],
                    [0.4, 0.7, 0.5]])
    average, forgetting = metrics(acc)
    assert average == pytest.approx([0.8, 0.75, (0.4 + 0.7 + 0.5) / 3])
    # F_2: task 0 fell from its best 0.8 to 0.6; F_3: task 0 from 0.8 to 0.4, task 1 from 0.9 to 0.7
    assert forgetting == pytest.approx([0.0, 0.2, (0.4 + 0.2) / 2])


def test_learning_accuracy_and_backward_and_forward_transfer_by_hand():
    nan = np.nan
    acc = np.array([[0.8, 0.1, nan],
                    [0.6, 0.9, 0.2],
                    [0.4, 0.7, 0.5]])
    learning, backward, forward = transfer(acc, start=[0.3, 0.05, 0.25])
    assert learning == pytest.approx((0.8 + 0.9 + 0.5) / 3)
    assert backward == pytest.approx(((0.4 - 0.8) + (0.7 - 0.9)) / 2)
    # before its stage task 1 reached 0.1 (0.05 from the start), task 2 reached 0.2 (0.25 from the start)
    assert forward == pytest.approx(((0.1 - 0.05) + (0.2 - 0.25)) / 2)
    assert transfer(acc, None)[2] is None


def test_a_tiny_benchmark_writes_matrices_metrics_and_heatmaps(tmp_path):
    out = tmp_path / "bench"
    results = run_benchmark(out, ["seqft", "ewc", "er", "eproj", "lora", "joint"], ("digits", "easyvqa-shape"),
                            Preset(train=16, test=8, epochs=1), seed=0, thresholds=[0.0, 1.0], command="test",
                            starts=("base", "instruct"))
    report = json.loads((out / "results.json").read_text())
    environment = report["config"]["environment"]  # what the numbers were measured with
    assert environment["packages"]["torch"] == torch.__version__ and environment["packages"]["cit"]
    assert environment["cpus"] >= 1 and isinstance(environment["cpu_flags"], list)
    methods = ["seqft", "ewc", "er", "eproj", "lora", "joint"]
    assert [(m["start"], m["method"]) for m in report["methods"]] == [(s, m) for s in ("base", "instruct") for m in methods]
    results = [r for r in results if r.start == "base"]
    assert (out / "heatmap-instruct-joint.png").exists()
    for r in results:
        assert len(r.accuracy) == 2 and r.accuracy[0][0] is not None and r.accuracy[0][1] is not None  # next: zero-shot
        assert all(0.0 <= v <= 1.0 for row in r.accuracy for v in row if v is not None)
        assert (out / f"heatmap-base-{r.method}.png").read_bytes()[:4] == b"\x89PNG"
    eproj = next(r for r in results if r.method == "eproj")
    assert eproj.adapters == 2 and eproj.routing_accuracy[-1] >= 0.9  # digits and shapes look nothing alike
    assert eproj.trainable_parameters == 2 * results[0].trainable_parameters
    lora = next(r for r in results if r.method == "lora")
    assert lora.adapters == 2 and lora.routing_accuracy == eproj.routing_accuracy  # routed alike
    assert lora.trainable_parameters > eproj.trainable_parameters
    sweep = {s["threshold"]: s["adapters"] for s in report["threshold_sweep"]}
    assert sweep == {0.0: 1, 1.0: 2}  # threshold 0 reuses everything; 1 expands for every distinct task
    # threshold 1 assigns tasks to adapters as plain EProj does: the same run
    assert report["threshold_sweep"][1]["final_average_accuracy"] == eproj.average_accuracy[-1]
    for r in results:  # every evaluated entry of the matrix, row by row, saved beside its cell
        saved = [json.loads(line) for line in (out / "cells" / f"base-o0-s0-{r.method}.predictions.jsonl").open()]
        for t, row in enumerate(r.accuracy):
            for j, value in enumerate(row):
                entry = [p for p in saved if p["stage"] == t and p["task"] == r.tasks[j]]
                assert (value is None) == (not entry), (r.method, t, j)
                if entry:
                    assert np.mean([p["verdict"] == "correct" for p in entry]) == pytest.approx(value)
                    assert sorted(p["row"] for p in entry) == list(range(len(entry)))
        assert all(("adapter" in p) == (r.method in ("eproj", "lora")) for p in saved)
    table = (out / "results.md").read_text()
    assert "| eproj |" in table and "| threshold | adapters | A_T |" in table and "| BWT | FWT |" in table
    for r in results:  # the start connector is measured once per start, and FWT is taken against it
        assert r.start_accuracy == results[0].start_accuracy and len(r.start_accuracy) == 2
        assert r.forward_transfer == pytest.approx(r.accuracy[0][1] - r.start_accuracy[1])
        assert r.learning_accuracy == pytest.approx((r.accuracy[0][0] + r.accuracy[1][1]) / 2)


def test_both_starting_connectors_ship_and_differ(backbone):
    base, instruct = backbone.base_connector("base"), backbone.base_connector("instruct")
    assert not torch.equal(base.proj.weight, instruct.proj.weight)
    with pytest.raises(ValueError, match="unknown starting point"):
        backbone.base_connector("blip")


def test_cells_of_seeds_and_orders_are_written_as_they_finish_and_a_run_resumes(tmp_path):
    """start x order x seed x method cells, each in its own file; a run stopped midway resumes with the cells it
    has, and the report says which are missing. Paired claims compare cells of the same order and seed."""
    import random

    from cit_trainer.bench import report_from_cells

    out, tasks = tmp_path / "bench", ("digits", "easyvqa-shape")
    grid = dict(methods=["seqft", "er"], order=tasks, preset=Preset(train=16, test=8, epochs=1), seed=0,
                thresholds=[], command="test", seeds=(0, 1), orders=(0, 3))
    results = run_benchmark(out, **grid)
    cells = sorted(p.name for p in (out / "cells").glob("base-*.json"))
    assert cells == [f"base-o{o}-s{s}-{m}.json" for o in (0, 3) for s in (0, 1) for m in ("er", "seqft")]
    shuffled = list(tasks)
    random.Random(3).shuffle(shuffled)
    assert {tuple(r.tasks) for r in results if r.order == 3} == {tuple(shuffled)}
    seqft = [r for r in results if r.method == "seqft" and r.order == 0]
    assert {r.seed for r in seqft} == {0, 1}
    report = json.loads((out / "results.json").read_text())
    assert report["missing"] == [] and {c["claim"]: c["cells"] for c in report["paired"]}["er - seqft"] == 4
    summary = {(g["start"], g["method"]): g for g in report["summary"]}
    a_t = [r.average_accuracy[-1] for r in results if r.method == "seqft"]
    assert summary["base", "seqft"]["cells"] == 4 and summary["base", "seqft"]["A_T"][0] == pytest.approx(np.mean(a_t))
    low, high = summary["base", "seqft"]["A_T"][1:]
    assert low <= np.mean(a_t) <= high

    (out / "cells" / "base-o3-s1-er.json").unlink()  # the run was stopped before its last cell
    assert report_from_cells(out) == ["base-o3-s1-er"]
    assert "Missing cells (1 of 8" in (out / "results.md").read_text()
    logged = []
    again = run_benchmark(out, **grid, resume=True, log=logged.append)
    assert sum("done before, kept" in line for line in logged) == 7
    assert len(again) == 8 and json.loads((out / "results.json").read_text())["missing"] == []
    with pytest.raises(ValueError, match="other settings"):
        run_benchmark(out, **{**grid, "seed": 5}, resume=True)


def test_order_seeds_that_give_the_same_order_count_once():
    from cit_trainer.bench import _distinct_orders, permuted

    logged = []
    assert permuted(("a", "b"), 5) == ("a", "b") and permuted(("a", "b"), 3) == ("b", "a")
    assert _distinct_orders(("a", "b"), (0, 3, 5, 1), logged.append) == (0, 3)
    assert logged == ["order seed 5 gives the order of seed 0: left out", "order seed 1 gives the order of seed 3: left out"]
