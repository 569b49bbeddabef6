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
    """One embedding table per categorical field: cat [B, F] int64 -> [B, F, D]."""

    def __init__(self, cardinalities: list[int], dim: int):
        super().__init__()
        self.tables = nn.ModuleList(nn.Embedding(int(c), dim) for c in cardinalities)
        for t in self.tables:
            nn.init.normal_(t.weight, std=0.05)

    def forward(self, cat: torch.Tensor) -> torch.Tensor:
        # codes beyond a table (never produced by the workflow) are clamped rather than crash ONNX
        return torch.stack(
            [t(cat[:, i].clamp(0, t.num_embeddings - 1)) for i, t in enumerate(self.tables)], dim=1
        )


class Tower(nn.Module):
    """cat [B, F], cont [B, C] -> L2-normalised embedding [B, D_out]."""

    def __init__(self, cardinalities: list[int], n_cont: int, emb_dim: int, hidden: list[int], out_dim: int):
        super().__init__()
        self.sparse = SparseArch(cardinalities, emb_dim)
        self.mlp = mlp([len(cardinalities) * emb_dim + n_cont, *hidden, out_dim])

    def forward(self, cat: torch.Tensor, cont: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.sparse(cat).flatten(1), cont], dim=1)
        return F.normalize(self.mlp(x), dim=-1)


class TwoTower(nn.Module):
    def __init__(self, user_card: list[int], user_cont: int, item_card: list[int], item_cont: int,
                 out_dim: int, hidden: list[int], emb_dim: int = 16):
        super().__init__()
        self.user_tower = Tower(user_card, user_cont, emb_dim, hidden, out_dim)
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
    """Pairwise dot products: [B, F+1, D] -> upper triangle [B, (F+1)F/2]."""

    def __init__(self, n_vectors: int):
        super().__init__()
        rows, cols = torch.triu_indices(n_vectors, n_vectors, offset=1)
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)

    def forward(self, vectors: torch.Tensor) -> torch.Tensor:
        dots = vectors @ vectors.transpose(1, 2)
        return dots[:, self.rows, self.cols]


class DLRM(nn.Module):
    """cat [B, F], dense [B, C] -> logits [B, 2] (click, purchase)."""

    def __init__(self, cardinalities: list[int], n_dense: int, dim: int, bottom: list[int], top: list[int]):
        super().__init__()
        if bottom[-1] != dim:
            raise ValueError(f"bottom MLP must end in the embedding dim {dim}, got {bottom}")
        self.sparse = SparseArch(cardinalities, dim)
        self.dense = mlp([n_dense, *bottom], final_activation=True)
        n = len(cardinalities) + 1
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

    Factorised for serving: everything that depends on the user alone (its Fu embeddings, their
    Fu(Fu-1)/2 pairwise dots and those dots' share of the first top-MLP layer) is computed once per
    user instead of once per candidate; per candidate only the pairs that involve the dense vector
    or an item field remain. Same outputs as DLRM on the broadcast rows (tests/test_models.py).
    """

    def __init__(self, dlrm: DLRM, n_user_fields: int):
        super().__init__()
        self.dlrm = dlrm
        fu = n_user_fields
        fi = len(dlrm.sparse.tables) - fu
        dim = dlrm.dense[-2].out_features
        first = dlrm.over[0]
        if not isinstance(first, nn.Linear) or fi < 1:
            raise ValueError("RankerServing expects DLRM's top MLP to start with a Linear and at least one item field")
        # vectors: 0 = dense, 1..fu = user fields, fu+1..fu+fi = item fields; pair p -> column dim + p
        column = {(int(a), int(b)): dim + p for p, (a, b) in enumerate(zip(*torch.triu_indices(fu + fi + 1, fu + fi + 1, 1)))}
        users, items = range(1, fu + 1), range(fu + 1, fu + fi + 1)
        uu = [(a, b) for a in users for b in users if a < b]
        self.item_pairs = [(a - fu - 1, b - fu - 1) for a in items for b in items if a < b]
        per_candidate = (list(range(dim)) + [column[0, u] for u in users] + [column[0, i] for i in items]
                         + [column[u, i] for i in items for u in users] + [column[a, b] for a in items for b in items if a < b])
        weight = first.weight.detach()
        self.register_buffer("w_candidate", weight[:, per_candidate].clone())
        self.register_buffer("w_user", weight[:, [column[p] for p in uu]].clone())
        self.register_buffer("bias", first.bias.detach().clone())
        self.register_buffer("uu_flat", torch.tensor([(a - 1) * fu + (b - 1) for a, b in uu], dtype=torch.long))
        self.fu, self.fi = fu, fi

    def forward(self, user_cat, user_cont, item_cat, item_cont):
        b, n = item_cat.shape[0], item_cat.shape[1]
        tables = self.dlrm.sparse.tables
        user = torch.stack([tables[f](user_cat[:, f].clamp(0, tables[f].num_embeddings - 1))
                            for f in range(self.fu)], dim=1)  # [B, Fu, D]
        item = torch.stack([tables[self.fu + j](item_cat[:, :, j].clamp(0, tables[self.fu + j].num_embeddings - 1))
                            for j in range(self.fi)], dim=2)  # [B, N, Fi, D]
        dense = self.dlrm.dense(torch.cat([user_cont[:, None, :].expand(b, n, user_cont.shape[1]), item_cont], dim=2))
        user_t = user.transpose(1, 2)  # [B, D, Fu]
        uu = (user @ user_t).flatten(1)[:, self.uu_flat]  # [B, Fu(Fu-1)/2], once per user
        h_user = uu @ self.w_user.T + self.bias  # [B, H]
        parts = [dense, dense @ user_t, (dense[:, :, None, :] * item).sum(-1),
                 (item.reshape(b, n * self.fi, -1) @ user_t).reshape(b, n, self.fi * self.fu)]
        parts += [(item[:, :, a] * item[:, :, c]).sum(-1, keepdim=True) for a, c in self.item_pairs]
        hidden = torch.cat(parts, dim=2) @ self.w_candidate.T + h_user[:, None, :]
        probs = torch.sigmoid(self.dlrm.over[1:](hidden))
        return probs[..., 0] + probs[..., 1]
