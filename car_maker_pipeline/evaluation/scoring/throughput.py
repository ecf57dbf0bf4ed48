"""What the evaluator computed, to see its waste: prompt tokens real vs. padded, forward passes, image tokens."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class ThroughputStats:
    """What the evaluator computed, to see waste: prompt tokens real vs. padded, passes, image tokens."""

    images: int = 0
    real_tokens: int = 0
    padded_tokens: int = 0
    image_passes: int = 0  # per image, the forward passes its batch ran, summed
    image_tokens: list[int] = field(default_factory=list)

    def add_batch(self, real_tokens: int, padded_tokens: int, forward_passes: int, image_tokens: list[int]) -> None:
        self.images += len(image_tokens)
        self.real_tokens += real_tokens
        self.padded_tokens += padded_tokens
        self.image_passes += forward_passes * len(image_tokens)
        self.image_tokens.extend(image_tokens)

    def summary(self) -> dict[str, float]:
        tokens = np.asarray(self.image_tokens or [0])
        return {
            "image_tokens_mean": float(tokens.mean()),
            "image_tokens_p95": float(np.percentile(tokens, 95)),
            "prompt_tokens_real": float(self.real_tokens),
            "prompt_tokens_computed": float(self.padded_tokens),
            "padded_to_real_tokens": self.padded_tokens / self.real_tokens if self.real_tokens else float("nan"),
            "forward_passes_per_image": self.image_passes / self.images if self.images else float("nan"),
        }
