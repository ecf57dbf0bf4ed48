"""The names earlier releases gave training folders, kept so a folder one of them made is found again.

Before the maths alone keyed a training folder (`LoraHyperparameters.fingerprint`), its name hashed
every setting the run config offered, `max_steps` included. `continuation.py` still looks for folders
named that way, so a run begun by an earlier release resumes. Frozen: never change what is hashed.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

# Defaults as they were when `legacy_fingerprint` was frozen, for settings whose default changed since
# (unset now means "chosen from the machine"), so an old folder's name is still computed the same way.
LEGACY_DEFAULTS = {"dataloader_num_workers": 0}

# The fields the run config offered when training folders were first named after a hash of the
# hyperparameters (`legacy_fingerprint`, the names folders got before the maths alone keyed them).
ALWAYS_FINGERPRINTED = (
    "learning_rate",
    "max_steps",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "target_modules",
    "checkpoint_every_n_steps",
    "seed",
    "vision_lr_scale",
    "gradient_checkpointing",
)


def legacy_fingerprint(settings: dict[str, Any], defaults: dict[str, Any], **launch_settings: Any) -> str:
    """Ten hex digits: the name an earlier release gave the folder of a run of `settings` (as JSON), where
    `defaults` are today's defaults; a setting at its default was left out unless always hashed."""
    settings = settings | {name: value for name, value in LEGACY_DEFAULTS.items() if settings[name] is None}
    defaults = defaults | LEGACY_DEFAULTS
    values = {
        name: value for name, value in settings.items() if name in ALWAYS_FINGERPRINTED or value != defaults[name]
    }
    values.update(launch_settings)
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:10]
