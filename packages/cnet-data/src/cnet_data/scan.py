"""Scanning a source: probe every pair in parallel, keep the good, report the bad.

Every bad sample is reported with where it came from, its paths, a kind and a reason. With
`on_bad="skip"` the good samples are indexed and the bad ones counted and listed; with
`on_bad="fail"` nothing is indexed and `BadSamplesError` carries the full report. A source
that yields no usable sample at all (an empty manifest, an empty folder, every line bad) is an
error in both modes, `NoSamplesError`, which names the counts: an empty index is never what
was meant.
"""

from __future__ import annotations

import itertools
import json
import multiprocessing
import os
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path
from typing import Literal

import attrs
from tqdm import tqdm

from cnet_data.atomic import atomic_write_text
from cnet_data.errors import CnetError
from cnet_data.imageio import (
    DEFAULT_MAX_PIXELS,
    BadImageError,
    ImageInfo,
    VerifyMode,
    probe_image,
)
from cnet_data.index import IndexBuilder
from cnet_data.jsonlines import LineCount
from cnet_data.outdir import claim_file
from cnet_data.source_protocol import SampleStore, SourceRecord
from cnet_data.source_registry import source_for
from cnet_data.sources import SourceConfig

OnBad = Literal["skip", "fail"]
REPORT_FORMAT = "cnet-data-scan-report"
"""The marker by which a report file is known, so that writing one replaces only a report."""
_CHUNK = 256
_REPORT_LIMIT = 1 << 30


ScanVerify = Literal["metadata", "header", "decode"]
"""How much of each image the scan reads (`ScanConfig.verify`)."""


@attrs.frozen
class ScanConfig:
    """How strictly samples are checked while indexing."""

    max_pixels: int = DEFAULT_MAX_PIXELS
    """Images with more pixels (read from the header) are rejected as decompression bombs."""
    verify: ScanVerify = "header"
    """`header`: sizes from headers and a completeness check; `decode`: decode every image;
    `metadata`: sizes from the source where it records them (a tar shard's `KEY.json`), with
    no image read at all (the fastest at scale; a corrupt image is then found by the loader,
    which replaces it with another sample and says so), else as `header`."""
    on_bad: OnBad = "fail"
    """`skip`: index the good samples and list the bad; `fail`: index nothing if any is bad."""
    workers: int = 0
    """Processes probing files; 0 means one per CPU core."""


@attrs.frozen
class BadSample:
    """One rejected sample and why."""

    where: str
    image: str
    conditioning: str
    kind: str
    reason: str


@attrs.define
class ScanReport:
    """The outcome of a scan, written next to the index as JSON."""

    source: str
    total: int = 0
    accepted: int = 0
    empty_captions: int = 0
    """Accepted samples whose caption is empty (allowed: they train unconditionally)."""
    bad: list[BadSample] = attrs.Factory(list)
    lines_read: int | None = None
    """Lines of a manifest read (None for a folder source)."""
    blank_lines: int = 0
    """Blank manifest lines, ignored (neither samples nor bad)."""

    def counts_by_kind(self) -> dict[str, int]:
        return dict(sorted(Counter(b.kind for b in self.bad).items()))

    def totals(self) -> dict[str, object]:
        """The counts without the list of bad samples (what the index header records)."""
        return {
            "source": self.source,
            "total": self.total,
            "accepted": self.accepted,
            "empty_captions": self.empty_captions,
            "bad": len(self.bad),
            "bad_by_kind": self.counts_by_kind(),
            "lines_read": self.lines_read,
            "blank_lines": self.blank_lines,
        }

    def to_json(self) -> dict[str, object]:
        bad = [attrs.asdict(b) for b in self.bad]
        return {"format": REPORT_FORMAT, **self.totals(), "bad_samples": bad}

    def write(self, path: Path) -> None:
        """Write the report atomically; an existing file is replaced only if it is a report."""
        path = Path(path)
        self.claim(path)
        atomic_write_text(path, json.dumps(self.to_json(), indent=2) + "\n")

    @staticmethod
    def claim(path: Path) -> None:
        """`OutputPathError` unless a report may be written at `path` (nothing or a report)."""
        claim_file(Path(path), is_ours=_is_report, what="a cnet-data scan report")

    def summary(self) -> str:
        kinds = ", ".join(f"{k}: {n}" for k, n in self.counts_by_kind().items())
        return (
            f"{self.total} samples, {self.accepted} accepted, {len(self.bad)} bad"
            + (f" ({kinds})" if kinds else "")
            + f", {self.empty_captions} empty captions"
        )


