"""The accuracy predictor: an MLP from an architecture's encoding to its proxy accuracy (eq. 14.2).

(Not to be confused with the repository's ``predictors/`` folder, which holds measured reference
data: latency tables and tuned schedules.)

The thesis' best setting is the default: one-hot encoding, two linear layers with tanh between,
Adam, MSE. Targets are standardised for training and the scaling is folded back into the last
layer, so ``numpy_layers()`` computes accuracy directly (what the solver maximises).

``output="sigmoid"`` fits the logit of accuracy instead and returns its sigmoid: a linear output
extrapolates past 1.0 for students unlike its training set (1.0955 was seen on a mixed-precision
run), and then outranks the quantization term it is traded against. With it, the last layer
gives the logit and the solver applies the sigmoid.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from scipy import special, stats
from torch import nn

from .files import atomic_path
from .threads import torch_threads


def one_hot_encode(choices: Sequence[Sequence[int]], options_per_block: Sequence[int]) -> np.ndarray:
    offsets = np.concatenate([[0], np.cumsum(options_per_block)[:-1]]).astype(int)
    c = np.asarray(choices, dtype=int).reshape(-1, len(options_per_block))
    X = np.zeros((len(c), int(sum(options_per_block))), dtype=np.float32)
    X[np.arange(len(c))[:, None], c + offsets] = 1.0
    return X


def index_encode(choices: Sequence[Sequence[int]], options_per_block: Sequence[int]) -> np.ndarray:
    c = np.asarray(choices, dtype=np.float32).reshape(-1, len(options_per_block))
    return c / np.maximum(np.asarray(options_per_block, dtype=np.float32) - 1, 1)


_ACTS = {"tanh": nn.Tanh, "relu": nn.ReLU}
OUTPUTS = ("linear", "sigmoid")


class MLPPredictor(nn.Module):
    """``layers`` Linear maps with ``activation`` between; outputs proxy accuracy itself
    (``output="sigmoid"``: the sigmoid of the last layer, which then gives the logit)."""

    def __init__(self, in_dim: int, hidden: int = 64, layers: int = 2, activation: str = "tanh", output: str = "linear"):
        super().__init__()
        if activation not in _ACTS:
            raise ValueError(f"unknown predictor activation {activation!r} (one of {sorted(_ACTS)})")
        if output not in OUTPUTS:
            raise ValueError(f"unknown predictor output {output!r} (one of {list(OUTPUTS)})")
        if layers < 1:
            raise ValueError("the predictor needs at least one layer")
        self.config = {"in_dim": in_dim, "hidden": hidden, "layers": layers, "activation": activation, "output": output}
        dims = [in_dim] + [hidden] * (layers - 1) + [1]
        mods = []
        for i in range(layers):
            mods.append(nn.Linear(dims[i], dims[i + 1]))
            if i < layers - 1:
                mods.append(_ACTS[activation]())
        self.net = nn.Sequential(*mods)

    def forward(self, x):
        z = self.net(x).squeeze(-1)
        return torch.sigmoid(z) if self.config["output"] == "sigmoid" else z

    @torch.no_grad()
    def predict(self, X: np.ndarray) -> np.ndarray:
        self.eval()
        return self(torch.as_tensor(np.asarray(X), dtype=torch.float32)).numpy().astype(np.float64)

    def numpy_layers(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """(W (out, in), b) per Linear, in float64: what the solver rebuilds in Gekko (before any sigmoid)."""
        return [(m.weight.detach().numpy().astype(np.float64), m.bias.detach().numpy().astype(np.float64))
                for m in self.net if isinstance(m, nn.Linear)]

    def save(self, path: Path) -> None:
        with atomic_path(Path(path)) as tmp:
            torch.save({"config": dict(self.config), "state": dict(self.state_dict())}, tmp)

    @classmethod
    def load(cls, path: Path) -> "MLPPredictor":
        blob = torch.load(path, map_location="cpu", weights_only=True)
        model = cls(**blob["config"])
        model.load_state_dict(blob["state"])
        return model.eval()


def train_predictor(X, y, *, hidden=64, layers=2, activation="tanh", output="linear", optimizer="adam", lr=3e-3, epochs=300,
                    batch_size=64, weight_decay=1e-4, seed=0, clip=1e-3) -> MLPPredictor:
    """Fit by MSE (eq. 14.2) on standardised targets; deterministic for a seed, global RNG untouched.

    With ``output="sigmoid"`` the targets are logits of accuracies clipped to [clip, 1 − clip]
    (a student right on every proxy image would otherwise have an infinite target).
    """
    X = torch.as_tensor(np.asarray(X), dtype=torch.float32)
    y = np.asarray(y, dtype=np.float64)
    if output == "sigmoid":
        if y.min() < 0 or y.max() > 1:
            raise ValueError(f"a sigmoid-output predictor fits accuracies in [0, 1]; the targets span {y.min():.3g}..{y.max():.3g}")
        y = special.logit(np.clip(y, clip, 1 - clip))
    mu, sd = float(y.mean()), float(y.std()) or 1.0
    t = torch.as_tensor((y - mu) / sd, dtype=torch.float32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MLPPredictor(X.shape[1], hidden, layers, activation, output)
    if optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    elif optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=lr * 10, momentum=0.9, weight_decay=weight_decay)
    else:
        raise ValueError(f"unknown predictor optimizer {optimizer!r} (adam or sgd)")
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    gen = torch.Generator().manual_seed(seed)
    with torch_threads(1):  # matrices this small only lose to thread hand-offs
        for _ in range(epochs):
            model.train()
            for idx in torch.randperm(len(X), generator=gen).split(batch_size):
                loss = nn.functional.mse_loss(model.net(X[idx]).squeeze(-1), t[idx])  # before any sigmoid: t is standardised (logit) accuracy
                opt.zero_grad()
                loss.backward()
                opt.step()
            sched.step()
    last = model.net[-1]
    with torch.no_grad():  # fold the target scaling into the output layer
        last.weight.mul_(sd)
        last.bias.mul_(sd).add_(mu)
    return model.eval()


def spearman(pred, true) -> float:
    """Rank correlation; 0 when undefined (a constant prediction ranks nothing)."""
    pred, true = np.asarray(pred, dtype=np.float64), np.asarray(true, dtype=np.float64)
    if np.ptp(pred) == 0 or np.ptp(true) == 0:
        return 0.0
    r = stats.spearmanr(pred, true)[0]
    return 0.0 if np.isnan(r) else float(r)
