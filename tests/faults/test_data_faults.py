"""Bad data costs samples, never the run: each failure is skipped, counted by kind, logged with its
shard, and summed over ranks in the metrics; too large a failed fraction stops the run clearly.
(Corrupt, zero-byte, truncated and non-image samples, truncated tars and missing shards are also
covered in tests/unit/test_pipeline.py::test_corrupt_inputs_are_skipped_and_counted.)"""

import itertools
import re
from collections import Counter

import pytest
from conftest import jpeg_bytes, make_shards
from fault_runs import launch, metrics, ok, tiny_args

import data.shards
from data.masking import MaskSampler
from data.pipeline import DataFailureError, ShardLoader
from data.shards import read_shard
from data.transforms import MultiCrop

AUG = MultiCrop(global_size=32, global_scale=(0.5, 1.0), n_local=0, local_size=16, local_scale=(0.1, 0.4))
MASKS = MaskSampler((4, 4), "block", (0.1, 0.5), 0.5, min_block_patches=2)


def _loader(urls, **kw):
    return ShardLoader(urls, augment=AUG, mask_sampler=MASKS, batch_size=4, shuffle_buffer=8, **kw)


def test_too_many_failures_stop_with_a_clear_error(tmp_path):
    bad = {s: [{"__key__": f"bad{s}_{i}", "jpg": b"not a jpeg"} for i in range(40)] for s in range(2)}
    urls = make_shards(tmp_path, n_shards=2, per_shard=80, extra=bad)  # 80 of 240 samples (33%) corrupt
    with pytest.raises(DataFailureError, match=r"data.train_shards: \d+ of the \d+ samples read .*corrupt_image"):
        list(itertools.islice(iter(_loader(urls, max_failed_fraction=0.2)), 200))
    # the same data under a tolerant threshold trains on
    batches = list(itertools.islice(iter(_loader(urls, max_failed_fraction=0.5)), 60))
    assert len(batches) == 60


def test_unopenable_shard_is_retried_then_skipped(tmp_path, monkeypatch, caplog):
    urls = make_shards(tmp_path, n_shards=1, per_shard=3)
    attempts = Counter()
    real = data.shards.open_url

    def flaky(url, *args):
        attempts[url] += 1
        if "gone" in url or attempts[url] < 2:  # the real shard fails once, then opens
            raise OSError("connection reset (injected)")
        return real(url, *args)

    monkeypatch.setattr(data.shards, "open_url", flaky)
    counters = Counter()
    assert len(list(read_shard(urls[0], counters, retries=2))) == 3 and not counters
    assert list(read_shard("s3://bucket/gone.tar", counters, retries=2)) == []
    assert attempts["s3://bucket/gone.tar"] == 3 and counters == {"shard_open_error": 1}
    assert "skipping shard s3://bucket/gone.tar" in caplog.text


def test_failing_pipe_url_is_counted_and_skipped(tmp_path):
    counters = Counter()
    assert list(read_shard(f"pipe:cat {tmp_path}/missing.tar", counters)) == []
    assert sum(counters.values()) >= 1 and set(counters) <= {"truncated_shard", "shard_close_error"}


@pytest.mark.slow
def test_failures_are_summed_over_ranks_in_the_metrics(tmp_path):
    bad = {s: [{"__key__": f"bad{s}_{i}", "jpg": jpeg_bytes(s)[:150], "cls": 1} for i in range(3)] for s in range(4)}
    make_shards(tmp_path / "shards", n_shards=4, per_shard=10, extra=bad)
    run = tmp_path / "run"
    result = ok(launch(tiny_args(run, 4, f"data.train_shards={tmp_path / 'shards'}", "data.shuffle_buffer=4"),
                       ranks=2))
    warned = re.findall(r"\[rank(\d)\] WARNING data.pipeline: \S+shard-\d+\.tar: sample bad\d_\d: cannot decode",
                        result.stderr)
    assert set(warned) == {"0", "1"}  # both ranks met corrupt samples, each logged with its shard
    last = [r for r in metrics(run) if "loss" in r][-1]
    assert last["data_corrupt_image"] == len(warned) == last["data_failures"]
    assert last["step"] == 4


def test_an_error_in_a_loader_worker_ends_the_run_instead_of_hanging(tmp_path):
    """A loader worker's exception reaches the training process, which stops with it and exits: the
    workers ignore SIGTERM (Slurm's, trainer-decided stops), so multiprocessing's exit hook, which
    terminates them by SIGTERM and then waits, waited for ever (data/pipeline.py _kill_workers_at_exit)."""
    p = launch(tiny_args(tmp_path / "run", 3, "data.num_workers=1"), faults=("worker-error:20",), timeout=240)
    assert p.returncode == 1, p.stderr[-3000:]
    assert "injected: an augmentation bug in a loader worker" in p.stderr
    assert "killed by signal" not in p.stderr  # the workers' deaths at exit are not a second error
