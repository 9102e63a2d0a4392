import io
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data.shards import write_shard

# Loader workers and the tests share 2 cores: keep torch from oversubscribing them.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Without a GPU, Triton kernels run in Triton's interpreter on CPU tensors. It is chosen when a
# kernel is defined, so it must be set before any test imports models.kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def jpeg_bytes(seed: int, size: tuple[int, int] = (40, 48)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def make_shards(root: Path, n_shards: int, per_shard: int, extra: dict | None = None) -> list[str]:
    """n_shards tar files of per_shard samples keyed `s{shard}_{i}` (label = shard % 10).
    `extra` maps a shard index to a list of additional raw samples appended to it."""
    urls = []
    for s in range(n_shards):
        samples = [{"__key__": f"s{s}_{i}", "jpg": jpeg_bytes(1000 * s + i), "cls": s % 10}
                   for i in range(per_shard)]
        samples += (extra or {}).get(s, [])
        path = root / f"shard-{s:04d}.tar"
        write_shard(path, samples)
        urls.append(str(path))
    return urls


@pytest.fixture(scope="session")
def digits_dirs(tmp_path_factory):
    from data.digits import digits_shards

    return digits_shards(tmp_path_factory.mktemp("cache"))
