"""Start-up B's network: standardised features in, yield (t/ha) out."""

import torch
from torch import nn


class YieldNet(nn.Module):
    def __init__(
        self, in_features: int, hidden: int = 32, target_mean: float = 0.0, target_std: float = 1.0
    ) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_features, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, 1),
        )
        self.register_buffer("scale", torch.tensor([target_mean, target_std]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1) * self.scale[1] + self.scale[0]
