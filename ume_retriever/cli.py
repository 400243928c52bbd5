"""The ``ume`` command: index files, search, delete, describe an index.

    ume index docs/ slides.pdf photo.jpg --model zhibinlan/UME-R1-2B
    ume search "a red circle in the top left" --k 5
    ume search --image query.png --fusion weighted:disc=0.3,gen=0.7 --json
    ume index big-folder/ --gen later   # searchable at once; reasoning later
    ume backfill                        # compute the pending gen vectors
    ume delete docs/old.pdf
    ume info

    ume serve --model zhibinlan/UME-R1-2B --api-key $KEY   # HTTP service (the serve extra)

The embedded store (``./ume-index``) is the default; ``--url`` (+ ``--qdrant-api-key`` or
``QDRANT_API_KEY``) uses a Qdrant server or cluster. ``--api-key`` (``UME_API_KEY``) is only
ever the key of our own service. ``search``/``delete``/``info`` read the
model an index was built with from the index itself. Errors print one line and exit 1
(``--verbose`` shows the traceback).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

from .errors import UMEError

DEFAULT_MODEL = "zhibinlan/UME-R1-2B"
logger = logging.getLogger(__name__)


class CLIError(UMEError):
    """A usage problem the command reports in one line."""


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="ume", description="UME-R1 multimodal search: disc + gen vectors in Qdrant.")
    ap.add_argument("--verbose", "-v", action="store_true", help="log progress details; show tracebacks on errors")
    sub = ap.add_subparsers(dest="command", required=True)

    def store_args(p: argparse.ArgumentParser, service: bool = False) -> None:
        p.add_argument("--store", default=os.environ.get("UME_STORE", "ume-index"),
                       help="embedded store folder (default ./ume-index, or $UME_STORE)")
        p.add_argument("--url", default=os.environ.get("QDRANT_URL"), help="Qdrant server/cluster URL (or $QDRANT_URL)")
        p.add_argument("--qdrant-api-key", default=os.environ.get("QDRANT_API_KEY"),
                       help="Qdrant API key (or $QDRANT_API_KEY)")
        p.add_argument("--collection", default="ume", help="collection name (default ume)")
        if not service:  # --api-key is the service's key (ume serve); here it would have meant Qdrant's
            p.add_argument("--api-key", dest="misplaced_api_key", help=argparse.SUPPRESS)

    def model_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", default=os.environ.get("UME_MODEL"),
                       help=f"hub name or checkpoint folder (default: the index's model, else {DEFAULT_MODEL})")
        p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
        p.add_argument("--dtype", help="float32, bfloat16 ... (default: bfloat16 on cuda, float32 on cpu)")
        p.add_argument("--batch-size", type=int, help="inputs per forward pass")
        p.add_argument("--max-new-tokens", type=int, help="reasoning length cap for gen vectors")

    def ray_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--ray", metavar="ADDRESS",
                       help="run on Ray Data: local (a Ray instance on this machine), auto (this machine's cluster) "
                            "or a cluster address (ray://HOST:10001, HOST:6379); needs the ray extra")
        p.add_argument("--encoders", type=int, default=1, help="with --ray: encoder actors (default 1)")
        p.add_argument("--gpus-per-encoder", type=float,
                       help="with --ray: GPUs per encoder actor (default: 1 where the cluster has GPUs, else 0)")
        p.add_argument("--threads-per-encoder", type=int,
                       help="with --ray: torch threads of a CPU encoder actor (default: the cores shared among them)")

    p = sub.add_parser("index", help="index files and folders (PDF pages, images, videos, text)")
    p.add_argument("paths", nargs="+", help="files or folders (recursively)")
    store_args(p)
    model_args(p)
    p.add_argument("--vectors", default="disc,gen", help="disc, gen or disc,gen (default both)")
    p.add_argument("--pdf-dpi", type=int, default=144, help="PDF render resolution")
    p.add_argument("--chunk-chars", type=int, help="split text files into chunks of about this many characters")
    p.add_argument("--clip-seconds", type=float, help="split videos into clips of this length")
    p.add_argument("--prune", action="store_true",
                   help="also delete the points of files under the given folders that no longer exist")
    p.add_argument("--retry-quarantined", action="store_true",
                   help="try again files an earlier ingest died on while decoding them")
    p.add_argument("--follow-symlinks", action="store_true",
                   help="follow symbolic links that lead out of the given folders (skipped by default)")
    p.add_argument("--gen", default="now", choices=("now", "later"),
                   help="later: store disc vectors only (searchable at once); `ume backfill` adds the gen vectors")
    ray_args(p)
    p.add_argument("--json", action="store_true", help="print the report as JSON")

    p = sub.add_parser("backfill", help="compute the gen vectors of points indexed with --gen later")
    store_args(p)
    model_args(p)
    p.add_argument("--limit", type=int, help="at most this many points (newest ingest first)")
    p.add_argument("--retry-failed", action="store_true", help="also retry points whose backfill failed")
    ray_args(p)
    p.add_argument("--json", action="store_true", help="print the report as JSON")

    p = sub.add_parser("search", help="search with a text and/or image query")
    p.add_argument("query", nargs="?", help="query text (optional with --image)")
    p.add_argument("--image", help="an image file as (part of) the query")
    p.add_argument("--k", type=int, default=5, help="results (default 5)")
    p.add_argument("--fusion", default="rrf",
                   help="rrf (default), weighted, dbsf, disc, gen, adaptive; parameters: weighted:disc=0.3,gen=0.7, "
                        "rrf:k=61, adaptive:margin=0.05,then=rrf (reason only when the disc top-2 gap < margin)")
    p.add_argument("--filter", action="append", default=[], metavar="FIELD=VALUE",
                   help="payload filter, repeatable (ANDed): modality=pdf_page, page=3, page>=2, page<5, "
                        "modality=image|pdf_page (any of), title=\"quoted text\" (docs/cli.md: the grammar)")
    p.add_argument("--gen-samples", type=int, default=1, help="sample this many reasoning chains (pass@k)")
    p.add_argument("--instruction", help="task instruction before the query text")
    p.add_argument("--json", action="store_true", help="print hits as JSON")
    store_args(p)
    model_args(p)

    p = sub.add_parser("delete", help="remove files (or item sources) from the index")
    p.add_argument("sources", nargs="+", help="file paths as indexed, or item sources")
    store_args(p)

    p = sub.add_parser("info", help="collection, model, counts")
    p.add_argument("--json", action="store_true")
    store_args(p)

    p = sub.add_parser("serve", help="serve embeddings and search over HTTP (Ray Serve; the serve extra)")
    store_args(p, service=True)
    model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--api-key", dest="service_api_key", default=os.environ.get("UME_API_KEY"),
                   help="the key clients send as 'Authorization: Bearer KEY' (or $UME_API_KEY); required "
                        "off loopback unless --insecure")
    p.add_argument("--insecure", action="store_true", help="allow a non-loopback address without an API key")
    p.add_argument("--allow-root", action="append", default=[], metavar="DIR",
                   help="a server folder POST /v1/index may read from (repeatable; none: uploads only)")
    p.add_argument("--upload-dir", help="where uploaded files are kept (default STORE/uploads)")
    p.add_argument("--served-model-name", help="the model name clients send (default: --model)")
    p.add_argument("--replicas", type=int, default=1, help="encoder replicas (one GPU each where there are GPUs)")
    p.add_argument("--search-replicas", type=int, default=1,
                   help="search/index replicas (1 with the embedded store; several against a Qdrant server)")
    p.add_argument("--ray-address", help="a running Ray cluster (default: start a local instance)")
    p.add_argument("--max-batch-size", type=int, default=16, help="requests encoded together (default 16)")
    p.add_argument("--batch-wait-ms", type=float, default=5.0, help="how long a batch waits to fill (default 5)")
    p.add_argument("--no-backfill", action="store_true", help="do not compute pending gen vectors in the service")
    p.add_argument("--max-body-mb", type=float, default=16, help="JSON request body cap (default 16 MiB)")
    p.add_argument("--max-upload-mb", type=float, default=512, help="upload request cap (default 512 MiB)")
    p.add_argument("--max-image-mb", type=float, default=20, help="one image's cap (default 20 MiB)")
    p.add_argument("--max-image-pixels", type=int, default=50_000_000, help="one image's pixel cap")
    p.add_argument("--max-inputs", type=int, default=256, help="inputs per embeddings request (default 256)")
    p.add_argument("--max-k", type=int, default=1000, help="largest k of a search (default 1000)")
    p.add_argument("--body-timeout", type=float, default=30, help="seconds a client has to send its body")
    p.add_argument("--request-timeout", type=float, default=300, help="seconds an embed or search may take")
    return ap


def parse_filters(specs: Sequence[str]) -> dict[str, Any] | None:
    """``["modality=pdf_page", "page<=3", "page>=2"]`` -> our filter spec (conditions ANDed).

    Grammar of one ``--filter``: ``FIELD OP VALUE``. FIELD ends at the first ``<``, ``>``,
    ``=`` or ``!`` and holds no space, quote or ``|``. OP is ``=``, ``<``, ``<=``, ``>``, ``>=``.
    After ``=``: one value, or several joined by ``|`` (any of); a value is ``"text"`` or
    ``'text'`` (quoted: always text, may hold ``|``, ``<``, spaces), an integer (``3``, ``-2``),
    a number with a fraction or exponent (``3.0``, ``2.5e3``: matched as a number, so
    ``page=3.0`` finds page 3), ``true``/``false``, or else bare text (``source=/a<b.pdf`` is
    text, ``<`` included). After ``<``, ``<=``, ``>``, ``>=``: a finite number. Any-of values
    are all text or all integers. A field may have one equality or any-of, or up to one lower
    and one upper bound. An existing path given as ``source=`` is made absolute.
    """
    out: dict[str, Any] = {}
    for spec in specs:
        def bad(why: str, spec: str = spec) -> CLIError:
            return CLIError(f"--filter {spec!r}: {why}")

        field, op, raw = _split_filter(spec, bad)
        existing = out.get(field)
        if op != "=":
            bound = _filter_number(raw, bad)
            if bound is None:
                raise bad(f"{raw!r} is not a number ({field}{op}N compares numbers)")
            key = _RANGE_OPS[op]
            if existing is not None and not isinstance(existing, dict):
                raise bad(f"{field} already has the condition ={existing!r}; a field takes one equality or a range")
            side = ("gte", "gt") if key in ("gte", "gt") else ("lte", "lt")
            if existing and any(k in existing for k in side):
                which = "lower" if side[0] == "gte" else "upper"
                raise bad(f"{field} already has a {which} bound; give at most one lower and one upper bound")
            out[field] = {**(existing or {}), key: bound}
            continue
        if existing is not None:
            raise bad(f"{field} is given twice (filters are ANDed; for any of several values write {field}=a|b)")
        values = [_filter_value(text, quoted, bad) for text, quoted in _filter_alternatives(raw, bad)]
        if field == "source":  # sources are stored as absolute paths
            values = [str(Path(v).absolute()) if isinstance(v, str) and Path(v).exists() else v for v in values]
        if len(values) == 1:
            out[field] = values[0]
            continue
        for v in values:
            if isinstance(v, (bool, float)):
                raise bad(f"any of (|) takes text or integers, not {v!r} (match numbers with a fraction by a range)")
        if len({type(v) for v in values}) > 1:
            quoted = "|".join(f'"{v}"' if isinstance(v, int) else str(v) for v in values)
            raise bad(f"any of (|) mixes text and integers; to match them all as text, quote the numbers: "
                      f"{field}={quoted}")
        out[field] = values
    return out or None


_RANGE_OPS = {"<=": "lte", ">=": "gte", "<": "lt", ">": "gt"}
_INT_RE = re.compile(r"[+-]?\d+\Z")
_FLOAT_RE = re.compile(r"[+-]?(\d+\.\d*|\.\d+|\d+)([eE][+-]?\d+)?\Z")
# One alternative of an equality value: "text" | 'text' | bare text, then | or the end.
_ALT_RE = re.compile(r"""\s*(?:"([^"]*)"|'([^']*)'|([^|"']*?))\s*(\||\Z)""")


