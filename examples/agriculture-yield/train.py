"""Start-up B's trainer, on aifactory's job runtime: it runs as a Slurm job (or a local
process) in its run directory, resumes from its checkpoint after a preemption or requeue,
and commits its metrics last."""

import json
import sys

import numpy as np
import torch
from model import YieldNet

from aifactory.tasks.payloads.job import Job, run_job


def rmse_r2(model: YieldNet, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    with torch.no_grad():
        pred = model(torch.from_numpy(x)).numpy().astype(np.float64)
    err = pred - y
    return float(np.sqrt(np.mean(err**2))), float(1 - np.mean(err**2) / max(np.var(y), 1e-12))


def train(job: Job) -> None:
    cfg = job.config
    torch.manual_seed(cfg["seed"])
    job.deterministic()
    x_tr, y_tr = job.split("train")  # standardised features, yield in t/ha
    x_va, y_va = job.split("val")
    x_te, y_te = job.split("test")
    init = {
        "in_features": x_tr.shape[1],
        "hidden": cfg["hidden"],
        "target_mean": float(y_tr.mean()),
        "target_std": float(y_tr.std() or 1.0),
    }
    model = YieldNet(**init)
    opt = torch.optim.Adam(model.parameters(), lr=cfg["lr"])
    fingerprint = json.dumps([cfg, job.inputs["splits"]], sort_keys=True)
    state = job.resume(fingerprint)  # None on a fresh start
    epoch = 0
    if state:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        epoch = state["epoch"]
    xt, yt = torch.from_numpy(x_tr), torch.from_numpy(y_tr)
    while epoch < cfg["epochs"]:
        gen = torch.Generator().manual_seed(cfg["seed"] + epoch)
        order = torch.randperm(len(xt), generator=gen)
        for i in range(0, len(xt), cfg["batch_size"]):
            idx = order[i : i + cfg["batch_size"]]
            loss = torch.nn.functional.mse_loss(model(xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        epoch += 1
        job.log(f"epoch {epoch}: val RMSE {rmse_r2(model, x_va, y_va)[0]:.3f} t/ha")
        if job.should_stop():  # Slurm's warning before the time limit, or a preemption
            job.stop_here(
                {"model": model.state_dict(), "opt": opt.state_dict(), "epoch": epoch},
                position=[epoch],
                fingerprint=fingerprint,
            )
    job.save("model_init.json", json.dumps(init))
    job.save("model.pt", model.state_dict())
    rmse, r2 = rmse_r2(model, x_te, y_te)
    job.commit(
        {"test_rmse": rmse, "test_r2": r2, "val_rmse": rmse_r2(model, x_va, y_va)[0]},
        finite=["test_rmse"],
    )


if __name__ == "__main__":
    sys.exit(run_job(train, "agriculture-yield"))
