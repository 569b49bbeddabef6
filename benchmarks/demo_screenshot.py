"""A PNG of the demo page (app/demo.py) against a running server, taken by headless Chromium.

    .venv/bin/shoprec serve &                                    # the small shop's bundle under ./artifacts
    .venv/bin/python -m benchmarks.demo_screenshot --url 127.0.0.1:8001 --user 1000000 -k 9
    # -> benchmarks/results/demo_page.png

The page is started here (`streamlit run`, a free loopback port) unless --page gives one already
running. `chromium --headless --screenshot` is not used: it shoots when the document has loaded, and
a Streamlit page has then not yet received its elements over the websocket (the picture comes out
blank). Over the DevTools protocol (benchmarks/browser.py) the shot waits until every card is there.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from urllib.parse import urlencode

from benchmarks.browser import BrowserError, Chromium, demo_page
from shoprec.config import REPO_ROOT, load_config

CARDS = "[...document.querySelectorAll('[data-item-id]')].map(e => e.dataset.itemId)"
# st.error boxes and tracebacks (their text arrives a moment after the box)
ERROR = ("[...document.querySelectorAll('[data-testid=stAlertContentError], [data-testid=stException]')]"
         ".map(e => e.innerText.trim()).filter(t => t).join(' | ')")


def rendered_cards(page, k: int, timeout_s: float = 40.0) -> list[int]:
    """The item ids of the page's cards, in rank order, once k are there; BrowserError with the page's
    message when it shows an error instead."""
    found = page.wait_for(f"(() => {{ const ids = {CARDS}; const error = {ERROR};"
                          f" return ids.length >= {k} ? {{ids}} : (error ? {{error}} : null); }})()", timeout_s)
    if "error" in found:
        raise BrowserError(f"the page shows an error: {found['error']}")
    return [int(i) for i in found["ids"]]


def query(user: int | None, k: int, diversity: float, scene: str | None = None) -> str:
    params = {"k": k, "diversity": f"{diversity:g}", **({"user": user} if user is not None else {}),
              **({"scene": scene} if scene else {})}
    return "/?" + urlencode(params)


def screenshot(page_url: str, out: Path, user: int | None, k: int, diversity: float, width: int, height: int,
               scene: str | None = None) -> list[int]:
    with Chromium(width, height) as browser:
        page = browser.open(page_url + query(user, k, diversity, scene))
        ids = rendered_cards(page, k)
        # web fonts and the history table's canvas paint after the elements arrive
        page.wait_for("document.fonts.status === 'loaded' && !!document.querySelector('[data-testid=stDataFrame] canvas')"
                      " || !!document.querySelector('[data-testid=stAlert]')", 20)
        page.evaluate("new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")
        out.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(out)
    return ids


def main(argv: list[str] | None = None) -> int:
    cfg = load_config()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--url", default=f"127.0.0.1:{cfg.serve.grpc_port}", help="the running server, host:port (gRPC)")
    p.add_argument("--artifacts", default=str(REPO_ROOT / "artifacts"), help="the bundle the page names users and items from")
    p.add_argument("--page", default=None, help="an already running page (http://host:port) instead of starting one")
    p.add_argument("--user", type=int, default=None, help="the user shown (default: the page's first)")
    p.add_argument("-k", type=int, default=9)
    p.add_argument("--diversity", type=float, default=0.0)
    p.add_argument("--scene", default=None, help="home (default), item_detail or cart (context: the user's latest items)")
    p.add_argument("--width", type=int, default=1440)
    p.add_argument("--height", type=int, default=1000)
    p.add_argument("--out", default=str(REPO_ROOT / "benchmarks" / "results" / "demo_page.png"))
    args = p.parse_args(argv)
    out = Path(args.out)
    try:
        if args.page:
            ids = screenshot(args.page.rstrip("/"), out, args.user, args.k, args.diversity, args.width, args.height, args.scene)
        else:
            with demo_page(args.artifacts, args.url) as page_url:
                ids = screenshot(page_url, out, args.user, args.k, args.diversity, args.width, args.height, args.scene)
    except BrowserError as e:
        print(f"demo_screenshot: {e}", file=sys.stderr)
        return 2
    print(f"{out}: {len(ids)} cards, items {ids}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