def _split_filter(spec: str, bad: Any) -> tuple[str, str, str]:
    match = re.search(r"[<>=!]", spec)
    if match is None:
        raise bad("write FIELD=VALUE, FIELD=A|B, FIELD<=N, FIELD>=N, FIELD<N or FIELD>N")
    i = match.start()
    if spec[i] == "!":
        raise bad("'!' is not an operator here (no 'not equal'): the operators are =, <, <=, >, >=")
    op = spec[i:i + 2] if spec[i:i + 2] in ("<=", ">=") else spec[i]
    field, raw = spec[:i].strip(), spec[i + len(op):].strip()
    if not field:
        raise bad(f"no field name before {op!r} (write FIELD{op}VALUE)")
    if re.search(r"[\s|\"']", field):
        raise bad(f"{field!r} is not a field name (no spaces, quotes or |)")
    if not raw:
        raise bad(f"no value after {op!r}")
    if op == "=" and raw[0] in "<>=!":
        meant = f"{field}={raw.lstrip('=')}" if raw[0] == "=" else f"{field}{raw}"
        raise bad(f"the value starts with {raw[0]!r}: did you mean {meant}? Quote a value that starts so "
                  f"({field}=\"{raw}\")")
    return field, op, raw


def _filter_alternatives(raw: str, bad: Any) -> list[tuple[str, bool]]:
    """``[(text, quoted)]``: the ``|``-separated values of an equality."""
    alternatives, pos = [], 0
    while True:
        match = _ALT_RE.match(raw, pos)
        if match is None:
            raise bad("an unclosed quote, or a quote inside an unquoted value: quote the whole value "
                      "(title=\"it's\")")
        double, single, bare, sep = match.groups()
        if double is not None or single is not None:
            alternatives.append((double if double is not None else single, True))
        elif bare.strip():
            alternatives.append((bare.strip(), False))
        else:
            raise bad("an empty value (nothing between two |, or at an end)")
        if not sep:
            return alternatives
        pos = match.end()


