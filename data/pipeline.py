"""Multi-crop batches streamed from WebDataset shards, with a position that survives restarts.

Order. Each rank runs `num_streams = max(1, num_workers)` streams; stream `s` of rank `r` is
global stream `g = r * num_streams + s`. In epoch `e` the shard list is permuted with
`(seed, e)` and stream `g` reads every `world_size * num_streams`-th shard of it from offset
`g`, so the streams of one epoch cover every shard exactly once. Raw (undecoded) samples pass a
shuffle buffer seeded with `(seed, e, g)`; the n-th sample a stream takes in an epoch is decoded,
augmented and masked with a seed of `(seed, e, g, n)`. Streams never end: when a stream's shards
run out it starts its next epoch, so every rank can take the same number of steps and no rank
waits at an epoch boundary for another.

Position. Every batch comes with (stream, epoch, samples taken, failure counters). The loader
records it when the batch reaches the consumer, so `state_dict()` names exactly what was trained
on. Resuming replays each stream's raw bytes through its shuffle buffer and drops the samples
already taken, without decoding them, then continues with the unseen ones. DataLoader hands out
batches round-robin over its workers, starting at worker 0; on resume worker `w` serves stream
`(w + batches) % num_streams`, so the interleaving also continues where it stopped.
"""

from __future__ import annotations

import atexit
import copy
import hashlib
import io
import itertools
import logging
import multiprocessing
import random
import signal
from collections import Counter
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .masking import MaskSampler
from .shards import IMAGE_KEYS, expand_shards, read_shard
from .transforms import ClassifyCrop, MultiCrop

log = logging.getLogger(__name__)

# Failures the loader counts, by kind (shard-level ones come from shards.read_shard).
SAMPLE_FAILURES = ("missing_image", "corrupt_image")
FAILURE_KINDS = ("shard_open_error", "truncated_shard", "shard_close_error", "duplicate_member", *SAMPLE_FAILURES,
                 "bad_label")
# The failed fraction is judged only once this many samples have been read (a few bad files at the
# start of a stream are not a trend).
MIN_SAMPLES_FOR_FRACTION = 200


class DataFailureError(RuntimeError):
    """Too large a fraction of the samples read could not be used."""


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1, dtype=np.uint64)[0] >> 1)


def shards_for_stream(urls: list[str], seed: int, epoch: int, stream: int, num_streams: int) -> list[str]:
    """The shards global stream `stream` (of `num_streams` over all ranks) reads in `epoch`."""
    order = np.random.default_rng(_seed(seed, epoch)).permutation(len(urls))
    return [urls[i] for i in order[stream::num_streams]]


def shuffle_buffer(items: Iterator, size: int, rng: random.Random) -> Iterator:
    """Reservoir-style shuffle with a buffer of `size` items."""
    buf: list = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        i = rng.randrange(size)
        yield buf[i]
        buf[i] = item
    rng.shuffle(buf)
    yield from buf


def decode(raw: dict, counters: Counter) -> tuple[Image.Image, int] | None:
    """(RGB image, label or -1) from a raw sample; None (counted, logged) when it has no usable image."""
    key = next((k for k in IMAGE_KEYS if k in raw), None)
    if key is None:
        counters["missing_image"] += 1
        log.warning("%s: sample %s has no image (members: %s)", raw["__url__"], raw["__key__"],
                    ", ".join(k for k in raw if not k.startswith("__")))
        return None
    try:
        img = Image.open(io.BytesIO(raw[key]))
        img.load()  # decode now, so a broken file fails here and is counted
        if img.mode != "RGB":
            img = img.convert("RGB")
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad files
        counters["corrupt_image"] += 1
        log.warning("%s: sample %s: cannot decode %s: %s", raw["__url__"], raw["__key__"], key, e)
        return None
    label = -1
    if "cls" in raw:
        try:
            label = int(raw["cls"])
        except ValueError:
            counters["bad_label"] += 1
    return img, label


