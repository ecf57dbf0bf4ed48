"""Benchmark: what preparing one picture costs on the CPU, step by step, at each photo size.

    python bench/bench_processor_cost.py             # 5 sizes, 12 pictures each
    python bench/bench_processor_cost.py --small     # 4 pictures each

What is measured
----------------
For each size (a thumbnail, the demo's 128x96, and photo sizes up to Stanford Cars' largest,
5,616 x 3,744), pictures from the demo renderer (offline/demo_source.py) are JPEG-encoded in memory
(quality 90), then, one picture at a time, as the evaluator prepares them:
- decode   `Image.open(bytes)` + `load()`, full resolution
- ready    `model_ready` (RGB, at most 8:1)
- real     LFM2-VL's real image processor (`Lfm2VlImageProcessor()`, the Hub models' settings:
           tiles of 512 px and a thumbnail; 70 to 2,273 image tokens), `return_tensors="pt"`
- tiny     the demo models' processor (offline/tokenizer.py `build_processor`: one small picture)
Medians in milliseconds per picture, with the image tokens the real processor makes. Torch runs
with 1 intra-op thread (`--threads`), as one preparing thread would.
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
from _common import RESULTS_DIR, format_table, library_versions, machine_info, median, save_results  # noqa: E402
from PIL import Image  # noqa: E402

from car_maker_pipeline.model_inputs.image_tokens import image_token_count  # noqa: E402
from car_maker_pipeline.model_inputs.images import model_ready  # noqa: E402

NAME = "bench_processor_cost"
SIZES = [(64, 48), (128, 96), (640, 480), (1600, 1200), (5616, 3744)]


def jpeg_pictures(size: tuple[int, int], count: int) -> list[bytes]:
    import numpy as np

    from car_maker_pipeline.offline.demo_source import DEMO_MAKERS
    from car_maker_pipeline.offline.population import drawing_size
    from car_maker_pipeline.offline.rendering import classes_by_maker, render_car

    pictures, names = [], classes_by_maker()
    for index in range(count):
        maker = DEMO_MAKERS[index % len(DEMO_MAKERS)]
        rng = np.random.default_rng(index)
        picture = render_car(maker, names[maker][0][1], rng, drawing_size(size)).resize(size, Image.Resampling.BILINEAR)
        buffer = io.BytesIO()
        picture.convert("RGB").save(buffer, format="JPEG", quality=90)
        pictures.append(buffer.getvalue())
    return pictures


def timed(function, *args) -> tuple[float, object]:
    started = time.perf_counter()
    result = function(*args)
    return (time.perf_counter() - started) * 1000, result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="4 pictures per size")
    parser.add_argument("--pictures", type=int, default=None, help="pictures per size (default 12)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0 = torch's default)")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "car_maker_bench")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / f"{NAME}.json", help="JSON results path")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    from transformers import Lfm2VlImageProcessor

    from car_maker_pipeline.offline.tokenizer import build_processor

    count = args.pictures or (4 if args.small else 12)
    started_all = time.perf_counter()
    machine = machine_info()
    processors = {"real": Lfm2VlImageProcessor(), "tiny": build_processor().image_processor}
    rows, results = [], []
    for size in SIZES:
        times: dict[str, list[float]] = {"decode": [], "ready": [], "real": [], "tiny": []}
        for data in jpeg_pictures(size, count + 1):
            decode_ms, picture = timed(lambda d: Image.open(io.BytesIO(d)).convert("RGB"), data)
            ready_ms, ready = timed(model_ready, picture)
            stage = {"decode": decode_ms, "ready": ready_ms}
            for name, processor in processors.items():
                stage[name], _ = timed(lambda p, r: p(images=[[r]], return_tensors="pt"), processor, ready)
            for name, value in stage.items():
                times[name].append(value)
        times = {name: values[1:] for name, values in times.items()}  # the first: one-off set-up
        tokens = image_token_count(processors["real"], *size)
        result = {"size": list(size), "pictures": count, "image_tokens_real": tokens}
        result.update({f"{name}_ms": median(values) for name, values in times.items()})
        results.append(result)
        rows.append([f"{size[0]}x{size[1]}", tokens, *(result[f"{n}_ms"] for n in ("decode", "ready", "real", "tiny"))])
        print(f"  {size[0]}x{size[1]}: done", flush=True)
    print()
    print(
        format_table(
            ["size", "image tokens (real)", "decode ms", "model_ready ms", "real processor ms", "tiny processor ms"],
            rows,
        )
    )
    save_results(
        args.out, NAME, machine, library_versions("torch", "transformers", "PIL"), started_all,
        torch_threads=torch.get_num_threads(), results=results,
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