def _filter_number(text: str, bad: Any) -> int | float | None:
    """An int, a finite float, or None when ``text`` is not written as a number."""
    if _INT_RE.match(text):
        return int(text)
    if _FLOAT_RE.match(text):
        number = float(text)
        if not math.isfinite(number):
            raise bad(f"{text!r} is beyond the range of numbers")
        return number
    return None


def _filter_value(text: str, quoted: bool, bad: Any) -> Any:
    if quoted:
        return text
    number = _filter_number(text, bad)
    if number is not None:
        return number
    if text in ("true", "false"):
        return text == "true"
    return text


def _store_location(args: argparse.Namespace) -> dict[str, Any]:
    return {"url": args.url, "api_key": args.qdrant_api_key, "collection": args.collection} if args.url else \
        {"path": args.store, "collection": args.collection}


def _recorded(args: argparse.Namespace):
    from .store import recorded_schema

    loc = _store_location(args)
    return recorded_schema(loc.get("path"), url=loc.get("url"), api_key=loc.get("api_key"), collection=args.collection)


def _open_existing_store(args: argparse.Namespace):
    """The store as it is (no model loaded): for delete and info."""
    from .store import open_store

    schema = _recorded(args)
    where = args.url or str(Path(args.store) / args.collection)
    if schema is None:
        raise CLIError(f"no UME index at {where} (create one with `ume index PATHS`)")
    loc = _store_location(args)
    return schema, open_store(schema, loc.get("path"), url=loc.get("url"), api_key=loc.get("api_key"),
                              collection=args.collection)


