"""A task's lifecycle (issue 17, part 3): which version serves (rollback, retire, restore, candidates and their
promotion), the history that decides it, gc and diff. Synthetic keys and adapters (no model needed); the CLI as a
user runs it. The running server follows these changes: tests/test_end_to_end.py."""
import json
import subprocess

import numpy as np
import pytest

from cit_registry.lifecycle import HISTORY
from cit_registry.router import Router
from cit_registry.store import Registry, TaskCard, TaskNotFound

from .test_registry import make_key, write_adapter


def add(reg, task_id, key=None, gate=None, kind="eproj", training=None, **parts):
    version = (reg.versions(task_id) or [0])[-1] + 1
    card = TaskCard(task_id, version, kind, {"action": "expanded", "dataset": task_id}, gate=gate or {},
                    training=training or {}, datasets=[{"name": f"{task_id}-{version}", "accuracy_after": 0.5}])
    return reg.commit(card, key or make_key(), {"adapter": write_adapter, **parts})


FAILED_GATE = {"max_forgetting": 2.0, "forgetting": 9.0, "passed": False}


def cli(reg, *args, timeout=300):
    return subprocess.run(["cit-registry", *args, "--registry", str(reg.root)], capture_output=True, text=True,
                          timeout=timeout)


def routed(reg, key) -> tuple[str, int]:
    c = Router.load(reg).search(key.routing_vectors[:1], k=1)[0][0]
    return c.task_id, c.version


@pytest.fixture
def reg(tmp_path):
    return Registry.open(tmp_path / "reg", create=True)


def test_rollback_serves_an_earlier_version_until_a_newer_one_is_committed(reg):
    keys = [make_key() for _ in range(3)]
    add(reg, "alpha", keys[0])
    add(reg, "alpha", keys[1])
    assert reg.serving_version("alpha") == 2 and routed(reg, keys[1]) == ("alpha", 2)
    out = cli(reg, "rollback", "alpha", "--to", "1")
    assert out.returncode == 0, out.stdout + out.stderr
    assert reg.serving_version("alpha") == 1 and reg.get("alpha").version == 1
    assert routed(reg, keys[0]) == ("alpha", 1) and reg.fingerprint() == [["alpha", 1]]
    assert "v1 (rolled back; newest v2)" in cli(reg, "list").stdout
    add(reg, "alpha", keys[2])  # a newer version supersedes the rollback
    assert reg.serving_version("alpha") == 3
    assert cli(reg, "rollback", "alpha", "--to", "2").returncode == 0
    assert reg.serving_version("alpha") == 2
    assert cli(reg, "rollback", "alpha", "--to", "latest").returncode == 0
    assert reg.serving_version("alpha") == 3
    again = cli(reg, "rollback", "alpha", "--to", "latest")
    assert again.returncode == 0 and "serves its newest version already" in again.stdout
    missing = cli(reg, "rollback", "alpha", "--to", "7")
    assert missing.returncode == 1 and "has no version 7" in missing.stdout
    assert cli(reg, "rollback", "alpha", "--to", "seven").returncode == 2
    assert cli(reg, "rollback", "nosuch", "--to", "1").returncode == 1


def test_retire_takes_a_task_out_of_routing_and_restore_brings_it_back(reg):
    keys = [make_key(), make_key()]
    add(reg, "alpha", keys[0])
    add(reg, "beta", keys[1])
    out = cli(reg, "retire", "alpha")
    assert out.returncode == 0, out.stdout + out.stderr
    assert [t.task_id for t in reg.serving()] == ["beta"] and routed(reg, keys[0])[0] == "beta"
    with pytest.raises(TaskNotFound, match="retired .*cit-registry restore alpha"):
        reg.get("alpha")
    assert reg.get("alpha", 1).version == 1  # nothing is deleted
    assert "retired (v1)" in cli(reg, "list").stdout
    assert '"version": 1' in cli(reg, "show", "alpha").stdout
    assert "retired already" in cli(reg, "retire", "alpha").stdout
    assert cli(reg, "restore", "alpha").returncode == 0
    assert routed(reg, keys[0]) == ("alpha", 1)
    assert "is not retired" in cli(reg, "restore", "alpha").stdout


