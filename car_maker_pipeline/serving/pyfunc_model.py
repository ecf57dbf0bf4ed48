"""The registered classifier as an MLflow pyfunc model, defined from code (MLflow's models-from-code).

MLflow copies this file into the logged model and runs it when the model is loaded, by
`mlflow.pyfunc.load_model`, `mlflow models serve` or anything built on them; `set_model` at the
bottom says which object is the model. Loading reads the artifacts (the LoRA adapter folder and
the maker list) and the model config (base model id, revision and, for a local folder, its path;
the prompt; the image-token budget), and builds the same `MakerPredictor` the `classify` command
uses.

Input: a DataFrame with one image per row in the binary column `image`: the file's bytes from Python
(base64 text is accepted too), base64 text in a JSON or CSV request; every request format of
MLflow's scoring server works, `serving/requests.py` lists how each arrives. At most
MAX_REQUEST_ROWS images and MAX_REQUEST_BYTES per request. Output: one row per image, with the
caller's index (so `frame.join(model.predict(frame))` pairs each answer with its image)
(`predictor.OUTPUT_SCHEMA`): the most probable `maker` and its calibrated `probability`, the `answer`
(that maker, or `unsure` below the registered confidence threshold), its `level` (`maker` or `unsure`;
class, maker or unsure for a class-task model) and the next two makers with theirs. The temperature and threshold come from the model config too. An unusable image, or a
request over a bound, fails the whole request with MLflow's INVALID_PARAMETER_VALUE naming the row,
which the scoring server answers with HTTP 400 and the reason.

`predict` carries type hints (a DataFrame in, a DataFrame out): MLflow validates the input against
the logged signature itself, and a DataFrame hint keeps that signature (and every JSON format of the
scoring server) rather than one inferred from the hint.

Loading verifies the version's files against the hashes recorded when it was registered
(`serving/integrity.py`): a changed maker list, adapter or model config is refused, naming the file.

`device`, `dtype` and `batch_size` in the model config choose where and how it runs (`auto`: CUDA
when present, bf16 there, fp32 on CPU); override them with `mlflow.pyfunc.load_model(uri,
model_config={"device": "cpu"})` or the environment variable `MLFLOW_PYFUNC_INFERENCE_CONFIG`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import PythonModel

from car_maker_pipeline.serving.predictor import IMAGE_COLUMN


class CarMakerClassifier(PythonModel):
    """A LoRA-tuned LFM2-VL answering one maker per image, constrained to the maker list it was trained on."""

    def load_context(self, context):
        from car_maker_pipeline.serving.integrity import ModelIntegrityError, verify_registered_files
        from car_maker_pipeline.serving.predictor import (
            ADAPTER_ARTIFACT,
            MAKERS_ARTIFACT,
            ClassifierCard,
            MakerPredictor,
        )

        makers_file = Path(context.artifacts[MAKERS_ARTIFACT])
        try:
            self.registered_as = verify_registered_files(makers_file.parents[1])  # <root>/artifacts/makers.json
        except ModelIntegrityError as error:
            raise MlflowException(str(error)) from error
        config = dict(context.model_config or {})
        makers = json.loads(makers_file.read_text())
        self.predictor = MakerPredictor.load(
            ClassifierCard.from_model_config(config, makers),
            Path(context.artifacts[ADAPTER_ARTIFACT]),
            device=config.get("device", "auto"),
            dtype=config.get("dtype", "auto"),
            batch_size=int(config.get("batch_size", 16)),
        )

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        from car_maker_pipeline.serving.images import ImageInputError
        from car_maker_pipeline.serving.requests import ACCEPTED_FORMS, RequestError, request_images

        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        if IMAGE_COLUMN not in frame.columns:
            raise MlflowException.invalid_parameter_value(
                f"The input has no {IMAGE_COLUMN!r} column (it has {list(frame.columns)}); send {ACCEPTED_FORMS}."
            )
        default_index = frame.index.equals(pd.RangeIndex(len(frame)))
        labels = [
            f"row {row}" if default_index else f"row {row} (index {label!r})" for row, label in enumerate(frame.index)
        ]
        try:
            images = request_images(list(frame[IMAGE_COLUMN]), labels)
            answers = self.predictor.predict_bytes(images, labels)
        except RequestError as error:
            raise MlflowException.invalid_parameter_value(f"Request too large: {error}") from error
        except ImageInputError as error:
            raise MlflowException.invalid_parameter_value(f"Unusable image in the request: {error}") from error
        answers.index = frame.index  # the caller's own index: frame.join(predict(frame)) pairs rows rightly
        return answers


mlflow.models.set_model(CarMakerClassifier())
