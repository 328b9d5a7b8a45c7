"""Hypernetworks: task embedding -> all weights of a target network.

One class covers both architectures of the paper. A *chunked* hypernetwork maps
``[task embedding, chunk embedding_j]`` through an MLP to chunk ``j`` of the target's flat weight
vector; the chunk embeddings are shared by all tasks and the last chunk is truncated. The *full*
hypernetwork is the special case of a single chunk of size ``n_params`` with no chunk embedding.

Two options change what a chunk is (both off by default, so older checkpoints load unchanged).
Both were measured for the capacity work (#15, docs/reproduction.md "Capacity") and neither
beat the flat layout at the same stored size, so no preset uses them:

* ``layout='columns'``: a chunk is one *column* of one target tensor (``W[:, j]`` of a weight
  ``(out, in, ...)``, the whole tensor for a bias), and every target tensor has its own output
  layer, so no output layer mixes unlike weights; for permuted inputs the chunk of input pixel
  ``j`` is exactly what a task re-routes. Each tensor's columns are scaled by
  ``1/sqrt(fan_in)`` (a bias by its weight's): unscaled, the 784-input first layer of an MLP
  starts 20x too large (measured: chance accuracy). Measured: one task of Permuted
  Fashion-MNIST reaches 81 % (flat: 86 %).
* ``task_chunk_emb_dim > 0``: task-conditioned chunk embeddings (hypnettorch's
  ``cond_chunk_embs``, here beside the shared ones). Each task's embedding row is
  ``[e (task_emb_dim); c_1 ... c_C (task_chunk_emb_dim each)]``: a private code per chunk,
  frozen with the task like ``e``.

Private factors (``adapter_rank`` r > 0): every task's row also holds ``V (r, fan_in)`` and,
unless ``adapter_basis='shared'`` keeps one ``U`` for all tasks, ``U (out, r)``, for the first
``adapter_layers`` weight tensors; ``U V`` is added to the generated tensor, or, with
``adapter_mode='replace'``, is the tensor (the generator then covers only the rest). With
``freeze='after-first-task'`` the shared weights learn with the first task only and every
later task trains its own row: a fixed trunk with a private low-rank input layer per task,
which the capacity work (#15) measured best on permuted tasks.

Generation is batched: ``K`` embeddings in, ``(K, n_params)`` out, in one pass. The first layer
is split into its task part and its chunk part (``W [e; c] = W_e e + W_c c``), so the ``K x C``
input grid is never materialized, and the output layer is a single ``addmm`` over ``K * C`` rows.

The task-embedding table grows: ``add_task`` appends a row and never touches the shared weights,
so every existing task's generated weights stay bit-identical.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Annotated, Literal, NamedTuple

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from hnet_serve.errors import InputError, UnknownTaskError
from hnet_serve.targets import Activation, activation_fn


class HypernetConfig(BaseModel):
    """Architecture of the hypernetwork. ``kind='full'`` ignores the chunk fields."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["full", "chunked"] = "chunked"
    hidden: list[int] = Field(default_factory=lambda: [25, 25])
    task_emb_dim: int = Field(default=24, gt=0, le=65_536)
    chunk_emb_dim: int = Field(default=8, gt=0, le=65_536)
    chunk_size: int = Field(default=78_000, gt=0)
    activation: Activation = "relu"
    emb_init_std: float = Field(default=1.0, gt=0)
    # "flat": chunks of ``chunk_size`` over the flat weight vector; "columns": one chunk per
    # column of every target tensor (``chunk_size`` unused).
    layout: Literal["flat", "columns"] = "flat"
    # Per-task code for every chunk (0: none); part of each task's embedding row.
    task_chunk_emb_dim: int = Field(default=0, ge=0, le=4096)
    # Rank of each task's private correction ``U V`` of the target's first weight tensor
    # (0: none); ``U (out, r)`` and ``V (r, fan_in)`` are part of the task's embedding row.
    # "auto": derived from the stored-size budget when training sizes the hypernetwork
    # (training.methods.hnet.hypernet_config_for); a built hypernetwork needs a number.
    adapter_rank: Annotated[int, Field(ge=0, le=4096)] | Literal["auto"] = 0
    # Initial std of ``V`` (None: 1/sqrt(fan_in)); ``U`` starts at zero.
    adapter_v_std: float | None = Field(default=None, gt=0)
    # How many of the target's leading weight tensors get a correction of that rank.
    adapter_layers: int = Field(default=1, ge=1, le=64)
    # "add": ``U V`` corrects the generated tensor; "replace": the tensor is ``U V`` alone and
    # the hypernetwork does not generate it (its chunks cover the other tensors).
    adapter_mode: Literal["add", "replace"] = "add"
    # "private": ``U`` and ``V`` in every task's row; "shared": one ``U`` per corrected tensor,
    # a shared weight, and only ``V`` in the rows (needs freeze="after-first-task": the output
    # regularizer does not cover ``U``).
    adapter_basis: Literal["private", "shared"] = "private"
    # "after-first-task": the shared weights learn with the checkpoint's first task only; every
    # later task trains its own row (embedding, private factors), which moves no other task, so
    # nothing is forgotten and no regularizer runs.
    freeze: Literal["never", "after-first-task"] = "never"

    @model_validator(mode="after")
    def _check(self):
        if any(h <= 0 for h in self.hidden):
            raise ValueError(f"hidden sizes must be positive, got {self.hidden}")
        if self.kind == "full" and (self.layout != "flat" or self.task_chunk_emb_dim):
            raise ValueError("layout='columns' and task_chunk_emb_dim need kind='chunked'")
        if self.adapter_mode == "replace" and self.layout != "flat":
            raise ValueError("adapter_mode='replace' needs layout='flat'")
        if self.adapter_basis == "shared" and self.freeze != "after-first-task":
            raise ValueError("adapter_basis='shared' needs freeze='after-first-task' (the output "
                             "regularizer does not hold a shared basis in place)")
        return self


