import json
from collections import Counter

from data.digits import resolve_builtin
from data.pipeline import decode
from data.shards import expand_shards, read_shard


def test_digits_shards_are_real_and_split(digits_dirs):
    counts = {}
    labels = {}
    for split, d in digits_dirs.items():
        manifest = json.loads((d / "manifest.json").read_text())
        counts[split] = manifest["total"]
        c = Counter()
        keys = set()
        for url in expand_shards(str(d)):
            for raw in read_shard(url, c):
                img, label = decode(raw, c)
                assert img.size == (64, 64) and img.mode == "RGB"
                keys.add(raw["__key__"])
                labels.setdefault(split, Counter())[label] += 1
        assert not c and len(keys) == manifest["total"]
    assert counts == {"train": 1497, "val": 300}
    assert all(n == 30 for n in labels["val"].values()) and len(labels["val"]) == 10


def test_builtin_resolution(digits_dirs, tmp_path):
    assert resolve_builtin("/data/x-{0..9}.tar", None, str(tmp_path)) == ("/data/x-{0..9}.tar", None)
    train, val = resolve_builtin("builtin:digits", None, str(digits_dirs["train"].parents[1]))
    assert train == str(digits_dirs["train"]) and val == str(digits_dirs["val"])