def _is_report(path: Path) -> bool:
    """Whether `path` holds a scan report (or one written before reports carried a marker)."""
    try:
        if path.stat().st_size > _REPORT_LIMIT:
            return False
        content = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError):
        return False
    if not isinstance(content, dict):
        return False
    legacy = {"source", "total", "accepted", "bad_samples"} <= content.keys()
    return content.get("format") == REPORT_FORMAT or legacy


class BadSamplesError(CnetError, ValueError):
    """Raised by `scan` with `on_bad="fail"` when any sample is bad; carries the full report."""

    def __init__(self, report: ScanReport) -> None:
        first = report.bad[0]
        super().__init__(
            f"{len(report.bad)} bad sample(s) in {report.source} "
            f"({', '.join(f'{k}: {n}' for k, n in report.counts_by_kind().items())}); first: "
            f"{first.where} {first.image}: {first.reason}",
            hint="fix them, or skip them with --on-bad skip (on_bad: skip in a training "
            "config); the report lists every one with its reason",
        )
        self.report = report


class NoSamplesError(BadSamplesError):
    """Raised by `scan` when the source yields no usable sample, in either mode."""

    def __init__(self, report: ScanReport) -> None:
        CnetError.__init__(self, _no_samples_message(report), hint=_no_samples_hint(report))
        self.report = report


def _no_samples_message(report: ScanReport) -> str:
    read = (
        f"{report.lines_read} line(s) read ({report.blank_lines} blank)"
        if report.lines_read is not None
        else f"{report.total} image(s) found"
    )
    kinds = ", ".join(f"{k}: {n}" for k, n in report.counts_by_kind().items())
    rejected = f"{len(report.bad)} rejected" + (f" ({kinds})" if kinds else "")
    first = f"; first: {report.bad[0].where}: {report.bad[0].reason}" if report.bad else ""
    return f"no usable sample in {report.source}: {read}, 0 accepted, {rejected}{first}"


def _no_samples_hint(report: ScanReport) -> str:
    if not report.bad:
        return "the source is empty; check the path (and --format) points at the dataset"
    if any("missing key" in b.reason for b in report.bad):
        return (
            "the lines lack the keys looked for; name them with --image-key, "
            "--conditioning-key and --caption-key (image_key, ... in a training config)"
        )
    return "every sample was rejected; the report lists each one with its reason"


@attrs.frozen
class _Good:
    height: int
    width: int
    caption: str


@attrs.frozen
class _Bad:
    kind: str
    reason: str


def scan(
    source: SourceConfig, config: ScanConfig = ScanConfig(), *, progress: bool = True
) -> tuple[IndexBuilder, ScanReport]:
    """Probe every sample of `source`; return the index of the good ones and the report."""
    reader = source_for(source)
    builder = IndexBuilder(reader.store)
    report = ScanReport(source=str(source.path))
    lines = LineCount()
    samples = reader.records(lines)
    bar = tqdm(desc="indexing", unit="sample", disable=not progress)
    for raw, outcome in _probe_all(reader.store, samples, config):
        report.total += 1
        bar.update()
        if isinstance(outcome, _Bad):
            report.bad.append(
                BadSample(raw.where, raw.image, raw.conditioning, outcome.kind, outcome.reason)
            )
            continue
        report.accepted += 1
        report.empty_captions += outcome.caption == ""
        builder.add(raw.image, raw.conditioning, outcome.caption, outcome.height, outcome.width)
    bar.close()
    if reader.counts_lines:
        report.lines_read, report.blank_lines = lines.lines, lines.blank
    if report.accepted == 0:
        raise NoSamplesError(report)
    if report.bad and config.on_bad == "fail":
        raise BadSamplesError(report)
    return builder, report


