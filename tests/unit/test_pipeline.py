import itertools
import stat
import tarfile
from collections import Counter

import pytest
import torch
from conftest import jpeg_bytes, make_shards

from data.masking import MaskSampler
from data.pipeline import PositionMismatch, ShardLoader, StreamPlan, shards_for_stream
from data.shards import expand_shards, read_shard
from data.transforms import MultiCrop

AUG = MultiCrop(global_size=32, global_scale=(0.5, 1.0), local_size=16, local_scale=(0.2, 0.5), n_local=2)
MASKS = MaskSampler((8, 8), "block", (0.1, 0.5), prob=0.5, min_block_patches=4)


def loader(urls, **kw):
    kw.setdefault("batch_size", 3)
    kw.setdefault("shuffle_buffer", 4)
    return ShardLoader(urls, augment=AUG, mask_sampler=MASKS, **kw)


def take(it, n):
    return list(itertools.islice(it, n))


def test_epoch_split_is_disjoint_and_complete(tmp_path):
    urls = make_shards(tmp_path, n_shards=9, per_shard=4)
    for epoch in range(3):
        seen = []
        for stream in range(4):  # 2 ranks x 2 workers
            seen += shards_for_stream(urls, seed=0, epoch=epoch, stream=stream, num_streams=4)
        assert sorted(seen) == sorted(urls)
    # the order changes with the epoch
    assert shards_for_stream(urls, 0, 0, 0, 4) != shards_for_stream(urls, 0, 1, 0, 4)


def test_two_ranks_two_workers_cover_every_sample_once(tmp_path):
    urls = make_shards(tmp_path, n_shards=8, per_shard=6)  # 2 shards = 12 samples = 4 batches per stream
    keys = []
    for rank in range(2):
        ld = loader(urls, rank=rank, world_size=2, num_workers=2)
        for batch in take(iter(ld), 8):
            keys += batch["keys"]
        assert all(s["epoch"] == 1 and s["consumed"] == 0 for s in ld.state_dict()["streams"]) or all(
            s["epoch"] == 0 and s["consumed"] == 12 for s in ld.state_dict()["streams"])
    assert len(keys) == 48 and len(set(keys)) == 48
    assert set(keys) == {f"s{s}_{i}" for s in range(8) for i in range(6)}


def test_batch_contents(tmp_path):
    urls = make_shards(tmp_path, n_shards=2, per_shard=5)
    batch = next(iter(loader(urls, batch_size=4)))
    assert batch["global_crops"].shape == (2, 4, 3, 32, 32) and batch["global_crops"].dtype == torch.uint8
    assert batch["local_crops"].shape == (2, 4, 3, 16, 16)
    assert batch["masks"].shape == (2, 4, 8, 8) and batch["masks"].dtype == torch.bool
    for key, label in zip(batch["keys"], batch["labels"].tolist()):
        assert label == int(key[1:].split("_")[0]) % 10


def _same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x["keys"] == y["keys"]
        for k in ("global_crops", "local_crops", "masks", "labels"):
            assert torch.equal(x[k], y[k]), k


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_twice_continues_with_unseen_samples(tmp_path, num_workers):
    urls = make_shards(tmp_path, n_shards=4, per_shard=7)  # uneven: batches cross shard and epoch ends
    straight = take(iter(loader(urls, num_workers=num_workers)), 17)

    first = loader(urls, num_workers=num_workers)
    head = take(iter(first), 5)
    state = first.state_dict()

    second = loader(urls, num_workers=num_workers)
    second.load_state_dict(state)
    middle = take(iter(second), 7)
    state2 = second.state_dict()

    third = loader(urls, num_workers=num_workers)
    third.load_state_dict(state2)
    tail = take(iter(third), 5)

    _same_batches(head + middle + tail, straight)
    assert max(s["epoch"] for s in third.state_dict()["streams"]) >= 1  # crossed an epoch boundary


def test_resume_does_not_decode_skipped_samples(tmp_path, monkeypatch):
    urls = make_shards(tmp_path, n_shards=2, per_shard=10)
    ld = loader(urls)
    take(iter(ld), 4)
    state = ld.state_dict()
    calls = Counter()
    original = StreamPlan.make_sample

    def counting(self, raw, seed, counters):
        calls["decoded"] += 1
        return original(self, raw, seed, counters)

    monkeypatch.setattr(StreamPlan, "make_sample", counting)
    resumed = loader(urls)
    resumed.load_state_dict(state)
    take(iter(resumed), 1)
    assert calls["decoded"] == 3  # exactly one batch, not the 12 samples skipped


