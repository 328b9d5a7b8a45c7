"""The output regularizer: Gram form == explicit form == direct generation, values and gradients."""

from __future__ import annotations

import copy

import pytest
import torch

from hnet_serve.errors import ConfigError, InputError
from hnet_serve.training.regularizer import choose_method, make_snapshot, output_regularizer
from tests.conftest import tiny_mlp_model

OLD = [0, 1, 2]


def perturb(hnet, scale: float = 0.05, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in hnet.shared_parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale * (p.abs().mean() + 0.1))


def random_delta(hnet, scale: float = 0.02, seed: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(p.shape, generator=g) * scale
            for n, p in hnet.named_parameters() if not n.startswith("task_embs")}


def reference(frozen, hnet, ids, delta=None, embeddings=None) -> torch.Tensor:
    """mean_t ||f_h(e_t, Θ*) - f_h(e_t', Θ + ΔΘ)||², generated the plain way."""
    with torch.no_grad():
        targets = frozen.generate(ids)  # (K, n)
    if delta:
        shifted = {n: p + delta[n] if n in delta else p for n, p in hnet.named_parameters()}
        emb = embeddings if embeddings is not None else frozen.embeddings(ids)
        out = torch.func.functional_call(hnet, shifted, (emb,))
    else:
        out = hnet(embeddings if embeddings is not None else frozen.embeddings(ids))
    return (out - targets).pow(2).sum(dim=1).mean()


def grads(hnet, value: torch.Tensor, extra=()) -> torch.Tensor:
    params = [*hnet.shared_parameters(), *extra]
    gs = torch.autograd.grad(value, params, allow_unused=True, retain_graph=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).flatten()
                      for g, p in zip(gs, params)])


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


CASES = [  # (kind, chunk_size): n_params = 371 for the tiny MLP (12 -> 16 -> 8 -> 3)
    ("full", 50),
    ("chunked", 50),  # 8 chunks, last one truncated to 21 rows
    ("chunked", 53),  # 7 chunks of exactly 53: no truncation
    ("chunked", 400),  # chunk larger than the target: a single (truncated) chunk
]


# (kind, chunk_size, layout, task_chunk_emb_dim): the column layout groups chunks by their rows
# (16, 8 and 3 here) and scales them per tensor; task codes make every chunk's input per task.
CASES_ALL = [(k, c, "flat", 0) for k, c in CASES] + [
    ("chunked", 50, "flat", 3),
    ("chunked", 0, "columns", 0),
    ("chunked", 0, "columns", 2),
]


def moved(kind: str, chunk: int, layout: str, codes: int):
    """A 4-task hypernetwork of one case, moved by ``perturb`` after snapshotting tasks OLD:
    ``(moved hypernetwork, frozen copy, snapshot)``."""
    model = tiny_mlp_model(4, kind=kind, chunk_size=chunk or 50, layout=layout,
                           task_chunk_emb_dim=codes)
    hn = model.hypernet
    frozen = copy.deepcopy(hn)
    snap = make_snapshot(hn, OLD)
    perturb(hn)
    return hn, frozen, snap


@pytest.mark.parametrize("kind,chunk,layout,codes", CASES_ALL)
@pytest.mark.parametrize("lookahead", [False, True])
def test_gram_equals_explicit_and_direct_generation(kind, chunk, layout, codes, lookahead):
    hn, frozen, snap = moved(kind, chunk, layout, codes)
    uncached = make_snapshot(frozen, OLD, max_cached_targets=0)  # regenerates targets every call
    delta = random_delta(hn) if lookahead else None

    assert snap.targets is not None and uncached.targets is None
    ref = reference(frozen, hn, OLD, delta)
    assert ref.item() > 1e-3  # the perturbation is real
    g_ref = grads(hn, ref)
    for s, method in ((snap, "gram"), (snap, "explicit"), (uncached, "explicit")):
        value = output_regularizer(hn, s, delta=delta, method=method)
        assert value.item() == pytest.approx(ref.item(), rel=1e-4), method
        assert rel_err(grads(hn, value), g_ref) < 1e-4, method


