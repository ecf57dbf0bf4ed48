"""Training domain: LoRA fine-tuning of LFM2-VL into a car-maker classifier (TRL SFTTrainer + PEFT), no Dagster.

- config.py: `LoraHyperparameters`, every hyperparameter with its range and default; to TRL and PEFT.
- targets.py: which layers the target names adapt, checked against the model.
- sft_data.py: `image` + `maker` rows as TRL prompt/completion examples.
- sampling.py: the order training rows are drawn in, natural or maker-balanced.
- augmentation.py: light random changes to training pictures as they are read.
- checkpoints.py: completion markers, quarantine of unusable checkpoints, where to resume.
- trainer.py: `build_trainer` and `train_lora`.
- mlflow_callback.py: losses streamed to MLflow, buffered while it is down.
- mlflow_run.py: the MLflow run of a training folder.
- distributed.py: training over several processes under `accelerate launch`.
- partition.py: `train_model`, what the `lora_checkpoints` asset runs for one model.

Only config.py is imported when Dagster loads the definitions; the rest is imported inside the step.
"""
