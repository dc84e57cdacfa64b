"""The continual-learning methods change training the way the paper says, on the real backbone and tiny data."""
from pathlib import Path

import numpy as np
import pytest
import torch

from cit_registry.store import TaskKey
from cit_registry.taskdata import Sample
from cit_trainer.methods import Batch, ImportanceMethod, ReplayMethod, make_method, tir_similarity
from cit_trainer.training import EmbeddedTask, train_connector


def tiny_task(seed: int, answers=("red", "blue"), n=8, instruction="What colour is it?") -> EmbeddedTask:
    rng = np.random.default_rng(seed)
    features = torch.from_numpy(rng.random((n, 1280), dtype=np.float32))
    samples = [Sample(Path(f"{seed}-{i}.png"), instruction, answers[i % len(answers)]) for i in range(n)]
    text = rng.normal(size=(n, 384)).astype(np.float32)
    return EmbeddedTask(samples, features, text, text + 0.1)


def key(image, instruction, output) -> TaskKey:
    arr = lambda v: np.asarray([v], dtype=np.float32)  # noqa: E731 - one centroid, already unit length
    return TaskKey(arr(image), arr(instruction), arr(output), np.array([1]))


def train(backbone, connector, task, method, epochs=1):
    return train_connector(backbone, connector, task, epochs=epochs, batch_size=4, lr=1e-3, method=method)


@pytest.mark.parametrize("kind", ["ewc", "mas", "si"])
def test_penalty_is_zero_at_the_old_parameters_and_grows_quadratically(backbone, kind):
    connector = backbone.base_connector().clone()
    method = make_method(kind, strength=1.0)
    train(backbone, connector, tiny_task(0), method)
    method.begin_task(connector, tiny_task(1).key())
    assert method.penalty(connector).item() == 0.0
    importance = torch.cat([v.flatten() for v in method.importance.values()])
    assert (importance >= 0).all() and importance.mean().item() == pytest.approx(1.0, rel=1e-4)
    direction = {n: torch.randn_like(p) * 1e-3 for n, p in connector.named_parameters()}
    penalties = []
    for scale in (1.0, 2.0):
        moved = connector.clone()
        with torch.no_grad():
            for n, p in moved.named_parameters():
                p.add_(scale * direction[n])
        penalties.append(method.penalty(moved).item())
    assert penalties[0] > 0 and penalties[1] == pytest.approx(4 * penalties[0], rel=1e-3)


def test_importance_is_merged_by_max_and_remembers_its_owner(backbone):
    connector = backbone.base_connector().clone()
    method = ImportanceMethod("mas")
    train(backbone, connector, tiny_task(0), method)
    first = {n: v.clone() for n, v in method.importance.items()}
    train(backbone, connector, tiny_task(1, answers=("circle", "square")), method)
    for n, merged in method.importance.items():
        assert torch.all(merged >= first[n])
        assert set(method.owner[n].unique().tolist()) <= {0, 1}
        assert torch.equal(merged[method.owner[n] == 0], first[n][method.owner[n] == 0])


def test_tir_similarity_matches_the_formula_by_hand():
    # Two tasks: the raw cosines multiplied.
    a = key([1, 0], [1, 0], [1, 0])
    b = key([0.6, 0.8], [0.8, 0.6], [0.0, 1.0])
    assert tir_similarity([a, b])[0, 1] == pytest.approx(0.6 * 0.8 * 0.0)
    c = key([0.8, 0.6], [0.6, 0.8], [0.6, 0.8])
    # Three tasks: per part, cosines of the pairs (ab, ac, bc) standardised, sigmoid, product.
    cos = {"image": [0.6, 0.8, 0.96], "instruction": [0.8, 0.6, 0.96], "output": [0.0, 0.6, 0.8]}
    sig = {p: 1 / (1 + np.exp(-(np.array(v) - np.mean(v)) / np.std(v))) for p, v in cos.items()}
    expected = sig["image"] * sig["instruction"] * sig["output"]
    s = tir_similarity([a, b, c])
    assert [s[0, 1], s[0, 2], s[1, 2]] == pytest.approx(expected.tolist())
    assert np.allclose(s, s.T) and np.allclose(np.diag(s), 1.0)


