"""Baselines: penalties against hand computations, forgetting on conflicting toy tasks, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hnet_serve.errors import ConfigError, InputError
from hnet_serve.hypernet import HypernetConfig
from hnet_serve.targets import MLPConfig, TargetSpec, build_target
from hnet_serve.training.config import TrainConfig
from hnet_serve.training.data import TaskData
from hnet_serve.training.loop import run_tasks
from hnet_serve.training.methods.base import task_seed
from hnet_serve.training.methods.baselines import (
    BASELINES,
    BaselineOptions,
    EWCMethod,
    IndependentMethod,
    NetworkMethod,
    SIMethod,
    make_baseline,
    train_baseline,
)
from hnet_serve.training.methods.hnet import build_model
from hnet_serve.training.methods.penalties import diagonal_fisher, quadratic_penalty
from hnet_serve.training.methods.registry import make_method

pytestmark = pytest.mark.usefixtures("one_thread")


# -- toy data -------------------------------------------------------------------------------
def toy_task(
    name: str, *, flip: bool = False, axis: int = 0, n: int = 256, dim: int = 4, seed: int = 0,
    center: np.ndarray | None = None,
) -> TaskData:
    """Gaussian inputs labelled by the sign of one coordinate (``flip``: the opposite label)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(2 * n, dim)).astype(np.float32)  # (2n, dim)
    y = (x[:, axis] > 0).astype(np.int64)
    if center is not None:
        x = x + center.astype(np.float32)
    if flip:
        y = 1 - y
    return TaskData(name, x[:n], y[:n], x[n:], y[n:], num_classes=2)


def conflicting_tasks() -> list[TaskData]:
    """Same kind of inputs, opposite labels: one shared network cannot keep both."""
    return [toy_task("a", seed=1), toy_task("b", flip=True, seed=2)]


def toy_config(**update) -> TrainConfig:
    base = TrainConfig(
        benchmark="custom", iterations=150, batch_size=32, lr=1e-2, beta=0.05, seed=0,
        target=TargetSpec(hidden=[16]),
        hypernet=HypernetConfig(kind="chunked", hidden=[16], chunk_size=64, task_emb_dim=4,
                                chunk_emb_dim=4),
    )
    return base.model_copy(update=update)


def tiny_net(seed: int = 0, heads: int = 1):
    torch.manual_seed(seed)
    return build_target(MLPConfig(input_shape=(3,), hidden=[4], num_classes=2, num_heads=heads))


# -- penalties ------------------------------------------------------------------------------
def test_quadratic_penalty_matches_hand_computation_and_is_zero_at_anchor():
    p = [torch.tensor([1.0, 2.0]), torch.tensor([[0.5]])]
    a = [torch.tensor([0.0, 1.0]), torch.tensor([[1.5]])]
    w = [torch.tensor([2.0, 3.0]), torch.tensor([[4.0]])]
    # 2*(1-0)^2 + 3*(2-1)^2 + 4*(0.5-1.5)^2 = 2 + 3 + 4
    assert quadratic_penalty(p, a, w).item() == pytest.approx(9.0)
    assert quadratic_penalty(p, p, w).item() == 0.0
    with pytest.raises(InputError):
        quadratic_penalty(p, a[:1], w)


def test_diagonal_fisher_equals_per_example_loop():
    net = tiny_net()
    x = torch.randn(7, 3, generator=torch.Generator().manual_seed(3))
    fisher = diagonal_fisher(net, x, generator=torch.Generator().manual_seed(5), chunk=3)
    # Hand computation: the same sampled labels (same generator stream, chunk by chunk), one
    # backward pass per example, squared gradients averaged.
    g = torch.Generator().manual_seed(5)
    labels = []
    for start in range(0, 7, 3):
        with torch.no_grad():
            probs = F.softmax(net(x[start : start + 3]), dim=-1)
        labels.append(torch.multinomial(probs, 1, generator=g).squeeze(1))
    y = torch.cat(labels)
    expected = [torch.zeros_like(p) for p in net.parameters()]
    for i in range(7):
        net.zero_grad()
        F.log_softmax(net(x[i : i + 1]), dim=-1)[0, y[i]].backward()
        for e, p in zip(expected, net.parameters()):
            e += p.grad.pow(2) / 7
    for f, e in zip(fisher, expected):
        torch.testing.assert_close(f, e, rtol=1e-5, atol=1e-7)
    assert sum(float(f.sum()) for f in fisher) > 0


