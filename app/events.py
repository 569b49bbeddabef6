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
    from serving.online import owner, pid_alive

    url_file = artifacts / "online" / "url"
    if not url_file.is_file():
        raise EventsError(f"no private online store is running for {artifacts} ({url_file} is missing): start "
                          "`shoprec serve`, or pass --online-store redis://HOST:PORT/DB")
    started_by = owner(url_file.parent)
    if started_by is not None and not pid_alive(started_by):  # no server reads it: what is written would be lost
        raise EventsError(f"the private online store for {artifacts} was left by a server that is gone (pid "
                          f"{started_by}), so no server reads it: start `shoprec serve`, which takes it over")
    return url_file.read_text().strip()


def read_events(stream, fmt: str, delimiter: str | None = None):
    """Yield (line number, event dict or an error string) from JSON lines or CSV text. CSV: the header's names
    stripped; `delimiter` None: a comma, unless the header has none and is split by ';', '|' or tabs (a spreadsheet's
    export, as `shoprec data` reads it)."""
    if fmt == "jsonl":
        for n, line in enumerate(stream, 1):
            if not line.strip():
                continue
            try:
                event = json.loads(line)
            except json.JSONDecodeError as exc:
                yield n, f"not JSON ({exc.msg})"
                continue
            yield n, (_event_as_type(event) if isinstance(event, dict) else
                      f"not a JSON object with user_id, item_id, type, timestamp (a {type(event).__name__})")
    elif fmt == "csv":
        header = stream.readline()
        if delimiter is None:
            delimiter = next((d for d in ";|\t" if "," not in header and d in header), ",")
        reader = csv.reader(io.StringIO(header), delimiter=delimiter)
        names = [name.strip() for name in next(reader, [])]
        fields = set(names)
        missing = {"user_id", "item_id", "type", "timestamp"} - fields - ({"type"} if "event" in fields else set())
        if missing:
            raise EventsError(f"CSV header lacks {', '.join(sorted(missing))} (has: {', '.join(names)})")
        rows = csv.DictReader(stream, fieldnames=names, delimiter=delimiter)
        for row in rows:
            yield rows.line_num + 1, _event_as_type(row)  # the row's last line (the header was read before)
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
        if event.get(field) in (None, ""):
            return f"missing {field}"
        text = id_text(event.get(field))
        try:
            event[field] = key_id(text)
        except (TypeError, ValueError):
            return f"{field} {event.get(field)!r} is not a text id (text or an integer)"
    return None


def _texts_named(reason: str, texts: dict | None) -> str:
    """A rejection's reason with each hashed text id (`--string-ids`) written as the text it was sent as."""
    for key, text in (texts or {}).items():
        reason = reason.replace(f"_id {key} ", f"_id {text!r} ")
    return reason


def ingest_stream(store, stream, fmt: str, progress: bool = True, string_ids: bool = False,
                  delimiter: str | None = None) -> dict:
    """Read, validate and apply events in chunks; a summary with the rejected events' reasons (their line numbers)."""
    from runtime.online_store import IngestReport

    report = IngestReport()
    t0 = time.perf_counter()
    chunk, lines, texts = [], [], []  # texts: per event, {hashed id: the text it was sent as} (--string-ids)
    n_read = 0

    def flush():
        if not chunk:
            return
        before = len(report.rejected)
        store.ingest(chunk, report)
        # the store numbers rejections by position in the chunk: name the input line instead, and a hashed text id
        # by its text
        report.rejected[before:] = [(lines[i] - 1, _texts_named(why, texts[i])) for i, why in report.rejected[before:]]
        chunk.clear()
        lines.clear()
        texts.clear()

    for n, event in read_events(stream, fmt, delimiter):
        n_read += 1
        sent = {}
        if isinstance(event, dict) and string_ids:
            sent = {f: event.get(f) for f in ("user_id", "item_id")}
            event = text_ids(event) or event
        if isinstance(event, str):
            report.rejected.append((n - 1, event))
            continue
        chunk.append(event)
        lines.append(n)
        texts.append({event[f]: text for f, text in sent.items()})
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
        stream = io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8-sig", newline="")
        delimiter = None
    else:
        path = Path(args.file)
        if not path.is_file():
            raise EventsError(f"{path}: no such file")
        fmt = args.format or ("csv" if path.suffix.lower() in (".csv", ".tsv") else "jsonl")
        stream = path.open(encoding="utf-8-sig", newline="")  # -sig: a spreadsheet's byte-order mark is not a name
        delimiter = "\t" if path.suffix.lower() == ".tsv" else None
    with stream:
        summary = ingest_stream(store, stream, fmt, progress=not args.quiet, string_ids=args.string_ids,
                                delimiter=delimiter)
    print(json.dumps(summary, indent=1))


def item_ids(values: list[str] | None, string_ids: bool, option: str) -> list[int]:
    """`shoprec items` ids as given: integers, or with --string-ids text ids hashed by `shoprec.ids.key_id`."""
    from runtime.online_store import _int
    from shoprec.ids import key_id

    out = []
    for value in values or []:
        if string_ids:
            try:
                out.append(key_id(value))
            except ValueError:  # the one refusal of a str: empty
                raise EventsError(f"{option}: empty text id") from None
        elif value.strip().isdigit():
            try:
                out.append(_int(value, option))  # the store's rule for an id: it fits int64
            except ValueError as exc:
                raise EventsError(str(exc)) from None
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
    if args.trending is not None:
        try:
            out["trending"] = [{"item_id": i, "events": n} for i, n in store.trending(args.trending)]
        except ValueError as exc:
            raise EventsError(str(exc)) from None
    print(json.dumps(out))
