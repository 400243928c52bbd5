"""``CachedEncoder``: an encoder whose results are kept on disk, per model and input content.

The evaluation runs the real ``UMEIndex`` (ingest, store, fused search), which calls
``encode`` for candidates and queries. Behind this wrapper each input is encoded once per
model: re-running an evaluation, adding a fusion or a task sharing items never re-encodes.

The file is data, never code: ``encodings-<key>.npz`` holds one float32 matrix of vectors and
a UTF-8 JSON index (keys, rows, reasoning, outcomes, token counts), read with
``numpy.load(allow_pickle=False)``. Pickles (``encodings-*.pkl``, the old format) are never
loaded: they are reported and left alone. A file that cannot be read, or that was written for
another model, is reported and ignored (its inputs are encoded again), never a crash.

``<key>`` is a digest of everything that changes the vectors (``model_fingerprint``):
the checkpoint's content (a local folder: a SHA-256 of the files the model is loaded from,
weights included; a hub name: the commit of the snapshot it was loaded from, else the
revision asked for; a model built in memory: a SHA-256 of its parameters), the processor's pixel caps, the model dtype, ``max_new_tokens``, the
input-token limit, the video frame count, the decode cap and the text blank-image rule.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..inputs.item import as_item
from ..model.protocol import EncoderLike
from ..results import EncodeResult, GenOutcome, GenSample

logger = logging.getLogger(__name__)

CACHE_FORMAT = 2  # 1 was the pickle; bump when the file layout or what a key means changes
# The files ``from_pretrained`` reads from a checkpoint folder (weights, configs, tokenizer,
# chat template); a trainer's optimizer state or README next to them changes no vector.
CHECKPOINT_SUFFIXES = (".safetensors", ".json", ".jinja", ".txt", ".model", ".tiktoken")
DIGEST_MEMO = "checkpoint-digests.json"
_RACY_SECONDS = 2.0  # a file changed this recently is hashed again next time (git's "racy clean")


@dataclass
class _Gen:
    vector: np.ndarray
    reasoning: str
    outcome: str
    num_tokens: int


class CacheFileError(ValueError):
    """A cache file that cannot be used (unreadable, malformed, or for another model)."""


class CachedEncoder:
    """Wraps an ``UMEEncoder``; ``encode`` serves cached disc vectors, greedy gen results and
    sampled gen results (keyed by num_samples, temperature, top_p, seed) and encodes the rest.
    Other attributes are the wrapped encoder's. ``save()`` writes the cache (``evaluate``
    calls it when done). ``cache_dir=None`` keeps the cache in memory only."""

    def __init__(self, encoder: EncoderLike, cache_dir: str | os.PathLike | None = None):
        self.encoder = encoder
        self._entries: dict[tuple, Any] = {}
        self.hits = 0
        self.misses = 0
        self.path: Path | None = None
        self.fingerprint: dict[str, Any] | None = None
        if cache_dir is None:
            return
        folder = Path(cache_dir)
        _report_pickles(folder)
        self.fingerprint = model_fingerprint(encoder, memo_dir=folder)
        blob = json.dumps(self.fingerprint, sort_keys=True).encode()
        self.path = folder / f"encodings-{hashlib.sha256(blob).hexdigest()[:32]}.npz"
        if self.path.is_file():
            try:
                self._entries = _read(self.path, self.fingerprint)
                logger.info("encoding cache %s: %d entries", self.path, len(self._entries))
            except CacheFileError as exc:
                logger.warning("encoding cache %s ignored (its inputs are encoded again): %s", self.path, exc)

    def __getattr__(self, name: str) -> Any:  # name_or_path, embedding_dim, processor, batch_size, ...
        if name == "encoder":  # not set yet (unpickling, a failed __init__): no recursion
            raise AttributeError(name)
        return getattr(self.encoder, name)

    def encode(self, inputs: Any, mode: str = "disc", **kwargs: Any) -> EncodeResult | list[EncodeResult]:
        from ..inputs.loaders import item_hash
        from ..model.encoder import _SINGLE_TYPES

        if kwargs.get("generation_kwargs"):  # logits processors and the like: no key can name them
            return self.encoder.encode(inputs, mode=mode, **kwargs)
        single = isinstance(inputs, _SINGLE_TYPES) or hasattr(inputs, "convert")
        values: Sequence[Any] = [inputs] if single else list(inputs)
        num_samples = kwargs.get("num_samples", 1)
        sampled = num_samples > 1 or kwargs.get("do_sample")
        gen_key: tuple = ("samples", num_samples, kwargs.get("temperature", 1.0), kwargs.get("top_p", 1.0),
                          kwargs.get("seed")) if sampled else ("gen",)
        budget = kwargs.get("max_new_tokens")
        if budget is not None and budget != self.encoder.max_new_tokens:  # a per-call budget: its own key
            gen_key = (*gen_key, "max_new_tokens", int(budget))
        kinds = {"disc": [("disc",)], "gen": [gen_key], "both": [("disc",), gen_key]}[mode]
        hashes = [item_hash(as_item(v)) for v in values]
        missing = [i for i, h in enumerate(hashes) if any((h, *k) not in self._entries for k in kinds)]
        self.hits += len(values) - len(missing)
        self.misses += len(missing)
        failed: dict[int, EncodeResult] = {}
        if missing:
            fresh = self.encoder.encode([values[i] for i in missing], mode=mode, **kwargs)
            for i, res in zip(missing, fresh):
                if res.error is not None:
                    failed[i] = res
                    continue
                if res.disc is not None:
                    self._entries[(hashes[i], "disc")] = np.asarray(res.disc, dtype=np.float32)
                if res.samples:
                    self._entries[(hashes[i], *gen_key)] = [
                        _Gen(np.asarray(s.vector, dtype=np.float32), s.reasoning, s.outcome.value, s.num_tokens)
                        for s in res.samples]
        out = []
        for i, h in enumerate(hashes):
            if i in failed:
                failed[i].index = i
                out.append(failed[i])
                continue
            res = EncodeResult(index=i)
            if mode in ("disc", "both"):
                res.disc = self._entries[(h, "disc")]
            if mode in ("gen", "both"):
                res.samples = [GenSample(g.vector, g.reasoning, GenOutcome(g.outcome), g.num_tokens)
                               for g in self._entries[(h, *gen_key)]]
                first = res.samples[0]
                res.gen, res.reasoning, res.gen_outcome = first.vector, first.reasoning, first.outcome
            out.append(res)
        return out[0] if single else out

    def save(self) -> None:
        """Write the cache atomically (a temporary file in the folder, then a rename). A cache
        that cannot be written is reported, not raised: the results it holds are already out."""
        if self.path is None:
            return
        try:
            _write(self.path, self.fingerprint, self._entries)
        except OSError as exc:
            logger.warning("encoding cache %s not written: %s", self.path, exc)


# -- the file -------------------------------------------------------------------------------


def _write(path: Path, fingerprint: dict[str, Any] | None, entries: dict[tuple, Any]) -> None:
    rows: list[np.ndarray] = []
    index = []
    for key, value in entries.items():
        if isinstance(value, np.ndarray):  # a disc vector
            index.append({"key": list(key), "row": len(rows), "count": 1})
            rows.append(value)
        else:  # gen results: one row per sample
            index.append({"key": list(key), "row": len(rows), "count": len(value),
                          "reasoning": [g.reasoning for g in value], "outcome": [g.outcome for g in value],
                          "num_tokens": [int(g.num_tokens) for g in value]})
            rows.extend(g.vector for g in value)
    dim = rows[0].shape[-1] if rows else 0
    vectors = np.stack(rows).astype(np.float32, copy=False) if rows else np.zeros((0, dim), np.float32)
    meta = {"format": CACHE_FORMAT, "fingerprint": fingerprint, "entries": index}
    meta_bytes = np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, vectors=vectors, meta=meta_bytes)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read(path: Path, fingerprint: dict[str, Any] | None) -> dict[tuple, Any]:
    """The entries of a cache file; ``CacheFileError`` says why it cannot be used."""
    try:
        with np.load(path, allow_pickle=False) as data:  # never unpickles: object arrays raise
            if not hasattr(data, "files") or set(data.files) != {"vectors", "meta"}:
                raise CacheFileError("not an encoding cache (expected arrays 'vectors' and 'meta')")
            vectors, meta_bytes = data["vectors"], data["meta"]
    except CacheFileError:
        raise
    except Exception as exc:  # noqa: BLE001 - zip, npy-header and pickle refusals all mean "unusable"
        raise CacheFileError(f"unreadable ({type(exc).__name__}: {exc})") from None
    if vectors.dtype != np.float32 or vectors.ndim != 2 or meta_bytes.dtype != np.uint8 or meta_bytes.ndim != 1:
        raise CacheFileError(f"unexpected arrays (vectors {vectors.dtype} {vectors.shape}, meta {meta_bytes.dtype})")
    try:
        meta = json.loads(meta_bytes.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CacheFileError(f"unreadable index ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != CACHE_FORMAT:
        raise CacheFileError(f"format {meta.get('format') if isinstance(meta, dict) else '?'}, expected {CACHE_FORMAT}")
    if meta.get("fingerprint") != fingerprint:
        raise CacheFileError("written for another model or settings")
    entries: dict[tuple, Any] = {}
    try:
        for e in meta["entries"]:
            key, row, count = tuple(e["key"]), e["row"], e["count"]
            if not (isinstance(row, int) and isinstance(count, int) and 0 <= row and 1 <= count
                    and row + count <= len(vectors)) or len(key) < 2 or not all(isinstance(k, str) for k in key[:2]):
                raise CacheFileError(f"bad entry {key!r} (rows {row}+{count} of {len(vectors)})")
            if key[1] == "disc":
                entries[key] = vectors[row]
                continue
            texts, outcomes, tokens = e["reasoning"], e["outcome"], e["num_tokens"]
            if not (len(texts) == len(outcomes) == len(tokens) == count):
                raise CacheFileError(f"bad entry {key!r}: {count} rows, {len(texts)} reasonings")
            entries[key] = [_Gen(vectors[row + j], str(texts[j]), GenOutcome(outcomes[j]).value, int(tokens[j]))
                            for j in range(count)]
    except CacheFileError:
        raise
    except (KeyError, TypeError, ValueError) as exc:
        raise CacheFileError(f"malformed index ({type(exc).__name__}: {exc})") from None
    return entries


def _report_pickles(folder: Path) -> None:
    try:
        old = sorted(folder.glob("encodings-*.pkl"))
    except OSError:
        return
    for p in old:
        logger.warning("encoding cache %s ignored: pickle files are never loaded (the cache is now .npz); "
                       "delete it", p)


# -- what the vectors depend on -------------------------------------------------------------


def model_fingerprint(encoder: Any, memo_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Everything that changes an encoder's vectors, as plain JSON data (see the module doc)."""
    from ..model.checkpoint import pixel_caps

    model = getattr(encoder, "model", None)
    preparer = getattr(encoder, "preparer", None)
    backend = getattr(encoder, "backend", None)
    return {
        "checkpoint": checkpoint_fingerprint(encoder, memo_dir),
        "pixel_caps": pixel_caps(encoder.processor),
        "dtype": str(getattr(model, "dtype", None) if model is not None else getattr(backend, "dtype", None)),
        "backend": type(backend).__name__ if backend is not None else None,
        "max_new_tokens": int(encoder.max_new_tokens),
        "max_input_tokens": getattr(preparer, "max_input_tokens", None),
        "num_video_frames": getattr(preparer, "num_video_frames", None),
        "max_decode_pixels": getattr(preparer, "max_decode_pixels", None),
        "blank_image_for_text": getattr(preparer, "blank_image_for_text", None),
    }