@pytest.mark.parametrize("kind,chunk,layout,codes", [*CASES_ALL[:2], CASES_ALL[-1]])
def test_trained_old_embeddings_get_equal_gradients(kind, chunk, layout, codes):
    hn, frozen, snap = moved(kind, chunk, layout, codes)
    with torch.no_grad():
        for i in OLD:
            hn.task_embs[i].add_(0.1)
    emb = hn.embeddings(OLD)  # (3, E), attached to the trainable rows
    old_embs = [hn.task_embs[i] for i in OLD]
    ref = reference(frozen, hn, OLD, embeddings=emb)
    for method in ("gram", "explicit"):
        value = output_regularizer(hn, snap, embeddings=emb, method=method)
        assert value.item() == pytest.approx(ref.item(), rel=1e-4)
        assert rel_err(grads(hn, value, old_embs), grads(hn, ref, old_embs)) < 1e-4


@pytest.mark.parametrize("method", ["gram", "explicit", "auto"])
@pytest.mark.parametrize("lookahead", [False, True])
def test_zero_at_the_snapshot(method, lookahead):
    model = tiny_mlp_model(4)
    hn = model.hypernet
    snap = make_snapshot(hn, OLD)
    delta = {k: torch.zeros_like(v) for k, v in random_delta(hn).items()} if lookahead else None
    value = output_regularizer(hn, snap, delta=delta, method=method)
    assert value.item() == 0.0
    # ... and a new task's embedding row never changes the old tasks' targets
    model.add_task("new")
    assert output_regularizer(hn, snap, method=method).item() == 0.0


def test_hand_computation_tiny_case():
    """One task, a full hypernetwork, only the output bias moved by c: reg = n * c²."""
    model = tiny_mlp_model(2, kind="full")
    hn = model.hypernet
    snap = make_snapshot(hn, [0, 1])
    with torch.no_grad():
        hn.head.bias.add_(0.5)
    expected = hn.n_params * 0.25  # every generated weight moved by 0.5, for both tasks
    for method in ("gram", "explicit"):
        assert output_regularizer(hn, snap, method=method).item() == pytest.approx(expected, rel=1e-5)
    # the lookahead adds to the same bias: -0.5 cancels the move exactly
    delta = {"head.bias": torch.full_like(hn.head.bias, -0.5)}
    for method in ("gram", "explicit"):
        assert output_regularizer(hn, snap, delta=delta, method=method).item() == pytest.approx(
            0.0, abs=1e-6)


def test_frozen_old_embeddings_get_no_gradient():
    model = tiny_mlp_model(4)
    hn = model.hypernet
    snap = make_snapshot(hn, OLD)
    perturb(hn)
    for method in ("gram", "explicit"):
        hn.zero_grad(set_to_none=True)
        output_regularizer(hn, snap, method=method).backward()
        assert all(hn.task_embs[i].grad is None for i in range(4))
        assert hn.head.weight.grad is not None and hn.head.weight.grad.abs().sum() > 0


def test_subset_of_old_tasks():
    model = tiny_mlp_model(4)
    hn = model.hypernet
    frozen = copy.deepcopy(hn)
    snap = make_snapshot(hn, OLD)
    perturb(hn)
    for method in ("gram", "explicit"):
        sub = output_regularizer(hn, snap, subset=[2, 0], method=method)
        assert sub.item() == pytest.approx(reference(frozen, hn, [2, 0]).item(), rel=1e-4)
    with pytest.raises(InputError, match="empty"):
        output_regularizer(hn, snap, subset=[])


def test_many_tasks_and_chunks_stay_accurate():
    """A larger case (30 old tasks x 45 chunks) at realistic weight changes."""
    model = tiny_mlp_model(31, input_size=40, hidden=(40, 30), chunk_size=64)
    hn = model.hypernet
    ids = list(range(30))
    frozen = copy.deepcopy(hn)
    snap = make_snapshot(hn, ids)
    perturb(hn, scale=0.01)
    ref = reference(frozen, hn, ids)
    gram = output_regularizer(hn, snap, method="gram")
    assert gram.item() == pytest.approx(ref.item(), rel=1e-4)
    assert rel_err(grads(hn, gram), grads(hn, ref)) < 1e-4


