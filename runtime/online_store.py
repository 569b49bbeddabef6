"""The online user store: Redis holds what users did since the export, the bundle's user store is the
snapshot underneath.

A request reads its users' live states and the unavailable items in ONE pipelined round trip
(`OnlineStore.read`). A user without a live state is served from the snapshot, as before. When
Redis is down or slower than `serve.online_timeout_ms`, the whole request is served from the
snapshot and marked `degraded`; after a failure the store is not asked again for
`serve.online_retry_s`, so a dead Redis costs no timeouts.

Events (`OnlineStore.ingest`, `shoprec events`) are user, item, type (view/click/cart/purchase),
timestamp and optional event id and session id. A user's first event seeds their live actions
from the snapshot, so the live state is the offline state of snapshot + events: same dedup (one
action per item and session, first time, strongest kind), same order (by time, whatever the
arrival order), same state (runtime/user_state.py). An event id already applied is skipped.

Key layout; the prefix names the bundle (`shoprec:<12 hex of its item table and user store
sha256>`), because item rows and the snapshot belong to one export:
  <p>:acts:<user>    HASH   "<item row>:<session>" -> "<unix seconds>:<kind 1-4>", the live actions
                            (at most `serve.online_max_actions`, the latest kept)
  <p>:state:<user>   STRING the state derived from them, with the user's columns as the query plan encodes
                            them (runtime/user_state.pack): what a request reads
  <p>:events:<user>  HASH   event id -> unix seconds: the user's applied event ids (idempotency;
                            an event id is unique per user; at most `serve.online_max_event_ids`,
                            the latest by event time: an older id replayed is applied again)
  shoprec:unavailable:items  STRING sorted raw item ids (int64) that no list may hold: without the bundle's
                            prefix, since raw ids outlive an export (withdrawn items stay withdrawn after a deploy)
  <p>:trend:<hour>   ZSET   item row -> accepted events in that hour (unix hours; kept two days):
                            `OnlineStore.trending`, `shoprec items --trending`
User and event keys expire `serve.online_ttl_days` after their last write: a user quiet for longer
is served from the snapshot again (the next export holds their events). Writes are optimistic
transactions (WATCH/MULTI), so concurrent writers never lose an event.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from shoprec.errors import UserError
from shoprec.manifest import read_manifest

from .request_transform import StateEncoder, TransformPlan, find_rows
from .user_state import pack, unpack, user_state

KIND = {"view": 1, "click": 2, "cart": 3, "purchase": 4}
TS_LIMIT = (1 << 34) - 1  # the offline store's limit (feature_workflows/history.py)
MAX_EVENT_ID = 128
TREND_TTL_S = 48 * 3600  # hourly item event counters are kept two days
UNAVAILABLE_KEY = "shoprec:unavailable:items"  # raw ids: every export of the shop reads the one list


class OnlineStoreError(UserError, RuntimeError):
    """The online store cannot be used (unreachable, or holds another format)."""


def store_url(value: str) -> str | None:
    """The Redis URL of `serve.online_store`, None when the server runs without one ("none", "private"
    outside `shoprec serve`)."""
    return value if value.startswith(("redis://", "rediss://", "unix://")) else None


def bundle_tag(bundle_path: Path) -> str:
    """Names the export the live keys belong to: its item table and user store hashes."""
    files = read_manifest(bundle_path)["files"]
    digest = hashlib.sha256("".join(files[k]["sha256"] for k in ("item_table.npz", "user_store.npz")).encode())
    return f"shoprec:{digest.hexdigest()[:12]}"


@dataclass
class IngestReport:
    accepted: int = 0
    duplicates: int = 0
    rejected: list = field(default_factory=list)  # (0-based position, reason)

    def as_dict(self, show: int = 20) -> dict:
        return {"accepted": self.accepted, "duplicates": self.duplicates, "rejected": len(self.rejected),
                "reasons": [f"event {i + 1}: {why}" for i, why in sorted(self.rejected, key=lambda r: r[0])[:show]]}


class OnlineStore:
    """Reads for the feature step, writes for event ingestion and item availability.

    item_ids / category / rel_price: the bundle's item table; snapshot: its UserStore; n_seq, n_cat:
    the state's sequence and recent-category lengths."""

    def __init__(self, url: str, prefix: str, item_ids: np.ndarray, category: np.ndarray | None,
                 rel_price: np.ndarray | None, snapshot, n_seq: int, n_cat: int, timeout_ms: float = 50.0,
                 retry_s: float = 1.0, ttl_days: float = 30.0, max_actions: int = 2000, max_event_ids: int = 10_000,
                 encoder=None, max_ahead_s: float = 3600.0):
        """encoder: what encodes written states' user columns (request_transform.StateEncoder), or a function of no
        arguments that makes one (called on the first write); None: states are written without them."""
        import redis

        self.redis_errors = (redis.RedisError, OSError)
        self.watch_error = redis.WatchError
        self.full_error = redis.exceptions.OutOfMemoryError  # the maxmemory refusal (noeviction)
        self.client = redis.Redis.from_url(url, socket_timeout=timeout_ms / 1000, socket_connect_timeout=timeout_ms / 1000,
                                           retry_on_timeout=False)
        self.url, self.prefix = url, prefix
        self.item_ids = np.asarray(item_ids, dtype=np.int64)
        self._item_order = np.argsort(self.item_ids, kind="stable")
        self.category, self.rel_price, self.snapshot = category, rel_price, snapshot
        self.n_seq, self.n_cat = n_seq, n_cat
        self.retry_s, self.ttl_s = retry_s, int(ttl_days * 86_400)
        self.max_actions, self.max_event_ids = max_actions, max_event_ids
        self.max_ahead_s = float(max_ahead_s)  # 0 or less: no check
        self._down_until = 0.0
        self._unavailable_blob = b""
        self._unavailable_rows = np.zeros(0, np.int64)
        self._encoder = encoder

    @property
    def encoder(self):
        """What encodes a written state's user columns (None: nothing does); made once, on the first write."""
        if self._encoder is not None and not isinstance(self._encoder, StateEncoder):
            self._encoder = self._encoder()
        return self._encoder

    @classmethod
    def for_bundle(cls, url: str, bundle, cfg, snapshot, timeout_ms: float | None = None) -> "OnlineStore":
        """The store of one serving bundle (runtime.steps.Bundle) under the serve config's limits. The live
        state has the snapshot's shape: its sequence length, and categories / prices when it has them."""
        table, a = bundle.npz("item_table"), snapshot.arrays
        category = table["category_code"] if "recent_categories" in a else None
        rel_price = table["rel_price"] if "price_level" in a else None
        n_cat = a["recent_categories"].shape[1] if "recent_categories" in a else 0

        def encoder():  # only a writer needs it: the query plan, as the feature step loads it
            plan = TransformPlan.load(bundle.file("query_plan"), bundle.file("query_vocab"))
            return StateEncoder(plan, bundle.dims["query_spec"], snapshot, table["category_names"])

        # the snapshot's encoded columns tie the plan to the store's key prefix (bundle_tag hashes the user store);
        # a store without them (an older bundle) gets states without them too
        return cls(url, bundle_tag(bundle.path), table["item_ids"], category, rel_price, snapshot, a["seq_rows"].shape[1],
                   n_cat, cfg.online_timeout_ms if timeout_ms is None else timeout_ms, cfg.online_retry_s,
                   cfg.online_ttl_days, cfg.online_max_actions, cfg.online_max_event_ids,
                   encoder=encoder if "enc__cat" in a else None, max_ahead_s=cfg.online_max_ahead_s)

    @classmethod
    def open(cls, serving_dir: Path, url: str, cfg, timeout_ms: float = 5000.0) -> "OnlineStore":
        """The writer's store (events, availability) of the bundle in `serving_dir`; checks Redis answers."""
        from .request_transform import UserStore
        from .steps import Bundle

        bundle = Bundle(Path(serving_dir))
        store = cls.for_bundle(url, bundle, cfg, UserStore(bundle.npz("user_store")), timeout_ms)
        store.ping()
        return store

    def key(self, kind: str, name) -> str:
        return f"{self.prefix}:{kind}:{name}"

    def ping(self) -> None:
        try:
            self.client.ping()
        except self.redis_errors as exc:
            raise OnlineStoreError(f"online store {self.url}: {exc}") from None

    def memory(self) -> tuple[int, int] | None:
        """(used bytes, maxmemory bytes; 0: no limit) from Redis's INFO memory, None when it does not answer.
        For the metrics publisher, not the request path."""
        try:
            info = self.client.info("memory")
            return int(info["used_memory"]), int(info.get("maxmemory", 0))
        except (*self.redis_errors, KeyError, ValueError):
            return None

    # ---- request path -------------------------------------------------------------------------------

    def read(self, user_ids: np.ndarray) -> tuple[list, np.ndarray, bool]:
        """(live state or None per user, unavailable item rows, degraded): one round trip (MGET). Degraded: Redis
        failed or is in its retry pause; every user then reads None and the last known unavailable rows."""
        return self.send(user_ids)()

    def send(self, user_ids: np.ndarray):
        """Send the MGET and return a function that waits for its reply and returns what `read` returns, so the
        caller can do its snapshot work while Redis answers."""
        now = time.monotonic()
        if now < self._down_until:
            return lambda: ([None] * len(user_ids), self._unavailable_rows, True)
        pool = self.client.connection_pool
        conn = None
        try:  # one command: the users' states and the unavailable items
            conn = pool.get_connection()
            conn.send_command("MGET", *(self.key("state", int(u)) for u in user_ids), UNAVAILABLE_KEY)
        except self.redis_errors:
            return self._failed(pool, conn, now, len(user_ids))

        def reply():
            try:
                *blobs, unavailable = conn.read_response()
            except self.redis_errors:
                return self._failed(pool, conn, now, len(user_ids))()
            pool.release(conn)
            states = []
            for blob in blobs:
                try:
                    states.append(None if blob is None else unpack(blob))
                except ValueError:  # a value of another format: the snapshot serves that user
                    states.append(None)
            return states, self._rows_of_unavailable(unavailable or b""), False

        return reply

    def _failed(self, pool, conn, now: float, n: int):
        if conn is not None:
            conn.disconnect()  # a reply may still be in flight: never hand this socket to the next request
            pool.release(conn)
        self._down_until = now + self.retry_s
        return lambda: ([None] * n, self._unavailable_rows, True)

    def _rows_of_unavailable(self, blob: bytes) -> np.ndarray:
        if blob != self._unavailable_blob:  # decoded once per change, not per request
            ids = np.frombuffer(blob, np.int64) if len(blob) % 8 == 0 else np.zeros(0, np.int64)
            self._unavailable_rows, _ = self._rows(ids)
            self._unavailable_rows = self._unavailable_rows[self._unavailable_rows >= 0]
            self._unavailable_blob = blob
        return self._unavailable_rows

    def _rows(self, item_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(item row or -1, found) of raw item ids."""
        rows = find_rows(self.item_ids, item_ids, self._item_order)
        return rows, rows >= 0

    # ---- writes -------------------------------------------------------------------------------------

    def ingest(self, events, report: IngestReport | None = None, offset: int = 0) -> IngestReport:
        """Apply a batch of events (dicts); bad ones are rejected with their reason, the rest kept."""
        report = report or IngestReport()
        good = []
        for i, event in enumerate(events):
            try:
                good.append(self._parse(event))
            except ValueError as exc:
                report.rejected.append((offset + i, str(exc)))
        by_user: dict[int, list] = {}
        for e in good:
            by_user.setdefault(e[0], []).append(e)
        users = list(by_user)
        for attempt in range(20):
            try:
                accepted, dups = self._apply(users, by_user)
                break
            except self.watch_error:  # another writer changed one of these users: read again
                time.sleep(0.001 * attempt)
            except self.redis_errors as exc:  # nothing of this batch was written (MULTI/EXEC is all or nothing)
                why = ("full (its maxmemory; raise serve.online_max_memory_mb, or the server's maxmemory, or lower "
                       "serve.online_ttl_days); no event of this batch was written" if isinstance(exc, self.full_error)
                       else str(exc))
                raise OnlineStoreError(f"online store {self.url}: {why}; {report.accepted} events of earlier batches "
                                       "were written") from None
        else:
            raise OnlineStoreError(f"online store {self.url}: {len(users)} users kept changing under this batch")
        report.accepted += accepted
        report.duplicates += dups
        return report

    def _parse(self, event) -> tuple:
        if not isinstance(event, dict):
            raise ValueError("not an object with user_id, item_id, type, timestamp")
        missing = [k for k in ("user_id", "item_id", "type", "timestamp") if event.get(k) in (None, "")]
        if missing:
            raise ValueError(f"missing {', '.join(missing)}")
        user = _int(event["user_id"], "user_id")
        item = _int(event["item_id"], "item_id")
        kind = KIND.get(str(event["type"]).strip().lower())
        if kind is None:
            raise ValueError(f"type {event['type']!r} is not one of {', '.join(KIND)}")
        ts = _timestamp(event["timestamp"])
        if self.max_ahead_s > 0 and ts > time.time() + self.max_ahead_s:
            # it would stay the user's latest action until the clock caught up, and count for trending in an hour to come
            raise ValueError(f"timestamp {event['timestamp']!r} is {ts - time.time():.0f} s ahead of this machine's clock "
                             f"(more than serve.online_max_ahead_s = {self.max_ahead_s:g})")
        row, found = self._rows(np.array([item]))
        if not found[0]:
            raise ValueError(f"item_id {item} is not in the served catalog")
        eid = event.get("event_id")
        eid = None if eid in (None, "") else str(eid)
        if eid is not None and len(eid) > MAX_EVENT_ID:
            raise ValueError(f"event_id longer than {MAX_EVENT_ID} characters")
        session = event.get("session_id")
        # without a session id each (user, timestamp) is its own session, as in the offline loaders
        session = f"t{ts}" if session in (None, "") else str(_int(session, "session_id"))
        return user, int(row[0]), kind, ts, session, eid

    def _seed(self, user: int) -> dict[str, tuple[int, int]]:
        """The snapshot's actions of one user as live action fields."""
        row = int(self.snapshot.lookup(np.array([user]))[0])
        if row < 0:
            return {}
        a = self.snapshot.arrays
        lo, hi = int(a["hist_indptr"][row]), int(a["hist_indptr"][row + 1])
        if "hist_ts" not in a:
            raise OnlineStoreError("the bundle's user store has no action times: re-run `shoprec features` and `export`")
        return {f"{r}:{s}": (int(t), int(k)) for r, s, t, k in
                zip(a["hist_rows"][lo:hi].tolist(), a["hist_session"][lo:hi].tolist(), a["hist_ts"][lo:hi].tolist(),
                    a["hist_kinds"][lo:hi].tolist())}

    def _apply(self, users: list[int], by_user: dict) -> tuple[int, int]:
        """One optimistic transaction for a batch: WATCH the users' keys, read them in one round trip, apply
        the events in Python, write only what changed in MULTI/EXEC (retried by `ingest` on a conflict)."""
        if not users:
            return 0, 0
        act_keys = [self.key("acts", u) for u in users]
        event_keys = [self.key("events", u) for u in users]
        with self.client.pipeline(transaction=True) as tx:
            tx.watch(*act_keys, *event_keys)
            read = self.client.pipeline(transaction=False)  # the reads in one round trip, after WATCH
            for u, k, ek in zip(users, act_keys, event_keys):
                read.hgetall(k)
                eids = [e[5] for e in by_user[u] if e[5] is not None]
                read.hmget(ek, eids) if eids else read.echo(b"")
                read.hlen(ek)
            got = read.execute()
            accepted = dups = 0
            tx.multi()
            trend: dict[tuple[int, int], int] = {}  # (hour, item row) -> accepted events
            states: dict[int, dict] = {}  # the changed users' new states, encoded together below
            for i, (u, key) in enumerate(zip(users, act_keys)):
                fields, applied, n_ids = got[3 * i], got[3 * i + 1], got[3 * i + 2]
                eids = [e[5] for e in by_user[u] if e[5] is not None]
                done = {e for e, v in zip(eids, applied) if v is not None} if eids else set()
                acts = ({f.decode(): tuple(map(int, v.decode().split(":"))) for f, v in fields.items()} if fields
                        else self._seed(u))
                changed: set[str] = set()
                new_ids: dict[str, int] = {}
                for _, row, kind, ts, session, eid in by_user[u]:
                    if eid is not None and (eid in done or eid in new_ids):
                        dups += 1
                        continue
                    if eid is not None:
                        new_ids[eid] = ts
                    f = f"{row}:{session}"
                    old = acts.get(f)
                    merged = (ts, kind) if old is None else (min(old[0], ts), max(old[1], kind))
                    if merged == old:  # the same action again (a resend without an event id): nothing changes,
                        dups += 1      # and it does not count for trending twice
                        continue
                    acts[f] = merged
                    changed.add(f)
                    trend[(ts // 3600, row)] = trend.get((ts // 3600, row), 0) + 1
                    accepted += 1
                if not changed:
                    continue
                if len(acts) > self.max_actions:  # the latest actions stay; memory per user is bounded
                    keep = sorted(acts, key=lambda f: (acts[f][0], int(f.split(":")[0])))[-self.max_actions :]
                    acts = {f: acts[f] for f in keep}
                    changed = set(acts)
                    tx.delete(key)
                elif not fields:  # first live event: the snapshot's actions are written too
                    changed = set(acts)
                tx.hset(key, mapping={f: "%d:%d" % acts[f] for f in changed})
                tx.expire(key, self.ttl_s)
                states[u] = self.state_of(acts)
                if new_ids:
                    tx.hset(event_keys[i], mapping=new_ids)
                    tx.expire(event_keys[i], self.ttl_s)
                    if n_ids + len(new_ids) > self.max_event_ids:  # rare: the oldest ids are forgotten
                        known = {k.decode(): int(v) for k, v in self.client.hgetall(event_keys[i]).items()}
                        known.update(new_ids)
                        oldest = sorted(known, key=lambda e: (known[e], e))[: len(known) - self.max_event_ids]
                        if oldest:
                            tx.hdel(event_keys[i], *oldest)
            if states:
                encoded = self.encoder(list(states), list(states.values())) if self.encoder is not None else None
                for j, (u, state) in enumerate(states.items()):
                    tx.set(self.key("state", u), pack(state, None if encoded is None else (encoded[0][j], encoded[1][j])),
                           ex=self.ttl_s)
            for (hour, row), n in trend.items():
                tx.zincrby(self.key("trend", hour), n, row)
            for hour in {h for h, _ in trend}:
                tx.expire(self.key("trend", hour), TREND_TTL_S)
            tx.execute()
        return accepted, dups

    def state_of(self, acts: dict[str, tuple[int, int]]) -> dict[str, np.ndarray]:
        rows = np.array([int(f.split(":")[0]) for f in acts], np.int64)
        ts = np.array([t for t, _ in acts.values()], np.int64)
        kinds = np.array([k for _, k in acts.values()], np.int64)
        return user_state(rows, kinds, ts, self.category, self.rel_price, self.n_seq, self.n_cat)

    def set_available(self, item_ids, available: bool) -> tuple[int, list]:
        """Mark raw item ids unavailable (never served) or available again: (changed, unknown ids)."""
        ids = np.asarray([_int(i, "item_id") for i in item_ids], dtype=np.int64)
        _, found = self._rows(ids)
        unknown = ids[~found].tolist()
        key = UNAVAILABLE_KEY
        for _ in range(20):
            with self.client.pipeline(transaction=True) as tx:
                tx.watch(key)
                current = set(np.frombuffer(tx.get(key) or b"", np.int64).tolist())
                new = (current - set(ids[found].tolist())) if available else (current | set(ids[found].tolist()))
                tx.multi()
                tx.set(key, np.array(sorted(new), np.int64).tobytes())
                try:
                    tx.execute()
                    return len(new ^ current), unknown
                except self.watch_error:
                    continue
        raise OnlineStoreError(f"online store {self.url}: the unavailable items kept changing")

    def trending(self, hours: int = 24, n: int = 20, now: float | None = None) -> list[tuple[int, int]]:
        """(raw item id, events) of the n items with the most events in the hourly counters that overlap the
        `hours` hours up to `now` (unix seconds; default: the clock), most first; ties by item id."""
        if not 1 <= hours < TREND_TTL_S // 3600:
            raise ValueError(f"trending hours must be in 1..{TREND_TTL_S // 3600 - 1}, got {hours}")
        now = time.time() if now is None else now
        keys = [self.key("trend", h) for h in range(int((now - hours * 3600) // 3600), int(now // 3600) + 1)]
        counts = self.client.zunion(keys, withscores=True)
        ranked = sorted(((self.item_ids[int(row)], int(c)) for row, c in counts), key=lambda x: (-x[1], x[0]))
        return [(int(i), c) for i, c in ranked[:n]]

    def unavailable_ids(self) -> np.ndarray:
        return np.frombuffer(self.client.get(UNAVAILABLE_KEY) or b"", np.int64)


INT64 = (-(1 << 63), (1 << 63) - 1)


def _int(value, name: str) -> int:
    """An id as an int64; ValueError naming `name` otherwise (a float with a fraction, text, out of range)."""
    if isinstance(value, bool):
        raise ValueError(f"{name} {value!r} is not an integer")
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError(f"{name} {value!r} is not an integer")
        out = int(value)
    else:
        try:
            out = int(str(value).strip())
        except ValueError:
            raise ValueError(f"{name} {value!r} is not an integer") from None
    if not INT64[0] <= out <= INT64[1]:
        raise ValueError(f"{name} {value!r} does not fit in int64")
    return out


def _timestamp(value) -> int:
    """Unix seconds (int, float or digits) or ISO-8601 text (UTC unless it names a zone)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        ts = float(value)
    else:
        text = str(value).strip()
        try:
            ts = float(text)
        except ValueError:
            try:
                parsed = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
            except ValueError:
                raise ValueError(f"timestamp {text!r} is neither unix seconds nor ISO-8601") from None
            if parsed.tzinfo is None:
                parsed = parsed.replace(tzinfo=dt.timezone.utc)
            ts = parsed.timestamp()
    if not (ts == ts) or ts < 0 or ts > TS_LIMIT:
        hint = " (milliseconds? divide by 1000)" if 1e11 <= ts <= TS_LIMIT * 1000 else ""
        raise ValueError(f"timestamp {value!r} is outside 0..{TS_LIMIT} unix seconds{hint}")
    return int(ts)
