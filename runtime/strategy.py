"""Scenes and layered experiments: the strategy one request runs, from the serve config. NumPy only.

A *scene* (request input `scene`; absent: `serve.default_scene`) says how the recall routes are fused
and what the re-rank does:

    [serve.scenes.cart]
    routes = { copurchase = 2.0, similar = 1.0, popular = 0.001 }   # route -> fusion weight (0 or absent: off;
                                                  # below 1 / num_candidates: only fills what the others leave)
    exclude_context_categories = true             # no substitutes of the cart's items
    order = "recall"                              # "ranker" (default): the ranker's order; "recall": the fused
                                                  # order of the routes (the scores stay the ranker's)
    max_per_category = 2                          # optional: else serve.max_per_category
    diversity = 0.2                               # optional: the MMR lambda when the request sends none

The built-in scenes (`DEFAULT_SCENES`) are home, item_detail and cart; a scene in the config replaces
the built-in one of that name or adds a new one, so a new scene needs no code.

An *experiment layer* assigns every user one arm by a stable hash of (the layer's salt, user id); each
arm may override settings for every scene. Layers are independent: a setting belongs to at most one
layer, and each layer hashes with its own salt, so arms of two layers are assigned independently.

    [serve.experiments.recall]
    salt = "recall-2026-11"
    arms = { control = 0.5, trending_up = 0.5 }    # arm -> traffic share (sums to 1)
    [serve.experiments.recall.set.trending_up]
    routes = { trending = 2.0 }                    # re-weights the route in every scene that uses it
    # also: diversity, max_per_category, order (every scene)
    [serve.experiments.recall.set.trending_up.scenes.home]
    routes = { trending = 2.0 }                    # one scene only: may also add a route to it

A request may force arms (`force_arms` = "recall=trending_up,rerank=control") for QA. Steps pass the
strategy on as two integers per request (scene code, variant: the arm of every layer in mixed radix).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from shoprec.contract import ROUTES

CONTEXT_ROUTES = ("similar", "similar_ann", "copurchase")  # routes that read the request's context items
FALLBACK = 0.001  # a weight this small only fills what the other routes leave (its first key, 1000, is after theirs)

DEFAULT_SCENES: dict[str, dict] = {
    # the personal mix: every history route, the two-tower, the user's categories, what is trending, popular
    "home": {"routes": {"cf_all": 1.0, "cf_pos": 1.0, "ann": 1.0, "category": 1.0, "popular": 1.0, "trending": 0.5}},
    # similar items to the viewed ones (context_item_ids): their item-to-item neighbours, their nearest
    # items in the two-tower space (new items too), popular items when both run dry
    # items in the recall order (similarity), not the ranker's (which knows the user, not the viewed item)
    "item_detail": {"routes": {"similar": 2.0, "similar_ann": 1.0, "popular": FALLBACK}, "order": "recall"},
    # complements of the cart (context_item_ids): bought together with or after its items, no substitutes
    "cart": {"routes": {"copurchase": 2.0, "similar": 1.0, "popular": FALLBACK}, "exclude_context_categories": True,
             "order": "recall"},
}
SCENE_KEYS = {"routes", "diversity", "max_per_category", "exclude_context_categories", "order", "blend"}
ARM_KEYS = {"routes", "diversity", "max_per_category", "order", "blend", "scenes"}
BLEND_TERMS = ("ctr", "cvr", "value")  # final score = ctr * pCTR + cvr * pCTR * pCVR + value * pCTR * pCVR * item value
ARM_SCENE_KEYS = ARM_KEYS - {"scenes"}


class StrategyError(ValueError):
    """A bad scene or experiment in the serve config (names the key)."""


@dataclass(frozen=True)
class Resolved:
    """What one (scene, variant) runs."""

    weights: np.ndarray  # [len(ROUTES)] fusion weight of each route, 0 = off
    diversity: float
    max_per_category: int
    exclude_context_categories: bool
    by_ranker: bool  # served in the ranker's order (else in the fused recall order)
    blend: np.ndarray | None  # [ctr, cvr, value] weights of the final score; None: the exported score

@dataclass(frozen=True)
class Layer:
    name: str
    salt: int  # 64-bit, from the configured salt text
    arms: tuple[str, ...]
    bounds: np.ndarray  # cumulative shares: arm i takes hash buckets in [bounds[i-1], bounds[i])
    settings: tuple[dict, ...]  # per arm: the settings it overrides


def _check_routes(routes, where: str) -> dict:
    if not isinstance(routes, dict):
        raise StrategyError(f"{where}.routes must be a table of route = weight, got {routes!r}")
    for r, w in routes.items():
        if r not in ROUTES:
            raise StrategyError(f"{where}.routes: unknown route {r!r}; routes: {list(ROUTES)}")
        if not isinstance(w, (int, float)) or isinstance(w, bool) or not 0 <= w <= 100:
            raise StrategyError(f"{where}.routes.{r} must be a weight in [0, 100], got {w!r}")
    return {r: float(w) for r, w in routes.items()}


def _check_settings(values: dict, allowed: set, where: str) -> dict:
    if not isinstance(values, dict):
        raise StrategyError(f"{where} must be a table, got {values!r}")
    unknown = sorted(set(values) - allowed)
    if unknown:
        raise StrategyError(f"{where}: unknown key(s) {unknown}; known: {sorted(allowed)}")
    out = dict(values)
    if "routes" in out:
        out["routes"] = _check_routes(out["routes"], where)
    if "diversity" in out and not (isinstance(out["diversity"], (int, float)) and 0 <= out["diversity"] <= 1):
        raise StrategyError(f"{where}.diversity must be in [0, 1], got {out['diversity']!r}")
    if "max_per_category" in out and not (isinstance(out["max_per_category"], int) and out["max_per_category"] >= 0):
        raise StrategyError(f"{where}.max_per_category must be an integer >= 0 (0: no cap), got {out['max_per_category']!r}")
    if "scenes" in out:
        if not isinstance(out["scenes"], dict):
            raise StrategyError(f"{where}.scenes must be a table of scene = settings")
        out["scenes"] = {name: _check_settings(v, ARM_SCENE_KEYS, f"{where}.scenes.{name}") for name, v in out["scenes"].items()}
    if "exclude_context_categories" in out and not isinstance(out["exclude_context_categories"], bool):
        raise StrategyError(f"{where}.exclude_context_categories must be true or false")
    if "blend" in out:
        b = out["blend"]
        if not isinstance(b, dict) or set(b) - set(BLEND_TERMS) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 100 for v in b.values()):
            raise StrategyError(f"{where}.blend must be a table of {list(BLEND_TERMS)} = weight in [0, 100], got {b!r}")
        out["blend"] = np.array([float(b.get(t, 0.0)) for t in BLEND_TERMS])
    if "order" in out and out["order"] not in ("ranker", "recall"):
        raise StrategyError(f"{where}.order must be \"ranker\" or \"recall\", got {out['order']!r}")
    return out


def _setting_keys(settings: dict, prefix: str = "") -> set[str]:
    """The settings an arm changes, as dotted keys ("routes.trending", "scenes.home.diversity"); a setting for every
    scene also counts as each scene's."""
    keys = set()
    for k, v in settings.items():
        if k == "routes":
            keys |= {f"{prefix}routes.{r}" for r in v}
        elif k == "scenes":
            for scene, sv in v.items():
                keys |= _setting_keys(sv, f"scenes.{scene}.")
        else:
            keys.add(prefix + k)
    return keys


