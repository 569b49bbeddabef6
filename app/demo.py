"""Demo page: one user's history and the recommendations the REAL Triton ensemble serves for them.

    .venv/bin/streamlit run app/demo.py -- --artifacts artifacts --url 127.0.0.1:8001

The lists come from a running server (`shoprec serve`) through `client.RecommenderClient`, never from
an in-process pipeline. The serving bundle under ARTIFACTS (checked against its manifest) only names
things: the users to pick from, their history (the export's snapshot; events sent to the online store
later are not shown) and the items' titles and categories. Query parameters preset the widgets, so a
URL reproduces a view: `?user=1000042&k=12&diversity=0.3`.

Scenes and experiments: the page offers the built-in scenes (home; item_detail and cart with context
items, by default the user's latest items) and shows the experiment arms the response names
(`Recommendation.experiment`); a QA field forces arms.
"""

from __future__ import annotations

import argparse
import html
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

# `streamlit run app/demo.py` puts app/ on sys.path, not the repository: without an installed checkout
# the project's packages would not import
_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(1, _ROOT)

from client import RecommenderClient
from runtime.strategy import Strategy
from shoprec.config import REPO_ROOT, load_config
from shoprec.manifest import verified_path

KIND_NAMES = {1: "view", 2: "click", 3: "cart", 4: "purchase"}  # feature_workflows/history.py KIND
TITLE_COLUMNS = ("title", "name", "product_name")  # the first display__ column of these is an item's title
MAX_PICKABLE_USERS = 5000  # beyond this the picker lists the most active users (a selectbox ships every option)
MAX_K = 100


def build_parser(cfg=None) -> argparse.ArgumentParser:
    cfg = cfg or load_config()
    p = argparse.ArgumentParser(
        prog="streamlit run app/demo.py --",
        description="Demo page: a user's history and the recommendations a running shoprec server returns for "
                    "them. Arguments go after `--`: streamlit run app/demo.py -- --artifacts DIR --url HOST:PORT")
    p.add_argument("--artifacts", default=str(REPO_ROOT / "artifacts"),
                   help="the artifacts folder whose serving/ bundle names the users and items (default: ./artifacts)")
    p.add_argument("--url", default=None,
                   help=f"the server, host:port (default: 127.0.0.1 and the configured port, gRPC {cfg.serve.grpc_port})")
    p.add_argument("--protocol", default="grpc", choices=["grpc", "http"])
    p.add_argument("--tls-ca", help="gRPC over TLS: PEM of the CA that signed the server's certificate")
    p.add_argument("--online-store", default=None,
                   help="where the page's events go: redis://HOST:PORT/DB (default: the private store a `shoprec serve` "
                        "on ARTIFACTS runs; none: no event form)")
    return p


def send_event(artifacts: str, configured: str | None, user_id: int, item_id: int, kind: str) -> dict:
    """One event into the online store of the server (the next request of the user sees it); the ingest summary."""
    import time

    from app.events import online_url
    from runtime.online_store import OnlineStore

    cfg = load_config().serve
    from shoprec.bundles import served_bundle

    # the keys of the version the server serves (a newer export may wait for `shoprec deploy`)
    store = OnlineStore.open(served_bundle(Path(artifacts)), online_url(Path(artifacts), configured or cfg.online_store), cfg)
    report = store.ingest([{"user_id": int(user_id), "item_id": int(item_id), "type": kind, "timestamp": time.time()}])
    return report.as_dict()


def parse_args(argv: list[str]) -> argparse.Namespace:
    cfg = load_config()
    args = build_parser(cfg).parse_args(argv)
    if args.url is None:
        serve = cfg.serve
        args.url = f"127.0.0.1:{serve.grpc_port if args.protocol == 'grpc' else serve.http_port}"
    return args


@dataclass(frozen=True)
class Catalog:
    """The item table's display side, by item-table row (the row space the user store's history uses)."""

    item_ids: np.ndarray  # int64 [I]
    titles: np.ndarray  # str [I]: a title column when the items have one, else "item <id>"
    has_titles: bool  # the items have a title column
    categories: np.ndarray  # str [I]: "" for items without a category
    details: dict[str, np.ndarray]  # the other display columns (brand, genres, ...)
    popular_rows: np.ndarray  # rows, most popular first

    @classmethod
    def load(cls, serving: Path) -> Catalog:
        with np.load(verified_path(serving, "item_table.npz"), allow_pickle=False) as z:
            ids, names, codes = z["item_ids"], z["category_names"], z["category_code"]
            display = {k[len("display__"):]: z[k] for k in z.files if k.startswith("display__")}
            popular = z["popular_rows"]
        title_col = next((c for c in TITLE_COLUMNS if c in display), None)
        titles = display.pop(title_col) if title_col else np.array([f"item {i}" for i in ids])
        categories = (np.where(codes >= 0, names[np.maximum(codes, 0)], "") if len(names)
                      else display.get("category", np.full(len(ids), "")))
        display.pop("category", None)
        return cls(ids, titles, title_col is not None, categories.astype(str), display, popular)

    def rows(self, item_ids) -> np.ndarray:
        """Row of each item id, -1 for ids this table does not hold (a server with another bundle)."""
        item_ids = np.asarray(item_ids, dtype=np.int64)
        order = np.argsort(self.item_ids, kind="stable")
        at = np.minimum(np.searchsorted(self.item_ids, item_ids, sorter=order), len(order) - 1)
        return np.where(self.item_ids[order[at]] == item_ids, order[at], -1) if len(order) else np.full(len(item_ids), -1)

    def label(self, row: int) -> str:
        return f"{self.item_ids[row]} · {self.titles[row] if self.has_titles else self.categories[row]}"