def _probe_all(
    store: SampleStore, samples: Iterable[SourceRecord], config: ScanConfig
) -> Iterator[tuple[SourceRecord, _Good | _Bad]]:
    workers = config.workers or os.cpu_count() or 1
    chunks = _chunks(samples, _CHUNK)
    first = next(chunks, None)
    if first is None:
        return
    second = next(chunks, None)
    if workers == 1 or second is None:  # a small dataset is not worth starting processes for
        for chunk in itertools.chain([first], [second] if second else [], chunks):
            yield from zip(chunk, _probe_chunk(store, chunk, config), strict=True)
        return
    context = multiprocessing.get_context("forkserver")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        pending: list[tuple[list[SourceRecord], Future[list[_Good | _Bad]]]] = []
        for chunk in itertools.chain([first, second], chunks):
            pending.append((chunk, pool.submit(_probe_chunk, store, chunk, config)))
            # Keep a bounded number of chunks in flight so a huge source streams through.
            if len(pending) >= 4 * workers:
                done, fut = pending.pop(0)
                yield from zip(done, fut.result(), strict=True)
        for done, fut in pending:
            yield from zip(done, fut.result(), strict=True)


def _chunks(items: Iterable[SourceRecord], size: int) -> Iterator[list[SourceRecord]]:
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def _probe_chunk(
    store: SampleStore, chunk: list[SourceRecord], config: ScanConfig
) -> list[_Good | _Bad]:
    return [_probe_sample(store, raw, config) for raw in chunk]


def _probe_sample(store: SampleStore, raw: SourceRecord, config: ScanConfig) -> _Good | _Bad:
    if raw.problem is not None:
        return _Bad(*raw.problem)
    caption = _caption_of(store, raw)
    if isinstance(caption, _Bad):
        return caption
    if config.verify == "metadata" and raw.size is not None:
        return _recorded_size(raw.size, caption, config)
    sizes = []
    for label, ref in (("image", raw.image), ("conditioning image", raw.conditioning)):
        try:
            info = _probe_member(store, ref, config)
        except BadImageError as exc:
            return _Bad(exc.kind, f"{label} {ref}: {exc.reason}")
        sizes.append((info.height, info.width))
    (ih, iw), (ch, cw) = sizes
    if (ih, iw) != (ch, cw):
        return _Bad(
            "size_mismatch",
            f"image is {iw}x{ih} but conditioning image is {cw}x{ch}; they must match",
        )
    return _Good(ih, iw, caption)


def _recorded_size(size: tuple[int, int], caption: str, config: ScanConfig) -> _Good | _Bad:
    """The sample as the source records its size (no image read), within `max_pixels`."""
    height, width = size
    if height * width > config.max_pixels:
        reason = f"the source records {width}x{height}, over max_pixels {config.max_pixels}"
        return _Bad("decompression_bomb", reason)
    return _Good(height, width, caption)


def _probe_member(store: SampleStore, reference: str, config: ScanConfig) -> ImageInfo:
    """The header facts of one member, read through the store (`BadImageError` if unusable)."""
    try:
        fh = store.open(reference)
    except FileNotFoundError:
        raise BadImageError("missing_file", "file does not exist") from None
    except OSError as exc:
        raise BadImageError("unreadable", f"cannot open file: {exc.strerror or exc}") from None
    with fh:
        verify: VerifyMode = "decode" if config.verify == "decode" else "header"
        return probe_image(fh, max_pixels=config.max_pixels, verify=verify)


def _caption_of(store: SampleStore, raw: SourceRecord) -> str | _Bad:
    member = raw.caption_member
    if member is not None:
        try:
            with store.open(member) as fh:
                data = fh.read()
        except FileNotFoundError:
            return _Bad("caption_missing", f"caption file {member} does not exist")
        except OSError as exc:
            return _Bad("caption_unreadable", f"caption file {member} cannot be read: {exc}")
        try:
            return data.decode("utf-8").strip()
        except UnicodeDecodeError as exc:
            return _Bad("caption_not_text", f"caption file {member} is not UTF-8: {exc}")
    if not isinstance(raw.caption, str):
        return _Bad(
            "caption_not_text",
            f"caption is {type(raw.caption).__name__} {raw.caption!r}, not text",
        )
    return raw.caption.strip()
