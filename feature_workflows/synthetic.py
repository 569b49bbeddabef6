"""Synthetic e-commerce shop with planted, learnable structure (the embedded default dataset).

What is planted, so that models can be checked against known truth:
- users have a latent category preference (Dirichlet), favourite brands and a price tier (budget
  .. premium, the same in every category);
- item popularity is long-tailed (Pareto weights, shape POPULARITY_TAIL) and drives what is shown:
  POPULAR_SHARE of the impressions come from the shop-wide best-seller list, the rest from the
  session's intent category, where the shop's own ranking picks, of SHOP_CANDIDATES
  popularity-drawn items, the one that best fits the user's price tier (plus noise);
- clicks follow category/brand/price-tier match (and popularity a little); add-to-cart and
  purchase follow clicks;
- about half the users shift interest to new categories late in the timeline (between SHIFT_WINDOW
  of it, before the last 10 % the default features config holds out for testing), so recent
  behaviour predicts the near future better than the long-term profile;
- the hour of day nudges the session's intent category (context matters, a little).
The latent truth per user is written to `ground_truth.parquet` beside the raw tables.

Calibration (measured on `small`): an earlier version drew 40 % of impressions from the
best-seller list, used Pareto shape 1.1 (the top 2.5 % of items held 47 % of the weight, inside
every category too) and let a quarter of the interest shifts fall in the held-out last 10 %. There, an
oracle scoring items with the generator's own latent preferences (a shifted user's new ones only
once a click had shown them) reached just 1.27x the most-popular baseline's Recall@50: no model
could win by a wide margin. Now the top 10 % of items still get 45 % of the impressions (top 1 %:
17 %), and that oracle reaches 1.95x.

Generation is deterministic for a seed and streamed: users are produced in chunks, each chunk's
interactions are written as one parquet part, so memory is bounded at any size.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from shoprec.progress import progress as progress_iter

from .raw_schema import make_schema, raw_paths

DAY = 86_400
END_TS = 1_767_225_600  # 2026-01-01T00:00:00Z: the end of the simulated timeline
USER_ID_BASE = 1_000_000
POPULARITY_TAIL = 1.5  # Pareto shape of item popularity (smaller: heavier tail)
POPULAR_SHARE = 0.2  # impressions from the shop-wide best-seller list; the rest are in-category
SHOP_CANDIDATES = 4  # popularity-drawn items the shop's ranking chooses each in-category impression from
SHIFT_WINDOW = (0.45, 0.85)  # interest shifts happen between these fractions of the timeline
ITEM_ID_BASE = 5_000_000
ITEM_KINDS = {"category": "categorical", "brand": "categorical", "price": "numeric", "created_ts": "timestamp"}
USER_KINDS = {"age": "numeric", "gender": "categorical", "region": "categorical", "device": "categorical"}


@dataclass(frozen=True)
class ShopSize:
    users: int
    items: int
    categories: int
    sessions_per_user: float
    slate: int  # impressions per session
    days: int = 90
    chunk_users: int = 20_000


SIZES = {
    "tiny": ShopSize(users=1_000, items=400, categories=12, sessions_per_user=6, slate=8),
    "small": ShopSize(users=4_000, items=2_000, categories=20, sessions_per_user=8, slate=10),
    "medium": ShopSize(users=100_000, items=100_000, categories=40, sessions_per_user=8, slate=10),
    "large": ShopSize(users=1_000_000, items=1_000_000, categories=60, sessions_per_user=1, slate=10),
}

REGIONS = np.array([f"region_{i}" for i in range(8)])
DEVICES = np.array(["mobile", "desktop", "tablet"])
GENDERS = np.array(["F", "M", "U"])


def _items(size: ShopSize, rng: np.random.Generator) -> tuple[pd.DataFrame, dict]:
    n, c = size.items, size.categories
    cat_p = 1.0 / np.arange(1, c + 1) ** 0.6
    cat_p /= cat_p.sum()
    category = rng.choice(c, size=n, p=cat_p)
    n_brands = max(2 * c, n // 40)
    # brand b belongs to category b % c; an item's brand is one of its category's brands
    brands_per_cat = n_brands // c
    brand = category + c * rng.integers(0, brands_per_cat, size=n)
    cat_log_price = rng.uniform(2.0, 6.0, size=c)
    price = np.round(np.exp(cat_log_price[category] + rng.normal(0, 0.45, size=n)), 2)
    popularity = rng.pareto(POPULARITY_TAIL, size=n) + 1.0  # long tail
    start = END_TS - size.days * DAY
    created = rng.integers(start - 180 * DAY, END_TS - 2 * DAY, size=n)
    frame = pd.DataFrame(
        {
            "item_id": ITEM_ID_BASE + np.arange(n, dtype=np.int64),
            "category": np.char.add("cat_", np.char.zfill(category.astype(str), 2)),
            "brand": np.char.add("brand_", np.char.zfill(brand.astype(str), 4)),
            "price": price,
            "created_ts": created.astype(np.int64),
        }
    )
    # items sorted by category, cumulative popularity: vectorised popularity sampling per category
    order = np.argsort(category, kind="stable")
    cum = np.cumsum(popularity[order])
    counts = np.bincount(category, minlength=c)
    ends = np.cumsum(counts)
    starts = ends - counts
    cum_lo = np.where(starts > 0, cum[np.maximum(starts - 1, 0)], 0.0)
    cum_hi = cum[ends - 1]
    state = {
        "category": category,
        "brand": brand,
        "log_price": np.log(price),
        "log_pop": np.log(popularity),
        "created": created,
        "order": order,
        "cum": cum,
        "cum_lo": cum_lo,
        "cum_hi": cum_hi,
        "global_cum": np.cumsum(popularity),
        "cat_log_price": cat_log_price,
        "rel_price": (np.log(price) - cat_log_price[category]) / 0.45,  # in the category's price spread
        "brands_per_cat": brands_per_cat,
    }
    return frame, state


def _sample_in_category(cats: np.ndarray, items: dict, rng: np.random.Generator) -> np.ndarray:
    lo, hi = items["cum_lo"][cats], items["cum_hi"][cats]
    x = lo + rng.random(len(cats)) * (hi - lo)
    pos = np.searchsorted(items["cum"], x, side="right")
    return items["order"][np.minimum(pos, len(items["order"]) - 1)]


def _sample_popular(n: int, items: dict, rng: np.random.Generator) -> np.ndarray:
    cum = items["global_cum"]
    return np.minimum(np.searchsorted(cum, rng.random(n) * cum[-1], side="right"), len(cum) - 1)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _user_chunk(size: ShopSize, items: dict, first: int, count: int, seed: int):
    """Users first..first+count-1: their attributes, the ground truth, and their events. The draws
    come from one generator in a fixed order, so a chunk is the same whatever the chunking."""
    rng = np.random.default_rng([seed, 1, first])
    u = _draw_users(size, items, first, count, rng)
    s = _draw_sessions(size, u, rng)
    imp = _draw_impressions(size, items, u, s, rng)
    return u.users, u.truth, _draw_events(items, first, u, s, imp, rng)


def _draw_users(size: ShopSize, items: dict, first: int, count: int, rng) -> SimpleNamespace:
    """Attributes and the latent taste: a segment prior (age/region) plus a personal Dirichlet draw,
    for half the users a second taste from a shift time on, a favourite brand pair and a price tier."""
    c = size.categories
    uid = first + np.arange(count)
    age = rng.integers(18, 71, size=count)
    gender = rng.choice(3, size=count, p=[0.48, 0.48, 0.04])
    region = rng.integers(0, len(REGIONS), size=count)
    device = rng.choice(3, size=count, p=[0.6, 0.3, 0.1])
    segment = (age // 15 + region) % c
    pref = rng.dirichlet(np.full(c, 0.15), size=count)
    pref[np.arange(count), segment] += 0.3
    pref /= pref.sum(1, keepdims=True)
    shifted = rng.random(count) < 0.5
    pref2 = rng.dirichlet(np.full(c, 0.1), size=count)
    start = END_TS - size.days * DAY
    lo, hi = (start + int(size.days * DAY * f) for f in SHIFT_WINDOW)
    shift_ts = rng.integers(lo, hi, size=count)
    fav_cat = pref.argmax(1)
    fav_brands = fav_cat[:, None] + c * rng.integers(0, items["brands_per_cat"], size=(count, 2))
    tier = rng.normal(0, 1, size=count)  # preferred price within any category: budget < 0 < premium
    users = pd.DataFrame({
        "user_id": USER_ID_BASE + uid.astype(np.int64),
        "age": age.astype(np.int64),
        "gender": GENDERS[gender],
        "region": REGIONS[region],
        "device": DEVICES[device],
    })
    truth = pd.DataFrame({
        "user_id": users["user_id"],
        "true_category": fav_cat,
        "shifted": shifted,
        "shift_ts": np.where(shifted, shift_ts, -1),
        "late_category": np.where(shifted, pref2.argmax(1), fav_cat),
        "price_tier": tier,
    })
    return SimpleNamespace(uid=uid, count=count, device=device, pref=pref, pref2=pref2, shifted=shifted, shift_ts=shift_ts,
                           fav_brands=fav_brands, tier=tier, start=start, users=users, truth=truth)


def _draw_sessions(size: ShopSize, u: SimpleNamespace, rng) -> SimpleNamespace:
    """Sessions around each user's peak hour, each with one intent category (15 % by time of day) and a device."""
    c = size.categories
    n_sess = rng.poisson(size.sessions_per_user, size=u.count) + 1
    user = np.repeat(np.arange(u.count), n_sess)
    n_s = len(user)
    peak_hour = rng.integers(0, 24, size=u.count)
    day = rng.integers(0, size.days, size=n_s)
    hour = (peak_hour[user] + np.round(rng.normal(0, 3, size=n_s)).astype(int)) % 24
    ts = u.start + day * DAY + hour * 3600 + rng.integers(0, 3600, size=n_s)
    late = u.shifted[user] & (ts >= u.shift_ts[user])
    pref = np.where(late[:, None], u.pref2[user], u.pref[user])
    cum = pref.cumsum(1)
    intent = (cum < rng.random(n_s)[:, None]).sum(1).clip(0, c - 1)
    by_hour = rng.random(n_s) < 0.15
    intent = np.where(by_hour, (hour // 4) % c, intent)
    device = np.where(rng.random(n_s) < 0.8, u.device[user], rng.integers(0, 3, size=n_s))
    return SimpleNamespace(n=n_s, user=user, ts=ts, pref=pref, intent=intent, device=device)


def _draw_impressions(size: ShopSize, items: dict, u: SimpleNamespace, s: SimpleNamespace, rng) -> SimpleNamespace:
    """What the shop showed: the best-seller list, or the intent category as the shop's ranking orders it."""
    m = size.slate
    sess = np.repeat(np.arange(s.n), m)
    from_cat = rng.random(len(sess)) >= POPULAR_SHARE
    item = np.empty(len(sess), dtype=np.int64)
    cat_sess = sess[from_cat]
    cand = _sample_in_category(np.repeat(s.intent[cat_sess], SHOP_CANDIDATES), items, rng).reshape(-1, SHOP_CANDIDATES)
    fit = -1.2 * np.abs(items["rel_price"][cand] - u.tier[s.user[cat_sess]][:, None])
    pick = np.argmax(fit + rng.gumbel(size=fit.shape), axis=1)
    item[from_cat] = np.take_along_axis(cand, pick[:, None], axis=1)[:, 0]
    item[~from_cat] = _sample_popular(int((~from_cat).sum()), items, rng)
    ts = s.ts[sess] + np.tile(np.arange(m), s.n)
    keep = items["created"][item] <= ts  # nothing is shown before it exists
    return SimpleNamespace(sess=sess[keep], item=item[keep], ts=ts[keep])


def _draw_events(items: dict, first: int, u: SimpleNamespace, s: SimpleNamespace, imp: SimpleNamespace, rng) -> pd.DataFrame:
    """The user's answer to each impression: click from intent, taste, brand, price fit and popularity;
    cart and purchase from brand, price fit and device. One row per event, ordered by time."""
    iu = s.user[imp.sess]
    icat = items["category"][imp.item]
    fav_brand = (items["brand"][imp.item][:, None] == u.fav_brands[iu]).any(1)
    price_gap = np.abs(items["rel_price"][imp.item] - u.tier[iu])
    logit = (
        -3.2
        + 2.2 * (icat == s.intent[imp.sess])
        + 3.0 * s.pref[imp.sess, icat]
        + 1.2 * fav_brand
        - 0.8 * price_gap
        + 0.25 * items["log_pop"][imp.item]
    )
    click = rng.random(len(logit)) < _sigmoid(logit)
    p_buy = _sigmoid(-1.0 + 1.5 * fav_brand - 1.2 * price_gap + 0.5 * (s.device[imp.sess] == 1))
    purchase = click & (rng.random(len(logit)) < p_buy)
    cart = purchase | (click & (rng.random(len(logit)) < 0.3))
    parts = []
    for name, mask, delay in (("impression", None, 0), ("click", click, 5), ("cart", cart, 30), ("purchase", purchase, 60)):
        sel = slice(None) if mask is None else mask
        parts.append(pd.DataFrame({
            "user_id": USER_ID_BASE + u.uid[iu[sel]].astype(np.int64),
            "item_id": ITEM_ID_BASE + imp.item[sel],
            "ts": (imp.ts[sel] + delay).astype(np.int64),
            "session_id": (first * 64 + imp.sess[sel]).astype(np.int64),
            "event": name,
            "device": DEVICES[s.device[imp.sess[sel]]],
        }))
    inter = pd.concat(parts, ignore_index=True).sort_values(["ts", "user_id"], kind="stable")
    return inter.reset_index(drop=True)


def latent_truth(size: str, seed: int, user_ids: np.ndarray) -> tuple[dict, SimpleNamespace]:
    """The generator's hidden state for some users, redrawn exactly as `generate` drew it: the item
    arrays (category, brand, rel_price, log_pop, ...) and per user (in the order of `user_ids`) the
    early and late category preferences, shift flag and time, price tier and favourite brands.
    For ceiling measurements (benchmarks/synthetic_ceiling.py); no model may read it."""
    spec = SIZES[size]
    _, items = _items(spec, np.random.default_rng([seed, 0]))
    idx = np.asarray(user_ids, dtype=np.int64) - USER_ID_BASE
    if len(idx) and (idx.min() < 0 or idx.max() >= spec.users):
        raise ValueError(f"user ids outside the {size} shop ({USER_ID_BASE}..{USER_ID_BASE + spec.users - 1})")
    c = spec.categories
    out = SimpleNamespace(pref=np.zeros((len(idx), c)), pref2=np.zeros((len(idx), c)), shifted=np.zeros(len(idx), bool),
                          shift_ts=np.zeros(len(idx), np.int64), tier=np.zeros(len(idx)),
                          fav_brands=np.zeros((len(idx), 2), np.int64))
    for first in range(0, spec.users, spec.chunk_users):
        count = min(spec.chunk_users, spec.users - first)
        mine = (idx >= first) & (idx < first + count)
        if not mine.any():
            continue
        u = _draw_users(spec, items, first, count, np.random.default_rng([seed, 1, first]))  # the chunk's first draws
        at = idx[mine] - first
        for name in ("pref", "pref2", "shifted", "shift_ts", "tier", "fav_brands"):
            getattr(out, name)[mine] = getattr(u, name)[at]
    return items, out


def examination(position: np.ndarray) -> np.ndarray:
    """P(a user looks at the item at 0-based `position` of a served list): 1 / log2(position + 2)."""
    return 1.0 / np.log2(np.asarray(position, dtype=np.float64) + 2.0)


def respond(items: dict, users: SimpleNamespace, item_ids: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Clicks and purchases of served lists, drawn from the planted truth, never from a model: for `users` (from
    `latent_truth`, at the end of the timeline: a shifted user's late taste) and their lists `item_ids` [U, k]
    (raw ids, -1 pads), each user opens a session with an intent drawn from their taste, looks at position p
    with `examination(p)` and clicks with the generator's click model (intent, taste, favourite brands, price
    fit, popularity); a click converts with its purchase model (the device term left out). -> clicks, purchases
    [U, k] bool."""
    ids = np.asarray(item_ids, dtype=np.int64)
    valid = ids >= ITEM_ID_BASE
    row = np.where(valid, ids - ITEM_ID_BASE, 0)
    n_users, k = ids.shape
    pref = np.where(users.shifted[:, None], users.pref2, users.pref)
    intent = (pref.cumsum(1) < rng.random(n_users)[:, None]).sum(1).clip(0, pref.shape[1] - 1)
    cat = items["category"][row]
    fav_brand = (items["brand"][row][:, :, None] == users.fav_brands[:, None, :]).any(2)
    price_gap = np.abs(items["rel_price"][row] - users.tier[:, None])
    logit = (-3.2 + 2.2 * (cat == intent[:, None]) + 3.0 * np.take_along_axis(pref, cat, 1) + 1.2 * fav_brand
             - 0.8 * price_gap + 0.25 * items["log_pop"][row])
    seen = rng.random((n_users, k)) < examination(np.arange(k))[None, :]
    click = valid & seen & (rng.random((n_users, k)) < _sigmoid(logit))
    purchase = click & (rng.random((n_users, k)) < _sigmoid(-1.0 + 1.5 * fav_brand - 1.2 * price_gap))
    return click, purchase


def generate(out_dir: str | Path, size: str = "small", seed: int = 7, progress: bool = True) -> dict:
    """Write users.parquet, items.parquet, interactions/part-*.parquet and ground_truth.parquet."""
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of {sorted(SIZES)}")
    spec = SIZES[size]
    out = Path(out_dir)
    (out / "interactions").mkdir(parents=True, exist_ok=True)
    for old in (out / "interactions").glob("part-*.parquet"):
        old.unlink()
    t0 = time.time()
    rng = np.random.default_rng([seed, 0])
    items_df, items = _items(spec, rng)
    items_df.to_parquet(out / "items.parquet", index=False)

    users_writer = truth_writer = None
    n_events = 0
    chunks = range(0, spec.users, spec.chunk_users)
    for i, first in enumerate(progress_iter(chunks, f"generate {size}", progress, total=len(chunks))):
        count = min(spec.chunk_users, spec.users - first)
        users, truth, inter = _user_chunk(spec, items, first, count, seed)
        inter.to_parquet(out / "interactions" / f"part-{i:05d}.parquet", index=False)
        n_events += len(inter)
        ut, tt = pa.Table.from_pandas(users, preserve_index=False), pa.Table.from_pandas(truth, preserve_index=False)
        if users_writer is None:
            users_writer = pq.ParquetWriter(out / "users.parquet", ut.schema)
            truth_writer = pq.ParquetWriter(out / "ground_truth.parquet", tt.schema)
        users_writer.write_table(ut)
        truth_writer.write_table(tt)
    users_writer.close()
    truth_writer.close()
    schema = make_schema(ITEM_KINDS, USER_KINDS, source=f"synthetic-{size}", size=size, seed=seed)
    raw_paths(out)["schema"].write_text(json.dumps(schema, indent=1) + "\n")
    return {"size": size, "seed": seed, "users": spec.users, "items": spec.items, "interactions": n_events,
            "seconds": round(time.time() - t0, 2)}
