"""What the tests check of a chart the pipeline writes."""

from __future__ import annotations

from pathlib import Path

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path: Path) -> None:
    """A PNG file with some content: the magic bytes and more than an empty canvas's few hundred bytes."""
    data = Path(path).read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 5000, f"{path}: {data[:8]!r}, {len(data)} bytes"
