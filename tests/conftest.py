"""Shared fixtures. The expensive ones (the real backbone, a registry of real tasks, a running cit-server)
are built once per session and shared by every test that needs them."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from cit_server.process import ServerProcess

# CI budget for the end-to-end registry: small, but real data, real weights, real training.
TRAIN_SAMPLES = int(os.environ.get("CIT_TEST_TRAIN", 400))
TEST_SAMPLES = int(os.environ.get("CIT_TEST_EVAL", 100))
EPOCHS = 3  # the add-task default
E2E_TASKS = ("fashion-mnist", "digits", "words")
E2E_METHODS = {"words": "lora"}  # one LoRA task (projection + LoRA on the LM) among the EProj ones

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def run_cli(*args: str, timeout: float = 1800) -> subprocess.CompletedProcess:
    """Run one of the project's console scripts as a user would, failing loudly with its output."""
    proc = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def full_sequence_loss(lm, visual, instructions, answers, lora=None):
    """transformers' own causal-LM loss over whole sequences (prompt, visual tokens, answer): the reference that
    the trainer's prefix-cached, answer-only loss must equal."""
    import torch

    rows = [torch.cat([p, lm.model.get_input_embeddings()(torch.tensor(lm.answer_ids(a)))])
            for p, a in zip(lm.prompt_embeddings(visual, instructions), answers)]
    n, length = len(rows), max(len(r) for r in rows)
    emb, labels = torch.zeros(n, length, lm.hidden_size), torch.full((n, length), -100)
    mask = torch.zeros(n, length, dtype=torch.long)
    for i, (r, a) in enumerate(zip(rows, answers)):
        ans = lm.answer_ids(a)
        emb[i, : len(r)], mask[i, : len(r)] = r, 1
        labels[i, len(r) - len(ans) : len(r)] = torch.tensor(ans)
    with lm.loras.rows([lora] * n):
        return lm.model(inputs_embeds=emb, attention_mask=mask, labels=labels).loss


def assert_training_loss_is_the_full_causal_lm_loss(lm, visual, instructions, answers):
    """The trainer's loss (prefix cache, answer positions only) and its gradient into `visual` equal transformers'
    loss over the whole sequences."""
    import torch

    visual = visual.detach().requires_grad_(True)
    reference = full_sequence_loss(lm, visual, instructions, answers)
    (ref_grad,) = torch.autograd.grad(reference, visual)
    loss = lm.loss(visual, instructions, answers)
    (grad,) = torch.autograd.grad(loss, visual)
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)
    assert (grad - ref_grad).abs().max() <= 1e-3 * ref_grad.abs().max()


@pytest.fixture(scope="session")
def backbone():
    from cit_backbone.backbone import Backbone

    return Backbone()


@pytest.fixture(scope="session")
def task_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tasks")
    run_cli("cit-trainer", "export", *E2E_TASKS, "--out", str(root), "--train", str(TRAIN_SAMPLES),
            "--test", str(TEST_SAMPLES))
    # The same clothing data drawn again with another seed: similar enough to be reused, not expanded.
    more = tmp_path_factory.mktemp("more")
    run_cli("cit-trainer", "export", "fashion-mnist", "--out", str(more), "--train", "64", "--test", "32",
            "--seed", "7")
    dirs = {name: root / name for name in E2E_TASKS}
    dirs["fashion-more"] = more / "fashion-mnist"
    return dirs


@pytest.fixture(scope="session")
def registry(tmp_path_factory, task_dirs) -> Path:
    """A registry built by `cit-trainer add-task` from three real-data tasks (one of them a LoRA task), then one
    reused."""
    reg = tmp_path_factory.mktemp("registry") / "reg"
    for name in E2E_TASKS:
        run_cli("cit-trainer", "add-task", str(task_dirs[name]), "--registry", str(reg), "--max-train",
                str(TRAIN_SAMPLES), "--max-eval", str(TEST_SAMPLES), "--epochs", str(EPOCHS),
                "--method", E2E_METHODS.get(name, "eproj"))
    run_cli("cit-trainer", "add-task", str(task_dirs["fashion-more"]), "--registry", str(reg), "--name",
            "fashion-more", "--epochs", "1")
    return reg


@pytest.fixture(scope="session")
def server(registry):
    # Two resident adapters for three tasks: every test over gRPC also exercises eviction and reload.
    # The OpenAI HTTP API on the same engine (tests/test_openai_api.py).
    srv = ServerProcess(registry, "--adapter-cache-size", "2", "--max-batch-size", "2", "--metrics-port", "0",
                        "--http-port", "0")
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def client(server):
    from cit_client import CitClient

    with CitClient(server.target) as c:
        yield c
