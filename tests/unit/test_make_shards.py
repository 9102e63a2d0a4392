import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from data.shards import expand_shards, read_shard

ROOT = Path(__file__).resolve().parents[2]


def image_folder(root: Path) -> dict[str, bytes]:
    """3 classes x 5 images: JPEGs (kept byte for byte) and one PNG per class, plus a broken file."""
    rng = np.random.default_rng(0)
    files = {}
    for c in ("n01440764", "n01443537", "n01484850"):
        (root / c).mkdir(parents=True)
        for i in range(5):
            path = root / c / (f"{i}.png" if i == 0 else f"{i}.JPEG")
            Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(
                path, format="PNG" if i == 0 else "JPEG")
            files[str(path)] = path.read_bytes()
    (root / "n01440764" / "broken.jpg").write_bytes(b"\xff\xd8\xff\x00garbage")  # copied, fails at decode
    (root / "n01443537" / "unreadable.png").write_bytes(b"not a png")  # cannot be re-encoded: skipped
    return files


def run(*args):
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "make_shards.py"), *map(str, args)],
                          capture_output=True, text=True, check=True)


def read_all(out: Path) -> dict[str, dict]:
    counters = Counter()
    samples = {}
    for url in expand_shards(str(out)):
        for s in read_shard(url, counters):
            samples[json.loads(s["json"])["path"]] = s
    assert not counters
    return samples


def test_image_folder_round_trip_and_resume(tmp_path):
    files = image_folder(tmp_path / "src")
    out = tmp_path / "shards"
    run(tmp_path / "src", out, "--samples-per-shard", 4, "--workers", 2)
    manifest = json.loads((out / "manifest.json").read_text())
    classes = json.loads((out / "classes.json").read_text())
    assert classes == {"n01440764": 0, "n01443537": 1, "n01484850": 2}
    assert manifest["total"] == 16 and manifest["num_shards"] == 5  # 17 sources, 1 unreadable
    assert len(manifest["unreadable"]) == 1 and "unreadable.png" in manifest["unreadable"][0]
    assert sum(s["count"] for s in manifest["shards"]) == 16

    samples = read_all(out)
    assert set(files) <= set(samples)
    for path, data in files.items():
        s = samples[path]
        assert int(s["cls"]) == classes[Path(path).parent.name]
        if path.endswith(".JPEG"):
            assert s["jpg"] == data  # copied, not re-encoded
        else:
            assert s["jpg"][:3] == b"\xff\xd8\xff"  # PNG re-encoded as JPEG
    # shuffled: the first shard mixes classes
    first = list(read_shard(str(out / "shard-000000.tar"), Counter()))
    assert len({int(s["cls"]) for s in first}) > 1

    # resume: a deleted shard is written again, identical; the others are left alone
    kept = (out / "shard-000001.tar").stat().st_mtime_ns
    before = (out / "shard-000003.tar").read_bytes()
    (out / "shard-000003.tar").unlink()
    result = run(tmp_path / "src", out, "--samples-per-shard", 4, "--workers", 2)
    assert "4 already written" in result.stderr
    assert (out / "shard-000003.tar").read_bytes() == before
    assert (out / "shard-000001.tar").stat().st_mtime_ns == kept
    assert json.loads((out / "manifest.json").read_text())["total"] == 16


def test_list_file_with_class_names(tmp_path):
    files = image_folder(tmp_path / "src")
    listing = tmp_path / "list.tsv"
    paths = sorted(p for p in files if p.endswith(".JPEG"))
    listing.write_text("".join(f"{Path(p).relative_to(tmp_path)}\t{'cat' if i % 2 else 'dog'}\n"
                               for i, p in enumerate(paths)))
    out = tmp_path / "shards"
    run(listing, out, "--samples-per-shard", 100, "--no-shuffle")
    assert json.loads((out / "classes.json").read_text()) == {"cat": 0, "dog": 1}
    samples = read_all(out)
    assert [int(samples[p]["cls"]) for p in paths] == [1 if i % 2 == 0 else 0 for i in range(len(paths))]
