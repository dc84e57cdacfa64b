"""What the registry records, exactly: the backbone record as commits arrive, the widths read from a version's
files, evaluation snapshots as a part, and what a bundle carries across. Synthetic files (no model needed); the
tests mutmut found missing (docs/mutation/)."""
import hashlib
import json
import tarfile

import numpy as np
import pytest
from safetensors.numpy import save_file

from cit_registry.store import BackboneMismatch, Registry, TaskCard, TaskKey, version_shapes

from .test_registry import make_key, write_adapter


def write_lora_on(path, modules, hidden=16, rank=2, kv=8):
    """A LoRA on several modules of a tiny LM: q_proj maps hidden -> hidden, v_proj hidden -> kv."""
    path.mkdir()
    (path / "adapter_config.json").write_text(json.dumps({"r": rank, "base_model_name_or_path": "tiny-lm"}))
    out = {"q_proj": hidden, "v_proj": kv}
    save_file({**{f"base_model.model.model.layers.0.self_attn.{m}.lora_A.weight": np.zeros((rank, hidden), np.float32)
                  for m in modules},
               **{f"base_model.model.model.layers.0.self_attn.{m}.lora_B.weight": np.zeros((out[m], rank), np.float32)
                  for m in modules}}, str(path / "adapter_model.safetensors"))


def write_eval(path, files=("samples.jsonl", "images/00000.png")):
    for rel in files:
        (path / "alpha" / rel).parent.mkdir(parents=True, exist_ok=True)
        (path / "alpha" / rel).write_bytes(b'{"image": "images/00000.png", "instruction": "q", "output": "a"}\n'
                                           if rel.endswith(".jsonl") else b"\x89PNG")


def commit(reg, task, kind="eproj", version=None, backbone=None, **parts):
    version = version or (reg.versions(task) or [0])[-1] + 1
    return reg.commit(TaskCard(task, version, kind, {"action": "expanded"}), make_key(),
                      {"adapter": write_adapter, **parts}, backbone=backbone)


def test_the_widths_of_a_version_are_read_from_its_files(tmp_path):
    reg = Registry.open(tmp_path / "reg", create=True)
    t = commit(reg, "alpha", "lora", lora=lambda d: write_lora_on(d, ("q_proj", "v_proj")))
    assert version_shapes(t.path) == {
        "key": {"image": 64, "instruction": 32, "output": 32},
        "adapter": {"feature_dim": 64, "hidden_size": 16, "num_tokens": 1, "projector": "linear"},
        "lora": {"base_model": "tiny-lm", "modules": {"q_proj": [16, 16], "v_proj": [16, 8]}}}
    assert t.key().counts.dtype == np.int64 and t.centroids() == 1


def test_the_backbone_record_grows_with_the_first_lora_and_names_the_first_identity_given(tmp_path):
    reg = Registry.open(tmp_path / "reg", create=True)
    assert reg.backbone() is None
    commit(reg, "alpha")  # no identity given yet
    assert reg.backbone()["identity"] is None and "lora" not in reg.backbone()
    commit(reg, "beta", backbone="bb-1")  # the first identity given is recorded ...
    commit(reg, "gamma")  # ... and kept by commits that name none
    assert reg.backbone()["identity"] == "bb-1"
    commit(reg, "delta", "lora", lora=lambda d: write_lora_on(d, ("q_proj",)))
    assert reg.backbone()["lora"] == {"base_model": "tiny-lm", "modules": {"q_proj": [16, 16]}}
    commit(reg, "eps", "lora", lora=lambda d: write_lora_on(d, ("v_proj",)))  # a module seen for the first time
    assert reg.backbone()["lora"]["modules"] == {"q_proj": [16, 16], "v_proj": [16, 8]}
    with pytest.raises(BackboneMismatch, match=r"^the task does not fit this registry's backbone: it was trained on "
                                                r"'bb-2', this registry's tasks on 'bb-1'; key image is 8"):
        reg.commit(TaskCard("zeta", 1, "eproj", {}), TaskKey.from_embeddings(np.ones((1, 8)), np.ones((1, 32)),
                                                                             np.ones((1, 32))),
                   {"adapter": write_adapter}, backbone="bb-2")
    with pytest.raises(BackboneMismatch, match="the LoRA is for 'other-lm', the registry's LM is 'tiny-lm'"):
        def other(d):
            write_lora_on(d, ("q_proj",))
            (d / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "other-lm"}))
        commit(reg, "eta", "lora", lora=other)
    assert json.loads((reg.root / "registry.json").read_text())["backbone"] == reg.backbone()
    assert list(reg.verify()) == []


