"""Start-up C's trainer: a logistic regression (scikit-learn) on aifactory's job runtime.
It saves the estimator as model.pkl (the sklearn flavour) and commits held-out metrics."""

import pickle
import sys

from sklearn.linear_model import LogisticRegression
from sklearn.metrics import brier_score_loss, roc_auc_score

from aifactory.tasks.payloads.job import Job, PayloadError, run_job


def train(job: Job) -> None:
    cfg = job.config
    x_tr, y_tr = job.split("train")  # standardised features; y is 0/1
    x_te, y_te = job.split("test")
    x_va, y_va = job.split("val")
    if len(set(y_tr.tolist())) < 2:
        raise PayloadError("the train split has one class only: nothing to learn")
    model = LogisticRegression(C=cfg["C"], max_iter=cfg["max_iter"])
    model.fit(x_tr, y_tr)
    p_te = model.predict_proba(x_te)[:, 1]
    job.save("model.pkl", pickle.dumps(model))
    job.commit(
        {
            "test_auc": float(roc_auc_score(y_te, p_te)),
            "val_auc": float(roc_auc_score(y_va, model.predict_proba(x_va)[:, 1])),
            "test_brier": float(brier_score_loss(y_te, p_te)),
            "readmission_rate": float(y_tr.mean()),
        },
        finite=["test_auc"],
    )


if __name__ == "__main__":
    sys.exit(run_job(train, "health-readmission"))