def test_tir_scales_importance_by_one_minus_the_similarity_to_its_owner(backbone):
    connector = backbone.base_connector().clone()
    method = ImportanceMethod("ewc", tir=True)
    first = tiny_task(0)
    train(backbone, connector, first, method)
    second = tiny_task(1, answers=("circle", "square"))
    method.begin_task(connector, second.key())
    s = tir_similarity([first.key(), second.key()])[0, 1]
    for n, imp in method.importance.items():
        assert torch.allclose(method.scaled[n], imp * (1 - s))
    plain = ImportanceMethod("ewc")
    plain.importance, plain.anchor, plain.owner, plain.keys = method.importance, method.anchor, method.owner, method.keys
    plain.begin_task(connector, second.key())
    assert plain.scaled is plain.importance  # the plain regulariser does not scale


def test_er_batches_contain_buffer_samples(backbone, monkeypatch):
    connector = backbone.base_connector().clone()
    method = ReplayMethod("er", fraction=0.5, min_per_task=2)
    old = tiny_task(0, answers=("red", "blue"))
    train(backbone, connector, old, method)
    assert len(method.buffer) == 4 and set(method.buffer.answers) <= {"red", "blue"}
    seen = []
    real_loss = backbone.lm.loss

    def recording_loss(visual, instructions, answers, lora=None):
        seen.append(list(answers))
        return real_loss(visual, instructions, answers, lora)

    monkeypatch.setattr(backbone.lm, "loss", recording_loss)
    train(backbone, connector, tiny_task(1, answers=("circle", "square")), method)
    assert seen and all({"red", "blue"} & set(step) for step in seen)
    assert all({"circle", "square"} & set(step) for step in seen)


def test_agem_projects_only_gradients_that_conflict_with_the_buffer(backbone):
    connector = backbone.base_connector().clone()
    method = ReplayMethod("agem", fraction=1.0)
    train(backbone, connector, tiny_task(0), method)  # the buffer (8 rows) is the whole reference batch

    def loss_fn(b: Batch, logits=False):
        return backbone.lm.loss(connector(b.features), b.instructions, b.answers)

    params = list(connector.parameters())
    connector.zero_grad()
    loss_fn(method.buffer).backward()
    reference = torch.cat([p.grad.flatten() for p in params])
    noise = torch.randn(reference.shape, generator=torch.Generator().manual_seed(0)) * reference.norm() / 100

    def adjusted(gradient):
        offset = 0
        for p in params:
            p.grad = gradient[offset : offset + p.numel()].view_as(p).clone()
            offset += p.numel()
        method.adjust_gradient(connector, loss_fn, torch.Generator().manual_seed(1))
        return torch.cat([p.grad.flatten() for p in params])

    agreeing = reference + noise
    assert torch.equal(adjusted(agreeing), agreeing)
    conflicting = -reference + noise
    projected = adjusted(conflicting)
    expected = conflicting - torch.dot(conflicting, reference) / torch.dot(reference, reference) * reference
    assert torch.allclose(projected, expected, atol=1e-5 * conflicting.abs().max())
    assert abs(torch.dot(projected, reference).item()) <= 1e-4 * conflicting.norm().item() * reference.norm().item()


def test_seqft_has_no_memory_and_unknown_methods_are_refused(backbone):
    shared = backbone.base_connector().clone()
    method = make_method("seqft")
    train(backbone, shared, tiny_task(0), method)
    assert method.penalty(shared) is None and method.replay(4, torch.Generator()) is None
    with pytest.raises(ValueError, match="shared-connector method"):
        make_method("eproj")


class Vector(torch.nn.Module):
    """A connector that is one parameter vector: losses on it are known in closed form."""

    def __init__(self, values):
        super().__init__()
        self.theta = torch.nn.Parameter(torch.tensor(values, dtype=torch.float64))