@dataclass(frozen=True)
class StreamPlan:
    """Everything that fixes the order of samples and what becomes of them."""

    urls: tuple[str, ...]
    augment: MultiCrop | ClassifyCrop
    mask_sampler: MaskSampler
    batch_size: int
    rank: int = 0
    world_size: int = 1
    num_streams: int = 1
    seed: int = 0
    shuffle_buffer: int = 1000
    shard_retries: int = 0
    s3_command: str = "aws s3 cp --quiet {url} -"
    keys: frozenset[str] | None = None  # the only samples read (None: all); others are passed over undecoded

    def layout(self) -> dict:
        digest = hashlib.sha1("\n".join(self.urls).encode()).hexdigest()
        out = {"world_size": self.world_size, "num_streams": self.num_streams, "seed": self.seed,
               "batch_size": self.batch_size, "shuffle_buffer": self.shuffle_buffer,
               "num_shards": len(self.urls), "shards_sha1": digest}
        if self.keys is not None:
            out["keys_sha1"] = hashlib.sha1("\n".join(sorted(self.keys)).encode()).hexdigest()
        return out

    def raw_samples(self, stream: int, epoch: int, counters: Counter) -> Iterator[dict]:
        g = self.rank * self.num_streams + stream
        shards = shards_for_stream(list(self.urls), self.seed, epoch, g, self.world_size * self.num_streams)
        raw = itertools.chain.from_iterable(
            read_shard(u, counters, self.shard_retries, self.s3_command) for u in shards)
        if self.keys is not None:
            raw = (r for r in raw if r["__key__"] in self.keys)
        return shuffle_buffer(raw, self.shuffle_buffer, random.Random(_seed(self.seed, epoch, g)))

    def make_sample(self, raw: dict, sample_seed: int, counters: Counter):
        # In the training process (num_workers=0) the global RNG belongs to the model: fork it.
        fork = torch.random.fork_rng(devices=[]) if get_worker_info() is None else nullcontext()
        with fork:
            # The CPU generator alone: torch.manual_seed also queues a seed for each device backend,
            # recording a stack trace each time (a third of the loader's time per sample, seen here).
            torch.default_generator.manual_seed(sample_seed)
            decoded = decode(raw, counters)
            if decoded is None:
                return None
            img, label = decoded
            views = self.augment(img)
        if self.mask_sampler.spread:  # drawn for the whole batch in `collate`, from the samples' seeds
            return views, sample_seed, label, raw["__key__"]
        rng = np.random.default_rng(sample_seed)
        masks = [torch.from_numpy(self.mask_sampler(rng)) for _ in views.global_crops]
        return views, masks, label, raw["__key__"]

    def collate(self, items: list) -> dict:
        views, masks, labels, keys = zip(*items)
        if self.mask_sampler.spread:  # `masks` holds the sample seeds: the batch's masks are a function of them
            G, B = len(views[0].global_crops), len(items)
            drawn = torch.from_numpy(self.mask_sampler.batch(G * B, np.random.default_rng(list(masks))))
            masks = [list(drawn.view(G, B, *drawn.shape[1:])[:, b]) for b in range(B)]
        g, loc = [v.global_crops for v in views], [v.local_crops for v in views]
        n_local, size = self.augment.n_local, self.augment.local_size
        extra = {}
        if views[0].second_crops is not None:  # BEiT: the tokenizer's view of each global crop, [G, B, 3, s, s]
            extra["second_crops"] = torch.stack([torch.stack(v) for v in zip(*(v.second_crops for v in views))])
        for name in ("global_params", "local_params"):  # colour work left to the consumer: [V, B, N_PARAMS]
            rows = [getattr(v, name) for v in views]
            if rows[0] is not None and rows[0]:
                extra[name] = torch.stack([torch.stack(r) for r in zip(*rows)])
        return {**extra,
            "global_crops": torch.stack([torch.stack(v) for v in zip(*g)]),  # [G, B, 3, H, W] uint8
            "local_crops": (torch.stack([torch.stack(v) for v in zip(*loc)]) if n_local
                            else torch.empty((0, len(items), 3, size, size), dtype=torch.uint8)),
            "masks": torch.stack([torch.stack(v) for v in zip(*masks)]),  # [G, B, h, w] bool
            "labels": torch.tensor(labels, dtype=torch.long),
            "keys": list(keys),
        }

    def batches(self, stream: int, start: dict) -> Iterator[tuple[dict, dict]]:
        """Endless (batch, position) pairs of one stream, from position `start`."""
        epoch, taken = start["epoch"], start["consumed"]
        counters = Counter(start.get("counters", {}))
        g = self.rank * self.num_streams + stream
        pending: list = []
        while True:
            samples = self.raw_samples(stream, epoch, counters)
            # Fast-forward over samples a previous run already trained on: no decoding.
            skipped = sum(1 for _ in itertools.islice(samples, taken))
            if skipped < taken:
                log.warning("stream %d epoch %d has %d samples, fewer than the %d recorded; "
                            "did the shards change? continuing with the next epoch", g, epoch, skipped, taken)
            fresh = 0
            for raw in samples:
                taken += 1
                fresh += 1
                counters["samples_read"] += 1
                item = self.make_sample(raw, _seed(self.seed, epoch, g, taken), counters)
                if item is None:
                    continue
                pending.append(item)
                if len(pending) == self.batch_size:
                    position = {"stream": stream, "epoch": epoch, "consumed": taken, "counters": dict(counters)}
                    yield self.collate(pending), position
                    pending = []
            if fresh == 0 and skipped == 0:
                raise RuntimeError(
                    f"loader stream {g} read no samples in epoch {epoch} from its shards "
                    f"(failures so far: {dict(counters) or 'none'}); check the shard URLs")
            epoch, taken = epoch + 1, 0


