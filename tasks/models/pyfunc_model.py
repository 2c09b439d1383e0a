"""The MLflow pyfunc wrappers: the trained network plus its fitted preprocessing.

Loads with the standard client (``mlflow.pyfunc.load_model``) and predicts on raw
data-space rows (the feature transform and the train-split normalisation travel with the
model) or on already-featurised rows.
"""

from __future__ import annotations

import json

import pandas as pd
from mlflow.pyfunc import PythonModel

# MLflow warns "Add type hints to the `predict` method" whenever a PythonModel subclass
# without them is defined, under its own warnings.simplefilter("once") (so no filter of
# ours can hide it). Ours take any frame on purpose; MLflow's own attribute for classes
# that skip type-hint validation says so (tests/unit/test_project.py fails if it stops
# working).


class TabularPyfunc(PythonModel):
    _skip_type_hint_validation = True

    def load_context(self, context):  # type: ignore[no-untyped-def]
        from aifactory.tasks.payloads.tabular_model import load_model

        self.module, self.meta = load_model(context.artifacts["model"])
        with open(context.artifacts["feature_config"]) as fh:
            self.feature_config = json.load(fh)
        self.code = context.artifacts.get("code")  # the feature function's folder, carried

    # No type hints on predict: MLflow would try to derive a schema from them.
    def predict(self, context, model_input, params=None):  # type: ignore[no-untyped-def]
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

    _skip_type_hint_validation = True

    def load_context(self, context):  # type: ignore[no-untyped-def]
        from aifactory.tasks.models.flavours import absolute_ref, load_model

        with open(context.artifacts["spec"]) as fh:
            self.spec = json.load(fh)
        self.code = context.artifacts["code"]
        ref = absolute_ref(self.spec["ref"], self.code)
        self.model = load_model(self.spec["flavour"], context.artifacts["model"], ref,
                                context.artifacts.get("init"))  # fmt: skip

    def predict(self, context, model_input, params=None):  # type: ignore[no-untyped-def]
        import numpy as np
        import pandas as pd

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