def test_si_integrates_the_task_loss_gradient_alone_along_the_path(monkeypatch):
    """On L(θ) = ½·a·|θ − c|² with gradient descent, SI's path integral Σ −g·Δθ must use g = a(θ − c), the task
    loss's gradient, even though each step also follows the penalty λΩ(θ − θ*)² of an earlier task."""
    a, c, lr, strength, steps = 2.0, torch.tensor([1.0, -2.0], dtype=torch.float64), 0.05, 3.0, 20
    omega = torch.tensor([0.5, 1.5], dtype=torch.float64)
    method = ImportanceMethod("si", strength=strength)
    connector = Vector([0.3, 0.1])
    method.importance, method.owner = {"theta": omega}, {"theta": torch.zeros(2, dtype=torch.long)}
    method.anchor, method.keys = {"theta": torch.zeros(2, dtype=torch.float64)}, [key([1.0], [1.0], [1.0])]
    method.begin_task(connector, key([1.0], [1.0], [1.0]))
    opt = torch.optim.SGD(connector.parameters(), lr=lr)
    theta, expected = connector.theta.detach().clone(), torch.zeros(2, dtype=torch.float64)
    for _ in range(steps):  # the hooks in train_connector's order
        opt.zero_grad()
        (0.5 * a * (connector.theta - c).pow(2).sum() + method.penalty(connector)).backward()
        method.adjust_gradient(connector, None, torch.Generator())
        opt.step()
        method.after_step(connector)
        task_grad = a * (theta - c)  # by hand
        step = -lr * (task_grad + 2 * strength * omega * theta)
        expected -= task_grad * step
        theta = theta + step
    assert torch.allclose(connector.theta.detach(), theta)
    assert torch.allclose(method._path["theta"], expected), (method._path["theta"], expected)
    importance = method.task_importance(connector, None, None)["theta"]
    assert torch.allclose(importance, (expected / ((theta - torch.tensor([0.3, 0.1], dtype=torch.float64)) ** 2
                                                   + 1e-3)).clamp(min=0))


def test_an_agem_step_with_adamw_does_not_raise_the_buffer_loss():
    """AdamW's first moment remembers earlier gradients: a projected gradient alone does not keep the step from
    climbing the buffer's loss. The step taken must not, to first order (the second-order rest is |Δθ|²/2)."""
    buffer_target = torch.tensor([1.0, 0.0], dtype=torch.float64)

    def loss_fn(batch, logits=False):
        return 0.5 * (connector.theta - batch.features.mean(0)).pow(2).sum()

    connector = Vector([0.0, 0.0])
    method = ReplayMethod("agem", fraction=1.0)
    method.buffer = Batch(buffer_target[None], ["q"], ["a"])
    opt = torch.optim.AdamW(connector.parameters(), lr=0.05, weight_decay=0.01)
    for _ in range(5):  # an earlier task pushed θ away from the buffer's target: Adam's moment points that way
        opt.zero_grad()
        connector.theta.grad = torch.tensor([1.0, 0.2], dtype=torch.float64)
        opt.step()
    for _ in range(3):  # now a task whose gradient conflicts with the buffer's
        before, buffer_before = connector.theta.detach().clone(), loss_fn(method.buffer).item()
        reference = connector.theta.detach() - buffer_target
        opt.zero_grad()
        connector.theta.grad = torch.tensor([0.5, -1.0], dtype=torch.float64)
        method.adjust_gradient(connector, loss_fn, torch.Generator().manual_seed(0))
        opt.step()
        method.after_step(connector)
        step = connector.theta.detach() - before
        assert torch.dot(step, reference).item() <= 1e-12  # first order: not up the buffer's loss
        assert loss_fn(method.buffer).item() - buffer_before <= 0.5 * step.pow(2).sum().item() + 1e-12


