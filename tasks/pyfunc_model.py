"""The MLflow pyfunc wrapper: the trained network plus its fitted preprocessing.

Loads with the standard client (``mlflow.pyfunc.load_model``) and predicts on raw
data-space rows (the feature transform and the train-split normalisation travel with the
model) or on already-featurised rows.
"""

from __future__ import annotations

import json
from typing import Any

import mlflow.pyfunc
import pandas as pd


class TabularPyfunc(mlflow.pyfunc.PythonModel):
    def load_context(self, context: Any) -> None:
        from tasks.payloads.tabular_model import load_model

        self.module, self.meta = load_model(context.artifacts["model"])
        with open(context.artifacts["feature_config"]) as fh:
            self.feature_config = json.load(fh)

    def predict(self, context: Any, model_input: Any, params: Any = None) -> Any:
        from tasks.features import transform
        from tasks.payloads.tabular_model import predict

        df = pd.DataFrame(model_input)
        cols = list(self.meta["feature_columns"])
        if not set(cols) <= set(df.columns):
            df, _ = transform(df, self.feature_config, inference=True)
        return predict(self.module, self.meta, df[cols])
