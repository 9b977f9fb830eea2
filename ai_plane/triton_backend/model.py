"""Triton Python-backend model: a LightGBM booster answering SCORE and CONTRIB.

Copied into every version directory of the model repository next to the
booster's `model.txt`. One `pred_contrib` prediction gives both outputs: the
TreeSHAP contributions (one per feature, then the bias) sum to the raw score,
whose logistic is the probability. Requests that Triton's dynamic batcher
grouped are predicted as one matrix. This file runs inside Triton's Python
stub process, not in the plane, so it imports nothing from Triplane.
"""

import os
from typing import Any

import lightgbm as lgb
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        path = os.path.join(args["model_repository"], args["model_version"], "model.txt")
        self.booster = lgb.Booster(model_file=path)

    def execute(self, requests: list[Any]) -> list[Any]:
        arrays = [pb_utils.get_input_tensor_by_name(r, "FEATURES").as_numpy() for r in requests]
        batch = np.concatenate(arrays) if len(arrays) > 1 else arrays[0]
        contrib = np.asarray(
            self.booster.predict(batch.astype(np.float64), pred_contrib=True, num_threads=1)
        )
        score = 1.0 / (1.0 + np.exp(-contrib.sum(axis=1, keepdims=True)))
        responses: list[Any] = []
        start = 0
        for array in arrays:
            end = start + array.shape[0]
            outputs = [
                pb_utils.Tensor("SCORE", score[start:end].astype(np.float32)),
                pb_utils.Tensor("CONTRIB", contrib[start:end].astype(np.float32)),
            ]
            responses.append(pb_utils.InferenceResponse(outputs))
            start = end
        return responses
