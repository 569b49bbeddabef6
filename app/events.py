"""`shoprec events` and `shoprec items`: write user events and item availability to the online store
of a running server (runtime/online_store.py).

Events are JSON lines (one object per line) or CSV with a header; the fields are
user_id, item_id, type (view, click, cart, purchase; or named `event`, as in the files `shoprec data` reads),
timestamp (unix seconds or ISO-8601) and
optionally event_id (idempotency: an id already applied is skipped) and session_id. With `--string-ids`
(data loaded that way) user_id and item_id are text ids, hashed by `shoprec.ids.key_id` as the loader did.
"""

from __future__ import annotations

import csv
import io
import json
import sys
import time
from pathlib import Path

from shoprec.bundles import served_bundle
from shoprec.errors import UserError

CHUNK = 1000


class EventsError(UserError, ValueError):
    pass


def online_url(artifacts: Path, configured: str) -> str:
    """The Redis URL to write to: the given one, or the private store a `shoprec serve` on these artifacts runs."""
    from runtime.online_store import store_url

    if store_url(configured):
        return configured
    if configured == "none":
        raise EventsError("the online store is off (serve.online_store = none); pass --online-store redis://HOST:PORT/DB")
    url_file = artifacts / "online" / "url"
    if not url_file.is_file():
        raise EventsError(f"no private online store is running for {artifacts} ({url_file} is missing): start "
                          "`shoprec serve`, or pass --online-store redis://HOST:PORT/DB")
    return url_file.read_text().strip()


def read_events(stream, fmt: str):
    """Yield (position, event dict or an error string) from JSON lines or CSV text."""
    if fmt == "jsonl":
        for n, line in enumerate(stream, 1):
            if not line.strip():
                continue
            try:
                yield n, _event_as_type(json.loads(line))
            except json.JSONDecodeError as exc:
                yield n, f"not JSON ({exc.msg})"
    elif fmt == "csv":
        reader = csv.DictReader(stream)
        fields = set(reader.fieldnames or ())
        missing = {"user_id", "item_id", "type", "timestamp"} - fields - ({"type"} if "event" in fields else set())
        if missing:
            raise EventsError(f"CSV header lacks {', '.join(sorted(missing))} (has: {', '.join(reader.fieldnames or [])})")
        for n, row in enumerate(reader, 2):
            yield n, _event_as_type(row)
    else:
        raise EventsError(f"format must be jsonl or csv, got {fmt!r}")


def _event_as_type(event):
    """The loader's column name `event` read as `type` (when the event has no `type`)."""
    if isinstance(event, dict) and "type" not in event and "event" in event:
        event["type"] = event.pop("event")
    return event


def text_ids(event: dict) -> str | None:
    """For data loaded with `--string-ids`: the event's user_id and item_id replaced in place by
    `shoprec.ids.key_id` of their text (`shoprec.ids.id_text`, as the loader reads them); the reason when one cannot
    be."""
    from shoprec.ids import id_text, key_id

    for field in ("user_id", "item_id"):
        text = id_text(event.get(field))
        try:
            event[field] = key_id(text)
        except (TypeError, ValueError):
            return f"{field} {event.get(field)!r} is not a text id (text or an integer)"
    return None


def ingest_stream(store, stream, fmt: str, progress: bool = True, string_ids: bool = False) -> dict:
    """Read, validate and apply events in chunks; a summary with the rejected events' reasons (their line numbers)."""
    from runtime.online_store import IngestReport

    report = IngestReport()
    t0 = time.perf_counter()
    chunk, lines = [], []
    n_read = 0

    def flush():
        if not chunk:
            return
        before = len(report.rejected)
        store.ingest(chunk, report)
        # the store numbers rejections by position in the chunk: name the input line instead
        report.rejected[before:] = [(lines[i] - 1, why) for i, why in report.rejected[before:]]
        chunk.clear()
        lines.clear()

    for n, event in read_events(stream, fmt):
        n_read += 1
        if isinstance(event, dict) and string_ids:
            event = text_ids(event) or event
        if isinstance(event, str):
            report.rejected.append((n - 1, event))
            continue
        chunk.append(event)
        lines.append(n)
        if len(chunk) >= CHUNK:
            flush()
            if progress and n_read % (CHUNK * 50) == 0:
                print(f"events: {n_read} read, {report.accepted} accepted", file=sys.stderr, flush=True)
    flush()
    seconds = time.perf_counter() - t0
    out = report.as_dict()
    out["reasons"] = [r.replace("event ", "line ", 1) for r in out["reasons"]]
    out.update(read=n_read, seconds=round(seconds, 3), events_per_s=round(n_read / seconds, 1) if seconds > 0 else None)
    return out


def cmd_events(args, cfg) -> None:
    from runtime.online_store import OnlineStore

    artifacts = Path(args.artifacts).resolve()
    store = OnlineStore.open(served_bundle(artifacts), online_url(artifacts, args.online_store or cfg.serve.online_store), cfg.serve)
    if args.file in (None, "-"):
        fmt = args.format or "jsonl"
        stream = io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8")
    else:
        path = Path(args.file)
        if not path.is_file():
            raise EventsError(f"{path}: no such file")
        fmt = args.format or ("csv" if path.suffix.lower() in (".csv", ".tsv") else "jsonl")
        stream = path.open(encoding="utf-8", newline="")
    with stream:
        summary = ingest_stream(store, stream, fmt, progress=not args.quiet, string_ids=args.string_ids)
    print(json.dumps(summary, indent=1))


def item_ids(values: list[str] | None, string_ids: bool, option: str) -> list[int]:
    """`shoprec items` ids as given: integers, or with --string-ids text ids hashed by `shoprec.ids.key_id`."""
    from shoprec.ids import key_id

    out = []
    for value in values or []:
        if string_ids:
            try:
                out.append(key_id(value))
            except ValueError:  # the one refusal of a str: empty
                raise EventsError(f"{option}: empty text id") from None
        elif value.strip().isdigit():
            out.append(int(value))
        else:
            raise EventsError(f"{option}: {value!r} is not an integer item id (text ids: --string-ids)")
    return out


def cmd_items(args, cfg) -> None:
    from runtime.online_store import OnlineStore

    unavailable = item_ids(args.unavailable, args.string_ids, "--unavailable")
    available = item_ids(args.available, args.string_ids, "--available")
    artifacts = Path(args.artifacts).resolve()
    store = OnlineStore.open(served_bundle(artifacts), online_url(artifacts, args.online_store or cfg.serve.online_store), cfg.serve)
    out: dict = {}
    if unavailable:
        out["made_unavailable"], out["unknown"] = store.set_available(unavailable, available=False)
    if available:
        out["made_available"], unknown = store.set_available(available, available=True)
        out["unknown"] = out.get("unknown", []) + unknown
    out["unavailable"] = store.unavailable_ids().tolist()
    if args.trending:
        try:
            out["trending"] = [{"item_id": i, "events": n} for i, n in store.trending(args.trending)]
        except ValueError as exc:
            raise EventsError(str(exc)) from None
    print(json.dumps(out))
