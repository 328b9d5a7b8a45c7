"""Hypernetworks: task embedding -> all weights of a target network.

One class covers both architectures of the paper. A *chunked* hypernetwork maps
``[task embedding, chunk embedding_j]`` through an MLP to chunk ``j`` of the target's flat weight
vector; the chunk embeddings are shared by all tasks and the last chunk is truncated. The *full*
hypernetwork is the special case of a single chunk of size ``n_params`` with no chunk embedding.

Generation is batched: ``K`` embeddings in, ``(K, n_params)`` out, in one pass. The first layer
is split into its task part and its chunk part (``W [e; c] = W_e e + W_c c``), so the ``K x C``
input grid is never materialized, and the output layer is a single ``addmm`` over ``K * C`` rows.

The task-embedding table grows: ``add_task`` appends a row and never touches the shared weights,
so every existing task's generated weights stay bit-identical.
"""

from __future__ import annotations

import itertools
import math
from typing import Literal

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

    @model_validator(mode="after")
    def _check(self):
        if any(h <= 0 for h in self.hidden):
            raise ValueError(f"hidden sizes must be positive, got {self.hidden}")
        return self


def _on_meta() -> bool:
    """Building on the meta device (shapes only)? Random initialization there is not free: its
    first call imports torch's compiler stack (0.9 s of every ``hnet-serve info``)."""
    return torch.get_default_device().type == "meta"


class HyperNetwork(nn.Module):
    """``f_h(e, Θ)``: a growable table of task embeddings plus the shared generator ``Θ``."""

    def __init__(self, config: HypernetConfig, n_params: int) -> None:
        super().__init__()
        if n_params <= 0:
            raise InputError(f"target must have parameters, got n_params={n_params}")
        self.config = config
        self.n_params = n_params
        if config.kind == "chunked":
            self.chunk_size = min(config.chunk_size, n_params)
            self.num_chunks = math.ceil(n_params / self.chunk_size)
            ce = config.chunk_emb_dim
            shape = (self.num_chunks, ce)  # (C, ce)
            self.chunk_embs = nn.Parameter(torch.empty(shape) if _on_meta() else torch.randn(shape))
        else:
            self.chunk_size = n_params
            self.num_chunks = 1
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
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(widths))
        self.head = nn.Linear(widths[-1], self.chunk_size)
        self._act = activation_fn(config.activation)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The paper's code: Xavier weights, zero biases, N(0, 1) chunk embeddings."""
        if _on_meta():
            return  # a shape-only build (checkpoint validation): nothing to initialize
        for layer in [self.in_task, self.in_chunk, *self.hidden, self.head]:
            if layer is None:
                continue
            nn.init.xavier_uniform_(layer.weight)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
        if self.chunk_embs is not None:
            nn.init.normal_(self.chunk_embs)

    # -- the embedding table ---------------------------------------------------------------
    @property
    def num_tasks(self) -> int:
        return len(self.task_embs)

    def add_task(
        self, embedding: torch.Tensor | None = None, generator: torch.Generator | None = None
    ) -> int:
        """Append a task embedding (``N(0, emb_init_std^2)`` unless given); returns its row."""
        dim = self.config.task_emb_dim
        if embedding is None:
            embedding = torch.randn(dim, generator=generator) * self.config.emb_init_std
        embedding = torch.as_tensor(embedding, dtype=torch.float32).detach().clone()
        if embedding.shape != (dim,):
            raise InputError(f"task embedding must have shape ({dim},), got {tuple(embedding.shape)}")
        ref = self.head.weight
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
            return self.head.weight.new_zeros(0, self.config.task_emb_dim)
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
    def features(self, emb: torch.Tensor) -> torch.Tensor:
        """Last hidden activation for every (task, chunk) pair: ``(K, E)`` -> ``(K, C, d)``."""
        h = self.in_task(emb).unsqueeze(1)  # (K, 1, H0)
        if self.in_chunk is not None:
            h = h + self.in_chunk(self.chunk_embs).unsqueeze(0)  # (K, C, H0)
        h = self._act(h)
        for layer in self.hidden:
            h = self._act(layer(h))
        return h  # (K, C, d)

    def project(self, feats: torch.Tensor) -> torch.Tensor:
        """Output layer over features ``(K, C, d)`` -> flat weights ``(K, n_params)``.

        Rows of the result are contiguous views (the truncated tail of the last chunk is
        sliced off without a copy).
        """
        k = feats.shape[0]
        d = feats.shape[-1]
        feats = feats.expand(k, self.num_chunks, d).reshape(k * self.num_chunks, d)
        out = torch.addmm(self.head.bias, feats, self.head.weight.t())  # (K*C, chunk)
        return out.view(k, self.num_chunks * self.chunk_size)[:, : self.n_params]

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        """Generate weights from embeddings ``(K, E)`` -> ``(K, n_params)``."""
        if emb.dim() != 2 or emb.shape[1] != self.config.task_emb_dim:
            raise InputError(
                f"embeddings must be (K, {self.config.task_emb_dim}), got {tuple(emb.shape)}"
            )
        return self.project(self.features(emb))

    def generate(self, task_ids: list[int] | torch.Tensor | None = None) -> torch.Tensor:
        """Weights for stored tasks: ``(K, n_params)``; row k equals generating task k alone."""
        return self(self.embeddings(task_ids))
