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
    """The exported ranker: one user against N candidates, loss-free.

    user_cat [B, Fu], user_cont [B, Cu], item_cat [B, N, Fi], item_cont [B, N, Ci] -> scores [B, N],
    score = P(click) + P(purchase): the expected gain with click=1, purchase=2 (as NDCG counts it).
    """

    def __init__(self, dlrm: DLRM):
        super().__init__()
        self.dlrm = dlrm

    def forward(self, user_cat, user_cont, item_cat, item_cont):
        b, n = item_cat.shape[0], item_cat.shape[1]
        uc = user_cat[:, None, :].expand(b, n, user_cat.shape[1])
        ud = user_cont[:, None, :].expand(b, n, user_cont.shape[1])
        cat = torch.cat([uc, item_cat], dim=2).reshape(b * n, -1)
        dense = torch.cat([ud, item_cont], dim=2).reshape(b * n, -1)
        probs = torch.sigmoid(self.dlrm(cat, dense))
        return (probs[:, 0] + probs[:, 1]).reshape(b, n)