class _Streams(IterableDataset):
    def __init__(self, plan: StreamPlan, starts: list[dict], rotation: int):
        self.plan, self.starts, self.rotation = plan, starts, rotation

    def __iter__(self):
        info = get_worker_info()
        stream = ((info.id if info else 0) + self.rotation) % self.plan.num_streams
        return self.plan.batches(stream, self.starts[stream])


class PositionMismatch(ValueError):
    """A saved data position that was recorded under a different data layout."""


def _ignore_stop_signals(worker_id: int) -> None:
    """Slurm's SIGTERM (scancel, pre-emption, the time limit) reaches every process of the job, loader
    workers too, whose default is to die of it; the training process would then fail on the lost
    worker instead of saving. The training process decides when to stop; its workers end with it."""
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


@atexit.register  # registered after multiprocessing's own exit hook, so it runs before it
def _kill_workers_at_exit() -> None:
    """At interpreter exit multiprocessing ends the daemonic children it still has by SIGTERM and then
    waits for them; loader workers ignore SIGTERM (above), so a training process leaving with live
    workers (an exception that keeps the loader's iterator alive in its traceback: a worker's own
    error, re-raised here) waited for ever: kill them, as multiprocessing would have."""
    children = [c for c in multiprocessing.active_children() if c.daemon]
    if children:  # torch's SIGCHLD handler would report each death as a second error
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for child in children:
        child.kill()


class ShardLoader:
    """Endless multi-crop batches for one rank, with `state_dict()` / `load_state_dict()`.

    Each batch is a dict: `global_crops` [G, B, 3, H, W] and `local_crops` [L, B, 3, h, w] (uint8,
    normalise with `transforms.normalize_batch`), `masks` [G, B, H/p, W/p] bool, `labels` [B]
    (-1 without a `cls`), `keys` (sample keys).
    """

    def __init__(
        self,
        urls: list[str],
        *,
        augment: MultiCrop | ClassifyCrop,
        mask_sampler: MaskSampler,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        shard_retries: int = 0,
        s3_command: str = "aws s3 cp --quiet {url} -",
        pin_memory: bool = False,
        max_failed_fraction: float = 1.0,
        source: str = "data.train_shards",
        keys: frozenset[str] | None = None,
    ):
        num_streams = max(1, num_workers)
        if not urls:
            raise ValueError(f"{source}: names no shards")
        if len(urls) < world_size * num_streams:
            raise ValueError(
                f"{source}: {len(urls)} shards cannot feed {world_size} ranks x {num_streams} loader "
                f"streams ({world_size * num_streams} needed: each stream reads whole shards); write "
                f"smaller shards (scripts/make_shards.py --samples-per-shard) or lower data.num_workers")
        self.plan = StreamPlan(tuple(urls), augment, mask_sampler, batch_size, rank, world_size,
                               num_streams, seed, shuffle_buffer, shard_retries, s3_command, keys)
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.max_failed_fraction, self.source = max_failed_fraction, source
        self._streams = [{"epoch": 0, "consumed": 0, "counters": {}} for _ in range(num_streams)]
        self._batches = 0

    def __iter__(self) -> Iterator[dict]:
        streams = _Streams(self.plan, copy.deepcopy(self._streams), self._batches % self.plan.num_streams)
        # A private generator: DataLoader draws its worker base seed from it, not from the
        # training process's global RNG (which a resumed run must find as it was saved).
        loader = DataLoader(streams, batch_size=None, num_workers=self.num_workers,
                            pin_memory=self.pin_memory, prefetch_factor=2 if self.num_workers else None,
                            generator=torch.Generator().manual_seed(self.plan.seed),
                            worker_init_fn=_ignore_stop_signals)
        for batch, position in loader:
            stream = position.pop("stream")
            self._streams[stream] = position
            self._batches += 1
            self._check_failures()
            yield batch

    def _check_failures(self) -> None:
        total = self._totals()
        read, failed = total["samples_read"], sum(total[k] for k in SAMPLE_FAILURES)
        if read >= MIN_SAMPLES_FOR_FRACTION and failed > self.max_failed_fraction * read:
            raise DataFailureError(
                f"{self.source}: {failed} of the {read} samples read on this rank could not be used "
                f"({', '.join(f'{k} {v}' for k, v in self.counters.items())}), more than "
                f"data.max_failed_fraction={self.max_failed_fraction}; see the warnings above for the shards")

    def _totals(self) -> Counter:
        total: Counter = Counter()
        for s in self._streams:
            total.update(s["counters"])
        return total

    @property
    def counters(self) -> Counter:
        """Failures by kind (`FAILURE_KINDS`: corrupt_image, missing_image, truncated_shard ...) over all
        streams of this rank."""
        return Counter({k: v for k, v in self._totals().items() if k in FAILURE_KINDS and v})

    @property
    def epoch(self) -> int:
        """The epoch the slowest stream is in (for logs and epoch-based rules)."""
        return min(s["epoch"] for s in self._streams)

    def state_dict(self) -> dict:
        return {"layout": self.plan.layout(), "batches": self._batches,
                "streams": copy.deepcopy(self._streams)}

    def restart(self, epoch: int, counters: dict[str, int] | None = None) -> None:
        """Every stream at the start of `epoch` (resuming under another layout: trainer/resharding.py),
        keeping the failure counters of what was read before."""
        self._streams = [{"epoch": epoch, "consumed": 0, "counters": {}} for _ in range(self.plan.num_streams)]
        self._streams[0]["counters"] = dict(counters or {})
        self._batches = 0

    def load_state_dict(self, state: dict) -> None:
        ours = self.plan.layout()
        if state["layout"] != ours:
            diff = {k: (state["layout"].get(k), v) for k, v in ours.items() if state["layout"].get(k) != v}
            raise PositionMismatch(
                "data position was saved under another data layout (saved, now): "
                + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in diff.items()))
        self._batches = state["batches"]
        self._streams = copy.deepcopy(state["streams"])


