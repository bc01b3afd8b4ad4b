"""The MLflow pyfunc model of a registered Kaleido version, logged as code (MLflow "models from code").

`kaleido.serving.build_model` saves this file with every version; MLflow runs it when the model loads (`mlflow
models serve`, `mlflow.pyfunc.load_model`). Code instead of a pickled instance: nothing to unpickle, and the
model follows the installed `kaleido` package (pinned by requirements.lock in the serving image).
"""

# No `from __future__ import annotations`: MLflow reads the predict hint as an object.
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel

from kaleido.serve_requests import generate_rows, refusal_message
from kaleido.serving import load_pipeline


class KaleidoS2VModel(PythonModel):
    """Subject-to-video generation with one registered version: rows (prompt, references) -> mp4 bytes."""

    def load_context(self, context: Any) -> None:
        base = context.artifacts.get("transformer")  # a LoRA version may reference its base instead
        self.pipe, self.config = load_pipeline(Path(base) if base else None, context.model_config or {},
                                               dict(context.artifacts))

    # pd.DataFrame is MLflow's "no schema from this hint" type: the explicit signature of build_model applies
    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        try:
            return generate_rows(self.pipe, self.config, model_input, params)
        except Exception as exc:
            message = refusal_message(exc)
            if message is None:
                raise
            # MLflow's scoring server answers an MlflowException with its code (400 here) and no stack trace
            raise MlflowException(message, error_code=INVALID_PARAMETER_VALUE) from None


mlflow.models.set_model(KaleidoS2VModel())
