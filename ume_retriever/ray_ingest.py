"""Scale-out indexing on Ray Data: ``UMEIndex.add(..., ray=ADDRESS, encoders=N)``.

The same ingest as in process, with its stages spread over a Ray cluster:

- **driver** (the process that calls ``add``): lists the files, and settles on its own every
  file it can without loading it (unreadable, quarantined, or unchanged by its manifest). For
  the others it reads which of their points the store holds already, so that a re-run after a
  crash does not encode them again.
- **load tasks** (CPU, Ray Data ``map_batches``): read and render each file into items,
  streamed item by item, so that the pixels of a large corpus are never in memory at once
  (Ray Data's back-pressure bounds what waits between the stages).
- **encoder actors** (an actor pool, one ``UMEEncoder`` each, loaded once from the index
  encoder's ``recipe``, on one GPU each where the cluster has GPUs): encode windows of
  ``batch_size * flush_batches`` items (``encode`` sorts them by length) into points with the
  in-process code (``ingest_points.PointBuilder``). With a Qdrant server (``url``) they write
  their points straight to it; with the embedded store (one process only) the points go back
  to the driver, which writes them.
- **driver**, again: reports every item, and once all of a file's items are in the store
  deletes its stale points and writes its manifest (last, as in process).

Faults: Ray restarts a dead actor and retries its batch (point ids are deterministic: a
retried write overwrites the same points, never duplicates). A file whose task or batch fails
past Ray's retries is reported failed with the reason; the others go on. A driver that dies
leaves what it wrote: files without a manifest are loaded again by the next run, which encodes
only their items not yet stored.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import pickle
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator

from .errors import InputError
from .faults import fault_point
from .ingest_points import (
    NO_ITEMS, NOT_REREADABLE, BuiltPoint, IngestEntry, PointBuilder, encoder_settings, in_memory_item, point_id,
    settings_id, upsert_batches,
)
from .inputs.item import Item, as_item
from .inputs.media import load_image, load_video
from .inputs.loaders import FileLoadError, LoadedItem, LoaderConfig, LoadFailure, Skipped, load_file, printable_path, walk
from .model.encoder import EncoderRecipe
from .store import StoredPoint, StoreSchema

logger = logging.getLogger(__name__)

# Row kinds flowing through the pipeline (each row: kind, source, blob = pickled details).
_FILE, _ITEM, _POINT, _UNCHANGED, _DONE, _FAILED = "file", "item", "point", "unchanged", "done", "failed"
# Files per load task: a task costs Ray tens of milliseconds here, as much as loading a few
# images (measured: 320 images in 320 tasks 7.9-15.2 s, in 40 tasks 2.2 s, on 2 cores). Files
# of a task lost past its retries are sent again one per task.
FILES_PER_BLOCK = 8
MAX_BLOCKS = 1024
# Tries beyond the first of a load task whose process died, and of an encoder batch whose
# actor died (Ray restarts the actor).
LOAD_RETRIES = 2
ENCODE_RETRIES = 2
LOST = "lost in the Ray pipeline: its task or encoder batch failed past Ray's retries ({})"


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide a Ray ingest runs.

    ``address``: "local" (a new Ray instance on this machine, stopped at the end), "auto" (the
    cluster this machine belongs to) or a cluster address (``ray://host:10001``, ``host:6379``).
    A process already connected to Ray (``ray.init`` called) uses that connection.
    ``encoders``: encoder actors. ``gpus_per_encoder``: None is 1 where the cluster has GPUs,
    else 0. ``threads_per_encoder``: torch threads of a CPU actor (None: this machine's cores
    shared among the actors).
    """

    address: str = "local"
    encoders: int = 1
    gpus_per_encoder: float | None = None
    threads_per_encoder: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.encoders, int) or self.encoders < 1:
            raise ValueError(f"encoders must be an integer >= 1, got {self.encoders!r}")
        if self.gpus_per_encoder is not None and self.gpus_per_encoder < 0:
            raise ValueError(f"gpus_per_encoder must be >= 0, got {self.gpus_per_encoder!r}")
        if self.threads_per_encoder is not None and self.threads_per_encoder < 1:
            raise ValueError(f"threads_per_encoder must be >= 1, got {self.threads_per_encoder!r}")


def _import_ray() -> Any:
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as exc:
        raise ImportError("indexing on Ray needs Ray Data: pip install 'ume-r1[ray]'") from exc
    return ray


