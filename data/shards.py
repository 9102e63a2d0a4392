"""WebDataset tar shards: naming them, reading their raw samples, writing them.

Reading goes through webdataset's `gopen` (local paths, `pipe:`, http, gs ...) and
`tar_file_iterator`; `s3://` URLs are turned into a `pipe:` command (configurable). Every failure
that can hit one sample or one shard (a shard that will not open, a truncated tar, a duplicate
member name) is counted in a `Counter` by kind and the stream goes on.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

import webdataset as wds
from webdataset.shardlists import expand_urls
from webdataset.tariterators import base_plus_ext, tar_file_iterator

log = logging.getLogger(__name__)

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
LIST_SUFFIXES = (".txt", ".list", ".shards")


def expand_shards(spec: str) -> list[str]:
    """Shard URLs named by `spec`: a brace pattern (`a-{000..099}.tar`, `::`-separated parts), a
    directory (its `*.tar`), a list file (one pattern per line, `#` comments), or one URL."""
    spec = spec.strip()
    if "://" in spec or spec.startswith("pipe:"):
        return expand_urls(spec)
    path = Path(os.path.expanduser(spec))
    if path.is_dir():
        return sorted(str(p) for p in path.glob("*.tar"))
    if path.suffix in LIST_SUFFIXES and path.is_file():
        urls = []
        for line in path.read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                urls += expand_shards(line)
        return urls
    return expand_urls(str(path))


def open_url(url: str, s3_command: str = "aws s3 cp --quiet {url} -"):
    """A readable binary stream for a shard URL."""
    if url.startswith("s3://"):
        url = "pipe:" + s3_command.format(url=shlex.quote(url))
    return wds.gopen(url, "rb")


def read_shard(
    url: str, counters: Counter, retries: int = 0, s3_command: str = "aws s3 cp --quiet {url} -"
) -> Iterator[dict]:
    """Raw samples (`{"__key__", "__url__", ext: bytes ...}`) of one shard, in tar order.

    Nothing is decoded. A shard that cannot be opened after `retries` more attempts is skipped and
    counted (`shard_open_error`); a tar that breaks off keeps the samples read so far and drops the
    incomplete last one (`truncated_shard`); a member name seen twice in one sample is dropped
    (`duplicate_member`).
    """
    stream = None
    for attempt in range(retries + 1):
        try:
            stream = open_url(url, s3_command)
            break
        except Exception as e:  # noqa: BLE001 - any opener failure is the same event to us
            last = e
            log.debug("opening %s failed (attempt %d): %s", url, attempt + 1, e)
    if stream is None:
        counters["shard_open_error"] += 1
        log.warning("skipping shard %s: cannot open it (%s)", url, last)
        return
    current: dict | None = None
    try:
        for member in tar_file_iterator(stream, handler=_reraise):
            prefix, suffix = base_plus_ext(member["fname"])
            if prefix is None:
                continue
            suffix = suffix.lower()
            if current is None or current["__key__"] != prefix:
                if current is not None:
                    yield current
                current = {"__key__": prefix, "__url__": url}
            if suffix in current:
                counters["duplicate_member"] += 1
                log.warning("%s: duplicate member %s dropped", url, member["fname"])
                continue
            current[suffix] = member["data"]
    except Exception as e:  # noqa: BLE001 - tarfile raises several types for a broken stream
        counters["truncated_shard"] += 1
        log.warning("shard %s is truncated or unreadable after %s: %s", url,
                    current["__key__"] if current else "its start", e)
        return
    finally:
        try:
            stream.close()
        except Exception as e:  # noqa: BLE001 - a pipe: command that failed reports here
            counters["shard_close_error"] += 1
            log.warning("shard %s: %s", url, e)
    if current is not None:
        yield current


def _reraise(exn: Exception) -> bool:
    raise exn


def write_shard(path: Path, samples: Iterable[dict]) -> int:
    """Write samples (`__key__`, `jpg`: bytes, `cls`: int, `json`: dict) to `path` atomically:
    a crash leaves no partial file under the final name, so finished shards can be trusted.
    The bytes are a function of the samples alone (fixed mtime), so a rewrite is identical."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    n = 0
    try:
        with os.fdopen(fd, "wb") as f, wds.TarWriter(f, mtime=0.0) as sink:
            for sample in samples:
                sink.write(sample)
                n += 1
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return n


def write_manifest(out_dir: Path, shards: list[dict], classes: list[str], extra: dict) -> Path:
    """`manifest.json`: per-shard counts and the totals; `classes.json`: class name -> index."""
    (out_dir / "classes.json").write_text(json.dumps({c: i for i, c in enumerate(classes)}, indent=1))
    manifest = {"total": sum(s["count"] for s in shards), "num_shards": len(shards),
                "num_classes": len(classes), "shards": shards, **extra}
    path = out_dir / "manifest.json"
    path.write_text(json.dumps(manifest, indent=1))
    return path