def test_a_candidate_serves_nothing_until_promoted_and_never_once_rejected(reg):
    keys = [make_key(), make_key(), make_key()]
    add(reg, "alpha", keys[0])
    add(reg, "alpha", keys[1], gate=FAILED_GATE)  # the gate's forgetting was over its limit
    add(reg, "alpha", keys[2], gate={**FAILED_GATE, "forgetting": 1.0, "passed": True})  # within it: serves
    assert reg.serving_version("alpha") == 3
    add(reg, "beta", gate=FAILED_GATE)
    assert reg.serving_version("alpha") == 3 and reg.status("alpha").candidates == (2,)
    assert [t.task_id for t in reg.serving()] == ["alpha"]  # beta has only a candidate
    with pytest.raises(TaskNotFound, match="v1 await promotion"):
        reg.get("beta")
    bad = cli(reg, "rollback", "alpha", "--to", "2")
    assert bad.returncode == 2 and "promote it instead" in bad.stdout
    assert cli(reg, "promote", "beta").returncode == 0
    assert reg.serving_version("beta") == 1 and reg.status("beta").candidates == ()
    assert cli(reg, "reject", "alpha", "--version", "2").returncode == 0
    assert reg.status("alpha").candidates == () and reg.serving_version("alpha") == 3
    assert cli(reg, "promote", "alpha", "--version", "3").returncode == 2  # not a candidate
    assert cli(reg, "promote", "alpha", "--version", "9").returncode == 1  # no such version
    assert cli(reg, "promote", "alpha").returncode == 2  # the rejected one is promoted only when named
    assert cli(reg, "promote", "alpha", "--version", "2").returncode == 0  # an operator may still overrule
    assert reg.serving_version("alpha") == 3  # ... but the newest that may serve still serves
    assert cli(reg, "rollback", "alpha", "--to", "2").returncode == 0 and reg.serving_version("alpha") == 2


def test_a_promoted_candidate_newer_than_a_rollback_supersedes_it(reg):
    add(reg, "alpha")
    add(reg, "alpha")
    reg.rollback("alpha", 1)
    add(reg, "alpha", gate=FAILED_GATE)
    assert reg.serving_version("alpha") == 1  # a candidate does not end a rollback ...
    reg.promote("alpha")
    assert reg.serving_version("alpha") == 3  # ... its promotion does


def test_every_change_is_one_history_line_saying_who_when_and_what(reg):
    add(reg, "alpha")
    add(reg, "alpha")
    reg.rollback("alpha", 1, who="ops@example")
    subprocess.run(["cit-registry", "retire", "alpha", "--registry", str(reg.root)], check=True,
                   env={**__import__("os").environ, "CIT_ACTOR": "alice"}, capture_output=True)
    lines = [json.loads(line) for line in cli(reg, "history").stdout.splitlines()]
    assert [(c["action"], c["task"], c["version"]) for c in lines] == [
        ("commit", "alpha", 1), ("commit", "alpha", 2), ("rollback", "alpha", 1), ("retire", "alpha", 1)]
    assert lines[2]["who"] == "ops@example" and lines[2]["detail"] == {"from": 2, "newest": 2}
    assert lines[3]["who"] == "alice" and all(c["at"].endswith("+00:00") for c in lines)
    assert lines[0]["detail"]["action"] == "expanded"
    assert reg.generation() == 4  # each change bumps it once: running servers see every one
    assert len(cli(reg, "history", "--task", "beta").stdout.splitlines()) == 0


def test_a_line_torn_by_a_crash_is_skipped_and_cut_off_by_the_next_change(reg):
    add(reg, "alpha")
    add(reg, "alpha")
    with open(reg.root / HISTORY, "a") as f:
        f.write('{"action": "rollback", "task": "alpha", "version": 1, "detail": {"new')  # power lost here
    assert reg.serving_version("alpha") == 2 and len(reg.history()) == 2
    reg.retire("alpha")
    assert [c.action.value for c in reg.history()] == ["commit", "commit", "retire"]
    assert not list(reg.verify())