@dataclass(frozen=True)
class Users:
    """The user store's ids and action history (CSR: hist_indptr over hist_rows / hist_kinds / hist_ts)."""

    user_id: np.ndarray
    activity: np.ndarray
    indptr: np.ndarray
    rows: np.ndarray
    kinds: np.ndarray
    ts: np.ndarray | None

    @classmethod
    def load(cls, serving: Path) -> Users:
        with np.load(verified_path(serving, "user_store.npz"), allow_pickle=False) as z:
            ts = z["hist_ts"] if "hist_ts" in z.files else None
            return cls(z["user_id"], np.diff(z["hist_indptr"]), z["hist_indptr"], z["hist_rows"], z["hist_kinds"], ts)

    def pickable(self, limit: int = MAX_PICKABLE_USERS) -> np.ndarray:
        """Every user id, or the `limit` most active ones (ties by id) when the store is larger."""
        if len(self.user_id) <= limit:
            return self.user_id
        return np.sort(self.user_id[np.lexsort((self.user_id, -self.activity))[:limit]])

    def history(self, user_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(item rows, kinds, unix seconds) of one user's actions, most recent first; empty for an unknown user."""
        at = int(np.searchsorted(self.user_id, user_id))
        if at >= len(self.user_id) or self.user_id[at] != user_id:
            return np.zeros(0, np.int64), np.zeros(0, np.int8), None
        lo, hi = self.indptr[at], self.indptr[at + 1]
        return self.rows[lo:hi][::-1], self.kinds[lo:hi][::-1], None if self.ts is None else self.ts[lo:hi][::-1]


def request_kwargs(k: int, diversity: float, include_seen: bool, scene: str = "home", context_item_ids=(),
                   hour: int | None = None, weekday: int | None = None, client_device: str | None = None,
                   force_arms: str = "") -> dict:
    """recommend()'s keyword arguments. home sends no scene (the server's default scene, whatever it is called)."""
    kw = {"k": k, "diversity": diversity, "exclude_seen": False if include_seen else None,
          "hour": hour, "weekday": weekday, "client_device": client_device or None}
    if scene != "home":
        kw["scene"] = scene
        if len(context_item_ids):
            kw["context_item_ids"] = [int(i) for i in context_item_ids]
    if force_arms.strip():
        kw["force_arms"] = force_arms.strip()
    return kw


def arm_text(rec) -> str:
    """The arms a response names (`Recommendation.experiment`, {layer: arm})."""
    experiment = getattr(rec, "experiment", None)
    if not experiment:
        return "none"
    if isinstance(experiment, dict):
        return ", ".join(f"{layer} = {arm}" for layer, arm in experiment.items())
    return str(experiment)


def cards_html(rec, catalog: Catalog | None) -> str:
    """The recommendations as image-less cards; each carries data-item-id and data-rank (the tests read them)."""
    rows = catalog.rows(rec.item_ids) if catalog is not None else np.full(len(rec.item_ids), -1)
    cards = []
    for rank, (item, score, row) in enumerate(zip(rec.item_ids.tolist(), rec.scores.tolist(), rows.tolist()), 1):
        if row >= 0:
            title, category = str(catalog.titles[row]), str(catalog.categories[row])
            extra = " · ".join(str(v[row]) for v in catalog.details.values() if str(v[row]))
        else:
            title, category, extra = f"item {item}", "", "not in the local item table" if catalog is not None else ""
        titled = row >= 0 and catalog.has_titles
        routes = rec.routes[rank - 1] if rec.routes else []
        badges = "".join(f'<span class="sr-route">{html.escape(r)}</span>' for r in routes)
        cards.append(
            f'<div class="sr-card" data-item-id="{item}" data-rank="{rank}">'
            f'<div class="sr-rank">#{rank}{f" · item {item}" if titled else ""}</div>'
            f'<div class="sr-title">{html.escape(title)}</div>'
            f'<div class="sr-meta">{html.escape(category or "no category")}'
            f'{" · " + html.escape(extra) if extra else ""}</div>'
            f'<div class="sr-routes">{badges}</div>'
            f'<div class="sr-score">score {score:.4f}</div></div>')
    return f"<style>{_CSS}</style><div class=\"sr-grid\">{''.join(cards)}</div>"


_CSS = """
.sr-grid {display: grid; grid-template-columns: repeat(auto-fill, minmax(150px, 1fr)); gap: 0.6rem;}
.sr-card {border: 1px solid rgba(128,128,128,0.35); border-radius: 0.5rem; padding: 0.6rem 0.75rem;}
.sr-rank {font-size: 0.75rem; opacity: 0.7;}
.sr-title {font-weight: 600; margin: 0.15rem 0;}
.sr-meta {font-size: 0.85rem;}
.sr-routes {margin: 0.3rem 0;}
.sr-route {display: inline-block; font-size: 0.7rem; padding: 0 0.4rem; margin-right: 0.25rem;
           border-radius: 0.6rem; background: rgba(255,75,75,0.12);}
.sr-score {font-family: monospace; font-size: 0.8rem;}
"""


def history_table(users: Users, catalog: Catalog | None, user_id: int, limit: int = 200):
    """One row per action of the user, most recent first, with the item's title and category."""
    import pandas as pd

    rows, kinds, ts = users.history(user_id)
    rows, kinds = rows[:limit], kinds[:limit]
    table = {}
    if ts is not None:
        table["when (UTC)"] = [datetime.fromtimestamp(int(t), timezone.utc).strftime("%Y-%m-%d %H:%M") for t in ts[:limit]]
    table["event"] = [KIND_NAMES.get(int(k), str(k)) for k in kinds]
    if catalog is not None:
        table["item_id"] = catalog.item_ids[rows]
        if catalog.has_titles:
            table["title"] = catalog.titles[rows]
        table["category"] = catalog.categories[rows]
        for name, values in catalog.details.items():
            table[name] = values[rows]
    else:
        table["item row"] = rows
    return pd.DataFrame(table)


def _query_int(params, name: str, default: int) -> int:
    try:
        return int(params.get(name, default))
    except ValueError:
        return default


def _query_float(params, name: str, default: float) -> float:
    try:
        return min(1.0, max(0.0, float(params.get(name, default))))
    except ValueError:
        return default


def main(argv: list[str]) -> None:
    import streamlit as st

    st.set_page_config(page_title="shoprec demo", layout="wide")
    parser = build_parser()
    try:
        args = parse_args(argv)
    except SystemExit:  # --help or a bad flag: argparse wrote to the server's terminal; say it here too
        st.code(parser.format_help())
        st.stop()

    @st.cache_resource(show_spinner=False)
    def bundle(artifacts: str):
        serving = Path(artifacts) / "serving"
        out, problems = {}, []
        for name, cls in (("catalog", Catalog), ("users", Users)):
            try:
                out[name] = cls.load(serving)
            except Exception as e:  # noqa: BLE001 - the page still works against the server, with less to show
                out[name] = None
                problems.append(f"{name}: {e}")
        return out["catalog"], out["users"], problems

    @st.cache_resource(show_spinner=False)
    def connect(url: str, protocol: str, tls_ca: str | None) -> RecommenderClient:
        return RecommenderClient(url, protocol, tls_ca=tls_ca)

    catalog, users, problems = bundle(str(Path(args.artifacts).resolve()))
    q = st.query_params

    st.title("shoprec demo")
    st.caption(f"recommendations from the served Triton ensemble at {args.url} ({args.protocol}) · "
               f"users and items named from {Path(args.artifacts) / 'serving'}")
    for problem in problems:
        st.warning(f"serving bundle: {problem}")

    with st.sidebar:
        if users is not None and len(users.user_id):
            options = users.pickable()
            wanted = _query_int(q, "user", int(options[0]))  # ?user= may name anyone: a user the store lacks is cold
            if wanted not in set(options.tolist()):
                options = np.sort(np.append(options, wanted))
            activity = dict(zip(users.user_id.tolist(), users.activity.tolist()))
            user_id = int(st.selectbox("user", options.tolist(), index=int(np.flatnonzero(options == wanted)[0]),
                                       format_func=lambda u: f"{u} · {activity[u]} actions" if u in activity
                                       else f"{u} · not in the store"))
        else:
            user_id = int(st.number_input("user id", value=_query_int(q, "user", 0), step=1))
        k = int(st.number_input("k", 1, MAX_K, min(MAX_K, max(1, _query_int(q, "k", 10)))))
        diversity = float(st.slider("diversity λ (MMR)", 0.0, 1.0, _query_float(q, "diversity", 0.0), 0.05,
                                    help="0 = the ranker's order, 1 = most diverse"))
        include_seen = st.checkbox("include items the user already acted on", value=q.get("include_seen") == "1")

        # a scene other than home sends context items: by default the user's latest (distinct) items
        scenes = Strategy(load_config().serve).scenes  # the built-in ones and the config's (runtime/strategy.py)
        scene = st.selectbox("scene", scenes, index=scenes.index(q.get("scene")) if q.get("scene") in scenes else 0)
        context_items: list[int] = []
        if scene != "home" and catalog is not None:
            hist_rows = users.history(user_id)[0] if users is not None else np.zeros(0, np.int64)
            candidates = list(dict.fromkeys([*hist_rows[:50].tolist(), *catalog.popular_rows[:200].tolist()]))
            default = list(dict.fromkeys(hist_rows.tolist()))[: 1 if scene == "item_detail" else 3]
            picked = st.multiselect("context items", candidates, default=default, format_func=catalog.label)
            context_items = [int(catalog.item_ids[r]) for r in picked]

        with st.expander("request context (optional)"):
            hour = st.selectbox("hour", [None, *range(24)], format_func=lambda h: "unknown" if h is None else str(h))
            weekday = st.selectbox("weekday", [None, *range(7)],
                                   format_func=lambda d: "unknown" if d is None else "MTWTFSS"[d] + f" ({d})")
            client_device = st.text_input("client device (e.g. mobile; blank: unknown)")
            force_arms = st.text_input("force arms (QA): layer=arm,...")

    st.query_params.update({"user": str(user_id), "k": str(k), "diversity": f"{diversity:g}", "scene": scene,
                            **({"include_seen": "1"} if include_seen else {})})

    left, right = st.columns([5, 7], gap="large")
    with left:
        st.subheader(f"user {user_id}: history")
        if users is None:
            st.info("no user store in the bundle: no history to show")
        else:
            table = history_table(users, catalog, user_id)
            if table.empty:
                st.info("no actions in the export's snapshot: a cold-start user")
            else:
                total = len(users.history(user_id)[0])
                st.caption(f"{total} actions, most recent first (the export's snapshot"
                           f"{'; the latest 200 shown' if total > 200 else ''})")
                st.dataframe(table, hide_index=True, width="stretch")

    with right:
        st.subheader(f"recommended: top {k}" + (f" · scene {scene}" if len(scenes) > 1 else ""))
        kw = request_kwargs(k, diversity, include_seen, scene, context_items, hour, weekday, client_device, force_arms)
        try:
            rec = connect(args.url, args.protocol, args.tls_ca).recommend(user_id, **kw)
        except Exception as e:  # noqa: BLE001 - a server error is shown on the page, never a traceback
            st.error(f"the request to {args.url} failed: {str(e).strip() or type(e).__name__}")
            st.stop()
        if rec.cold_start:
            st.info("cold start: the server knows no history of this user")
        if rec.degraded:
            st.warning("degraded: the online store failed; the list comes from the export's snapshot of the user")
        st.caption(f"experiment arm: {arm_text(rec)}")
        sent = st.session_state.get("sent")
        if sent and sent[0] == user_id:
            st.success(sent[1])
        st.html(cards_html(rec, catalog))
        # an event on a served item goes to the server's online store: the rerun's request already sees it
        if args.online_store != "none" and len(rec.item_ids):
            st.caption("send an event on a served item to the server's online store: the list above is asked again after it")
            cols = st.columns([3, 2, 2], vertical_alignment="bottom")
            item = cols[0].selectbox("item", rec.item_ids.tolist(),
                                     format_func=lambda i: catalog.label(catalog.rows(np.array([i]))[0])
                                     if catalog is not None else str(i))
            kind = cols[1].selectbox("event", ["click", "cart", "purchase", "view"])
            if cols[2].button("send event"):  # a plain button, not a form: a form flashes "Missing Submit Button" as it renders
                try:
                    out = send_event(args.artifacts, args.online_store, user_id, int(item), kind)
                except Exception as e:  # noqa: BLE001 - shown on the page
                    st.error(f"the event was not sent: {str(e).strip() or type(e).__name__}")
                else:
                    st.session_state["sent"] = (user_id, f"sent {kind} on item {int(item)} for user {user_id} "
                                                f"({out.get('accepted', 0)} accepted); the list is the server's "
                                                "answer after it")
                    st.rerun()


if __name__ == "__main__":
    try:
        from streamlit.runtime import exists as _in_streamlit
    except ImportError:  # streamlit missing: still answer --help
        def _in_streamlit() -> bool:
            return False
    if _in_streamlit():
        main(sys.argv[1:])
    else:  # `python app/demo.py --help`
        build_parser().parse_args(sys.argv[1:])
        print("run it with streamlit: .venv/bin/streamlit run app/demo.py -- --artifacts DIR --url HOST:PORT")