@contextlib.contextmanager
def connected(options: RayOptions) -> Iterator[Any]:
    """Ray, connected as ``options.address`` says (an existing connection is used, and kept)."""
    ray = _import_ray()
    if ray.is_initialized():
        yield ray
        return
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
    if options.address == "local":
        # Logical CPUs: every actor one, and at least one left for the load tasks.
        kwargs["num_cpus"] = max(os.cpu_count() or 1, options.encoders + 1)
    ray.init(address=options.address, **kwargs)
    try:
        yield ray
    finally:
        ray.shutdown()


def recipe_of(encoder: Any) -> EncoderRecipe:
    recipe = getattr(encoder, "recipe", None)
    if not isinstance(recipe, EncoderRecipe):
        raise ValueError("add(ray=...) loads the index's encoder again in every Ray actor, from the checkpoint it "
                         "was loaded from: build it with UMEEncoder.from_pretrained (this encoder was built from "
                         "objects, or is a remote stand-in)")
    return recipe


@dataclass
class _FileWork:
    path: str
    fhash: str
    stored: frozenset[str]  # ids of this file's points already in the store


def ray_add(index: Any, inputs: list[Any], report: Any, options: RayOptions,
            show_progress: bool) -> None:
    """The body of ``UMEIndex.add`` on Ray (``index.add`` does the rest: prune, optimize)."""
    recipe = recipe_of(index.encoder)
    rows = _plan(index, inputs, report)
    if not rows:
        return
    from tqdm.auto import tqdm

    state = _IngestState(rows)
    load = functools.partial(_load_rows, loader=index.loader, vectors=index.vectors, settings=index.settings_id,
                             media=MediaCaps.of(index.encoder))
    job = _IngestJob(index.point_builder(), index.batch_size)
    with connected(options) as ray, data_context(ray), \
            tqdm(desc="indexing (ray)", unit="item", disable=not show_progress) as bar:
        ds = encode_pipeline(ray, index, rows, recipe, options, load, job, rows_per_block=FILES_PER_BLOCK)
        error = _consume(index, ds, state, report, bar)
        lost = state.lost_rows(index, rows) if error is None else []
        if lost:  # blocks lost past their retries: their files again, one per task, so that
            # the one that kills its task (a decoder crash) does not take the others with it
            logger.warning("%d file(s)/item(s) lost in the Ray pipeline: trying them again one per task", len(lost))
            ds = encode_pipeline(ray, index, lost, recipe, options, load, job, rows_per_block=1)
            error = _consume(index, ds, state, report, bar)
    state.report_lost(report, error)


def _plan(index: Any, inputs: list[Any], report: Any) -> list[dict[str, Any]]:
    """Driver side, before any loading: list the files, settle those that need no loading, and
    one pipeline row for every file to load and every in-memory item to encode."""
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    for value in inputs:
        if isinstance(value, (str, os.PathLike)):
            for path in walk([value], follow_symlinks=index.loader.follow_symlinks):
                if isinstance(path, (LoadFailure, Skipped)):
                    status = "failed" if isinstance(path, LoadFailure) else "skipped"
                    report.entries.append(IngestEntry(path.source, "", status, path.reason))
                    continue
                if str(path) in seen:
                    continue
                seen.add(str(path))
                checked = index.check_file(path)
                if isinstance(checked, str):
                    stored = frozenset(pid for pid, _ in index.store.scroll({"source": str(path), "kind": "item"}, []))
                    rows.append(pipeline_row(_FILE, str(path), _FileWork(str(path), checked, stored)))
                elif checked[0] == "unchanged":
                    report.entries.extend(checked[1])
                else:
                    failure: LoadFailure = checked[1]
                    report.entries.append(IngestEntry(failure.source, "", "failed", failure.reason))
                    index._record_failure(failure.source, failure.reason)
        else:
            try:
                loaded = in_memory_item(as_item(value))
            except InputError as exc:
                report.entries.append(IngestEntry(f"<input {type(value).__name__}>", "", "failed", exc.reason))
                continue
            pid = point_id(loaded.source, loaded.locator, loaded.content_hash, index.vectors, index.settings_id)
            if index.store.existing_ids([pid]):
                report.entries.append(IngestEntry(loaded.source, loaded.locator, "unchanged", id=pid))
            else:
                rows.append(pipeline_row(_ITEM, loaded.source, (loaded, pid)))
    return rows


