"""The chat prompt shared by evaluation and training.

Training teaches exactly the answer the evaluator scores (the bare maker name after the
assistant turn opens), so both build their messages here.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

DEFAULT_SYSTEM_PROMPT = "You excel at identifying car makers from pictures."
DEFAULT_USER_PROMPT = "What is the car maker of the car in this picture? Pick one from the following list: {makers}"


class PromptError(ValueError):
    """A prompt template that cannot be used."""


@dataclass(frozen=True)
class PromptTemplate:
    system: str = DEFAULT_SYSTEM_PROMPT
    user: str = DEFAULT_USER_PROMPT
    # What '{makers}' lists. None: the answers themselves (the maker task). The class task lists the makers
    # of its classes instead: 196 class names would add about 1,300 prompt tokens to every picture.
    listing: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if "{makers}" not in self.user:
            raise PromptError(
                f"The user prompt {self.user!r} has no '{{makers}}' placeholder; the model must be shown "
                "the list of makers it may answer with. Add '{makers}' where the list should go."
            )

    def user_text(self, makers: list[str] | tuple[str, ...]) -> str:
        return self.user.replace("{makers}", ", ".join(self.listing if self.listing is not None else makers))

    def messages(self, makers: list[str] | tuple[str, ...]) -> list[dict]:
        """Chat messages up to (not including) the assistant's answer; one image placeholder."""
        return [
            {"role": "system", "content": [{"type": "text", "text": self.system}]},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": self.user_text(makers)}]},
        ]

    @staticmethod
    def answer_messages(maker: str) -> list[dict]:
        return [{"role": "assistant", "content": [{"type": "text", "text": maker}]}]

    def fingerprint(self, makers: list[str] | tuple[str, ...]) -> str:
        """Short hash of the exact prompt, logged so runs with different prompts are never compared blindly."""
        blob = json.dumps({"system": self.system, "user": self.user_text(makers)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]
