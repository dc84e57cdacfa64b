"""LLaVA / CoIN-style instruction data becomes a cit task (issue 16: research data in). No model needed."""
import json
import subprocess

from PIL import Image

from cit_registry.taskdata import read_jsonl


def make(tmp_path):
    images = tmp_path / "coco"
    (images / "train2017").mkdir(parents=True)
    for i in range(10):
        Image.new("RGB", (8, 8), (20 * i, 0, 0)).save(images / "train2017" / f"{i}.jpg")
    records = [{"id": str(i), "image": f"train2017/{i}.jpg", "conversations": [
        {"from": "human", "value": "<image>\nWhat colour is it?"}, {"from": "gpt", "value": f"red {i}"}]}
        for i in range(8)]
    records[0]["conversations"] += [{"from": "human", "value": "And its size?"}, {"from": "gpt", "value": "small"}]
    records.append({"id": "text-only", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]})
    records.append({"id": "gone", "image": "train2017/missing.jpg", "conversations": records[1]["conversations"]})
    (tmp_path / "secret.jpg").write_bytes(b"not for the task")
    records.append({"id": "out", "image": "../secret.jpg", "conversations": records[1]["conversations"]})
    data = tmp_path / "llava.json"
    data.write_text(json.dumps(records))
    flat = tmp_path / "coin-test.jsonl"  # CoIN's evaluation records: image, text, answer
    flat.write_text("".join(json.dumps({"question_id": i, "image": f"train2017/{i}.jpg", "text": "Colour? <image>",
                                        "answer": f"red {i}"}) + "\n" for i in (8, 9)))
    return data, images, flat


def run(*args):
    return subprocess.run(["cit-trainer", "import-llava", *map(str, args)], capture_output=True, text=True, timeout=300)


def test_conversations_become_rows_and_the_test_split_is_drawn_by_image(tmp_path):
    data, images, _ = make(tmp_path)
    out = run(data, "--images", images, "--out", tmp_path / "task", "--test-fraction", "0.25")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "1 records without an image" in out.stdout and "1 records whose image does not exist" in out.stdout
    assert "1 later turns imported without the turns before them" in out.stdout
    assert "1 records whose image path leaves --images" in out.stdout
    train, test = read_jsonl(tmp_path / "task" / "train.jsonl"), read_jsonl(tmp_path / "task" / "test.jsonl")
    assert len(train) + len(test) == 9 and len(test) in (2, 3)  # 2 of 8 images held out; image 0 has two rows
    assert {s.image for s in train}.isdisjoint({s.image for s in test})
    assert all(s.instruction in ("What colour is it?", "And its size?") for s in train + test)
    assert all(s.image.is_file() and s.image.parent == tmp_path / "task" / "images" for s in train + test)


def test_a_separate_coin_style_test_file_is_used_as_the_test_split(tmp_path):
    data, images, flat = make(tmp_path)
    out = run(data, "--images", images, "--out", tmp_path / "task", "--test", flat)
    assert out.returncode == 0, out.stdout + out.stderr
    test = read_jsonl(tmp_path / "task" / "test.jsonl")
    assert [(s.instruction, s.output) for s in test] == [("Colour?", "red 8"), ("Colour?", "red 9")]
    assert len(read_jsonl(tmp_path / "task" / "train.jsonl")) == 9
    bad = tmp_path / "bad.json"
    bad.write_text('{"not": "a list"}')
    refused = run(bad, "--images", images, "--out", tmp_path / "other")
    assert refused.returncode == 2 and "expected a list of records" in refused.stdout


def test_a_reimport_leaves_no_stale_split_and_out_may_not_lie_inside_images(tmp_path):
    data, images, _ = make(tmp_path)
    assert run(data, "--images", images, "--out", tmp_path / "task", "--test-fraction", "0.25").returncode == 0
    assert (tmp_path / "task" / "test.jsonl").exists()
    again = run(data, "--images", images, "--out", tmp_path / "task", "--test-fraction", "0")
    assert again.returncode == 0 and not (tmp_path / "task" / "test.jsonl").exists()  # its rows named old images
    inside = run(data, "--images", images, "--out", images / "task")
    assert inside.returncode == 2 and "inside --images" in inside.stdout