def _open_index(args: argparse.Namespace, vectors: Sequence[str] | None = None, must_exist: bool = False):
    from .index import UMEIndex
    from .inputs.loaders import LoaderConfig
    from .model.encoder import UMEEncoder

    loader = None
    if getattr(args, "pdf_dpi", None) is not None:  # built first: a bad setting fails before the model loads
        loader = LoaderConfig(pdf_dpi=args.pdf_dpi, text_chunk_chars=args.chunk_chars,
                              video_clip_seconds=args.clip_seconds, follow_symlinks=args.follow_symlinks)
    schema = _recorded(args)
    if must_exist and schema is None:
        raise CLIError(f"no UME index at {args.url or Path(args.store) / args.collection} "
                       "(create one with `ume index PATHS`)")
    model = args.model or (schema.model if schema else DEFAULT_MODEL)
    kwargs = {k: getattr(args, k) for k in ("device", "dtype", "batch_size", "max_new_tokens")
              if getattr(args, k, None) is not None}
    logger.info("loading %s", model)
    if not args.verbose:  # our own bar and tables only
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    encoder = UMEEncoder.from_pretrained(model, **kwargs)
    loc = _store_location(args)
    return UMEIndex(encoder, loc.get("path"), url=loc.get("url"), api_key=loc.get("api_key"),
                    collection=args.collection, vectors=vectors or ("disc", "gen"), loader=loader)


