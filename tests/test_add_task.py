"""add-task with every kind of adapter, in process on the real backbone and a few real samples per task:
EProj leaves other tasks alone, shared-connector methods keep one connector and their memory in the registry."""
import hashlib

import pytest
import torch
from safetensors.torch import load_file

from cit_registry.router import REUSE_THRESHOLD
from cit_registry.store import Registry
from cit_server.adapter_cache import AdapterId, AdapterStore
from cit_trainer.add_task import AddTaskOptions, add_task

TINY = dict(epochs=1, batch_size=8, max_train=24, max_eval=8, forgetting_samples=8)


@pytest.fixture(scope="module")
def embedder():
    from cit_backbone.embedder import TextEmbedder

    return TextEmbedder()


@pytest.fixture
def add(tmp_path, backbone, embedder, task_dirs):
    def run(name: str, method: str, **options):
        opts = AddTaskOptions(method=method, **{**TINY, **options})
        return add_task(tmp_path / "reg", task_dirs[name], name, opts, backbone, embedder, log=lambda *_: None)
    return run


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_eproj_leaves_every_other_task_adapter_bit_identical(add, tmp_path, task_dirs, backbone, embedder):
    # the first task's files are gone after it is added (another machine, a cleaned disk): later tasks still
    # re-measure it, from the evaluation snapshot its version keeps, never from the paths in its card
    import shutil

    copy = shutil.copytree(task_dirs["fashion-mnist"], tmp_path / "elsewhere" / "fashion-mnist")
    first = add_task(tmp_path / "reg", copy, "fashion-mnist", AddTaskOptions(method="eproj", **TINY), backbone,
                     embedder, log=lambda *_: None).task
    shutil.rmtree(copy)
    assert (first.eval_dir / "fashion-mnist" / "samples.jsonl").is_file()
    before = {p.name: digest(p) for p in first.adapter_dir.iterdir()}
    second = add("digits", "eproj").task
    assert {p.name: digest(p) for p in first.adapter_dir.iterdir()} == before
    assert digest(second.adapter_dir / "adapter_model.safetensors") != before["adapter_model.safetensors"]
    assert second.card.metrics["forgetting"]["fashion-mnist"]["now"] == \
        second.card.metrics["forgetting"]["fashion-mnist"]["when_trained"]


def test_a_reused_adapter_trains_again_on_the_training_samples_its_registry_keeps(tmp_path, task_dirs, backbone,
                                                                                 embedder):
    # the first data set's files are gone when its adapter is reused: what is replayed comes from its version
    import shutil

    from cit_registry.snapshots import read_snapshot

    def add(data, name, **options):
        return add_task(tmp_path / "reg", data, name, AddTaskOptions(**{**TINY, "threshold": 0.0, **options}),
                        backbone, embedder, log=lambda *_: None).task

    copy = shutil.copytree(task_dirs["fashion-mnist"], tmp_path / "elsewhere" / "fashion-mnist")
    first = add(copy, "fashion-mnist", replay_samples=10)
    shutil.rmtree(copy)
    assert len(read_snapshot(first.replay_dir / "fashion-mnist")) == 10
    second = add(task_dirs["fashion-more"], "fashion-more", replay_samples=6)
    assert (second.task_id, second.version, second.card.decision["action"]) == ("fashion-mnist", 2, "reused")
    # 24 new samples and 6 replayed, in batches of 8: 4 steps (3 without replay)
    assert second.card.training["replayed"] == {"fashion-mnist": 6} and second.card.training["steps"] == 4
    assert {d: len(read_snapshot(second.replay_dir / d)) for d in ("fashion-mnist", "fashion-more")} == \
        {"fashion-mnist": 10, "fashion-more": 6}  # carried whole, and the new data set's own
    forgetting = second.card.metrics["forgetting"]["fashion-mnist"]
    assert len(forgetting["now_correct"]) == forgetting["samples"] == 8
    third = add(task_dirs["digits"], "digits", replay_samples=0)  # 0: nothing replayed, nothing of it kept
    assert third.card.training["replayed"] == {} and third.card.training["steps"] == 3
    assert sorted(p.name for p in third.replay_dir.iterdir()) == ["fashion-mnist", "fashion-more"]