def test_method_choice_and_errors():
    assert choose_method(pairs=9 * 27, width=26) == "gram"  # the paper's PermutedMNIST task 10
    assert choose_method(pairs=9 * 27, width=26, cached_targets=True) == "gram"
    assert choose_method(pairs=3, width=26) == "explicit"
    assert choose_method(pairs=45, width=26) == "gram"
    assert choose_method(pairs=45, width=26, cached_targets=True) == "explicit"
    model = tiny_mlp_model(3)
    snap = make_snapshot(model.hypernet, [0, 1])
    with pytest.raises(ConfigError):
        output_regularizer(model.hypernet, snap, method="fast")  # type: ignore[arg-type]
    other = tiny_mlp_model(3, chunk_size=40)
    with pytest.raises(InputError, match="different shape"):
        output_regularizer(other.hypernet, snap)
    with pytest.raises(InputError):
        output_regularizer(model.hypernet, snap, embeddings=torch.zeros(3, 6))
    with pytest.raises(InputError):
        make_snapshot(model.hypernet, [])
    # subsets index the cached targets too
    hn = model.hypernet
    frozen = copy.deepcopy(hn)
    perturb(hn)
    sub = output_regularizer(hn, snap, subset=[1], method="explicit")
    assert sub.item() == pytest.approx(reference(frozen, hn, [1]).item(), rel=1e-4)


def chunk_terms(frozen, hnet, ids) -> torch.Tensor:
    """Per chunk j: mean over tasks of ||chunk j of f_h(e_t, Θ*) - chunk j of f_h(e_t, Θ)||²,
    generated the plain way (flat layout: chunk j is flat weights [jS, (j+1)S))."""
    with torch.no_grad():
        targets = frozen.generate(ids)
    diff = (hnet(frozen.embeddings(ids)) - targets).pow(2).mean(dim=0)  # (n,)
    s, c = hnet.chunk_size, hnet.num_chunks
    return torch.stack([diff[j * s:(j + 1) * s].sum() for j in range(c)])


@pytest.mark.parametrize("kind,chunk,layout,codes", CASES_ALL)
def test_a_subset_of_chunks_is_an_unbiased_sample(kind, chunk, layout, codes):
    """``chunks=``: the penalty over those chunks only, scaled by C / m, so that its mean over
    random subsets is the full penalty; every chunk alone, added up, is the full penalty."""
    hn, frozen, snap = moved(kind, chunk, layout, codes)
    c = hn.num_chunks
    full = output_regularizer(hn, snap, method="gram")
    singles = [output_regularizer(hn, snap, chunks=[j]) for j in range(c)]
    assert sum(singles).item() / c == pytest.approx(full.item(), rel=1e-4)
    assert rel_err(grads(hn, sum(singles) / c), grads(hn, full)) < 1e-4
    every = output_regularizer(hn, snap, chunks=list(range(c)))
    assert every.item() == pytest.approx(full.item(), rel=1e-5)
    if c >= 3:
        sel = [c - 1, 0, c // 2]  # any order; the truncated last chunk included
        sub = output_regularizer(hn, snap, chunks=sel, subset=[2, 0])
        want = sum(output_regularizer(hn, snap, chunks=[j], subset=[2, 0]) for j in sel) / 3
        assert sub.item() == pytest.approx(want.item(), rel=1e-4)
    if layout == "flat" and kind == "chunked":  # against plain generation, chunk by chunk
        terms = chunk_terms(frozen, hn, OLD)
        for j in range(c):
            assert singles[j].item() == pytest.approx(c * terms[j].item(), rel=1e-4)
    # the lookahead reads the same chunks
    delta = random_delta(hn)
    la = [output_regularizer(hn, snap, chunks=[j], delta=delta) for j in range(c)]
    assert sum(la).item() / c == pytest.approx(
        output_regularizer(hn, snap, delta=delta, method="gram").item(), rel=1e-4)


def test_chunk_subset_errors():
    model = tiny_mlp_model(4, chunk_size=50)
    hn = model.hypernet
    snap = make_snapshot(hn, OLD)
    for bad in ([], [0, 0], [-1], [hn.num_chunks]):
        with pytest.raises(InputError, match="distinct indices"):
            output_regularizer(hn, snap, chunks=bad)
    with pytest.raises(ConfigError, match="Gram form"):
        output_regularizer(hn, snap, chunks=[0], method="explicit")