def test_ewc_penalty_zero_at_anchor_then_equals_hand_value_and_online_decay():
    tasks = conflicting_tasks()
    opts = BaselineOptions(ewc_lambda=3.0, ewc_gamma=0.5, fisher_samples=64)
    ewc = make_baseline("ewc", toy_config(iterations=20), tasks, opts)
    assert isinstance(ewc, EWCMethod)
    run_tasks(ewc, tasks[:1], ewc.config, progress=False)
    assert ewc.penalty().item() == 0.0  # at the anchor
    fisher1 = [f.clone() for f in ewc.fisher]
    with torch.no_grad():
        deltas = [torch.randn_like(p) * 0.1 for p in ewc.params]
        for p, d in zip(ewc.params, deltas):
            p.add_(d)
    hand = 0.5 * 3.0 * sum(float((f * d * d).sum()) for f, d in zip(fisher1, deltas))
    assert ewc.penalty().item() == pytest.approx(hand, rel=1e-5)
    assert hand > 0
    # Online: after the second task F = gamma * F_1 + F_2, with F_2 at the new parameters.
    ewc.begin_task(1, tasks[1])
    ewc.end_task(1, tasks[1])
    x = ewc.sample_inputs(1, tasks[1], opts.fisher_samples)  # F_2 recomputed the same way
    f2 = diagonal_fisher(ewc.net, x, num_classes=2,
                         generator=torch.Generator().manual_seed(task_seed(0, 4_001)))
    for f, f1, g2 in zip(ewc.fisher, fisher1, f2):
        torch.testing.assert_close(f, 0.5 * f1 + g2)


def test_si_importance_and_penalty_match_hand_computation():
    tasks = conflicting_tasks()
    si = make_baseline("si", toy_config(), tasks, {"si_c": 2.0, "si_xi": 0.5})
    assert isinstance(si, SIMethod)
    si.begin_task(0, tasks[0])
    start = [p.detach().clone() for p in si.params]
    # Two hand-made "steps": gradients g_k and parameter moves d_k.
    steps = [([torch.randn_like(p) for p in start], [torch.randn_like(p) * 0.1 for p in start])
             for _ in range(2)]
    for grads, moves in steps:
        before = [p.detach().clone() for p in si.params]
        with torch.no_grad():
            for p, d in zip(si.params, moves):
                p.add_(d)
        si.observe_step(grads, before)
    si.end_task(0, tasks[0])
    for k, (omega_hat, p, s) in enumerate(zip(si.importance, si.params, start)):
        omega = sum(-g[k] * d[k] for g, d in steps)
        total = p.detach() - s
        torch.testing.assert_close(omega_hat, (omega / (total**2 + 0.5)).clamp_min(0))
    assert si.penalty().item() == 0.0  # at the anchor
    with torch.no_grad():
        for p in si.params:
            p.add_(0.2)
    hand = 2.0 * sum(float((w * 0.04).sum()) for w in si.importance)
    assert si.penalty().item() == pytest.approx(hand, rel=1e-4)


def test_si_path_integral_tracks_the_task_loss_gradient_in_training():
    """With no penalty yet (first task), omega = -sum g * dtheta is positive: the loss went down."""
    tasks = conflicting_tasks()
    si = make_baseline("si", toy_config(iterations=40), tasks)
    run_tasks(si, tasks[:1], si.config, progress=False)
    assert sum(float(w.sum()) for w in si.importance) > 0


# -- forgetting -----------------------------------------------------------------------------
def _first_task_after_second(matrix: list[list[float | None]]) -> float:
    return float(matrix[1][0])


def test_finetune_forgets_conflicting_task_while_ewc_si_and_hnet_keep_it():
    tasks = conflicting_tasks()
    cfg = toy_config()
    fine_run = train_baseline("finetune", tasks, cfg, progress=False)
    fine = fine_run.result.accuracy_matrix
    assert fine[0][0] > 0.9 and fine[1][1] > 0.9
    assert _first_task_after_second(fine) < 0.2  # overwritten by the opposite labels
    ewc = train_baseline("ewc", tasks, cfg, {"ewc_lambda": 1e4}, progress=False)
    si = train_baseline("si", tasks, cfg, {"si_c": 100.0}, progress=False)
    hnet = run_tasks(make_method(cfg, tasks), tasks, cfg, progress=False)
    for matrix in (ewc.result.accuracy_matrix, si.result.accuracy_matrix, hnet.accuracy_matrix):
        assert _first_task_after_second(matrix) > _first_task_after_second(fine) + 0.5
    # The hypernetwork keeps task a *and* learns task b (separate generated weights).
    assert _first_task_after_second(hnet.accuracy_matrix) > 0.9
    assert hnet.accuracy_matrix[1][1] > 0.9
    # Backward transfer tells the same story.
    assert ewc.metrics["bwt"] > -0.1 > -0.5 > fine_run.metrics["bwt"]