def test_a_shared_method_trains_one_connector_and_keeps_its_memory_in_the_registry(add, tmp_path, backbone):
    first = add("fashion-mnist", "ewc").task
    assert (first.card.adapter_kind, first.shared_method, first.card.training["sequence"]) == ("shared", "ewc", 1)
    assert not first.replay_dir.exists()  # its method keeps its own memory in method/
    second = add("digits", "ewc").task
    reg = Registry.open(tmp_path / "reg")
    assert reg.shared_head("ewc").task_id == "digits" and second.card.training["sequence"] == 2
    assert list(reg.verify()) == []

    # The memory after task 2: anchors are the connector as digits left it, importance from both tasks.
    state = load_file(str(second.path / "method" / "state.safetensors"))
    weights = load_file(str(second.adapter_dir / "adapter_model.safetensors"))
    assert torch.equal(state["anchor.proj.weight"], weights["proj.weight"])
    assert set(state["owner.proj.weight"].unique().tolist()) <= {0, 1} and "key1.image" in state
    # The second task started from the first one's connector and moved it: the first task has forgotten
    # something or nothing, but it is measured with the new connector, not with its own.
    forgetting = second.card.metrics["forgetting"]["fashion-mnist"]
    assert forgetting["task"] == "fashion-mnist" and forgetting["samples"] == 8

    # Served: a request routed to the first task is answered by the method's newest connector.
    store = AdapterStore(reg, backbone, capacity=4)
    served = store.get(AdapterId("fashion-mnist", 1)).connector
    assert torch.equal(served.proj.weight, weights["proj.weight"])
    assert store.resident() == [AdapterId("digits", 1)]


def test_replay_buffer_is_kept_in_the_registry_and_grows_per_task(add):
    add("fashion-mnist", "er", replay_fraction=0.1)
    second = add("digits", "er", replay_fraction=0.1).task
    import json

    meta = json.loads((second.path / "method" / "state.json").read_text())
    features = load_file(str(second.path / "method" / "state.safetensors"))["features"]
    assert len(meta["answers"]) == len(features) == 16  # at least 8 samples of each task (10 % of 24 is 3)
    from cit_trainer.data import TEMPLATES

    wordings_of = {name: {*TEMPLATES[name].train} for name in ("fashion-mnist", "digits")}
    assert {name for i in meta["instructions"] for name, w in wordings_of.items() if i in w} == set(wordings_of)


def test_a_shared_method_cannot_reuse_another_kind_of_task(add):
    add("fashion-mnist", "eproj")
    with pytest.raises(ValueError, match="is not trained with 'ewc'"):
        add("fashion-mnist", "ewc", threshold=0.0)
    with pytest.raises(ValueError, match="unknown method 'joint'.*upper bound"):
        add("digits", "joint")


