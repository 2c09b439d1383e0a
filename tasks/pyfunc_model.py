"""The MLflow pyfunc wrapper: the trained network plus its fitted preprocessing.

Loads with the standard client (``mlflow.pyfunc.load_model``) and predicts on raw
data-space rows (the feature transform and the train-split normalisation travel with the
model) or on already-featurised rows.
"""

from __future__ import annotations

import json

import pandas as pd
from mlflow.pyfunc import PythonModel


class TabularPyfunc(PythonModel):
    def load_context(self, context):  # type: ignore[no-untyped-def]
        from aifactory.tasks.payloads.tabular_model import load_model

        self.module, self.meta = load_model(context.artifacts["model"])
        with open(context.artifacts["feature_config"]) as fh:
            self.feature_config = json.load(fh)

    # No type hints on predict: MLflow would try to derive a schema from them.
    def predict(self, context, model_input, params=None):  # type: ignore[no-untyped-def]
        from aifactory.tasks.features import MOBILITY_FUNCTION, load_function, transform
        from aifactory.tasks.payloads.tabular_model import predict

        df = pd.DataFrame(model_input)
        cols = list(self.meta["feature_columns"])
        if not set(cols) <= set(df.columns):
            ref = self.feature_config.get("function", MOBILITY_FUNCTION)
            if ref == MOBILITY_FUNCTION:
                df, _ = transform(df, self.feature_config, inference=True)
            else:  # the project's own feature function (importable where the model loads)
                out = load_function(ref)(df, self.feature_config)
                df = out[0] if isinstance(out, tuple) else out
        return predict(self.module, self.meta, df[cols])
