"""The demo page (app/demo.py) under `streamlit run`, against the real tritonserver, rendered by headless
Chromium: its cards hold the items the server returns for the same request, id for id and in order.

Chromium is a test dependency like tritonserver (`make setup` installs Debian's `chromium`): without
it these tests fail, naming the fix, never skip."""

from __future__ import annotations

import time

import numpy as np
import pytest

from benchmarks.browser import (
    BrowserError,
    Chromium,
    demo_page,
    find_chromium,
    free_port,
)
from benchmarks.demo_screenshot import query, rendered_cards
from client import RecommenderClient
from runtime.request_transform import UserStore
from shoprec.manifest import verified_path

pytestmark = pytest.mark.integration

K = 7
COLD_USER = 424242  # no store holds it (tests/test_serving_integration.py asks for it too)


@pytest.fixture(scope="module")
def browser():
    try:
        find_chromium()
    except BrowserError as e:
        pytest.fail(str(e), pytrace=False)
    with Chromium(1280, 900) as b:
        yield b


def _warm_users(artifacts, n: int) -> list[tuple[int, int]]:
    """(user id, number of actions) of n users with a history, spread over the store."""
    store = UserStore.load(verified_path(artifacts / "serving", "user_store.npz"))
    actions = store.arrays["hist_indptr"][1:] - store.arrays["hist_indptr"][:-1]
    warm = [(int(u), int(a)) for u, a in zip(store.user_id, actions) if a > 0]
    return warm[len(warm) // (n + 1):: len(warm) // (n + 1)][:n]


def test_cards_are_the_served_list_id_for_id(triton, artifacts, browser, tmp_path):
    users = _warm_users(artifacts, 2)
    with RecommenderClient(triton.grpc_url) as c:
        expected = {u: c.recommend(u, k=K, diversity=0.0).item_ids.tolist() for u in [u for u, _ in users] + [COLD_USER]}
        diverse = c.recommend(users[0][0], k=K, diversity=0.7).item_ids.tolist()
        store = UserStore.load(verified_path(artifacts / "serving", "user_store.npz"))
        latest = store.history(int(store.lookup(np.array([users[0][0]]))[0]))[0][-1]  # time order: the last is the latest
        item_ids = np.load(verified_path(artifacts / "serving", "item_table.npz"))["item_ids"]
        similar = c.recommend(users[0][0], k=K, diversity=0.0, scene="item_detail", context_item_ids=[int(item_ids[latest])])
    with demo_page(artifacts, triton.grpc_url, log=tmp_path / "streamlit.log") as url:
        for user, actions in users:
            page = browser.open(url + query(user, K, 0.0))
            assert rendered_cards(page, K) == expected[user], user
            text = page.wait_for("document.body.innerText")
            assert f"user {user}: history" in text and f"{actions} actions, most recent first" in text
            assert "cold start" not in text
        page = browser.open(url + query(users[0][0], K, 0.7))
        assert rendered_cards(page, K) == diverse
        # a scene with its default context (the user's latest item), and the arm the session's A/A layer gives
        page = browser.open(url + query(users[0][0], K, 0.0, "item_detail"))
        assert rendered_cards(page, K) == similar.item_ids.tolist()
        assert f"ranking = {similar.experiment['ranking']}" in page.evaluate("document.body.innerText")
        page = browser.open(url + query(COLD_USER, K, 0.0))  # ?user= may name a user the store lacks
        assert rendered_cards(page, K) == expected[COLD_USER]
        assert "cold start" in page.evaluate("document.body.innerText")


def test_a_server_that_does_not_answer_is_an_error_on_the_page(artifacts, browser, tmp_path):
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there
    with demo_page(artifacts, dead, log=tmp_path / "streamlit.log") as url:
        page = browser.open(url + query(None, K, 0.0))
        with pytest.raises(BrowserError, match=rf"the page shows an error: the request to {dead} failed: .*(UNAVAILABLE|failed to connect)"):
            rendered_cards(page, K)
        assert "shoprec demo" in page.evaluate("document.body.innerText")  # the page itself still stands


def test_an_event_sent_from_the_page_changes_the_served_list(triton, artifacts, browser, tmp_path):
    """The page's event form writes to the server's online store; the list it shows next is the server's answer
    after the event: the clicked item is gone (seen) and the user is no longer cold."""
    user = 987_654_321  # no store and no other test knows this user
    with RecommenderClient(triton.grpc_url) as c:
        before = c.recommend(user, k=K).item_ids.tolist()
    with demo_page(artifacts, triton.grpc_url, log=tmp_path / "streamlit.log") as url:
        page = browser.open(url + query(user, K, 0.0))
        assert rendered_cards(page, K) == before
        send = "[...document.querySelectorAll('button')].find(b => b.innerText.includes('send event'))"
        page.wait_for(f"!!{send}", 40)  # the form renders after the cards
        page.evaluate(f"{send}.click()")
        page.wait_for("document.body.innerText.includes('sent click on item')", 40)
        deadline = time.time() + 30
        while (after := rendered_cards(page, K)) == before and time.time() < deadline:  # the rerun's cards replace them
            time.sleep(0.2)
        text = page.evaluate("document.body.innerText")
    with RecommenderClient(triton.grpc_url) as c:
        served = c.recommend(user, k=K)
    assert before[0] not in after and after == served.item_ids.tolist() and not served.cold_start, text[-600:]
