"""Jobs: the data preparation, and the per-model work (one run per model and task partition)."""

import dagster as dg

from car_maker_pipeline.orchestration.partitions import model_partitions

data_job = dg.define_asset_job(
    "data_job",
    selection=dg.AssetSelection.groups("data"),
    description="Download (or generate) Stanford Cars and build the maker dataset, with its checks.",
)

baseline_job = dg.define_asset_job(
    "baseline_job",
    selection=dg.AssetSelection.groups("baseline"),
    partitions_def=model_partitions,
    description="Score one base model (a partition) on the test split.",
)

training_job = dg.define_asset_job(
    "training_job",
    selection=dg.AssetSelection.groups("training", "evaluation"),
    partitions_def=model_partitions,
    description="Fine-tune one model for one task (a partition) with LoRA, then score and register its checkpoints.",
)

serving_job = dg.define_asset_job(
    "serving_job",
    selection=dg.AssetSelection.groups("serving"),
    partitions_def=model_partitions,
    description="Export one model's (a partition's) champion merged, and classify the incoming images with it.",
)

sweep_job = dg.define_asset_job(
    "sweep_job",
    selection=dg.AssetSelection.groups("sweep"),
    partitions_def=model_partitions,
    description="Search one model's (a partition's) LoRA hyperparameters with Optuna.",
)

labeling_job = dg.define_asset_job(
    "labeling_job",
    selection=dg.AssetSelection.groups("labeling"),
    partitions_def=model_partitions,
    description="Rank one model's (a partition's) doubtful incoming images into a review queue for labeling.",
)

jobs = [data_job, baseline_job, training_job, serving_job, sweep_job, labeling_job]