def checkpoint_fingerprint(encoder: Any, memo_dir: str | os.PathLike | None = None) -> str:
    """``sha256:<digest>`` of a local checkpoint folder's files; ``hub:<name>@<commit>`` for a
    hub model (the snapshot it was loaded from; else the revision asked for); for a model
    built in memory, ``params-sha256:<digest>`` of its parameters and buffers."""
    name = encoder.name_or_path
    revision = getattr(encoder, "revision", None)
    if name and os.path.isdir(name):
        return "sha256:" + folder_digest(Path(name), memo_dir)
    commit = _hub_commit(name, revision)
    if commit is not None:
        return f"hub:{name}@{commit}"
    if revision is not None:
        return f"hub:{name}@{revision}"
    model = getattr(encoder, "model", None)
    if model is not None and hasattr(model, "state_dict"):  # built in memory (a trainer's encoder)
        return "params-sha256:" + _params_digest(model)
    logger.warning("encoding cache: %s is neither a folder nor a hub snapshot in the local cache; the cache "
                   "cannot tell its versions apart (pass a revision)", name)
    return f"name:{name}"


def folder_digest(folder: Path, memo_dir: str | os.PathLike | None = None) -> str:
    """SHA-256 over the names and contents of the folder's checkpoint files (``CHECKPOINT_SUFFIXES``).

    Headers and sizes alone would not do: a fine-tune keeps every tensor's name, dtype and
    shape, so its safetensors header is byte for byte the old one. Reading the weights costs
    about a second per GB here; each file's digest is kept in ``memo_dir``/``DIGEST_MEMO``
    under its (size, mtime, ctime, inode), which any write changes, so a re-run hashes nothing.
    """
    memo_path = Path(memo_dir) / DIGEST_MEMO if memo_dir is not None else None
    memo = _read_memo(memo_path)
    changed = False
    total = hashlib.sha256()
    for path in sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in CHECKPOINT_SUFFIXES):
        st = path.stat()
        stamp = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
        key = str(path.resolve())
        known = memo.get(key)
        if isinstance(known, dict) and known.get("stat") == stamp and isinstance(known.get("sha256"), str):
            digest = known["sha256"]
        else:
            with open(path, "rb") as f:
                digest = hashlib.file_digest(f, "sha256").hexdigest()
            if time.time() - max(st.st_mtime_ns, st.st_ctime_ns) / 1e9 > _RACY_SECONDS and path.stat().st_ctime_ns == st.st_ctime_ns:
                memo[key] = {"stat": stamp, "sha256": digest}
                changed = True
        total.update(f"{path.name}\0{digest}\0".encode())
    if changed and memo_path is not None:
        _write_memo(memo_path, memo)
    return total.hexdigest()


def _read_memo(path: Path | None) -> dict[str, Any]:
    if path is None or not path.is_file():
        return {}
    try:
        memo = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        logger.warning("checkpoint digest memo %s ignored: %s", path, exc)
        return {}
    return memo if isinstance(memo, dict) else {}


def _write_memo(path: Path, memo: dict[str, Any]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(memo, f)
        os.replace(tmp, path)
    except OSError as exc:  # only a speed-up
        logger.warning("checkpoint digest memo %s not written: %s", path, exc)


def _params_digest(model: Any) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of a torch module's state dict."""
    import torch

    h = hashlib.sha256()
    with torch.no_grad():
        for name, tensor in sorted(model.state_dict().items()):
            t = tensor.detach().cpu().contiguous()
            h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _hub_commit(name: str | None, revision: str | None) -> str | None:
    """The commit of the local hub snapshot ``name``@``revision`` resolves to, if there is one."""
    if not name:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(name, "config.json", revision=revision)
    except Exception:  # noqa: BLE001 - not a repo id, no hub client: no commit to name
        return None
    return Path(found).parent.name if isinstance(found, str) else None