def test_independent_networks_do_not_interfere():
    tasks = conflicting_tasks()
    res = train_baseline("independent", tasks, toy_config(), progress=False)
    learner = res.learner
    assert isinstance(learner, IndependentMethod)
    assert learner.nets["a"] is not learner.nets["b"]
    assert res.result.accuracy_matrix[1][0] == res.result.accuracy_matrix[0][0]
    assert learner.n_stored_params == 2 * learner.nets["a"].n_params


def test_multi_head_finetune_keeps_old_heads_untouched():
    tasks = conflicting_tasks()
    cfg = toy_config(multi_head=True)
    learner = make_baseline("finetune", cfg, tasks)
    assert learner.target_config.num_heads == 2
    run_tasks(learner, tasks[:1], cfg, progress=False)
    last = learner.net.layers[-1]
    head0 = last.weight[:2].detach().clone()
    head1 = last.weight[2:].detach().clone()
    learner.begin_task(1, tasks[1])
    x = torch.from_numpy(tasks[1].x_train[:32])
    y = torch.from_numpy(tasks[1].y_train[:32])
    for _ in range(5):
        learner.train_step(x, y)
    torch.testing.assert_close(last.weight[:2], head0, rtol=0, atol=0)
    assert not torch.equal(last.weight[2:], head1)
    assert learner.heads == {"a": 0, "b": 1}


# -- configuration and errors ---------------------------------------------------------------
@pytest.mark.parametrize("method,cls", [("finetune", NetworkMethod), ("independent",
                         IndependentMethod), ("ewc", EWCMethod), ("si", SIMethod)])
def test_methods_register_with_the_trainer(method, cls):
    tasks = conflicting_tasks()
    learner = make_method(toy_config(method=method), tasks)
    assert type(learner) is cls
    assert method in BASELINES


@pytest.mark.parametrize("values", [{"ewc_lambda": -1}, {"si_xi": 0}, {"ewc_gamma": 2},
                                    {"fisher_samples": 0}, {"lambda": 1}])
def test_bad_options_raise_config_error(values):
    with pytest.raises(ConfigError, match=next(iter(values))):
        BaselineOptions.build(values)


def test_unknown_method_and_hnet_checkpoint_are_refused():
    tasks = conflicting_tasks()
    with pytest.raises(ConfigError, match="unknown baseline"):
        make_baseline("lwf", toy_config(), tasks)
    model = build_model(toy_config(), tasks)
    with pytest.raises(ConfigError, match="cannot continue"):
        make_method(toy_config(method="ewc"), tasks, model)


def test_wrong_input_shape_and_repeated_task_are_input_errors():
    tasks = conflicting_tasks()
    learner = make_baseline("finetune", toy_config(), tasks)
    with pytest.raises(InputError, match="inputs shaped"):
        learner.begin_task(0, toy_task("c", dim=5))
    learner.begin_task(0, tasks[0])
    with pytest.raises(InputError, match="already learned"):
        learner.begin_task(1, tasks[0])
    with pytest.raises(InputError, match="not been learned"):
        learner.predictor("b")


def test_training_is_deterministic_for_a_seed():
    tasks = conflicting_tasks()
    cfg = toy_config(iterations=30)
    a = train_baseline("si", tasks, cfg, progress=False)
    b = train_baseline("si", tasks, cfg, progress=False)
    for p, q in zip(a.learner.params, b.learner.params):
        assert torch.equal(p, q)
    c = train_baseline("si", tasks, cfg.model_copy(update={"seed": 1}), progress=False)
    assert not torch.equal(a.learner.params[0], c.learner.params[0])
    assert a.to_dict()["method"] == "si" and a.to_dict()["stored_params"] > 0
