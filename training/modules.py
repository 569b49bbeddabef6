"""Small typed modules. Shapes: B batch, F categorical fields, C continuous, D embedding dim."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def mlp(sizes: list[int], final_activation: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2 or final_activation:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class SparseArch(nn.Module):
    """Embedding lookup: cat [B, F] int64 -> [B, F, D].

    `tables[f]` names field f's table (default: one per field). Fields encoded with one joint
    vocabulary (the last N clicked items, the categories of the last N clicks) share a table, so a
    value learns one vector whichever slot it appears in: N times the examples per vector.
    """

    def __init__(self, cardinalities: list[int], dim: int, tables: list[int] | None = None):
        super().__init__()
        tables = list(range(len(cardinalities))) if tables is None else [int(t) for t in tables]
        if len(tables) != len(cardinalities):
            raise ValueError(f"{len(cardinalities)} fields but {len(tables)} table assignments")
        keys = sorted(set(tables))
        self.field_table = [keys.index(t) for t in tables]
        sizes = [max(int(c) for c, t in zip(cardinalities, self.field_table) if t == k) for k in range(len(keys))]
        self.tables = nn.ModuleList(nn.Embedding(n, dim) for n in sizes)
        for t in self.tables:
            nn.init.normal_(t.weight, std=0.05)

    def forward(self, cat: torch.Tensor) -> torch.Tensor:
        # codes beyond a table (never produced by the workflow) are clamped rather than crash ONNX
        out = []
        for i, t in enumerate(self.field_table):
            table = self.tables[t]
            out.append(table(cat[:, i].clamp(0, table.num_embeddings - 1)))
        return torch.stack(out, dim=1)


class FieldArch(nn.Module):
    """The embedding vectors a model reads: cat [B, F] int64 -> [B, V, D].

    `fields` picks the categorical columns used (default: all F); `tables` assigns each column an
    embedding table (see SparseArch). Columns sharing a table (the slots of one history list) are
    mean-pooled into one vector: the mix of the user's recent categories, not their order. V is the
    number of distinct tables among the used fields.
    """

    def __init__(self, cardinalities: list[int], dim: int, tables: list[int] | None = None,
                 fields: list[int] | None = None):
        super().__init__()
        fields = list(range(len(cardinalities))) if fields is None else [int(f) for f in fields]
        tables = list(range(len(cardinalities))) if tables is None else list(tables)
        self.register_buffer("fields", torch.tensor(fields, dtype=torch.long), persistent=False)
        self.sparse = SparseArch([cardinalities[f] for f in fields], dim, [tables[f] for f in fields])
        groups = self.sparse.field_table
        pool = torch.zeros(max(groups) + 1, len(groups))
        for i, g in enumerate(groups):
            pool[g, i] = 1.0
        self.register_buffer("pool", pool / pool.sum(1, keepdim=True), persistent=False)
        self.n_vectors = len(pool)

    def forward(self, cat: torch.Tensor) -> torch.Tensor:
        return self.pool @ self.sparse(cat.index_select(1, self.fields))


class Tower(nn.Module):
    """cat [B, F], cont [B, C] -> L2-normalised embedding [B, D_out] (fields/tables: see FieldArch)."""

    def __init__(self, cardinalities: list[int], n_cont: int, emb_dim: int, hidden: list[int], out_dim: int,
                 tables: list[int] | None = None, fields: list[int] | None = None):
        super().__init__()
        self.sparse = FieldArch(cardinalities, emb_dim, tables, fields)
        self.mlp = mlp([self.sparse.n_vectors * emb_dim + n_cont, *hidden, out_dim])

    def forward(self, cat: torch.Tensor, cont: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.sparse(cat).flatten(1), cont], dim=1)
        return F.normalize(self.mlp(x), dim=-1)


class TwoTower(nn.Module):
    def __init__(self, user_card: list[int], user_cont: int, item_card: list[int], item_cont: int,
                 out_dim: int, hidden: list[int], emb_dim: int = 16, user_tables: list[int] | None = None,
                 user_fields: list[int] | None = None):
        super().__init__()
        self.user_tower = Tower(user_card, user_cont, emb_dim, hidden, out_dim, user_tables, user_fields)
        self.item_tower = Tower(item_card, item_cont, emb_dim, hidden, out_dim)


def sampled_softmax_loss(user: torch.Tensor, item: torch.Tensor, item_ids: torch.Tensor,
                         log_q: torch.Tensor | None, temperature: float) -> torch.Tensor:
    """In-batch softmax. user, item [B, D] (row i is a positive pair); item_ids [B] for masking
    in-batch duplicates; log_q [B] sampling log-probability of each in-batch item (log-Q correction:
    popular items appear as negatives more often, so their logits are lowered by log q)."""
    logits = user @ item.T / temperature
    if log_q is not None:
        logits = logits - log_q[None, :]
    same = item_ids[None, :] == item_ids[:, None]
    eye = torch.eye(len(item_ids), dtype=torch.bool, device=user.device)
    logits = logits.masked_fill(same & ~eye, float("-inf"))
    target = torch.arange(len(item_ids), device=user.device)
    return F.cross_entropy(logits, target)


class InteractionArch(nn.Module):
    """Pairwise dot products: [B, V+1, D] -> upper triangle [B, (V+1)V/2]."""

    def __init__(self, n_vectors: int):
        super().__init__()
        rows, cols = torch.triu_indices(n_vectors, n_vectors, offset=1)
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)

    def forward(self, vectors: torch.Tensor) -> torch.Tensor:
        dots = vectors @ vectors.transpose(1, 2)
        return dots[:, self.rows, self.cols]


class DLRM(nn.Module):
    """cat [B, F], dense [B, C] -> logits [B, 2] (click, purchase) (fields/tables: see FieldArch)."""

    def __init__(self, cardinalities: list[int], n_dense: int, dim: int, bottom: list[int], top: list[int],
                 tables: list[int] | None = None, fields: list[int] | None = None):
        super().__init__()
        if bottom[-1] != dim:
            raise ValueError(f"bottom MLP must end in the embedding dim {dim}, got {bottom}")
        self.sparse = FieldArch(cardinalities, dim, tables, fields)
        self.dense = mlp([n_dense, *bottom], final_activation=True)
        n = self.sparse.n_vectors + 1
        self.interaction = InteractionArch(n)
        self.over = mlp([dim + n * (n - 1) // 2, *top, 2])

    def forward(self, cat: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        d = self.dense(dense)
        vectors = torch.cat([d[:, None, :], self.sparse(cat)], dim=1)
        return self.over(torch.cat([d, self.interaction(vectors)], dim=1))


class RankerServing(nn.Module):
    """The exported ranker: one user against N candidates, loss-free, the same function as DLRM.

    user_cat [B, Fu], user_cont [B, Cu], item_cat [B, N, Fi], item_cont [B, N, Ci] -> scores [B, N],
    score = P(click) + P(purchase): the expected gain with click=1, purchase=2 (as NDCG counts it).

    Factorised for serving: everything that depends on the user alone (its embedding vectors, their
    pairwise dots and those dots' share of the first top-MLP layer) is computed once per user
    instead of once per candidate; per candidate only the pairs that involve the dense vector or an
    item vector remain. Same outputs as DLRM on the broadcast rows (tests/test_models.py).
    """

    def __init__(self, dlrm: DLRM, n_user_fields: int):
        super().__init__()
        self.dlrm = dlrm
        arch, fu = dlrm.sparse, n_user_fields
        first = dlrm.over[0]
        fields = arch.fields.tolist()
        pool = arch.pool  # [V, used fields]
        user_pos = [j for j, f in enumerate(fields) if f < fu]
        item_pos = [j for j, f in enumerate(fields) if f >= fu]
        user_vec = [v for v in range(len(pool)) if pool[v, item_pos].abs().sum() == 0]
        item_vec = [v for v in range(len(pool)) if pool[v, user_pos].abs().sum() == 0]
        if len(user_vec) + len(item_vec) != len(pool) or not item_vec or not isinstance(first, nn.Linear):
            raise ValueError("RankerServing needs every embedding vector to come from user fields only or item "
                             "fields only, at least one item vector, and a top MLP that starts with a Linear")
        self.user_lookup = [(fields[j], arch.sparse.field_table[j]) for j in user_pos]
        self.item_lookup = [(fields[j] - fu, arch.sparse.field_table[j]) for j in item_pos]
        self.register_buffer("user_pool", pool[user_vec][:, user_pos].clone())
        self.register_buffer("item_pool", pool[item_vec][:, item_pos].clone())
        dim = dlrm.dense[-2].out_features
        # vectors: 0 = dense, 1 + v = embedding vector v; pair (a, b), a < b -> column dim + p
        n = len(pool) + 1
        column = {(int(a), int(b)): dim + p for p, (a, b) in enumerate(zip(*torch.triu_indices(n, n, 1)))}
        users, items = [1 + v for v in user_vec], [1 + v for v in item_vec]

        def col(a, b):
            return column[min(a, b), max(a, b)]

        uu = [(x, y) for x in range(len(users)) for y in range(len(users)) if x < y]
        self.item_pairs = [(x, y) for x in range(len(items)) for y in range(len(items)) if x < y]
        per_candidate = (list(range(dim)) + [col(0, u) for u in users] + [col(0, i) for i in items]
                         + [col(u, i) for i in items for u in users] + [col(items[x], items[y]) for x, y in self.item_pairs])
        weight = first.weight.detach()
        self.register_buffer("w_candidate", weight[:, per_candidate].clone())
        self.register_buffer("w_user", weight[:, [col(users[x], users[y]) for x, y in uu]].clone())
        self.register_buffer("bias", first.bias.detach().clone())
        self.register_buffer("uu_flat", torch.tensor([x * len(users) + y for x, y in uu], dtype=torch.long))
        self.vu, self.vi = len(users), len(items)

    def _lookup(self, cat: torch.Tensor, lookup) -> torch.Tensor:
        tables = self.dlrm.sparse.sparse.tables
        return torch.stack([tables[t](cat[..., f].clamp(0, tables[t].num_embeddings - 1)) for f, t in lookup], dim=-2)

    def forward(self, user_cat, user_cont, item_cat, item_cont):
        b, n = item_cat.shape[0], item_cat.shape[1]
        user = self.user_pool @ self._lookup(user_cat, self.user_lookup)  # [B, Vu, D], once per user
        item = self.item_pool @ self._lookup(item_cat, self.item_lookup)  # [B, N, Vi, D]
        dense = self.dlrm.dense(torch.cat([user_cont[:, None, :].expand(b, n, user_cont.shape[1]), item_cont], dim=2))
        user_t = user.transpose(1, 2)  # [B, D, Vu]
        uu = (user @ user_t).flatten(1)[:, self.uu_flat]  # [B, Vu(Vu-1)/2], once per user
        h_user = uu @ self.w_user.T + self.bias  # [B, H]
        parts = [dense, dense @ user_t, (dense[:, :, None, :] * item).sum(-1),
                 (item.reshape(b, n * self.vi, -1) @ user_t).reshape(b, n, self.vi * self.vu)]
        parts += [(item[:, :, x] * item[:, :, y]).sum(-1, keepdim=True) for x, y in self.item_pairs]
        hidden = torch.cat(parts, dim=2) @ self.w_candidate.T + h_user[:, None, :]
        probs = torch.sigmoid(self.dlrm.over[1:](hidden))
        return probs[..., 0] + probs[..., 1]
