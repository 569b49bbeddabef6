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
