"""The reference implementation: hypnettorch 0.0.4 (the paper authors' library) in our trainer.

hypnettorch ships the networks and the regularizer but not the experiment loop, so the loop here
mirrors the paper's training loop (hypercl): per step, generate the current task's weights with
``ChunkedHMLP.forward(cond_id=task)``, run its ``MLP`` main network on them, back-propagate the
task loss, step the embedding optimizer, add ``beta * calc_fix_target_reg(hnet, task,
targets=get_current_targets(task, hnet))`` (all previous tasks, targets computed once per task)
and step the optimizer of the shared parameters. It is a :class:`training.trainer.ContinualMethod`,
so :func:`training.trainer.run_tasks` gives it exactly the same batches, iterations and
evaluation as our ``hnet`` method; only the model and the regularizer differ.

Same sizes as ours: the main network has the target's layer sizes, the hypernetwork the same
chunk size, hidden layers and embedding sizes (asserted by parameter count), initialized with
the same scheme (Xavier weights, zero biases, N(0, 1) chunk and task embeddings), and fed the
same normalized inputs (our target normalizes inside the model; here the inputs are normalized
before the main network with the same mean and std).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hnet_serve.errors import ConfigError, InputError
from hnet_serve.model import HNetModel
from hnet_serve.training.config import TrainConfig
from hnet_serve.training.data import TaskData
from hnet_serve.training.evaluate import Predict
from hnet_serve.training.methods.base import ContinualMethod, StepStats, task_seed
from hnet_serve.training.methods.hnet import build_model


class HypnettorchMethod(ContinualMethod):
    """The paper's method, implemented with hypnettorch's ``ChunkedHMLP``/``HMLP``, ``MLP`` and
    ``calc_fix_target_reg``; sizes taken from the model our ``hnet`` method would build."""

    name = "hypnettorch"

    def __init__(self, config: TrainConfig, tasks: list[TaskData]) -> None:
        from hypnettorch.hnets.chunked_mlp_hnet import ChunkedHMLP
        from hypnettorch.hnets.mlp_hnet import HMLP
        from hypnettorch.mnets.mlp import MLP

        ours: HNetModel = build_model(config, tasks)  # the sizes to match
        tc, hc = ours.target_config, ours.hypernet_config
        if tc.kind != "mlp" or tc.num_heads != 1:
            raise ConfigError("the hypnettorch reference runs single-head MLP targets only")
        self.config = config
        self.mean = torch.tensor(tc.input_mean).reshape(1, -1)
        self.std = torch.tensor(tc.input_std).reshape(1, -1)
        torch.manual_seed(config.seed)
        self.mnet = MLP(n_in=tc.input_size, n_out=tc.num_classes, hidden_layers=list(tc.hidden),
                        no_weights=True, verbose=False)
        common = {"layers": list(hc.hidden), "cond_in_size": hc.task_emb_dim,
                      "num_cond_embs": len(tasks), "verbose": False}
        if hc.kind == "chunked":
            self.hnet = ChunkedHMLP(self.mnet.param_shapes, chunk_size=hc.chunk_size,
                                    chunk_emb_size=hc.chunk_emb_dim, **common)
        else:
            self.hnet = HMLP(self.mnet.param_shapes, **common)
        self.hnet.custom_init()  # Xavier weights, zero biases (as ours)
        expected = ours.hypernet.n_shared + len(tasks) * hc.task_emb_dim
        if self.hnet.num_params != expected:
            raise ConfigError(
                f"hypnettorch hypernetwork has {self.hnet.num_params} parameters, ours {expected}"
            )
        self.n_shared = ours.hypernet.n_shared
        self.n_target = ours.target.n_params
        self.task_index: dict[str, int] = {}
        self.num_classes: dict[str, int] = {}
        self.current = -1
        self.classes = 0  # of the task being learned
        self.targets: list | None = None
        self.theta_optim: torch.optim.Optimizer | None = None
        self.emb_optim: torch.optim.Optimizer | None = None

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], -1)  # (B, in)
        return (x - self.mean) / self.std

    def begin_task(self, index: int, task: TaskData) -> None:
        from hypnettorch.utils.hnet_regularizer import get_current_targets

        if index >= len(self.hnet.conditional_params):
            raise InputError("more tasks than task embeddings were created")
        self.current, self.classes = index, task.num_classes
        self.task_index[task.name] = index
        self.num_classes[task.name] = task.num_classes
        # Embedding of a new task: N(0, 1) with the same per-task seed as ours.
        g = torch.Generator().manual_seed(task_seed(self.config.seed, 1_000 + index))
        with torch.no_grad():
            emb = self.hnet.conditional_params[index]
            emb.copy_(torch.randn(emb.shape, generator=g))
        self.targets = get_current_targets(index, self.hnet) if index > 0 else None
        self.theta_optim = torch.optim.Adam(self.hnet.unconditional_params, lr=self.config.lr)
        self.emb_optim = torch.optim.Adam([self.hnet.conditional_params[index]], lr=self.config.lr)

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> StepStats:
        from hypnettorch.utils.hnet_regularizer import calc_fix_target_reg

        i, beta = self.current, self.config.beta
        calc_reg = i > 0 and beta > 0
        self.theta_optim.zero_grad()
        self.emb_optim.zero_grad()
        weights = self.hnet.forward(cond_id=i)
        logits = self.mnet.forward(self._normalize(x), weights=weights)
        loss = F.cross_entropy(logits[:, : self.classes], y)
        loss.backward(retain_graph=calc_reg)
        self.emb_optim.step()
        reg_value = 0.0
        if calc_reg:
            reg = calc_fix_target_reg(self.hnet, i, targets=self.targets)
            (beta * reg).backward()
            reg_value = float(reg.detach())
        self.theta_optim.step()
        return StepStats(float(loss.detach()), reg_value)

    def end_task(self, index: int, task: TaskData) -> None:
        self.targets = None
        self.theta_optim = self.emb_optim = None

    def predictor(self, task_name: str) -> Predict:
        i, c = self.task_index[task_name], self.num_classes[task_name]
        with torch.no_grad():
            weights = [w.detach() for w in self.hnet.forward(cond_id=i)]

        def predict(xb: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return self.mnet.forward(self._normalize(xb), weights=weights)[:, :c]

        return predict