def _on_meta() -> bool:
    """Building on the meta device (shapes only)? Random initialization there is not free: its
    first call imports torch's compiler stack (0.9 s of every ``hnet-serve info``)."""
    return torch.get_default_device().type == "meta"


def column_chunks(param_shapes: Sequence[Sequence[int]]) -> list[tuple[int, int]]:
    """``(columns, rows)`` per target tensor for ``layout='columns'``: a weight
    ``(out, in, *k)`` has ``in`` chunks of ``out * prod(k)`` rows, a bias one chunk."""
    out = []
    for shape in param_shapes:
        if len(shape) >= 2:
            out.append((int(shape[1]), int(shape[0]) * math.prod(shape[2:])))
        else:
            out.append((1, math.prod(shape)))
    return out


def adapter_sites(param_shapes: Sequence[Sequence[int]], layers: int = 1
                  ) -> list[tuple[int, int, int]]:
    """``(offset, out, fan_in)`` of the first ``layers`` weight tensors (``(out, in, *k)``) in
    the target's flat weight vector: where a task's private low-rank corrections
    (``adapter_rank``) go."""
    sites, offset = [], 0
    for shape in param_shapes:
        if len(shape) >= 2 and len(sites) < layers:
            sites.append((offset, int(shape[0]), math.prod(int(x) for x in shape[1:])))
        offset += math.prod(shape)
    if len(sites) < layers:
        raise InputError(f"adapter_layers={layers} needs a target with that many weight "
                         f"matrices, it has {len(sites)}")
    return sites


class FactorCounts(NamedTuple):
    """What a task's private factors (``adapter_rank``) cost and cover, per unit of rank."""

    per_task: int  # numbers in every task's row (``V``, and ``U`` unless shared)
    shared: int  # numbers of the shared ``U`` (adapter_basis "shared")
    replaced: int  # target values the factors replace: not generated (adapter_mode "replace")
    smallest: int  # the smallest side of a factored matrix