def test_lifecycle_changes_do_not_wait_for_a_writer_that_is_training(reg, tmp_path):
    """add-task holds the write lock while it trains (minutes to hours): retiring a misbehaving task must not wait."""
    add(reg, "alpha")
    holder = subprocess.Popen(["python", "-c", "import sys, time; from cit_registry.store import Registry\n"
                               f"with Registry.open({str(reg.root)!r}).writing():\n"
                               "    print('held', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        out = cli(reg, "retire", "alpha", timeout=30)  # not after the writer's minute
        assert out.returncode == 0 and reg.status("alpha").retired, out.stdout + out.stderr
    finally:
        holder.kill()
        holder.wait()


def test_a_shared_connector_follows_the_serving_versions_of_its_tasks(reg):
    def shared(task, sequence):
        return add(reg, task, kind="shared", training={"method": "ewc", "sequence": sequence},
                   method=lambda d: (d.mkdir(), (d / "state.json").write_text("{}"),
                                     __import__("safetensors.numpy").numpy.save_file(
                                         {"x": np.zeros(1, np.float32)}, str(d / "state.safetensors"))))
    shared("alpha", 1)
    shared("beta", 2)
    shared("alpha", 3)
    assert (reg.shared_head("ewc").task_id, reg.shared_head("ewc").version) == ("alpha", 2)
    reg.rollback("alpha", 1)  # the connector as it stood after beta
    assert (reg.shared_head("ewc").task_id, reg.shared_head("ewc").version) == ("beta", 1)
    reg.retire("beta")  # out of routing; its training stays in the connector
    assert reg.shared_head("ewc").task_id == "beta"
    assert reg.shared_sequence("ewc") == 3  # the next task of the method is numbered after every version on disk
    shared("gamma", 3)  # trained from beta's connector while alpha was rolled back (an older add-task numbered so)
    reg.rollback("alpha", None)
    assert (reg.shared_head("ewc").task_id, reg.shared_head("ewc").version) == ("gamma", 1)  # a tie: the later commit


def test_gc_removes_only_what_no_serving_or_candidate_version_needs(reg):
    for _ in range(3):
        add(reg, "alpha")
    add(reg, "alpha", gate=FAILED_GATE)  # v4, a candidate
    add(reg, "alpha")
    add(reg, "alpha")
    reg.rollback("alpha", 1)
    add(reg, "beta")
    add(reg, "beta")
    reg.retire("beta")
    dry = cli(reg, "gc", "--keep", "1", "--dry-run")
    assert dry.returncode == 0 and "alpha: would remove v2, v3, v5" in dry.stdout, dry.stdout
    assert reg.versions("alpha") == [1, 2, 3, 4, 5, 6]
    out = cli(reg, "gc", "--keep", "2")
    assert out.returncode == 0 and "alpha: removed v2, v3\n" in out.stdout and "beta" not in out.stdout, out.stdout
    assert reg.versions("alpha") == [1, 4, 5, 6] and reg.versions("beta") == [1, 2]
    assert reg.serving_version("alpha") == 1 and reg.status("alpha").candidates == (4,)
    last = reg.history()[-1]
    assert last.action.value == "gc" and last.detail["removed"] == {"alpha": [2, 3]} and last.detail["bytes"] > 0
    assert not list(reg.verify())
    assert cli(reg, "gc", "--keep", "0").returncode == 2
    add(reg, "alpha")  # numbering goes on past what was removed
    assert reg.versions("alpha")[-1] == 7


def test_diff_says_what_changed_between_two_versions(reg):
    add(reg, "alpha")
    add(reg, "alpha", gate=FAILED_GATE)
    out = cli(reg, "diff", "alpha", "--from", "1", "--to", "2", "--json")
    assert out.returncode == 0, out.stdout + out.stderr
    changes = json.loads(out.stdout)["changes"]
    assert changes["data sets"] == {"from": ["alpha-1"], "to": ["alpha-2"]}
    assert changes["gate"] == {"from": None, "to": FAILED_GATE}
    assert "bytes: adapter" not in changes  # the same adapter size
    table = cli(reg, "diff", "alpha", "--from", "1", "--to", "2").stdout
    assert "data sets" in table and "alpha-2" in table
    assert cli(reg, "diff", "alpha", "--from", "9").returncode == 1


def test_a_bundle_of_a_rolled_back_task_carries_its_serving_version(reg, tmp_path):
    add(reg, "alpha")
    add(reg, "alpha", gate=FAILED_GATE)
    bundle = reg.export_bundle("alpha", tmp_path / "alpha.tar")  # default: the serving version, v1
    other = Registry.open(tmp_path / "other", create=True)
    t = other.import_bundle(bundle)
    assert t.card.decision["imported_from"]["version"] == 1 and other.serving_version("alpha") == 1
    candidate = other.import_bundle(reg.export_bundle("alpha", tmp_path / "c.tar", version=2))
    assert candidate.candidate and other.serving_version("alpha") == 1  # a candidate stays one when moved
    assert other.history()[-1].detail["candidate"] is True