def cmd_index(args: argparse.Namespace, console: Any) -> int:
    vectors = tuple(v.strip() for v in args.vectors.split(",") if v.strip())
    if not vectors or not set(vectors) <= {"disc", "gen"}:
        raise CLIError(f"--vectors {args.vectors!r}: use disc, gen or disc,gen")
    ray_options = _ray_options(args)
    with _open_index(args, vectors) as index:
        report = index.add(args.paths, show_progress=not args.json, prune=args.prune,
                           retry_quarantined=args.retry_quarantined, gen=args.gen, **ray_options)
        total = index.count()
        pending = index.pending_gen()
    if args.json:
        print(json.dumps({"entries": [e.__dict__ for e in report.entries], "stale_removed": report.deleted_stale,
                          "seconds": report.seconds, "points": total, "optimized": report.optimized,
                          "gen_pending": pending}, indent=2))
        return 1 if report.failed else 0
    from rich.markup import escape
    from rich.table import Table

    summary = Table(title=escape(f"Indexed into {index.store.location}"))
    for col in ("indexed", "unchanged", "failed", "skipped", "removed", "stale removed", "points in index", "seconds"):
        summary.add_column(col, justify="right")
    summary.add_row(str(len(report.indexed)), str(len(report.unchanged)), str(len(report.failed)),
                    str(len(report.skipped)), str(len(report.removed)), str(report.deleted_stale), str(total),
                    f"{report.seconds:.1f}")
    console.print(summary)
    for title, style, entries in (("Failed", "bold red", report.failed), ("Skipped", "yellow", report.skipped),
                                  ("Removed (files gone)", "cyan", report.removed)):
        if not entries:
            continue
        table = Table(title=title, title_style=style)
        table.add_column("source")
        table.add_column("where")
        table.add_column("reason", overflow="fold")
        for e in entries:
            table.add_row(escape(e.source), escape(e.locator), escape(e.reason or ""))
        console.print(table)
    if report.optimized:
        console.print("vector indexes (HNSW) built for the new points")
    if pending:
        console.print(f"{pending} point(s) wait for their gen vector: run `ume backfill`")
    return 1 if report.failed else 0


def _ray_options(args: argparse.Namespace) -> dict[str, Any]:
    """``--ray`` and its actor options as keyword arguments of ``add``/``backfill_gen``."""
    if args.ray is not None:
        return {"ray": args.ray, "encoders": args.encoders, "gpus_per_encoder": args.gpus_per_encoder,
                "threads_per_encoder": args.threads_per_encoder}
    if args.encoders != 1 or args.gpus_per_encoder is not None or args.threads_per_encoder is not None:
        raise CLIError("--encoders, --gpus-per-encoder and --threads-per-encoder need --ray ADDRESS")
    return {}


def cmd_backfill(args: argparse.Namespace, console: Any) -> int:
    if args.limit is not None and args.limit < 0:
        raise CLIError(f"--limit must be >= 0, got {args.limit}")
    ray_options = _ray_options(args)
    with _open_index(args, must_exist=True) as index:
        if index.vectors != ("disc", "gen"):
            raise CLIError("this index does not store gen vectors: nothing to backfill")
        report = index.backfill_gen(args.limit, show_progress=not args.json, retry_failed=args.retry_failed,
                                    **ray_options)
        failed_total = index.failed_gen()
    if args.json:
        print(json.dumps({"filled": report.filled, "failed": [e.__dict__ for e in report.failed],
                          "changed": [e.__dict__ for e in report.changed], "pending": report.remaining,
                          "failed_total": failed_total, "seconds": report.seconds}, indent=2))
        return 1 if report.failed else 0
    from rich.markup import escape
    from rich.table import Table

    summary = Table(title="gen backfill")
    for col in ("filled", "failed", "changed", "still pending", "seconds"):
        summary.add_column(col, justify="right")
    summary.add_row(str(report.filled), str(len(report.failed)), str(len(report.changed)), str(report.remaining),
                    f"{report.seconds:.1f}")
    console.print(summary)
    for title, style, entries in (("Failed (ume backfill --retry-failed retries)", "bold red", report.failed),
                                  ("Changed since indexed (run ume index again)", "yellow", report.changed)):
        if entries:
            table = Table(title=title, title_style=style)
            for col in ("source", "where", "reason"):
                table.add_column(col, overflow="fold")
            for e in entries:
                table.add_row(escape(e.source), escape(e.locator), escape(e.reason))
            console.print(table)
    return 1 if report.failed else 0