def factor_counts(config: HypernetConfig, param_shapes: Sequence[Sequence[int]]
                  ) -> FactorCounts:
    """:class:`FactorCounts` of ``config``'s factors for a target of ``param_shapes``."""
    sites = adapter_sites(param_shapes, config.adapter_layers)
    shared = config.adapter_basis == "shared"
    return FactorCounts(
        per_task=sum(fan_in + (0 if shared else out) for _, out, fan_in in sites),
        shared=sum(out for _, out, _ in sites) if shared else 0,
        replaced=(sum(out * fan_in for _, out, fan_in in sites)
                  if config.adapter_mode == "replace" else 0),
        smallest=min(min(out, fan_in) for _, out, fan_in in sites))


def adapter_site(param_shapes: Sequence[Sequence[int]]) -> tuple[int, int, int]:
    """``(offset, out, fan_in)`` of the first weight tensor (see :func:`adapter_sites`)."""
    return adapter_sites(param_shapes)[0]


class HyperNetwork(nn.Module):
    """``f_h(e, Θ)``: a growable table of task embeddings plus the shared generator ``Θ``."""

    def __init__(self, config: HypernetConfig, n_params: int,
                 param_shapes: Sequence[Sequence[int]] | None = None) -> None:
        super().__init__()
        if n_params <= 0:
            raise InputError(f"target must have parameters, got n_params={n_params}")
        self.config = config
        self.n_params = n_params
        # (offset, out, fan_in) of the tensor each task corrects privately (adapter_rank > 0)
        self._adapters: list[tuple[int, int, int]] = []
        # per unit of rank: row numbers, shared numbers, replaced values (none without factors)
        self._factors = FactorCounts(0, 0, 0, 0)
        if config.adapter_rank == "auto":
            raise InputError("adapter_rank 'auto' is sized from a stored-size budget when "
                             "training builds the model; give a number here")
        if config.adapter_rank:
            if param_shapes is None:
                raise InputError("adapter_rank needs the target's param_shapes")
            self._adapters = adapter_sites(param_shapes, config.adapter_layers)
            self._factors = factor_counts(config, param_shapes)
        # What the generator's chunks cover: every target value but the replaced tensors.
        self.n_generated = n_params - self._factors.replaced
        if self.n_generated <= 0:
            raise InputError("adapter_mode='replace' leaves the hypernetwork nothing to generate")
        # column layout: (first chunk, columns, shape, scale) per target tensor
        self._blocks: list[tuple[int, int, tuple[int, ...], float]] = []
        # (output layer, rows used, first chunk, end chunk): contiguous chunks that use the
        # first ``rows`` rows of one output layer; the regularizer works group by group.
        groups: list[tuple[int, int, int, int]] = []
        if config.layout == "columns":
            if param_shapes is None or sum(math.prod(s) for s in param_shapes) != n_params:
                raise InputError("layout='columns' needs the target's param_shapes")
            first, scale = 0, 1.0
            for shape, (cols, r) in zip(param_shapes, column_chunks(param_shapes)):
                if len(shape) >= 2:  # a bias keeps the scale of the weight before it
                    scale = 1.0 / math.sqrt(math.prod(shape[1:]))
                groups.append((len(self._blocks), r, first, first + cols))
                self._blocks.append((first, cols, tuple(int(x) for x in shape), scale))
                first += cols
            self.chunk_size = max(g[1] for g in groups)
            self.num_chunks = first
        else:
            n_gen = self.n_generated
            self.chunk_size = min(config.chunk_size, n_gen) if config.kind == "chunked" \
                else n_gen
            self.num_chunks = math.ceil(n_gen / self.chunk_size)
            last = n_gen - (self.num_chunks - 1) * self.chunk_size
            if self.num_chunks > 1:
                groups.append((0, self.chunk_size, 0, self.num_chunks - 1))
            groups.append((0, last, self.num_chunks - 1, self.num_chunks))
        self.chunk_groups: tuple[tuple[int, int, int, int], ...] = tuple(groups)
        # Fixed factor on each chunk's output (all 1 in the flat layout); not a parameter.
        # Built with torch (not a Python list) so that a model built on the meta device to
        # validate a checkpoint allocates nothing, however many chunks its config asks for.
        scale_t = (torch.cat([torch.full((c,), sc) for _, c, _, sc in self._blocks])
                   if self._blocks else torch.ones(self.num_chunks))
        self.register_buffer("chunk_scale", scale_t, persistent=False)  # (C,)
        # adapter_basis "shared": one (out, r) basis U per corrected tensor, a shared weight
        self.adapter_u = nn.ParameterList(
            nn.Parameter(torch.empty(out, config.adapter_rank)) for _, out, _ in self._adapters
        ) if config.adapter_basis == "shared" else None
        if config.kind == "chunked":
            ce = config.chunk_emb_dim
            shape = (self.num_chunks, ce)  # (C, ce)
            self.chunk_embs = nn.Parameter(torch.empty(shape) if _on_meta() else torch.randn(shape))
        else:
            self.chunk_embs = None
        # The task embeddings are a list of rows so that each can be frozen on its own and the
        # table can grow without reallocating (and without touching) the existing rows.
        self.task_embs = nn.ParameterList()

        widths = list(config.hidden)
        if not widths:
            raise InputError("the hypernetwork needs at least one hidden layer")
        self.in_task = nn.Linear(config.task_emb_dim, widths[0])
        self.in_chunk = (
            nn.Linear(config.chunk_emb_dim, widths[0], bias=False)
            if self.chunk_embs is not None
            else None
        )
        tc = config.task_chunk_emb_dim
        self.in_code = nn.Linear(tc, widths[0], bias=False) if tc else None
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(widths))
        if self._blocks:  # one output layer per target tensor
            self.head = None
            self.heads = nn.ModuleList(
                nn.Linear(widths[-1], self.chunk_groups[i][1]) for i in range(len(self._blocks)))
        else:
            self.head = nn.Linear(widths[-1], self.chunk_size)
            self.heads = None
        self._act = activation_fn(config.activation)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The paper's code: Xavier weights, zero biases, N(0, 1) chunk embeddings."""
        if _on_meta():
            return  # a shape-only build (checkpoint validation): nothing to initialize
        for layer in [self.in_task, self.in_chunk, self.in_code, *self.hidden,
                      *self.output_layers]:
            if layer is None:
                continue
            nn.init.xavier_uniform_(layer.weight)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
        if self.chunk_embs is not None:
            nn.init.normal_(self.chunk_embs)
        for u in self.adapter_u or ():  # U V then starts with the variance of 1 / fan_in
            nn.init.normal_(u, std=1 / math.sqrt(u.shape[1]))

    @property
    def output_layers(self) -> list[nn.Linear]:
        """The output layer (flat layout) or one per target tensor (column layout)."""
        return [self.head] if self.head is not None else list(self.heads)

    # -- the embedding table ---------------------------------------------------------------
    @property
    def num_tasks(self) -> int:
        return len(self.task_embs)

    @property
    def code_dim(self) -> int:
        """Length of ``e`` plus the per-chunk codes: what the generator's MLP reads of a row."""
        return self.config.task_emb_dim + self.num_chunks * self.config.task_chunk_emb_dim

    @property
    def adapter_dim(self) -> int:
        """Numbers of one task's private factors ``U (out, r)`` (unless shared) and
        ``V (r, fan_in)`` (or 0)."""
        return self.config.adapter_rank * self._factors.per_task if self._adapters else 0

    @property
    def emb_dim(self) -> int:
        """Length of one task's embedding row: ``e``, its per-chunk codes and its private
        correction, if any."""
        return self.code_dim + self.adapter_dim

    @property
    def n_stored(self) -> int:
        """Everything the hypernetwork must keep to answer every task: shared weights, chunk
        embeddings and every task's embedding row."""
        return self.n_shared + self.num_tasks * self.emb_dim

    def add_task(
        self, embedding: torch.Tensor | None = None, generator: torch.Generator | None = None
    ) -> int:
        """Append a task embedding (``N(0, emb_init_std^2)`` unless given); returns its row."""
        dim = self.emb_dim
        if embedding is None:
            cfg, r = self.config, self.config.adapter_rank
            embedding = torch.randn(self.code_dim, generator=generator) * cfg.emb_init_std
            for _, out, fan_in in self._adapters:
                # V ~ N(0, 1/fan_in) as a layer's input projection. Added to generated weights,
                # U V starts at zero (U = 0, or V = 0 with a shared U): the task starts from
                # them. Replacing them, U ~ N(0, 1/r): U V starts like a fresh layer.
                v = torch.randn(r * fan_in, generator=generator) * (
                    cfg.adapter_v_std or 1 / math.sqrt(fan_in))
                if self.adapter_u is not None:
                    embedding = torch.cat([embedding, v if cfg.adapter_mode == "replace"
                                           else torch.zeros_like(v)])
                    continue
                u = (torch.randn(out * r, generator=generator) / math.sqrt(r)
                     if cfg.adapter_mode == "replace" else torch.zeros(out * r))
                embedding = torch.cat([embedding, u, v])
        embedding = torch.as_tensor(embedding, dtype=torch.float32).detach().clone()
        if embedding.shape != (dim,):
            raise InputError(f"task embedding must have shape ({dim},), got {tuple(embedding.shape)}")
        ref = self.in_task.weight
        self.task_embs.append(nn.Parameter(embedding.to(ref.device)))
        return self.num_tasks - 1

    def embeddings(self, task_ids: list[int] | torch.Tensor | None = None) -> torch.Tensor:
        """Stack task embeddings ``(K, E)`` (all tasks when ``task_ids`` is None)."""
        if task_ids is None:
            task_ids = range(self.num_tasks)
        ids = [int(i) for i in task_ids]
        for i in ids:
            if not 0 <= i < self.num_tasks:
                raise UnknownTaskError(f"#{i}")
        if not ids:
            return self.in_task.weight.new_zeros(0, self.emb_dim)
        return torch.stack([self.task_embs[i] for i in ids])

    def shared_parameters(self) -> list[nn.Parameter]:
        """Θ: every trainable parameter except the task embeddings."""
        emb_ids = {id(p) for p in self.task_embs}
        return [p for p in self.parameters() if id(p) not in emb_ids]

    @property
    def n_shared(self) -> int:
        """Trainable hypernetwork parameters (chunk embeddings included, task embeddings not)."""
        return sum(p.numel() for p in self.shared_parameters())

    def compression_ratio(self) -> float:
        return self.n_shared / self.n_params

    # -- generation ------------------------------------------------------------------------
    def features(self, emb: torch.Tensor, chunks: torch.Tensor | None = None) -> torch.Tensor:
        """Last hidden activation for every (task, chunk) pair: ``(K, E)`` -> ``(K, C, d)``;
        with ``chunks`` (a 1-D index of m chunks) only for those: ``(K, m, d)``."""
        e = self.config.task_emb_dim
        h = self.in_task(emb[:, :e]).unsqueeze(1)  # (K, 1, H0)
        if self.in_chunk is not None:
            ce = self.chunk_embs if chunks is None else self.chunk_embs[chunks]
            h = h + self.in_chunk(ce).unsqueeze(0)  # (K, C, H0)
        if self.in_code is not None:
            codes = emb[:, e:self.code_dim].reshape(emb.shape[0], self.num_chunks, -1)  # (K, C, tc)
            h = h + self.in_code(codes if chunks is None else codes[:, chunks])  # (K, C, H0)
        h = self._act(h)
        for layer in self.hidden:
            h = self._act(layer(h))
        return h  # (K, C, d)

    def project(self, feats: torch.Tensor,
                layers: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None
                ) -> torch.Tensor:
        """Output layers over features ``(K, C, d)`` -> generated values ``(K, n_generated)``
        (every target weight unless adapter_mode "replace" leaves some to the tasks' factors).

        ``layers``: ``(weight (S, d), bias (S,))`` per output layer in place of the module's
        own (the regularizer's shifted or frozen copies). In the flat layout rows of the
        result are contiguous views (the truncated tail of the last chunk is sliced off without
        a copy); the column layout assembles every tensor from its columns (one copy).
        """
        if layers is None:
            layers = [(m.weight, m.bias) for m in self.output_layers]
        k, d = feats.shape[0], feats.shape[-1]
        feats = feats.expand(k, self.num_chunks, d)
        if not self._blocks:
            weight, bias = layers[0]
            out = torch.addmm(bias, feats.reshape(k * self.num_chunks, d), weight.t())
            return out.view(k, self.num_chunks * self.chunk_size)[:, : self.n_generated]
        parts = []
        for (first, cols, shape, scale), (weight, bias) in zip(self._blocks, layers):
            f = feats[:, first : first + cols].reshape(k * cols, d)
            block = torch.addmm(bias, f, weight.t()) * scale  # (K*in, out * prod(k))
            if len(shape) >= 2:  # columns -> the tensor's own (out, in, *k) order
                block = block.view(k, cols, shape[0], -1).transpose(1, 2)
            parts.append(block.reshape(k, -1))
        return torch.cat(parts, dim=1)  # (K, n_generated)

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        """Generate weights from embeddings ``(K, E)`` -> ``(K, n_params)``."""
        if emb.dim() != 2 or emb.shape[1] != self.emb_dim:
            raise InputError(f"embeddings must be (K, {self.emb_dim}), got {tuple(emb.shape)}")
        return self.with_adapters(self.project(self.features(emb)), emb)

    def with_adapters(self, flat: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """Generated values ``(K, n_generated)`` -> the target's weights ``(K, n_params)``:
        each corrected tensor gets the task's ``U V`` added (or is ``U V``, adapter_mode
        "replace"). Old tasks' rows are frozen (and a shared ``U`` with them), so the factors
        are constants the output regularizer need not see."""
        if not self._adapters:
            return flat
        r, k, c = self.config.adapter_rank, emb.shape[0], self.code_dim
        replace = self.config.adapter_mode == "replace"
        parts, done, skipped = [], 0, 0  # generated columns used; replaced values before
        for i, (offset, out, fan_in) in enumerate(self._adapters):
            if self.adapter_u is not None:
                u = self.adapter_u[i]  # (out, r), broadcast over the K tasks
            else:
                u = emb[:, c : c + out * r].reshape(k, out, r)
                c += out * r
            v = emb[:, c : c + r * fan_in].reshape(k, r, fan_in)
            c += r * fan_in
            uv = torch.matmul(u, v).reshape(k, -1)
            start = offset - skipped  # where the tensor is (or would be) in ``flat``
            if replace:
                parts += [flat[:, done:start], uv]
                done, skipped = start, skipped + out * fan_in
            else:
                parts += [flat[:, done:start], flat[:, start:start + out * fan_in] + uv]
                done = start + out * fan_in
        return torch.cat([*parts, flat[:, done:]], dim=1)

    def generate(self, task_ids: list[int] | torch.Tensor | None = None) -> torch.Tensor:
        """Weights for stored tasks: ``(K, n_params)``; row k equals generating task k alone."""
        return self(self.embeddings(task_ids))