@pytest.mark.parametrize("part", ["eval", "replay"])
def test_snapshots_are_a_part_of_any_version_and_hold_only_their_own_files(tmp_path, part):
    reg = Registry.open(tmp_path / "reg", create=True)
    t = commit(reg, "alpha", **{part: write_eval})
    assert (t.path / part / "alpha" / "images" / "00000.png").is_file() and list(reg.verify()) == []
    upper = commit(reg, "beta", **{part: lambda d: write_eval(d, ("samples.jsonl", "images/00001.PNG"))})
    assert (upper.path / part / "alpha" / "images" / "00001.PNG").is_file()
    for bad in ("notes.txt", "images/weights.bin", "other/00000.png"):
        with pytest.raises(ValueError, match=f"refused: {part}/alpha/{bad} is not a snapshot's file"):
            commit(reg, "gamma", **{part: lambda d, bad=bad: write_eval(d, ("samples.jsonl", bad))})
    assert reg.task_ids() == ["alpha", "beta"]
    (t.path / part / "alpha" / "stray.txt").write_text("?")  # verify sees what commit would refuse
    assert f"alpha v1: {part}/alpha/stray.txt is not a snapshot's file" in list(reg.verify())


def test_a_bundle_carries_every_part_its_lineage_and_its_registrys_backbone(tmp_path):
    src = Registry.open(tmp_path / "src", create=True)
    commit(src, "alpha", "lora", backbone="bb-1", lora=lambda d: write_lora_on(d, ("q_proj",)), eval=write_eval)
    second = commit(src, "alpha", "lora", lora=lambda d: write_lora_on(d, ("q_proj",)))
    bundle = src.export_bundle("alpha", tmp_path / "alpha-v1.tar", version=1)  # not the newest
    with tarfile.open(bundle) as tar:
        meta, names = json.loads(tar.extractfile("bundle.json").read()), tar.getnames()
    assert names[0] == "bundle.json" and all(n.startswith("task/") for n in names[1:])
    assert (meta["task_id"], meta["version"], meta["backbone"]) == ("alpha", 1, src.backbone())
    assert {"task/eval/alpha/samples.jsonl", "task/lora/adapter_model.safetensors", "task/manifest.json"} <= set(names)
    dst = Registry.open(tmp_path / "dst", create=True)
    commit(dst, "alpha", "lora", lora=lambda d: write_lora_on(d, ("q_proj",)))  # dst has alpha v1 already
    moved = dst.import_bundle(bundle, "alpha")
    assert (moved.task_id, moved.version) == ("alpha", 2)
    assert moved.card.decision["imported_from"] == {"task_id": "alpha", "version": 1,
                                                    "bundle_sha256": hashlib.sha256(bundle.read_bytes()).hexdigest()}
    for rel in ("lora/adapter_model.safetensors", "eval/alpha/images/00000.png", "key.safetensors"):
        assert (moved.path / rel).read_bytes() == (src.get("alpha", 1).path / rel).read_bytes()
    assert dst.backbone()["identity"] == "bb-1"  # named by the bundle's record
    assert list(dst.verify()) == [] and second.version == 2
    renamed = dst.import_bundle(bundle, "copy")
    assert (renamed.task_id, renamed.version) == ("copy", 1)


def test_card_json_is_stable_for_manifests_and_diffs(tmp_path):
    card = TaskCard("alpha", 1, "eproj", {"action": "expanded", "similarity": 0.5}, created_at="2026-12-02T00:00:00")
    text = card.to_json()
    assert text == json.dumps(json.loads(text), indent=2, sort_keys=True) + "\n"
    assert text.startswith('{\n  "adapter_kind": "eproj",\n  "created_at"')
    assert TaskCard.from_json(text) == card


def test_list_shows_every_data_set_a_task_serves_when_trained_and_now(tmp_path):
    """A reused adapter's earlier data set shows its re-measured accuracy, not the newest data set's."""
    import subprocess
    import sys

    reg = Registry.open(tmp_path / "reg", create=True)

    def card(task, version, datasets, forgetting, created):
        return TaskCard(task, version, "eproj", {"action": "reused" if version > 1 else "expanded"},
                        metrics={"forgetting": forgetting}, created_at=created,
                        datasets=[{"name": n, "accuracy_after": a} for n, a in datasets])

    for c in (card("clothes", 1, [("clothes", 0.86)], {}, "2026-01-01T00:00:00+00:00"),
              card("clothes", 2, [("clothes", 0.86), ("more", 0.83)],
                   {"clothes": {"task": "clothes", "when_trained": 0.85, "now": 0.74}}, "2026-01-02T00:00:00+00:00"),
              card("shapes", 1, [("shapes", 0.8)], {}, "2026-01-01T00:00:00+00:00"),
              card("digits", 1, [("digits", 0.92)],  # measured shapes v1, older than shapes v2: not shown for it
                   {"shapes": {"task": "shapes", "when_trained": 0.8, "now": 0.8}}, "2026-01-01T12:00:00+00:00"),
              card("shapes", 2, [("shapes", 0.8), ("shapes-2", 0.7)], {}, "2026-01-02T00:00:00+00:00")):
        reg.commit(c, make_key(), {"adapter": write_adapter})
    out = subprocess.run([sys.executable, "-m", "cit_registry.cli", "list", "--registry", str(reg.root)],
                         capture_output=True, text=True, check=True).stdout
    assert "clothes 85.0% -> 74.0%" in out and "more 83.0% -> 83.0%" in out and "digits 92.0% -> 92.0%" in out
    assert "shapes 80.0% -> -" in out and "shapes-2 70.0% -> 70.0%" in out  # not re-measured by its reuse