def test_replay_draws_leave_the_data_order_of_seqft(backbone, monkeypatch):
    """ER with the same seed sees the new task's rows in the order SeqFT sees them: its buffer draws come from a
    generator of their own, so a comparison of the two is paired."""
    new = tiny_task(1, answers=tuple(f"a{i}" for i in range(8)), instruction="Which one?")
    orders = {}
    real_loss = backbone.lm.loss
    for name in ("seqft", "er"):
        seen = orders[name] = []

        def recording_loss(visual, instructions, answers, lora=None, seen=seen):
            seen.append([a for a, i in zip(answers, instructions) if i == "Which one?"])
            return real_loss(visual, instructions, answers, lora)

        connector, method = backbone.base_connector().clone(), make_method(name)
        if name == "er":
            method.buffer = tiny_task(0).batch()
        monkeypatch.setattr(backbone.lm, "loss", recording_loss)
        train(backbone, connector, new, method, epochs=2)
        monkeypatch.setattr(backbone.lm, "loss", real_loss)
    assert orders["er"] == orders["seqft"] and len(orders["er"]) == 4


def test_importance_keeps_the_relative_weight_of_tasks(monkeypatch):
    """One scale for all tasks (the first task's mean): a task whose parameters mattered a tenth as much keeps a
    tenth of the weight instead of being scaled up to the first task's."""
    method = ImportanceMethod("ewc")
    connector = Vector([0.0, 0.0])
    raw = iter([{"theta": torch.tensor([2.0, 4.0], dtype=torch.float64)},
                {"theta": torch.tensor([0.6, 0.2], dtype=torch.float64)}])
    monkeypatch.setattr(method, "task_importance", lambda *args: next(raw))
    method.end_task(connector, key([1.0], [1.0], [1.0]), None, None)
    assert torch.allclose(method.importance["theta"], torch.tensor([2 / 3, 4 / 3], dtype=torch.float64))
    method.end_task(connector, key([0.0], [1.0], [1.0]), None, None)
    assert torch.allclose(method.importance["theta"], torch.tensor([2 / 3, 4 / 3], dtype=torch.float64))
    tensors, meta = method.state()
    again = ImportanceMethod("ewc")
    again.load_state(tensors, meta)
    assert again.scale == pytest.approx(3.0)

    degenerate = ImportanceMethod("si")  # a first task that moved nothing sets no scale (1e-12 would blow up the next)
    raw = iter([{"theta": torch.zeros(2, dtype=torch.float64)}, {"theta": torch.tensor([1.0, 3.0], dtype=torch.float64)}])
    monkeypatch.setattr(degenerate, "task_importance", lambda *args: next(raw))
    degenerate.end_task(connector, key([1.0], [1.0], [1.0]), None, None)
    assert degenerate.scale is None
    degenerate.end_task(connector, key([0.0], [1.0], [1.0]), None, None)
    assert degenerate.scale == pytest.approx(2.0)
    assert torch.allclose(degenerate.importance["theta"], torch.tensor([0.5, 1.5], dtype=torch.float64))


@pytest.mark.parametrize("kind", ["ewc", "mas"])
def test_importance_is_the_mean_over_samples_of_each_samples_gradient(kind):
    """EWC's diagonal empirical Fisher is the mean of squared per-sample gradients (MAS: of their absolute
    values), not the square of a batch's gradient: on L_r(θ) = ½(θ·x_r − y_r)² the per-sample gradient is
    (θ·x_r − y_r)·x_r, by hand."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(10, 3)), rng.normal(size=10)
    connector = Vector([0.5, -0.2, 0.1])
    data = Batch(torch.from_numpy(np.c_[x, y]), ["q"] * 10, ["a"] * 10)

    def loss_fn(batch, logits=False):
        f = batch.features
        residual = f[:, :3] @ connector.theta - f[:, 3]
        return residual[:, None] if logits else (0.5 * residual.pow(2)).mean()

    theta = np.array([0.5, -0.2, 0.1])
    if kind == "ewc":
        per_sample = ((x @ theta - y)[:, None] * x) ** 2
    else:  # MAS: d/dθ of the squared output norm, |2·(θ·x − y)·x|
        per_sample = np.abs(2 * (x @ theta - y)[:, None] * x)
    importance = ImportanceMethod(kind).task_importance(connector, data, loss_fn)["theta"]
    assert np.allclose(importance.numpy(), per_sample.mean(0))
