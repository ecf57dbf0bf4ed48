"""The demo source's dataset card: the README whose YAML header declares its features and splits, as the Hub's does.

`datasets.load_dataset(folder)` reads the split files and the ClassLabel names from this header, so
the generated folder loads exactly like `tanganke/stanford_cars`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import yaml


def dataset_card(class_names: Sequence[str], splits: dict[str, tuple[int, int]], settings: dict) -> str:
    """README.md with Hub-style YAML front matter: features (with all class names), splits, data files.

    The YAML is what `load_dataset` reads first for a local folder: `configs` maps split names to
    files, `dataset_info` gives the features (so ClassLabel names survive even without parquet
    metadata) and the expected row counts, which `load_dataset` checks against the files.
    """
    card = {
        "dataset_info": {
            "features": [
                {"name": "image", "dtype": "image"},
                {"name": "label", "dtype": {"class_label": {"names": {str(i): n for i, n in enumerate(class_names)}}}},
            ],
            "splits": [
                {"name": name, "num_bytes": nbytes, "num_examples": rows} for name, (rows, nbytes) in splits.items()
            ],
            "dataset_size": sum(nbytes for _, nbytes in splits.values()),
        },
        "configs": [
            {
                "config_name": "default",
                "data_files": [{"split": name, "path": f"data/{name}-*"} for name in splits],
            }
        ],
        "task_categories": ["image-classification"],
        "tags": ["synthetic", "stanford-cars-shaped"],
    }
    front = yaml.safe_dump(card, sort_keys=False, allow_unicode=True)
    body = (
        "# Synthetic Stanford Cars demo source\n\n"
        "Generated offline by `car_maker_pipeline.offline.demo_source.generate_demo_source`; shaped like "
        "`tanganke/stanford_cars` (same features, all 196 class names, parquet files under `data/`), "
        "with synthetic car drawings instead of photographs. Not real data: use it for demos and tests.\n\n"
        "Generation settings:\n\n```json\n" + json.dumps(settings, indent=2) + "\n```\n"
    )
    return f"---\n{front}---\n\n{body}"
