"""The registered model: an MLflow PythonModel over the trained LM (the pyfunc flavour).

``predict`` takes rows with a ``text`` column and returns each text's bits per byte under
the model (lower: a more typical review), computed on the CPU."""

import json
import math
import os

import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel


class ReviewLM(PythonModel):
    def load_context(self, context):
        import torch

        from aifactory.tasks.payloads.train_lm import TinyLM

        folder = context.artifacts["model"]
        with open(os.path.join(folder, "config.json")) as fh:
            arch = json.load(fh)
        self.context = int(arch["context"])
        self.model = TinyLM(arch["layers"], arch["d_model"], arch["heads"], self.context)
        state = torch.load(
            os.path.join(folder, "weights.pt"), map_location="cpu", weights_only=True
        )
        self.model.load_state_dict(state, strict=True)
        self.model.eval()

    def predict(self, context, model_input: pd.DataFrame, params=None):
        import torch

        out = []
        for text in pd.DataFrame(model_input)["text"].astype(str):
            data = np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)
            if len(data) < 2:
                out.append(float("nan"))
                continue
            ids = torch.from_numpy(data[-(self.context + 1) :])
            with torch.no_grad():
                logits = self.model(ids[None, :-1])
                loss = torch.nn.functional.cross_entropy(logits[0].float(), ids[1:])
            out.append(float(loss) / math.log(2))
        return np.asarray(out, dtype=np.float64)