def test_position_from_another_layout_is_refused(tmp_path):
    urls = make_shards(tmp_path, n_shards=4, per_shard=3)
    ld = loader(urls, num_workers=2)
    take(iter(ld), 2)
    other = loader(urls, num_workers=0)
    with pytest.raises(PositionMismatch, match="num_streams 2 -> 1"):
        other.load_state_dict(ld.state_dict())


def test_too_few_shards_is_refused_clearly(tmp_path):
    urls = make_shards(tmp_path, n_shards=3, per_shard=2)
    with pytest.raises(ValueError, match=r"3 shards cannot feed 2 ranks x 2 loader streams \(4 needed"):
        loader(urls, world_size=2, num_workers=2)


def test_corrupt_inputs_are_skipped_and_counted(tmp_path):
    bad = {
        0: [{"__key__": "corrupt", "jpg": b"\xff\xd8\xff not a jpeg", "cls": 1},
            {"__key__": "truncated_jpeg", "jpg": jpeg_bytes(5)[:200], "cls": 1},
            {"__key__": "zero_bytes", "jpg": b"", "cls": 1},
            {"__key__": "no_image", "cls": 3},
            {"__key__": "text_only", "txt": b"hello"}],
    }
    urls = make_shards(tmp_path, n_shards=3, per_shard=4, extra=bad)
    # a truncated tar: cut shard 2 inside its third sample
    data = open(urls[2], "rb").read()
    with tarfile.open(urls[2]) as t:
        cut = t.getmembers()[5]  # s2_2.jpg: s2_0 and s2_1 are complete before it
    open(urls[2], "wb").write(data[: cut.offset_data + 100])
    missing = str(tmp_path / "missing.tar")
    ld = loader(urls + [missing], batch_size=1, shuffle_buffer=1, shard_retries=1)
    keys = [b["keys"][0] for b in take(iter(ld), 10)]
    # all good samples arrive: 4 + 4 + the 2 complete ones before the cut
    assert sorted(keys) == sorted([f"s0_{i}" for i in range(4)] + [f"s1_{i}" for i in range(4)] + ["s2_0", "s2_1"])
    c = ld.counters
    assert c["corrupt_image"] == 3
    assert c["missing_image"] == 2
    assert c["truncated_shard"] == 1
    assert c["shard_open_error"] == 1


def test_shard_spec_forms(tmp_path):
    urls = make_shards(tmp_path, n_shards=3, per_shard=2)
    assert expand_shards(str(tmp_path / "shard-{0000..0002}.tar")) == urls
    assert expand_shards(str(tmp_path)) == urls
    listing = tmp_path / "train.txt"
    listing.write_text(f"# my shards\n{urls[0]}\n\n{tmp_path}/shard-{{0001..0002}}.tar\n")
    assert expand_shards(str(listing)) == urls
    assert expand_shards("s3://bucket/in22k-{000..002}.tar")[-1] == "s3://bucket/in22k-002.tar"


def test_pipe_and_s3_urls_stream(tmp_path):
    urls = make_shards(tmp_path, n_shards=2, per_shard=3)
    counters = Counter()
    piped = list(read_shard(f"pipe:cat {urls[0]}", counters))
    assert [s["__key__"] for s in piped] == ["s0_0", "s0_1", "s0_2"]
    # s3:// goes through the configured command; a stand-in CLI maps the bucket to a directory
    fake = tmp_path / "fake_s3"
    fake.write_text(f'#!/bin/sh\ncat "{tmp_path}/$(basename "$1")"\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    s3 = list(read_shard("s3://bucket/shard-0001.tar", counters, s3_command=f"{fake} {{url}}"))
    assert [s["__key__"] for s in s3] == ["s1_0", "s1_1", "s1_2"]
    assert not counters


def test_no_readable_samples_stops_clearly(tmp_path):
    urls = [str(tmp_path / f"gone-{i}.tar") for i in range(2)]
    with pytest.raises(RuntimeError, match="read no samples"):
        next(iter(loader(urls)))


def test_in_process_loading_leaves_the_global_rng_alone(tmp_path):
    urls = make_shards(tmp_path, n_shards=1, per_shard=4)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    next(iter(loader(urls, num_workers=0)))
    assert torch.equal(torch.rand(3), expected)
