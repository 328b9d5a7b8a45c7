"""The output regularizer of von Oswald et al.: keep every old task's generated weights in place.

For the old tasks t (embeddings e_t) and the hypernetwork f_h(e, Θ) frozen at the start of the
current task (Θ*), the penalty is

    reg = 1/K Σ_t || f_h(e_t, Θ*) - f_h(e_t, Θ + ΔΘ) ||²          (ΔΘ: optional lookahead)

Every generated chunk is the output layer applied to the last hidden activation, so each
(task, chunk) pair m contributes ||Ŵ ã_m - W* ã*_m||² with ã = [a; 1] (bias folded in),
Ŵ = [W | b] the current (or lookahead) output layer and W* the frozen one. With D = Ŵ - W* and
δ_m = ã_m - ã*_m:

    ||Ŵ ã_m - W* ã*_m||² = δ_mᵀ G* δ_m + 2 δ_mᵀ (W*ᵀ D) ã_m + ã_mᵀ (Dᵀ D) ã_m,   G* = W*ᵀ W*

Only (d+1)x(d+1) matrices touch the big output layer (d = last hidden width), so the *Gram form*
costs O(chunk_size·d²) + O(pairs·d²) instead of the *explicit form*'s O(pairs·chunk_size·d),
and no old targets are stored: the snapshot keeps W* and the (K, C, d+1) activations a*.
Writing the residual as W*δ + Dã (never expanding ||Ŵã||² - 2... + ||W*ã*||²) keeps it free of
cancellation, and it is exactly zero when Θ equals the snapshot. A chunk that uses only the
first r rows of the output layer (the truncated last chunk; in the column layout every tensor
with fewer rows than the widest) uses Gram matrices over those rows: chunks are grouped by r,
and the matrices of r_1 < r_2 < ... are accumulated over consecutive row blocks, so the cost
stays O(S·d²) however many groups there are. A chunk whose output the hypernetwork scales by
a fixed s (column layout) contributes s² times its term: the form is quadratic in (δ, ã), so
its rows of δ and ã are scaled by s.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.func import functional_call

from hnet_serve.errors import ConfigError, InputError
from hnet_serve.hypernet import HyperNetwork

RegMethod = Literal["auto", "gram", "explicit"]
# The explicit form keeps the old tasks' generated weights when they fit in this many floats
# (it then skips regenerating them every step); the Gram form never needs them.
MAX_CACHED_TARGETS = 1 << 25


@dataclass(frozen=True)
class HeadSnapshot:
    """One frozen output layer and the chunk groups that use it."""

    head: torch.Tensor  # (S, d+1) [W* | b*]
    groups: tuple[tuple[int, int, int], ...]  # (rows r, first chunk, end chunk), r ascending
    grams: tuple[torch.Tensor, ...]  # per group: (d+1, d+1) G* over rows [0, r)


@dataclass(frozen=True)
class Snapshot:
    """What the regularizer needs of the frozen hypernetwork Θ* and the old tasks."""

    task_ids: tuple[int, ...]  # embedding rows covered, in order
    embeddings: torch.Tensor  # (K, E) the old tasks' embeddings when frozen
    features: torch.Tensor  # (K, C, d+1) a*: last hidden activation with a constant-1 column
    heads: tuple[HeadSnapshot, ...]  # one per output layer of the hypernetwork
    n_params: int
    scale: torch.Tensor | None  # (C,) fixed factor on each chunk's output; None: all 1
    targets: torch.Tensor | None = None  # (K, n) f_h(e_t, Θ*), kept when small (explicit form)

    @property
    def num_tasks(self) -> int:
        return len(self.task_ids)

    @property
    def num_chunks(self) -> int:
        return self.features.shape[1]


def _augment(feats: torch.Tensor) -> torch.Tensor:
    """(..., d) -> (..., d+1): append the constant-1 input that carries the bias."""
    return torch.cat([feats, feats.new_ones(*feats.shape[:-1], 1)], dim=-1)


def _head_matrix(weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return torch.cat([weight, bias.unsqueeze(1)], dim=1)  # (S, d+1)


@torch.no_grad()
def make_snapshot(
    hnet: HyperNetwork, task_ids: list[int], *, max_cached_targets: int = MAX_CACHED_TARGETS
) -> Snapshot:
    """Freeze what the regularizer needs: old embeddings, their activations a*, W* and G*
    (and the old tasks' generated weights if they hold at most ``max_cached_targets`` floats).
    """
    if not task_ids:
        raise InputError("a regularizer snapshot needs at least one old task")
    emb = hnet.embeddings(task_ids).detach().clone()  # (K, E)
    feats = _augment(hnet.features(emb))  # (K, C, d+1)
    heads = []
    for i, layer in enumerate(hnet.output_layers):
        head = _head_matrix(layer.weight, layer.bias).detach().clone()  # (S, d+1)
        groups = tuple(sorted((r, a, b) for h, r, a, b in hnet.chunk_groups if h == i))
        heads.append(HeadSnapshot(head, groups, tuple(head[:r].T @ head[:r]
                                                      for r, _, _ in groups)))
    targets = None
    if len(task_ids) * hnet.n_params <= max_cached_targets:
        targets = hnet.project(hnet.features(emb)).detach().clone()  # (K, n)
    return Snapshot(
        task_ids=tuple(int(i) for i in task_ids),
        embeddings=emb,
        features=feats.expand(len(task_ids), hnet.num_chunks, -1).clone(),
        heads=tuple(heads),
        n_params=hnet.n_params,
        scale=None if bool((hnet.chunk_scale == 1).all()) else hnet.chunk_scale.clone(),
        targets=targets,
    )


class _Features(nn.Module):
    """Adapter so ``functional_call`` can run ``hnet.features`` with shifted parameters."""

    def __init__(self, hnet: HyperNetwork) -> None:
        super().__init__()
        self.hnet = hnet

    def forward(self, emb: torch.Tensor, chunks: torch.Tensor | None = None) -> torch.Tensor:
        return self.hnet.features(emb, chunks)


def current_outputs(
    hnet: HyperNetwork, emb: torch.Tensor, delta: dict[str, torch.Tensor] | None = None,
    chunks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Activations ``(K, C, d)`` (``(K, m, d)`` for the m ``chunks`` given) and every output
    layer's ``(weight (S, d), bias (S,))`` at Θ (+ ΔΘ).

    ``delta`` maps parameter names of ``hnet`` (as in ``named_parameters``) to changes; names
    that are missing stay unchanged.
    """
    names = ["head"] if hnet.head is not None else [f"heads.{i}" for i in range(len(hnet.heads))]
    layers = hnet.output_layers
    if not delta:
        return hnet.features(emb, chunks), [(m.weight, m.bias) for m in layers]
    params = {
        f"hnet.{n}": p + delta[n] for n, p in hnet.named_parameters() if n in delta
    }
    feats = functional_call(_Features(hnet), params, (emb, chunks))
    return feats, [(m.weight + delta.get(f"{n}.weight", 0), m.bias + delta.get(f"{n}.bias", 0))
                   for n, m in zip(names, layers)]


def choose_method(pairs: int, width: int, cached_targets: bool = False
                  ) -> Literal["gram", "explicit"]:
    """The cheaper form for ``pairs`` (task, chunk) pairs and ``width`` = d + 1.

    Forward plus backward, the explicit form costs ~3·pairs·S·width multiply-adds (plus
    ~pairs·S·width to regenerate the targets when they are not cached), the Gram form
    ~6·S·width² (plus pairs·width², negligible).
    """
    return "gram" if pairs >= (2 if cached_targets else 1.5) * width else "explicit"


def _quad_sum(
    g: torch.Tensor, m: torch.Tensor, n: torch.Tensor, dlt: torch.Tensor, a: torch.Tensor
) -> torch.Tensor:
    """Σ_p δ_pᵀ G δ_p + 2 δ_pᵀ M a_p + a_pᵀ N a_p over rows p of ``dlt``/``a`` ``(P, d+1)``."""
    return ((dlt @ g) * dlt).sum() + 2 * ((dlt @ m) * a).sum() + ((a @ n) * a).sum()


def _gram_sum(snap: Snapshot, a: torch.Tensor, a_star: torch.Tensor,
              heads: list[torch.Tensor], chunks: torch.Tensor | None = None) -> torch.Tensor:
    """Σ over (task, chunk) pairs of ||Ŵ ã - W* ã*||² restricted to each chunk's rows, output
    layer by output layer; ``heads``: the current ``[W | b]`` of each ``(S, d+1)``.
    ``chunks``: the ascending chunk indices that ``a``/``a_star``'s second axis holds (default:
    every chunk)."""
    dlt = a - a_star  # (K, C, d+1)
    if snap.scale is not None:  # the form is quadratic in (δ, ã): scale both by s
        s = (snap.scale if chunks is None else snap.scale[chunks]).view(1, -1, 1)
        dlt, a = dlt * s, a * s
    width = a.shape[-1]
    total = a.new_zeros(())
    where = {}  # chunk index -> its position in the subset (or where it would be)
    if chunks is not None:  # one lookup for every group's bounds
        edges = sorted({x for hs in snap.heads for _, lo, hi in hs.groups for x in (lo, hi)})
        pos = torch.searchsorted(chunks, torch.tensor(edges, device=chunks.device)).tolist()
        where = dict(zip(edges, pos))
    for hs, w in zip(snap.heads, heads):
        bounds = [0, *dict.fromkeys(r for r, _, _ in hs.groups)]
        sizes = [y - x for x, y in itertools.pairwise(bounds)] + [w.shape[0] - bounds[-1]]
        # One split (its backward is a single concatenation) rather than slices, whose
        # backward zero-fills and copies the whole (S, d+1) gradient once per slice.
        d_parts = torch.split(w - hs.head, sizes)  # D = Ŵ - W*, row blocks
        w_parts = torch.split(hs.head, sizes)
        m = n = None
        block = 0
        for (rows, first, end), gram in zip(hs.groups, hs.grams):
            # W*ᵀ D and Dᵀ D over rows [0, r), accumulated block by block as r grows
            while bounds[block] < rows:
                m_b = w_parts[block].T @ d_parts[block]  # (d+1, d+1)
                n_b = d_parts[block].T @ d_parts[block]
                m = m_b if m is None else m + m_b
                n = n_b if n is None else n + n_b
                block += 1
            if chunks is not None:  # the positions of this group's chunks in the subset
                first, end = where[first], where[end]
                if first == end:
                    continue
            dl, aa = dlt[:, first:end], a[:, first:end]
            total = total + _quad_sum(gram, m, n, dl.reshape(-1, width), aa.reshape(-1, width))
    return total


def _explicit_sum(
    hnet: HyperNetwork, snap: Snapshot, feats: torch.Tensor,
    layers: list[tuple[torch.Tensor, torch.Tensor]], a_star: torch.Tensor,
    targets: torch.Tensor | None,
) -> torch.Tensor:
    if targets is None:
        with torch.no_grad():
            d = feats.shape[-1]
            frozen = [(hs.head[:, :d], hs.head[:, d]) for hs in snap.heads]
            targets = hnet.project(a_star[..., :d], frozen)  # (K, n)
    return (hnet.project(feats, layers) - targets).pow(2).sum()


def output_regularizer(
    hnet: HyperNetwork,
    snapshot: Snapshot,
    *,
    embeddings: torch.Tensor | None = None,
    delta: dict[str, torch.Tensor] | None = None,
    subset: torch.Tensor | list[int] | None = None,
    chunks: torch.Tensor | list[int] | None = None,
    method: RegMethod = "auto",
) -> torch.Tensor:
    """``1/K Σ_t ||f_h(e_t, Θ*) - f_h(e_t', Θ + ΔΘ)||²`` over the snapshot's old tasks.

    ``embeddings`` (K, E): the current old embeddings e_t' when they are trained too (default:
    the snapshot's frozen ones, which then get no gradient). ``delta``: the lookahead ΔΘ by
    parameter name (None: the plain output regularizer). ``subset``: positions into the
    snapshot's tasks to regularize this step (default: all). ``chunks``: distinct chunk
    indices to regularize this step, for every task in the subset (default: all); the sum over
    them is scaled by C / m, so a uniformly random set of m chunks gives an unbiased estimate of
    the full penalty (Gram form only). ``method``: ``gram``, ``explicit`` (the reference) or
    ``auto`` (the cheaper of the two).
    """
    if snapshot.n_params != hnet.n_params or [h.head.shape[0] for h in snapshot.heads] != [
            m.weight.shape[0] for m in hnet.output_layers]:
        raise InputError("the snapshot was taken from a hypernetwork of a different shape")
    emb = snapshot.embeddings if embeddings is None else embeddings
    if emb.shape != snapshot.embeddings.shape:
        raise InputError(
            f"expected old embeddings {tuple(snapshot.embeddings.shape)}, got {tuple(emb.shape)}"
        )
    a_star, targets = snapshot.features, snapshot.targets
    idx = None
    if subset is not None:
        idx = torch.as_tensor(subset, dtype=torch.long, device=emb.device)
        if idx.numel() == 0:
            raise InputError("the regularized subset of old tasks is empty")
        emb, a_star = emb[idx], a_star[idx]
    k, factor = emb.shape[0], 1.0
    if chunks is not None:
        chunks = torch.as_tensor(chunks, dtype=torch.long, device=emb.device).sort().values
        n_chunks = snapshot.num_chunks
        if (chunks.numel() == 0 or int(chunks[0]) < 0 or int(chunks[-1]) >= n_chunks
                or bool((chunks[1:] == chunks[:-1]).any())):
            raise InputError(f"the regularized chunks must be distinct indices in [0, "
                             f"{n_chunks}), got {chunks.tolist()}")
        if method == "explicit":
            raise ConfigError("a subset of chunks is regularized with the Gram form only")
        method = "gram"
        a_star = a_star[:, chunks]
        factor = n_chunks / chunks.numel()
    feats, layers = current_outputs(hnet, emb, delta, chunks)
    if method == "auto":
        method = choose_method(k * snapshot.num_chunks, feats.shape[-1] + 1, targets is not None)
    if method == "explicit" and targets is not None and idx is not None:
        targets = targets[idx]  # (k, n): only the explicit form reads them (a copy per step)
    if method == "gram":
        total = _gram_sum(snapshot, _augment(feats), a_star,
                          [_head_matrix(w, b) for w, b in layers], chunks) * factor
    elif method == "explicit":
        total = _explicit_sum(hnet, snapshot, feats, layers, a_star, targets)
    else:
        raise ConfigError(f"unknown regularizer method {method!r} (auto, gram or explicit)")
    return total / k
