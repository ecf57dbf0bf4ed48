"""Serving: the fine-tuned classifier as a product outside the pipeline.

An MLflow pyfunc model (models-from-code, `pyfunc_model.py`, registered by `recording/registry.py`)
whose files are verified against the hashes recorded on its version whenever it loads
(`integrity.py`); the predictor both it and the `classify` command run (`predictor.py`); the one
decoding rule for incoming image bytes (`images.py`), what one request may hold and how each of its
formats arrives (`requests.py`), and which files are read at all (`files.py`); batch predictions over
a folder of incoming images (`batch.py`) and the merged export of the champion (`export.py`).
Nothing here imports Dagster; the assets in `orchestration/assets/serving.py` call these functions.
"""
