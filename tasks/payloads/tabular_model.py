"""The reference tabular model (an MLP) and how to load it and predict with it.

No Prefect, no tasks/ imports: this runs inside Slurm jobs and inside MLflow's pyfunc.
``model.pt`` holds the state dict, the architecture, the feature columns and the
normalisation fitted on the train split, so prediction works on featurised rows.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import torch
from torch import nn


class MLP(nn.Module):
    def __init__(self, in_features: int, hidden: list[int]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)


def state_dict_sha256(module: nn.Module) -> str:
    """A hash of the weights that is the same wherever the same weights are loaded."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def norm_arrays(meta: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, float, float]:
    norm = meta["normalisation"]
    cols = meta["feature_columns"]
    mean = np.array([norm[c]["mean"] for c in cols], dtype=np.float32)
    std = np.array([norm[c]["std"] for c in cols], dtype=np.float32)
    t = norm.get(meta["target"], {"mean": 0.0, "std": 1.0})
    return mean, std, float(t["mean"]), float(t["std"])


def load_model(path: str) -> tuple[MLP, dict[str, Any]]:
    blob = torch.load(path, map_location="cpu", weights_only=False)
    arch = blob["architecture"]
    module = MLP(arch["in_features"], arch["hidden"])
    module.load_state_dict(blob["state_dict"])
    module.eval()
    meta = {k: v for k, v in blob.items() if k != "state_dict"}
    return module, meta


def predict(module: MLP, meta: dict[str, Any], frame: Any) -> np.ndarray:
    """Predict the target for rows holding the feature columns (pandas or Arrow)."""
    cols = meta["feature_columns"]
    if hasattr(frame, "to_pandas"):
        frame = frame.to_pandas()
    x = frame[cols].to_numpy(dtype=np.float32)
    mean, std, t_mean, t_std = norm_arrays(meta)
    x = (x - mean) / std
    with torch.no_grad():
        y = module(torch.from_numpy(np.ascontiguousarray(x))).numpy()
    return (y * t_std + t_mean).astype(np.float64)