def cmd_search(args: argparse.Namespace, console: Any) -> int:
    from .fusion import Fusion
    from .inputs.query import build_query

    if args.query is None and args.image is None:
        raise CLIError("give a query text, --image FILE, or both")
    if args.image is not None and not Path(args.image).is_file():
        raise CLIError(f"--image {args.image}: no such file")
    if args.k < 1:
        raise CLIError(f"--k must be >= 1, got {args.k}")
    fusion = Fusion.parse(args.fusion)
    flt = parse_filters(args.filter)
    query = build_query(args.query, Path(args.image) if args.image else None)
    with _open_index(args, must_exist=True) as index:
        hits = index.search(query, args.k, fusion=fusion, filter=flt, gen_samples=args.gen_samples,
                            instruction=args.instruction)
    if args.json:
        print(json.dumps([{"rank": i + 1, "id": h.id, "score": h.score, "disc_score": h.disc_score,
                           "gen_score": h.gen_score, "source": h.source, "page": h.page,
                           "modality": h.payload.get("modality"), "locator": h.payload.get("locator"),
                           "reasoning": h.reasoning, "reasoned": h.reasoned,
                           "gen_pending": h.payload.get("gen_status") is not None} for i, h in enumerate(hits)],
                         indent=2))
        return 0
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"{len(hits)} hits, fusion {fusion}")
    for col, just in (("#", "right"), ("source", "left"), ("page", "right"), ("fused", "right"),
                      ("disc", "right"), ("gen", "right"), ("reasoning", "left")):
        table.add_column(col, justify=just, overflow="fold")
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    for i, h in enumerate(hits):
        table.add_row(str(i + 1), escape(_short_source(h)), str(h.page or ""), fmt(h.score), fmt(h.disc_score),
                      fmt(h.gen_score), escape(first_words(h.reasoning)))
    console.print(table)
    return 0


def _short_source(hit: Any) -> str:
    source = hit.source or hit.id
    try:
        return str(Path(source).relative_to(Path.cwd()))
    except ValueError:
        return source


def first_words(reasoning: str | None, n: int = 16) -> str:
    """The reasoning's first ``n`` words, without the special-token markup."""
    if not reasoning:
        return ""
    text = reasoning
    for tag in ("<think>", "</think>", "<answer>", "</answer>", "<gen_emb>"):
        text = text.replace(tag, " ")
    words = text.split()
    return " ".join(words[:n]) + (" ..." if len(words) > n else "")


def cmd_delete(args: argparse.Namespace, console: Any) -> int:
    from .index import source_keys

    _, store = _open_existing_store(args)
    try:
        missing = []
        for source in args.sources:
            keys = source_keys(source)  # a path as given (stored absolute) or an item source
            n = store.count({"source": keys, "kind": "item"})
            if n == 0 and store.count({"source": keys}) == 0:
                missing.append(source)
                continue
            store.delete_where({"source": keys})
            console.print(f"deleted {source}: {n} item(s)", markup=False)
    finally:
        store.close()
    if missing:
        raise CLIError(f"not in the index: {', '.join(missing)}")
    return 0


