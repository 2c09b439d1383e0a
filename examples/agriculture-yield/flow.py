"""Start-up B's own Prefect flow from aifactory's stages: two learning rates trained side
by side on one feature set, the better one (validation RMSE) registered. Each stage is a
Prefect flow that takes and returns typed manifests (DataSnapshot, FeatureSet,
TrainedModel, ModelVersion), with all of the platform's guarantees.
    python flow.py
"""

from pathlib import Path

from prefect import flow

from aifactory.flows.ingest import ingest_flow
from aifactory.flows.preprocess import preprocess_flow
from aifactory.flows.register import register_flow
from aifactory.flows.train import train_flow
from aifactory.tasks.core.project import project_overrides

PROJECT = Path(__file__).with_name("aifactory.yaml")


@flow(name="agriculture-yield-two-rates")
def two_rates(profile: str = "local", rates: tuple[float, ...] = (0.001, 0.003)) -> str:
    startup, settings = project_overrides(PROJECT)
    snap = ingest_flow(profile, startup, settings)
    fset = preprocess_flow(snap, profile, startup, settings)
    runs = [
        train_flow(fset, profile, startup, {**settings, "training.config.lr": lr}) for lr in rates
    ]
    best = min(runs, key=lambda t: t.metrics["val_rmse"])
    mv = register_flow(best, fset, snap, profile, startup, settings)
    return mv.uri


if __name__ == "__main__":
    print(two_rates())
