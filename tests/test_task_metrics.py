"""Per-task metrics stay bounded: only the busiest tasks get series of their own, whatever the number of tasks."""
import random

from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from cit_server.metrics import BASE, OTHER, Metrics, TopTasks


def test_the_busiest_tasks_keep_their_labels_and_a_rising_one_takes_over():
    dropped = []
    top = TopTasks(2, dropped.append)
    assert [top.label("a") for _ in range(10)][-1] == "a" and top.label("b") == "b"
    for _ in range(4):
        top.label("b")
    assert top.label("c") == OTHER  # no room: c counts as other until it is clearly busier than b
    labels = [top.label("c") for _ in range(8)]
    assert labels[-1] == "c" and dropped == ["b"] and top.labelled == {"a", "c"}
    assert top.peek("b") == OTHER and top.peek("a") == "a" and top.peek("") == "none"


def test_a_heavy_task_keeps_its_label_among_thousands_of_one_off_tasks_in_bounded_memory():
    top = TopTasks(3, lambda task: None)
    rng = random.Random(0)
    for i in range(20_000):
        top.label("heavy" if rng.random() < 0.2 else f"once-{i}")
    assert "heavy" in top.labelled and len(top.labelled) <= 3 and len(top.counts) <= top.capacity == 16


class _Store:  # what the adapter-cache collector reads; not under test here
    hits = misses = evictions = 0

    def resident(self):
        return []

    def resident_bytes(self):
        return 0


def test_series_are_bounded_by_top_n_plus_other_and_base():
    metrics = Metrics(_Store(), top_tasks=3)
    rng = random.Random(1)
    for i in range(2_000):
        task = f"task-{min(int(rng.expovariate(0.3)), 50)}" if i % 10 else ""
        metrics.count_task(task)
        labels = metrics.task_labels(task, 1)
        metrics.task_requests.labels(*labels, "ok").inc()
        metrics.task_tokens.labels(*labels).inc(3)
    tasks = {sample.labels["task"] for family in text_string_to_metric_families(generate_latest(metrics.registry).decode())
             if family.name.startswith("cit_task_") for sample in family.samples}
    assert BASE in tasks and OTHER in tasks and len(tasks - {BASE, OTHER}) <= 3, tasks


def test_a_request_that_ends_after_its_task_lost_its_label_counts_as_other():
    """A long request routed while its task was labelled, ending after another task took the label: no series of
    the unlabelled task comes back."""
    metrics = Metrics(_Store(), top_tasks=1)
    metrics.count_task("a")
    assert metrics.task_labels("a", 1) == ("a", "1")
    for _ in range(3):
        metrics.count_task("b")  # b takes a's label
    assert metrics.task_labels("a", 1) == (OTHER, "")  # what the long request of a is counted under now


def test_counters_of_labelled_tasks_are_never_taken_over():
    top = TopTasks(2, lambda task: None)
    top.label("a"), top.label("b")
    for i in range(100):  # one-off tasks fill and churn the other counters
        top.label(f"once-{i}")
    assert top.labelled == {"a", "b"} and top.counts["a"] == top.counts["b"] == 1