def _salt(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def bucket(user_id: np.ndarray, salt: int) -> np.ndarray:
    """A uniform number in [0, 1) per user, stable across processes and releases (splitmix64 of id ^ salt)."""
    with np.errstate(over="ignore"):
        z = np.asarray(user_id, dtype=np.int64).view(np.uint64) ^ np.uint64(salt)
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


class Strategy:
    """Scenes and experiment layers of one serve config, checked when a step loads (StrategyError names the key)."""

    def __init__(self, cfg):
        scenes = {**DEFAULT_SCENES, **{k: v for k, v in (cfg.scenes or {}).items()}}
        self.scene_settings = {name: _check_settings(v, SCENE_KEYS, f"serve.scenes.{name}") for name, v in scenes.items()}
        for name, s in self.scene_settings.items():
            if not any(w > 0 for w in s.get("routes", {}).values()):
                raise StrategyError(f"serve.scenes.{name}.routes: at least one route needs a weight > 0")
        self.scenes = tuple(self.scene_settings)
        self.scene_code = {name: i for i, name in enumerate(self.scenes)}
        if cfg.default_scene not in self.scene_code:
            raise StrategyError(f"serve.default_scene {cfg.default_scene!r} is not a scene; scenes: {list(self.scenes)}")
        self.default_scene = self.scene_code[cfg.default_scene]
        self.base = {"diversity": float(cfg.diversity), "max_per_category": int(cfg.max_per_category)}
        self.layers = tuple(self._layer(name, spec) for name, spec in (cfg.experiments or {}).items())
        salts = [layer.salt for layer in self.layers]
        if len(set(salts)) != len(salts):  # the same salt draws the same bucket: the layers' arms would move together
            raise StrategyError("serve.experiments: every layer needs its own salt, or its arms are not independent of "
                                "another layer's")
        owner: dict[str, str] = {}
        for layer in self.layers:
            unknown = sorted({sc for s in layer.settings for sc in s.get("scenes", {})} - set(self.scene_settings))
            if unknown:
                raise StrategyError(f"serve.experiments.{layer.name}: arms set scenes {unknown} that are not scenes "
                                    f"({list(self.scene_settings)})")
            # the same setting in two layers confounds them, in one scene or in all (so scenes are not told apart)
            for key in {k.split(".", 2)[2] if k.startswith("scenes.") else k for s in layer.settings for k in _setting_keys(s)}:
                if key in owner and owner[key] != layer.name:
                    raise StrategyError(f"serve.experiments: {key!r} is set by layers {owner[key]!r} and {layer.name!r}; "
                                        "a setting belongs to one layer, or their effects are confounded")
                owner[key] = layer.name
        self.radix = np.cumprod([1, *(len(layer.arms) for layer in self.layers)])
        if self.radix[-1] > 2**31 - 1:
            raise StrategyError("serve.experiments: too many arm combinations")
        self._cache: dict[tuple[int, int], Resolved] = {}

    @staticmethod
    def _layer(name: str, spec: dict) -> Layer:
        where = f"serve.experiments.{name}"
        if not isinstance(spec, dict):
            raise StrategyError(f"{where} must be a table with salt, arms and set")
        unknown = sorted(set(spec) - {"salt", "arms", "set"})
        if unknown:
            raise StrategyError(f"{where}: unknown key(s) {unknown}; known: ['arms', 'salt', 'set']")
        if not name or "=" in name or "," in name:
            raise StrategyError(f"serve.experiments: layer names may not be empty or hold '=' or ',', got {name!r}")
        salt, arms = spec.get("salt"), spec.get("arms")
        if not isinstance(salt, str) or not salt:
            raise StrategyError(f"{where}.salt must be a non-empty string (change it to re-draw the arms)")
        if not isinstance(arms, dict) or len(arms) < 1:
            raise StrategyError(f"{where}.arms must be a table of arm = traffic share")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in arms.values()):
            raise StrategyError(f"{where}.arms: shares must be numbers, got {dict(arms)}")
        shares = np.array([float(v) for v in arms.values()])
        if not np.isfinite(shares).all() or (shares < 0).any() or abs(shares.sum() - 1) > 1e-6:
            raise StrategyError(f"{where}.arms: shares must be >= 0 and sum to 1, got {dict(arms)}")
        sets = spec.get("set", {})
        unknown_arms = sorted(set(sets) - set(arms))
        if unknown_arms:
            raise StrategyError(f"{where}.set: {unknown_arms} are not arms of the layer ({list(arms)})")
        for arm in arms:
            if not arm or "=" in arm or "," in arm:
                raise StrategyError(f"{where}.arms: arm names may not be empty or hold '=' or ',', got {arm!r}")
        settings = tuple(_check_settings(sets.get(a, {}), ARM_KEYS, f"{where}.set.{a}") for a in arms)
        bounds = np.cumsum(shares)
        bounds[-1] = 1.0
        return Layer(name, _salt(salt), tuple(arms), bounds, settings)

    # -- per request -------------------------------------------------------------------------------------

    def parse_forced(self, text: str) -> dict[int, int]:
        """"layer=arm,layer=arm" -> {layer index: arm index}; ValueError names the unknown layer or arm."""
        out = {}
        names = [layer.name for layer in self.layers]
        for part in filter(None, (p.strip() for p in text.split(","))):
            layer, sep, arm = part.partition("=")
            if not sep or layer.strip() not in names:
                raise ValueError(f"force_arms: {part!r} is not layer=arm with a layer of {names}")
            li = names.index(layer.strip())
            if li in out:
                raise ValueError(f"force_arms: layer {layer.strip()!r} is named twice")
            if arm.strip() not in self.layers[li].arms:
                raise ValueError(f"force_arms: layer {layer.strip()!r} has no arm {arm.strip()!r} (arms: "
                                 f"{list(self.layers[li].arms)})")
            out[li] = self.layers[li].arms.index(arm.strip())
        return out

    def assign(self, user_id: np.ndarray, forced: list[dict[int, int]] | None = None) -> np.ndarray:
        """Variant per user: every layer's arm (hash of salt and user id, or forced), in mixed radix."""
        variant = np.zeros(len(user_id), np.int64)
        for li, layer in enumerate(self.layers):
            arm = np.minimum(np.searchsorted(layer.bounds, bucket(user_id, layer.salt), side="right"), len(layer.arms) - 1)
            if forced is not None and len(forced):  # a list, or the object array the Triton adapter concatenates
                arm = np.array([f.get(li, a) for f, a in zip(forced, arm)], np.int64)
            variant += arm * self.radix[li]
        return variant.astype(np.int32)

    def arms(self, variant: int) -> list[tuple[str, str]]:
        """(layer, arm) of every layer for one variant."""
        return [(layer.name, layer.arms[(int(variant) // int(self.radix[li])) % len(layer.arms)])
                for li, layer in enumerate(self.layers)]

    def label(self, variant: int) -> str:
        """The response's experiment assignment: "layer=arm,layer=arm" ("" without experiments)."""
        return ",".join(f"{layer}={arm}" for layer, arm in self.arms(variant))

    def check_codes(self, scene: np.ndarray, variant: np.ndarray) -> None:
        if scene.size and (scene.min() < 0 or scene.max() >= len(self.scenes)):
            raise ValueError(f"strategy scene code must be in 0..{len(self.scenes) - 1}")
        if variant.size and (variant.min() < 0 or variant.max() >= self.radix[-1]):
            raise ValueError(f"strategy variant must be in 0..{int(self.radix[-1]) - 1}")

    def resolve(self, scene: int, variant: int) -> Resolved:
        key = (int(scene), int(variant))
        if key not in self._cache:
            s = self.scene_settings[self.scenes[key[0]]]
            routes = dict(s.get("routes", {}))
            keys = (*self.base, "order", "blend")
            values = {**self.base, "order": "ranker", "blend": None, **{k: v for k, v in s.items() if k in keys}}
            scene_name = self.scenes[key[0]]
            for li, layer in enumerate(self.layers):
                arm = (key[1] // int(self.radix[li])) % len(layer.arms)
                over = layer.settings[arm]
                # every scene: re-weight the routes the scene uses; one scene: set any route
                routes.update({r: w for r, w in over.get("routes", {}).items() if routes.get(r, 0.0) > 0})
                values.update({k: v for k, v in over.items() if k in keys})
                scoped = over.get("scenes", {}).get(scene_name, {})
                routes.update(scoped.get("routes", {}))
                values.update({k: v for k, v in scoped.items() if k in keys})
            weights = np.array([routes.get(r, 0.0) for r in ROUTES], np.float64)
            if not any(w > 0 for r, w in zip(ROUTES, weights) if r not in CONTEXT_ROUTES):
                # only context routes (or none, after an arm): a request without context items still gets a list
                weights[ROUTES.index("popular")] = max(weights[ROUTES.index("popular")], FALLBACK)
            self._cache[key] = Resolved(weights, float(values["diversity"]), int(values["max_per_category"]),
                                        bool(s.get("exclude_context_categories", False)), values["order"] == "ranker",
                                        values["blend"])
        return self._cache[key]
