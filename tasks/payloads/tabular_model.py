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
    """Linear layers of the given hidden widths with ReLU between, one output."""

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
    """A hash of the weights (name-sorted tensors, CPU bytes): same wherever they load."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def norm_arrays(meta: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, float, float]:
    """(feature means, feature stds, target mean, target std); target as-is when unfitted."""
    norm = meta["normalisation"]
    cols = meta["feature_columns"]
    missing = [c for c in cols if c not in norm]
    if missing:
        raise ValueError(f"normalisation has no mean/std for feature columns {missing}")
    mean = np.array([norm[c]["mean"] for c in cols], dtype=np.float32)
    std = np.array([norm[c]["std"] for c in cols], dtype=np.float32)
    std = np.where(std > 0, std, np.float32(1.0)).astype(np.float32)  # constant column
    t = norm.get(meta["target"], {"mean": 0.0, "std": 1.0})
    t_std = float(t["std"]) if float(t["std"]) > 0 else 1.0
    return mean, std, float(t["mean"]), t_std


def load_model(path: str) -> tuple[MLP, dict[str, Any]]:
    """The network (eval mode, CPU) and its metadata: architecture, columns, normalisation."""
    blob = torch.load(path, map_location="cpu", weights_only=False)
    arch = blob["architecture"]
    module = MLP(int(arch["in_features"]), [int(h) for h in arch["hidden"]])
    module.load_state_dict(blob["state_dict"])
    module.eval()
    meta = {k: v for k, v in blob.items() if k != "state_dict"}
    return module, meta


def _feature_matrix(frame: Any, cols: list[str]) -> np.ndarray:
    """Columns ``cols`` of a pyarrow Table/RecordBatch, a pandas DataFrame or a dict."""
    if hasattr(frame, "column_names"):
        names = list(frame.column_names)
    elif hasattr(frame, "columns"):
        names = list(frame.columns)
    else:
        names = list(frame)
    missing = [c for c in cols if c not in names]
    if missing:
        raise ValueError(f"input rows lack feature columns {missing} (have {names})")
    if hasattr(frame, "column_names"):  # Arrow: no pandas round trip
        arrays = [np.asarray(frame.column(c).to_numpy(zero_copy_only=False)) for c in cols]
    else:
        arrays = [np.asarray(frame[c]) for c in cols]
    if not arrays:
        return np.zeros((0, 0), dtype=np.float32)
    return np.column_stack(arrays).astype(np.float32)


def predict(module: MLP, meta: dict[str, Any], frame: Any) -> np.ndarray:
    """Predict the target (original units) for raw rows holding the feature columns."""
    x = _feature_matrix(frame, list(meta["feature_columns"]))
    mean, std, t_mean, t_std = norm_arrays(meta)
    x = (x - mean) / std
    module.eval()
    with torch.no_grad():
        y = module(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))).numpy()
    return (y.astype(np.float64) * t_std + t_mean).reshape(-1)