def build_train_loader(data, *, patch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                       pin_memory: bool = False, augment: MultiCrop | ClassifyCrop | None = None,
                       keys: frozenset[str] | None = None) -> ShardLoader:
    """A `ShardLoader` from a `DataConfig`-shaped object whose `train_shards` is already resolved;
    `augment`: the views made of each image (the multi-crop of `data.*` unless given); `keys`: the
    only samples read (a labelled subset)."""
    grid = data.global_crops.size // patch_size
    m = data.mask
    sampler = MaskSampler((grid, grid), m.kind, tuple(m.ratio), m.prob, m.min_block_patches, m.min_aspect, m.fill_exact,
                          m.patches, m.spread, m.max_block_fraction)
    return ShardLoader(
        expand_shards(data.train_shards), augment=augment or MultiCrop.from_config(data), mask_sampler=sampler,
        batch_size=data.batch_size, rank=rank, world_size=world_size, num_workers=data.num_workers,
        seed=seed, shuffle_buffer=data.shuffle_buffer, shard_retries=data.shard_retries,
        s3_command=data.s3_command, pin_memory=pin_memory, max_failed_fraction=data.max_failed_fraction,
        keys=keys)


def labelled_batches(urls: list[str], size: int, batch_size: int, rank: int = 0, world_size: int = 1,
                     counters: Counter | None = None, transform=None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's share, in shard order, as (uint8 [B, 3, size, size], labels [B]): resized (shorter
    side, bicubic) and centre-cropped, or `transform(PIL image) -> PIL image` of `size` (a linear
    probe's training crops). For evaluation: no shuffle, no augmentation by default. With at least as
    many shards as ranks each rank reads every `world_size`-th shard (no shard is read twice);
    with fewer, every rank reads them all and keeps every `world_size`-th sample."""
    from torchvision.transforms import functional as F

    counters = Counter() if counters is None else counters
    images, labels = [], []
    by_shard = len(urls) >= world_size
    raw = itertools.chain.from_iterable(read_shard(u, counters) for u in (urls[rank::world_size] if by_shard else urls))
    for raw_sample in raw if by_shard else itertools.islice(raw, rank, None, world_size):
        decoded = decode(raw_sample, counters)
        if decoded is None:
            continue
        img, label = decoded
        img = transform(img) if transform is not None else F.center_crop(
            F.resize(img, size, interpolation=F.InterpolationMode.BICUBIC), size)
        images.append(F.pil_to_tensor(img))
        labels.append(label)
        if len(images) == batch_size:
            yield torch.stack(images), torch.tensor(labels)
            images, labels = [], []
    if images:
        yield torch.stack(images), torch.tensor(labels)
