"""The MLflow pyfunc wrappers: the trained network plus its fitted preprocessing.

Loads with the standard client (``mlflow.pyfunc.load_model``) and predicts on raw
data-space rows (the feature transform and the train-split normalisation travel with the
model) or on already-featurised rows.
"""

from __future__ import annotations

import json
from typing import Any

import pandas as pd
from mlflow.pyfunc import PythonModel, PythonModelContext

# Typed as MLflow asks ("Add type hints to the `predict` method", its warning for a
# PythonModel without them): the input is a pandas DataFrame, a hint MLflow accepts without
# deriving a column schema from it, as both models take either raw data-space rows or
# already-featurised rows. (tests/unit/test_registry_mlflow.py: registering warns nothing.)


class TabularPyfunc(PythonModel):
    def load_context(self, context: PythonModelContext) -> None:
        from aifactory.tasks.payloads.tabular_model import load_model

        self.module, self.meta = load_model(context.artifacts["model"])
        with open(context.artifacts["feature_config"]) as fh:
            self.feature_config = json.load(fh)
        self.code = context.artifacts.get("code")  # the feature function's folder, carried

    def predict(self, context: PythonModelContext, model_input: pd.DataFrame,
                params: dict[str, Any] | None = None) -> Any:  # fmt: skip
        from aifactory.tasks.models.flavours import absolute_ref
        from aifactory.tasks.payloads.tabular_model import predict
        from aifactory.tasks.stages.features import call_features, load_function

        df = pd.DataFrame(model_input)
        cols = list(self.meta["feature_columns"])
        if not set(cols) <= set(df.columns):  # raw rows: the project's feature function
            ref = str(self.feature_config["function"])
            fn = load_function(str(absolute_ref(ref, self.code)) if self.code else ref)
            out = call_features(fn, df, self.feature_config, inference=True)
            df = out[0] if isinstance(out, tuple) else out
        return predict(self.module, self.meta, df[cols])


class ProjectPyfunc(PythonModel):
    """A project's model as one MLflow pyfunc: raw rows -> the project's features ->
    standardised as in training -> the model's predictions."""

    def load_context(self, context: PythonModelContext) -> None:
        from aifactory.tasks.models.flavours import absolute_ref, load_model

        with open(context.artifacts["spec"]) as fh:
            self.spec = json.load(fh)
        self.code = context.artifacts["code"]
        ref = absolute_ref(self.spec["ref"], self.code)
        self.model = load_model(self.spec["flavour"], context.artifacts["model"], ref,
                                context.artifacts.get("init"))  # fmt: skip

    def predict(self, context: PythonModelContext, model_input: pd.DataFrame,
                params: dict[str, Any] | None = None) -> Any:  # fmt: skip
        import numpy as np

        from aifactory.tasks.models.flavours import absolute_ref
        from aifactory.tasks.stages.features import call_features, load_ref

        df = pd.DataFrame(model_input)
        cols = list(self.spec["feature_columns"])
        text = list(self.spec["feature_config"].get("text", []))
        if not set([*cols, *text]) <= set(df.columns):
            fc = dict(self.spec["feature_config"])
            fn = load_ref(str(absolute_ref(fc.get("function"), self.code)), "features.function")
            out = call_features(fn, df, fc, inference=True)
            df = out[0] if isinstance(out, tuple) else pd.DataFrame(out)
        norm = self.spec["normalisation"]
        mean = np.array([norm[c]["mean"] for c in cols], np.float32)
        std = np.array([norm[c]["std"] for c in cols], np.float32)
        x = (df[cols].to_numpy(dtype=np.float32) - mean) / np.where(std > 0, std, 1.0)
        x = x.astype(np.float32)
        flavour = self.spec["flavour"]
        if flavour == "pytorch":
            import torch

            with torch.no_grad():
                y = self.model(torch.from_numpy(np.ascontiguousarray(x))).cpu().numpy()
            return y.reshape(-1) if y.ndim == 2 and y.shape[1] == 1 else y
        if flavour == "sklearn":
            return self.model.predict(x)
        frame = pd.DataFrame(x, columns=cols)
        for c in text:  # free text goes to the model as it is
            frame[c] = df[c].astype(str).to_numpy()
        return self.model.predict(context, frame)