def test_kill_9_of_add_task_leaves_the_registry_whole(tmp_path, task_dirs):
    """A real `cit-trainer add-task` killed at several moments (loading, embedding, training, writing): verify stays
    clean, the earlier task stays byte-identical, the new task is whole or absent, and the next run succeeds."""
    import random
    import signal
    import subprocess
    import time

    from .conftest import run_cli

    reg = tmp_path / "reg"
    args = ["--registry", str(reg), "--max-train", "24", "--max-eval", "8", "--epochs", "1"]
    run_cli("cit-trainer", "add-task", str(task_dirs["fashion-mnist"]), *args)
    first = Registry.open(reg).get("fashion-mnist")
    before = {p: digest(p) for p in first.path.rglob("*") if p.is_file()}
    rnd = random.Random(0)
    for delay in sorted(rnd.uniform(2, 25) for _ in range(3)):
        proc = subprocess.Popen(["cit-trainer", "add-task", str(task_dirs["digits"]), *args],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        registry = Registry.open(reg)
        assert list(registry.verify()) == [], delay
        assert {p: digest(p) for p in first.path.rglob("*") if p.is_file()} == before
        assert registry.task_ids() in (["fashion-mnist"], ["digits", "fashion-mnist"])
        if registry.task_ids() == ["digits", "fashion-mnist"]:
            break  # it finished before the kill: nothing more to interrupt
    run_cli("cit-trainer", "add-task", str(task_dirs["digits"]), *args)  # the lock died with the killed writer
    assert "digits" in Registry.open(reg).task_ids() and list(Registry.open(reg).verify()) == []
    assert not list((reg / ".staging").glob("*"))


def test_the_same_question_of_other_images_expands_however_similar(tmp_path, backbone, embedder):
    """Handwritten and printed digits, one question: similar beyond the default threshold, but the printed
    digits do not clear the handwritten task's image floor, so they get an adapter of their own, and say why."""
    from cit_trainer.data import export_task

    lines = []
    for name in ("digits", "printed-digits"):
        data, _ = export_task(name, tmp_path / "data", 24, 4)
        result = add_task(tmp_path / "reg", data, name, AddTaskOptions(**{**TINY, "threshold": 0.0}), backbone,
                          embedder, log=lines.append)
    decision = result.task.card.decision
    assert (result.task.task_id, decision["action"]) == ("printed-digits", "expanded")
    assert decision["similarity"] >= REUSE_THRESHOLD and decision["image_share"] < decision["image_share_needed"]
    assert any("image floor" in line and "a task of its own" in line for line in lines)


def test_a_version_over_its_forgetting_gate_is_a_candidate_until_promoted(tmp_path, task_dirs, backbone, embedder):
    import shutil

    def add(name, **options):
        return add_task(tmp_path / "reg", task_dirs[name], name, AddTaskOptions(**{**TINY, **options}), backbone,
                        embedder, log=lambda *_: None)

    first = add("fashion-mnist", max_forgetting=5.0)  # a new adapter served nothing before: nothing to forget
    assert first.gate == {"max_forgetting": 5.0, "forgetting": 0.0, "passed": True, "measured": [], "unmeasured": []}
    assert not first.task.candidate
    # A data set its adapter serves that cannot be re-measured fails the gate: not measured, not known to be kept.
    shutil.rmtree(first.task.eval_dir / "fashion-mnist")
    second = add("fashion-more", threshold=0.0, max_forgetting=100.0)
    assert (second.task.task_id, second.task.version, second.task.candidate) == ("fashion-mnist", 2, True)
    assert second.gate["unmeasured"] == ["fashion-mnist"] and not second.gate["passed"]
    reg = Registry.open(tmp_path / "reg")
    assert reg.serving_version("fashion-mnist") == 1 and reg.status("fashion-mnist").candidates == (2,)
    reg.promote("fashion-mnist")
    assert reg.serving_version("fashion-mnist") == 2
    # Reuse trains the serving version further and numbers after the newest: rolled back to v1, v3 grows from v1.
    reg.rollback("fashion-mnist", 1)
    third = add("fashion-more", threshold=0.0, max_forgetting=100.0)
    assert third.task.version == 3 and [d["name"] for d in third.task.card.datasets] == ["fashion-mnist", "fashion-more"]
    with pytest.raises(ValueError, match="forgetting_samples"):
        add("digits", max_forgetting=1.0, forgetting_samples=0)


def test_the_gate_judges_the_worst_data_set_its_adapter_served():
    from cit_trainer.add_task import _gate

    forgetting = {"a": {"when_trained": 0.9, "now": 0.85}, "b": {"when_trained": 0.5, "now": 0.52},
                  "other": {"when_trained": 0.9, "now": 0.1}}  # another task's own adapter: not this gate's
    opts = AddTaskOptions(max_forgetting=5.0)
    gate = _gate(forgetting, [{"name": "a"}, {"name": "b"}], None, "t", opts, log=lambda *_: None)
    assert gate["passed"] and gate["forgetting"] == pytest.approx(5.0) and gate["measured"] == ["a", "b"]
    opts.max_forgetting = 4.9
    assert not _gate(forgetting, [{"name": "a"}, {"name": "b"}], None, "t", opts, log=lambda *_: None)["passed"]


def test_a_rollback_while_add_task_trains_makes_its_version_a_candidate(tmp_path, task_dirs, backbone, embedder):
    """The operator rolled back what the new version grows from while it trained: it must not serve over that."""
    def add(name, log=lambda *_: None, **options):
        return add_task(tmp_path / "reg", task_dirs[name], name, AddTaskOptions(**{**TINY, "threshold": 0.0, **options}),
                        backbone, embedder, log=log)

    add("fashion-mnist")
    add("fashion-more")

    def operator_meanwhile(line):  # add-task has read what it grows from (v2) and says so: now the rollback lands
        if str(line).startswith("reusing task"):
            Registry.open(tmp_path / "reg").rollback("fashion-mnist", 1)

    third = add("fashion-more", log=operator_meanwhile)
    assert third.task.version == 3 and third.task.candidate
    assert third.task.card.gate["changed_while_training"] == {"then": [2, False], "now": [1, False]}
    assert Registry.open(tmp_path / "reg").serving_version("fashion-mnist") == 1
