"""The registered classifier as an MLflow pyfunc model, defined from code (MLflow's models-from-code).

MLflow copies this file into the logged model and runs it when the model is loaded, by
`mlflow.pyfunc.load_model`, `mlflow models serve` or anything built on them; `set_model` at the
bottom says which object is the model. Loading reads the artifacts (the LoRA adapter folder and
the maker list) and the model config (base model id, revision and, for a local folder, its path;
the prompt; the image-token budget), and builds the same `MakerPredictor` the `classify` command
uses.

Input: a DataFrame with one image per row in the binary column `image` (raw bytes from Python; in
a JSON request to the scoring server, base64 text, which the server decodes). Output: one row per
image (`predictor.OUTPUT_SCHEMA`): the most probable `maker` and its calibrated `probability`, the
`answer` (that maker, or `unsure` below the registered confidence threshold) and the next two makers
with theirs. The temperature and threshold come from the model config too. An image that cannot be used fails the whole request with
MLflow's INVALID_PARAMETER_VALUE, which the scoring server answers with HTTP 400 and the reason.

`device`, `dtype` and `batch_size` in the model config choose where and how it runs (`auto`: CUDA
when present, bf16 there, fp32 on CPU); override them with `mlflow.pyfunc.load_model(uri,
model_config={"device": "cpu"})` or the environment variable `MLFLOW_PYFUNC_INFERENCE_CONFIG`.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import PythonModel

from car_maker_pipeline.serving.predictor import IMAGE_COLUMN


class CarMakerClassifier(PythonModel):
    """A LoRA-tuned LFM2-VL answering one maker per image, constrained to the maker list it was trained on."""

    def load_context(self, context):
        from car_maker_pipeline.serving.predictor import (
            ADAPTER_ARTIFACT,
            MAKERS_ARTIFACT,
            ClassifierCard,
            MakerPredictor,
        )

        config = dict(context.model_config or {})
        makers = json.loads(Path(context.artifacts[MAKERS_ARTIFACT]).read_text())
        self.predictor = MakerPredictor.load(
            ClassifierCard.from_model_config(config, makers),
            Path(context.artifacts[ADAPTER_ARTIFACT]),
            device=config.get("device", "auto"),
            dtype=config.get("dtype", "auto"),
            batch_size=int(config.get("batch_size", 16)),
        )

    def predict(self, context, model_input, params=None):
        import pandas as pd

        from car_maker_pipeline.serving.images import ImageInputError

        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        if IMAGE_COLUMN not in frame.columns:
            raise MlflowException.invalid_parameter_value(
                f"The input has no {IMAGE_COLUMN!r} column (it has {list(frame.columns)}); send one image per row "
                f"as bytes (base64 text in JSON) in a column named {IMAGE_COLUMN!r}."
            )
        try:
            return self.predictor.predict_bytes(list(frame[IMAGE_COLUMN]))
        except ImageInputError as error:
            raise MlflowException.invalid_parameter_value(f"Unusable image in the request: {error}") from error


mlflow.models.set_model(CarMakerClassifier())