def pipeline_row(kind: str, source: str, details: Any) -> dict[str, Any]:
    return {"kind": kind, "source": source, "blob": pickle.dumps(details, protocol=pickle.HIGHEST_PROTOCOL)}


@contextlib.contextmanager
def data_context(ray: Any) -> Iterator[None]:
    """Ray Data settings of our pipelines, restored afterwards (the context is the process's)."""
    ctx = ray.data.DataContext.get_current()
    ours = {"enable_progress_bars": False,  # the driver shows its own bar
            "print_on_execution_start": False,
            # A block that fails past its retries is left out and the run goes on: the driver
            # reports what it held as failed (nothing is skipped silently).
            "max_errored_blocks": -1}
    before = {name: getattr(ctx, name) for name in ours}
    for name, value in ours.items():
        setattr(ctx, name, value)
    try:
        yield
    finally:
        for name, value in before.items():
            setattr(ctx, name, value)


def encode_pipeline(ray: Any, index: Any, rows: list[dict[str, Any]], recipe: EncoderRecipe, options: RayOptions,
                    load: Any, job: Any, rows_per_block: int = 1) -> Any:
    """rows -> ``load`` tasks -> encoder actors running ``job`` -> output rows (a lazy dataset)."""
    gpus = options.gpus_per_encoder
    if gpus is None:
        gpus = 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0
    threads = options.threads_per_encoder or max(1, (os.cpu_count() or 1) // options.encoders)
    window = index.batch_size * index.flush_batches
    server = getattr(index.store, "_is_server", False)
    sink = _ServerSink(index.schema, index.store.location, index._api_key, index.store.collection,
                       index.store.writer_id) if server else None
    ds = ray.data.from_items(rows, override_num_blocks=min(-(-len(rows) // rows_per_block), MAX_BLOCKS))
    # Ray Data retries its tasks and actor calls without end; a file that kills its process on
    # every try (a decoder crash) must end as that file's failure instead. The retry limits
    # also keep the load tasks a stage of their own (not fused into the encoder actors).
    # Ray has no named parameter for them yet: ``ray_remote_args``, whose deprecation warning
    # is silenced here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ds = ds.map_batches(load, batch_size=1, batch_format="numpy", num_cpus=1, max_retries=LOAD_RETRIES)
        return ds.map_batches(
            _EncoderActor, batch_size=window, batch_format="numpy",
            # two batches in flight per actor: the next is there when one ends, and the first actor
            # up does not take every batch of a small corpus while the others still load
            compute=ray.data.ActorPoolStrategy(size=options.encoders, max_tasks_in_flight_per_actor=2),
            num_gpus=gpus or None, num_cpus=1,
            max_restarts=-1, max_task_retries=ENCODE_RETRIES,
            fn_constructor_kwargs={"recipe": recipe, "device": "cuda" if gpus else "cpu", "threads": threads,
                                   "settings": index.settings_id, "job": job, "sink": sink})


@dataclass(frozen=True)
class MediaCaps:
    """How the encoder decodes media: load tasks decode images and video frames the same way,
    so that native decoders run (and may crash) in the cheap, retried, per-file tasks."""

    num_video_frames: int
    max_decode_pixels: int

    @classmethod
    def of(cls, encoder: Any) -> "MediaCaps":
        preparer = encoder.preparer
        return cls(preparer.num_video_frames, preparer.max_decode_pixels)

    def decoded(self, loaded: LoadedItem) -> LoadedItem:
        """``loaded`` with its image and video files decoded (raises ``InputError``)."""
        item = self.decoded_item(loaded.item)
        return loaded if item is loaded.item else replace(loaded, item=item)

    def decoded_item(self, item: Item) -> Item:
        """``item`` with its image and video files decoded (raises ``InputError``)."""
        changes: dict[str, Any] = {}
        if isinstance(item.image, (str, os.PathLike)):
            changes["image"] = load_image(item.image, self.max_decode_pixels)
        if isinstance(item.video, (str, os.PathLike)):
            changes.update(video=load_video(item.video, self.num_video_frames, item.video_start, item.video_end,
                                            self.max_decode_pixels), video_start=None, video_end=None)
        return replace(item, **changes) if changes else item


def _load_rows(batch: dict[str, Any], *, loader: LoaderConfig, vectors: tuple[str, ...], settings: str,
               media: MediaCaps) -> Iterator[dict[str, list]]:
    """Load task: one input row in, its items out one by one, then the file's ``done`` row (or
    its ``failed`` row). Items already in the store come out as ``unchanged``."""
    for kind, source, blob in zip(batch["kind"], batch["source"], batch["blob"]):
        if kind == _ITEM:
            yield output_batch(_ITEM, source, blob)
            continue
        work: _FileWork = pickle.loads(blob)
        count = 0
        try:
            for loaded in load_file(Path(work.path), loader, work.fhash):
                count += 1
                pid = point_id(loaded.source, loaded.locator, loaded.content_hash, vectors, settings)
                if pid in work.stored:
                    yield output_batch(_UNCHANGED, source, pickle.dumps(IngestEntry(source, loaded.locator, "unchanged",
                                                                                 id=pid)))
                    continue
                try:
                    loaded = media.decoded(loaded)
                except InputError as exc:  # this item fails (as the encoder would report it), the file goes on
                    entry = IngestEntry(source, loaded.locator, "failed", exc.reason)
                    yield output_batch(_POINT, source, pickle.dumps(BuiltPoint(entry, pid, None)))
                    continue
                yield output_batch(_ITEM, source, pickle.dumps((loaded, pid), protocol=pickle.HIGHEST_PROTOCOL))
        except FileLoadError as exc:
            yield output_batch(_FAILED, source, pickle.dumps(str(exc)))
            continue
        except Exception as exc:  # noqa: BLE001 - a library's surprise: this file only
            logger.warning("loading %s failed", printable_path(work.path), exc_info=True)
            yield output_batch(_FAILED, source, pickle.dumps(f"unexpected {type(exc).__name__} while loading: {exc}"))
            continue
        if count == 0:
            yield output_batch(_FAILED, source, pickle.dumps(NO_ITEMS))
        else:
            yield output_batch(_DONE, source, pickle.dumps((work.fhash, count)))


def output_batch(kind: str, source: str, blob: bytes) -> dict[str, list]:
    return {"kind": [kind], "source": [source], "blob": [blob]}


@dataclass(frozen=True)
class _ServerSink:
    """Where encoder actors write when the store is a Qdrant server: as the driver's writer
    (its writer lease covers the whole ingest)."""

    schema: StoreSchema
    url: str
    api_key: str | None
    collection: str
    writer_id: str

    def open(self) -> Any:
        from .store.qdrant import QdrantStore

        return QdrantStore(self.schema, url=self.url, api_key=self.api_key, collection=self.collection,
                           writer_id=self.writer_id)


class _EncoderActor:
    """One encoder in the actor pool: the rows its job takes in, the job's rows out (other rows
    pass through)."""

    def __init__(self, recipe: EncoderRecipe, device: str, threads: int, settings: str, job: Any,
                 sink: _ServerSink | None):
        import torch

        if device == "cpu":
            torch.set_num_threads(threads)
        self.encoder = recipe.load(device=device)
        found = settings_id(encoder_settings(self.encoder))
        if found != settings:  # the ids and manifests of this ingest assume the driver's settings
            raise RuntimeError(f"the encoder loaded in a Ray actor has other settings ({encoder_settings(self.encoder)}) "
                               f"than the index's encoder: {recipe}")
        self.job = job
        self.store = sink.open() if sink is not None else None

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        fault_point("ray_encoder_batch")
        out: dict[str, list] = {"kind": [], "source": [], "blob": []}
        todo = []
        for kind, source, blob in zip(batch["kind"], batch["source"], batch["blob"]):
            if kind == self.job.takes:
                todo.append(pickle.loads(blob))
            else:
                out["kind"].append(kind)
                out["source"].append(source)
                out["blob"].append(blob)
        for kind, source, details in (self.job.run(self.encoder, todo, self.store) if todo else []):
            out["kind"].append(kind)
            out["source"].append(source)
            out["blob"].append(pickle.dumps(details, protocol=pickle.HIGHEST_PROTOCOL))
        return out


@dataclass(frozen=True)
class _IngestJob:
    """Loaded items -> points (written to a server store here, else sent to the driver)."""

    builder: PointBuilder
    batch_size: int
    takes: str = _ITEM

    def run(self, encoder: Any, todo: list[tuple[LoadedItem, str]], store: Any) -> list[tuple[str, str, Any]]:
        built = self.builder.build(encoder, todo, self.batch_size)
        if store is not None:  # straight to the Qdrant server; only the reports go back
            for chunk in upsert_batches([b.point for b in built if b.point is not None]):
                store.upsert(chunk)
            built = [replace(b, point=None) if b.point is not None else b for b in built]
        return [(_POINT, b.entry.source, b) for b in built]


@dataclass
class _Progress:
    """What the driver knows of one file being loaded."""

    ids: dict[str, str]  # point id -> locator, of its items seen so far
    expected: int | None = None  # its item count, once its load task said ``done``
    fhash: str = ""
    failed: bool = False
    finished: bool = False

    @property
    def settled(self) -> bool:
        return self.failed or self.finished


class _IngestState:
    """What the driver knows of a Ray ingest, across its passes."""

    def __init__(self, rows: list[dict[str, Any]]):
        self.files = {row["source"]: _Progress({}) for row in rows if row["kind"] == _FILE}
        self.items_left = {pickle.loads(row["blob"])[1]: row["source"] for row in rows if row["kind"] == _ITEM}
        # Point ids already in the report: a retried task or batch may send a row again.
        self.reported: set[str] = set()

    def lost_rows(self, index: Any, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The rows of files and items no result has settled yet, ready to be sent again."""
        lost = []
        for row in rows:
            if row["kind"] == _ITEM and pickle.loads(row["blob"])[1] in self.items_left:
                lost.append(row)
            elif row["kind"] == _FILE and not self.files[row["source"]].settled:
                work: _FileWork = pickle.loads(row["blob"])
                stored = frozenset(pid for pid, _ in index.store.scroll({"source": work.path, "kind": "item"}, []))
                lost.append(pipeline_row(_FILE, row["source"], replace(work, stored=stored)))
        return lost

    def report_lost(self, report: Any, error: Exception | None) -> None:
        reason = LOST.format(f"{type(error).__name__}: {error}" if error else "see the Ray logs")
        for src, p in self.files.items():
            if not p.settled:
                report.entries.append(IngestEntry(src, "", "failed", reason))
        for pid, src in self.items_left.items():
            report.entries.append(IngestEntry(src, "", "failed", reason, id=pid))


def _consume(index: Any, ds: Any, state: _IngestState, report: Any, bar: Any) -> Exception | None:
    """Driver: report every row, write the points (embedded store), finish complete files.
    Returns the pipeline's error, if it failed as a whole."""
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=1):
            points: list[StoredPoint] = []
            for kind, source, blob in zip(batch["kind"], batch["source"], batch["blob"]):
                progress = state.files.get(source)
                if kind == _FAILED:
                    if progress is not None and progress.failed:
                        continue  # sent again by a retry
                    reason = pickle.loads(blob)
                    report.entries.append(IngestEntry(source, "", "failed", reason))
                    index._record_failure(source, reason)
                    if progress is not None:
                        progress.failed = True
                elif kind == _DONE:
                    progress.fhash, progress.expected = pickle.loads(blob)
                elif kind == _UNCHANGED:
                    entry: IngestEntry = pickle.loads(blob)
                    progress.ids[entry.id] = entry.locator
                    if entry.id not in state.reported:
                        state.reported.add(entry.id)
                        report.entries.append(entry)
                        bar.update(1)
                elif kind == _POINT:
                    built: BuiltPoint = pickle.loads(blob)
                    state.items_left.pop(built.id, None)
                    if built.point is not None:
                        points.append(built.point)  # written again if sent again: the same point
                    if built.id not in state.reported:
                        state.reported.add(built.id)
                        _account(built, report, progress)
                        bar.update(1)
            index._upsert(points)
            if points:
                fault_point("after_item_upsert")
            done = [(src, p.fhash, p.ids) for src, p in state.files.items()
                    if not p.settled and p.expected is not None and len(p.ids) == p.expected]
            report.deleted_stale += index._finish_sources(done)
            for src, _, _ in done:
                state.files[src].finished = True
    except Exception as exc:  # noqa: BLE001 - Ray's error; every unfinished file is reported with it
        logger.warning("the Ray ingest pipeline failed", exc_info=True)
        return exc
    return None


def _account(built: BuiltPoint, report: Any, progress: _Progress | None) -> None:
    report.entries.append(built.entry)
    if built.entry.status == "failed":
        if progress is not None:
            progress.failed = True
        return
    if progress is not None:
        progress.ids[built.entry.id] = built.entry.locator
    report.gen_pending += built.deferred
    if built.gen_now:
        report.gen_now.append(IngestEntry(built.entry.source, built.entry.locator, "indexed", NOT_REREADABLE,
                                          id=built.entry.id))