def cmd_info(args: argparse.Namespace, console: Any) -> int:
    schema, store = _open_existing_store(args)
    try:
        modalities: Counter = Counter()
        gen_status: Counter = Counter()
        sources: set[str] = set()
        for _, payload in store.scroll({"kind": "item"}, ["modality", "source", "gen_status"]):
            modalities[payload.get("modality", "?")] += 1
            sources.add(payload.get("source", "?"))
            if payload.get("gen_status"):
                gen_status[payload["gen_status"]] += 1
        # files whose last ingest failed: their last good version is what search serves
        stale = {p["source"]: p["last_error"] for _, p in store.scroll({"kind": "manifest"}, ["source", "last_error"])
                 if p.get("last_error")}
        from .ingest_journal import IngestJournal, journal_path

        quarantined = {s: e.get("reason") for s, e in
                       IngestJournal(journal_path(str(store.location), args.collection)).quarantined.items()}
        info = {"location": store.location, "collection": args.collection, "model": schema.model,
                "revision": schema.revision, "vector_size": schema.vector_size, "distance": schema.distance,
                "items": sum(modalities.values()), "sources": len(sources), "by_modality": dict(modalities),
                "stale_sources": stale, "quarantined": quarantined,
                "gen_pending": gen_status["pending"], "gen_failed": gen_status["failed"]}
    finally:
        store.close()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="UME index", show_header=False)
    for key in ("location", "collection", "model", "revision", "vector_size", "distance", "items", "sources"):
        table.add_row(key, escape(str(info[key])))
    for modality, n in sorted(modalities.items()):
        table.add_row(f"  {modality}", str(n))
    table.add_row("gen pending", f"{info['gen_pending']}" + ("; run: ume backfill" if info["gen_pending"] else ""))
    if info["gen_failed"]:
        table.add_row("gen failed", f"{info['gen_failed']}; retry: ume backfill --retry-failed")
    table.add_row("stale sources", str(len(stale)))
    for source, reason in sorted(stale.items()):
        table.add_row(f"  {escape(source)}", escape(f"last ingest failed ({reason}): last good version served"))
    table.add_row("quarantined", str(len(quarantined)))
    for source, reason in sorted(quarantined.items()):
        table.add_row(f"  {escape(source)}", escape(f"{reason}; retry: ume index PATH --retry-quarantined"))
    console.print(table)
    return 0


def cmd_serve(args: argparse.Namespace, console: Any) -> int:
    try:
        from .serve.runner import run_service
    except ImportError as exc:
        raise CLIError(f"ume serve needs the serve extra: pip install 'ume-r1[serve]' ({exc})") from None
    from .serve.config import MiB, ServeConfig

    schema = _recorded(args)
    model = args.model or (schema.model if schema else DEFAULT_MODEL)
    if Path(model).exists():
        model = str(Path(model).absolute())  # Ray workers need not share our working directory
    try:
        config = ServeConfig(
            model=model, store=None if args.url else str(Path(args.store).absolute()), url=args.url,
            qdrant_api_key=args.qdrant_api_key, collection=args.collection, host=args.host, port=args.port,
            api_key=args.service_api_key, insecure=args.insecure, allow_roots=args.allow_root,
            upload_dir=args.upload_dir, served_model_name=args.served_model_name, replicas=args.replicas,
            search_replicas=args.search_replicas, device=args.device, dtype=args.dtype, batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens, max_batch_size=args.max_batch_size,
            batch_wait_ms=args.batch_wait_ms, backfill=not args.no_backfill, ray_address=args.ray_address,
            max_body_bytes=int(args.max_body_mb * MiB), max_upload_bytes=int(args.max_upload_mb * MiB),
            max_image_bytes=int(args.max_image_mb * MiB), max_image_pixels=args.max_image_pixels,
            max_inputs=args.max_inputs, max_k=args.max_k, body_timeout_s=args.body_timeout,
            request_timeout_s=args.request_timeout)
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    run_service(config, ready=lambda url: print(f"ume serve: ready on {url}", file=sys.stderr, flush=True))
    print("ume serve: stopped", file=sys.stderr, flush=True)
    return 0


COMMANDS = {"index": cmd_index, "backfill": cmd_backfill, "search": cmd_search, "delete": cmd_delete,
            "info": cmd_info, "serve": cmd_serve}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    from rich.console import Console

    console = Console(stderr=False)
    try:
        if getattr(args, "misplaced_api_key", None) is not None:
            raise CLIError("--api-key is the key of `ume serve` clients; Qdrant's key is --qdrant-api-key "
                           "(or $QDRANT_API_KEY)")
        return COMMANDS[args.command](args, console)
    except KeyboardInterrupt:
        print("ume: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - one clear line, the traceback only on request
        if args.verbose:
            raise
        print(f"ume {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
