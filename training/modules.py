"""Small typed modules. Shapes: B batch (users), N candidates, F categorical fields, C continuous,
L sequence length, D embedding dim. Every forward is ONNX-exportable (opset 17): masks use a large
negative instead of -inf, and every attention has an always-present "nothing" slot, so an empty
history gives zeros, never NaN.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

NEG = -1e4
PAD_CODE = 0  # Categorify's padding code: sequence slots without an action
OOV_CODE = 2  # Categorify's out-of-vocabulary code
N_KINDS = 5  # 0 pad, 1 view, 2 click, 3 cart, 4 purchase


def mlp(sizes: list[int], final_activation: bool = False, dropout: float = 0.0) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2 or final_activation:
            layers.append(nn.ReLU())
            if dropout:
                layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


class FieldArch(nn.Module):
    """Categorical fields -> embedding vectors: cat [..., F] int64 -> [..., V, D].

    `fields` picks the columns used; `tables` assigns each column a table (columns with one joint
    vocabulary, such as the slots of a history list or of a multi-valued attribute, share one and
    are mean-pooled into one vector, padding and nulls excluded). V: distinct tables used. A code
    outside its table is an error in training (`check`) and cannot reach the exported model, whose
    inputs come from the same vocabularies.
    """

    def __init__(self, cardinalities: list[int], dim: int, tables: list[int] | None = None,
                 fields: list[int] | None = None, shared: dict[int, nn.Embedding] | None = None):
        super().__init__()
        fields = list(range(len(cardinalities))) if fields is None else [int(f) for f in fields]
        tables = list(range(len(cardinalities))) if tables is None else list(tables)
        keys = sorted({tables[f] for f in fields})
        self.field_list = fields
        self.field_table = [keys.index(tables[f]) for f in fields]
        sizes = [max(int(cardinalities[f]) for f, t in zip(fields, self.field_table) if t == k) for k in range(len(keys))]
        shared = shared or {}
        embs = []
        for k, size in enumerate(sizes):
            owner = next(f for f, t in zip(fields, self.field_table) if t == k)
            if owner in shared:
                embs.append(shared[owner])
                continue
            e = nn.Embedding(size, dim)
            nn.init.normal_(e.weight, std=0.05)
            embs.append(e)
        self.tables = nn.ModuleList(embs)
        self.register_buffer("fields", torch.tensor(fields, dtype=torch.long), persistent=False)
        pool = torch.zeros(len(keys), len(fields))
        for i, g in enumerate(self.field_table):
            pool[g, i] = 1.0
        self.register_buffer("pool", pool, persistent=False)
        self.n_vectors = len(keys)
        self.sizes = sizes
        # each field's first row in the tables laid end to end (the one-lookup form, forward(fused=True))
        starts = [sum(int(e.weight.shape[0]) for e in embs[:k]) for k in range(len(embs))]
        self.register_buffer("offsets", torch.tensor([starts[t] for t in self.field_table], dtype=torch.long),
                             persistent=False)

    def check(self, cat: torch.Tensor) -> None:
        for i, t in enumerate(self.field_table):
            col = cat[..., self.field_list[i]]
            if col.numel() and (int(col.min()) < 0 or int(col.max()) >= self.sizes[t]):
                raise ValueError(f"categorical field {self.field_list[i]}: code outside 0..{self.sizes[t] - 1}")

    def forward(self, cat: torch.Tensor, fused: bool = False) -> torch.Tensor:
        """fused: the same vectors from one lookup in the tables laid end to end (export writes this form: one
        Gather where there were a Gather, a Squeeze and an Unsqueeze per field; the concatenation of the
        tables is a constant the exporter folds)."""
        used = cat.index_select(-1, self.fields)
        if fused:
            vecs = F.embedding(used + self.offsets, torch.cat([e.weight for e in self.tables]))
        else:
            vecs = torch.stack([self.tables[t](used[..., i]) for i, t in enumerate(self.field_table)], dim=-2)
        # pooled slots ignore padding/null codes (0, 1); a single field keeps its own vector whatever its code
        real = (used > 1).to(vecs.dtype)
        single = (self.pool.sum(1, keepdim=True) == 1).to(vecs.dtype)
        weight = self.pool * (real.unsqueeze(-2) + single * (1 - real.unsqueeze(-2)))
        weight = weight / weight.sum(-1, keepdim=True).clamp(min=1.0)
        return weight @ vecs


class SequenceEncoder(nn.Module):
    """The recent actions -> one vector: item-id embedding + event kind + position, one self-attention
    layer, then attention pooling with a learned query (DIN-free, candidate-independent).

    seq [B, L] item-id codes (0 pad), kinds [B, L] (0 pad) -> [B, D]."""

    def __init__(self, item_table: nn.Embedding, length: int, dim: int, dropout: float = 0.0):
        super().__init__()
        self.items = item_table
        self.proj = nn.Linear(item_table.embedding_dim, dim) if item_table.embedding_dim != dim else nn.Identity()
        self.kind = nn.Embedding(N_KINDS, dim)
        self.position = nn.Embedding(length, dim)
        for e in (self.kind, self.position):
            nn.init.normal_(e.weight, std=0.05)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.norm = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, 2 * dim), nn.ReLU(), nn.Linear(2 * dim, dim))
        self.norm2 = nn.LayerNorm(dim)
        self.query = nn.Parameter(torch.randn(dim) * 0.05)
        self.null = nn.Parameter(torch.zeros(dim))  # the "no history" slot every pooling can attend to
        self.register_buffer("positions", torch.arange(length), persistent=False)
        self.dim = dim

    def tokens(self, seq: torch.Tensor, kinds: torch.Tensor) -> torch.Tensor:
        x = self.proj(self.items(seq)) + self.kind(kinds) + self.position(self.positions[: seq.shape[1]])
        mask = (seq > PAD_CODE).unsqueeze(-1).to(x.dtype)
        x = x * mask
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        att = q @ k.transpose(1, 2) / self.dim ** 0.5
        att = att + (1 - mask.transpose(1, 2)) * NEG
        h = self.norm(x + torch.softmax(att, dim=-1) @ v)
        # no dropout inside the sequence: on [B, L, D] it cost a sixth of the step for no holdout gain
        return self.norm2(h + self.ff(h)) * mask

    def forward(self, seq: torch.Tensor, kinds: torch.Tensor) -> torch.Tensor:
        h = self.tokens(seq, kinds)
        keys = torch.cat([self.null.expand(h.shape[0], 1, -1), h], dim=1)
        valid = torch.cat([torch.ones_like(seq[:, :1]), (seq > PAD_CODE).long()], dim=1).to(h.dtype)
        scores = keys @ self.query / self.dim ** 0.5 + (1 - valid) * NEG
        return (torch.softmax(scores, dim=-1).unsqueeze(-1) * keys).sum(1)


class UserTower(nn.Module):
    """user_cat [B, Fu], user_cont [B, Cu], seq [B, L], seq_kinds [B, L] -> L2-normalised [B, D_out]."""

    def __init__(self, card: list[int], tables: list[int], fields: list[int], n_cont: int, item_table: nn.Embedding,
                 seq_len: int, field_dim: int, seq_dim: int, hidden: list[int], out_dim: int, dropout: float):
        super().__init__()
        self.fields = FieldArch(card, field_dim, tables, fields)
        self.sequence = SequenceEncoder(item_table, seq_len, seq_dim, dropout)
        self.mlp = mlp([self.fields.n_vectors * field_dim + n_cont + seq_dim, *hidden, out_dim], dropout=dropout)

    def forward(self, user_cat, user_cont, seq, seq_kinds):
        x = torch.cat([self.fields(user_cat).flatten(1), user_cont, self.sequence(seq, seq_kinds)], dim=1)
        return F.normalize(self.mlp(x), dim=-1)


class ItemTower(nn.Module):
    """item_cat [B, Fi] (column 0: the item-id code), item_cont [B, Ci] -> L2-normalised [B, D_out]."""

    def __init__(self, card: list[int], tables: list[int], n_cont: int, item_table: nn.Embedding, field_dim: int,
                 hidden: list[int], out_dim: int, dropout: float):
        super().__init__()
        self.id_table = item_table
        self.fields = FieldArch(card, field_dim, tables, fields=list(range(1, len(card)))) if len(card) > 1 else None
        width = item_table.embedding_dim + (self.fields.n_vectors * field_dim if self.fields else 0) + n_cont
        self.mlp = mlp([width, *hidden, out_dim], dropout=dropout)

    def forward(self, item_cat, item_cont):
        parts = [self.id_table(item_cat[:, 0])]
        if self.fields is not None:
            parts.append(self.fields(item_cat).flatten(1))
        parts.append(item_cont)
        return F.normalize(self.mlp(torch.cat(parts, dim=1)), dim=-1)


class TwoTower(nn.Module):
    """Retrieval: a user tower reading the action sequence and an item tower, one shared item-id table."""

    def __init__(self, user_card, user_tables, user_fields, user_cont, item_card, item_tables, item_cont, seq_len: int,
                 out_dim: int, hidden: list[int], id_dim: int, field_dim: int, dropout: float = 0.0,
                 sparse_ids: bool = False):
        super().__init__()
        # sparse_ids: a step's gradient holds only the rows its batch touched (big catalogs; see training/train.py)
        self.item_ids = nn.Embedding(int(item_card[0]), id_dim, sparse=sparse_ids)
        nn.init.normal_(self.item_ids.weight, std=0.05)
        self.user_tower = UserTower(user_card, user_tables, user_fields, user_cont, self.item_ids, seq_len, field_dim,
                                    id_dim, hidden, out_dim, dropout)
        self.item_tower = ItemTower(item_card, item_tables, item_cont, self.item_ids, field_dim, hidden, out_dim, dropout)


def listwise_loss(logits: torch.Tensor, clicks: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """ListNet over each list [B, N]: the cross-entropy between the softmax of the logits over the list's valid
    candidates (mask 1) and the clicks spread evenly, averaged over the lists holding a click (0 when none does).
    Only the order inside a list matters to it, as only that order is served."""
    log_p = torch.log_softmax(logits.masked_fill(mask == 0, -1e9), dim=1)
    n_pos = clicks.sum(1)
    has = n_pos > 0
    if not bool(has.any()):
        return logits.sum() * 0.0
    return -((log_p * clicks).sum(1)[has] / n_pos[has]).mean()


def sampled_softmax_loss(user: torch.Tensor, item: torch.Tensor, item_ids: torch.Tensor, log_q: torch.Tensor | None,
                         temperature: float, extra: torch.Tensor | None = None, extra_ids: torch.Tensor | None = None,
                         extra_log_q: torch.Tensor | None = None) -> torch.Tensor:
    """Mixed-negative softmax. user, item [B, D] (row i is a positive pair); item_ids [B] mask in-batch
    duplicates; log_q [B] the log expected count of each in-batch item as a negative (logQ correction:
    popular items are negatives more often, so their logits are lowered by it). extra [M, D]: uniform
    random items (ids extra_ids, log expected count extra_log_q) added as negatives for every row;
    one equal to the row's positive is masked."""
    logits = user @ item.T / temperature
    if log_q is not None:
        logits = logits - log_q[None, :]
    same = item_ids[None, :] == item_ids[:, None]
    eye = torch.eye(len(item_ids), dtype=torch.bool, device=user.device)
    logits = logits.masked_fill(same & ~eye, NEG)
    if extra is not None:
        more = user @ extra.T / temperature
        if extra_log_q is not None:
            more = more - extra_log_q[None, :]
        more = more.masked_fill(extra_ids[None, :] == item_ids[:, None], NEG)
        logits = torch.cat([logits, more], dim=1)
    target = torch.arange(len(item_ids), device=user.device)
    return F.cross_entropy(logits, target)


class TargetAttention(nn.Module):
    """DIN: each candidate attends over the user's recent actions.

    cand [B, N, D], hist [B, L, D], valid [B, L] -> [B, N, D]: sum_j w(c, h_j) h_j with w from an MLP
    over (c, h_j, c * h_j, c - h_j), softmax-normalised with a "nothing" slot (empty history: zeros)."""

    def __init__(self, dim: int, hidden: int = 32):
        super().__init__()
        self.score = mlp([4 * dim, hidden, 1])

    def forward(self, cand: torch.Tensor, hist: torch.Tensor, valid: torch.Tensor, folded: bool = False) -> torch.Tensor:
        s = self.folded_scores(cand, hist) if folded else self.scores(cand, hist)  # [B, N, L]
        s = s + (1 - valid.unsqueeze(1).to(s.dtype)) * NEG
        s = torch.cat([torch.zeros_like(s[..., :1]), s], dim=-1)
        w = torch.softmax(s, dim=-1)[..., 1:]
        return w @ hist

    def scores(self, cand: torch.Tensor, hist: torch.Tensor) -> torch.Tensor:
        """score(c, h_j) for every candidate and action, [B, N, L], without building the [B, N, L, 4D] input.

        The first layer is linear, so W [c, h, c*h, c-h] = (Wc + Wd) c + (Wh - Wd) h + Wp (c*h): the candidate
        and the action parts are computed once each and broadcast, and only the product term pairs them:
        c . (Wp * h), one batched matmul of the candidates with each action's weighted copy. The same function
        as `score(cat(...))` with the same weights (tested), at about a quarter of the multiplications and no
        concatenation: it was the ranker's largest cost at serving time."""
        first, relu, last = self.score
        d = cand.shape[-1]
        w_c, w_h, w_p, w_d = self._first_layer(d)
        b, n, length, hidden = cand.shape[0], cand.shape[1], hist.shape[1], w_c.shape[0]
        c_part = cand @ (w_c + w_d).T  # [B, N, H]
        h_part = hist @ (w_h - w_d).T + first.bias  # [B, L, H]
        # Wp (c*h) = c . (Wp * h): each action's weighted copy [B, L*H, D], then one matmul with the candidates
        weighted = (hist.unsqueeze(2) * w_p).reshape(b, length * hidden, d)
        product = (cand @ weighted.transpose(1, 2)).reshape(b, n, length, hidden)  # [B, N, L, H]
        pre = product + c_part.unsqueeze(2) + h_part.unsqueeze(1)
        return (relu(pre) @ last.weight.T).squeeze(-1) + last.bias  # [B, N, L]

    def _first_layer(self, d: int) -> tuple[torch.Tensor, ...]:
        """The score MLP's first weight split by what it multiplies: (W_c, W_h, W_p, W_d), each [H, D], for the
        input (c, h, c*h, c-h)."""
        w = self.score[0].weight
        return w[:, :d], w[:, d : 2 * d], w[:, 2 * d : 3 * d], w[:, 3 * d :]

    def folded_scores(self, cand: torch.Tensor, hist: torch.Tensor) -> torch.Tensor:
        """scores() as the exported ranker computes it: the first layer in one batched matmul, no [B, N, L, H] sums.

        (Wc + Wd) c + Wp (c*h) = c . (Wp * h + Wc + Wd), and the action part (Wh - Wd) h + b rides on a constant 1
        appended to each candidate: [c, 1] . [Wp * h + Wc + Wd, (Wh - Wd) h + b] for every (action, unit). The same
        function up to float rounding (tested); scores() adds two [B, N, L, H] tensors after the matmul, which at a
        batch of 16 users (4,800 candidates) leave the cache (docs/performance.md, What each step costs). Training
        keeps scores(): the trained weights do not depend on the form, and the export's parity check compares
        this form's ONNX graph with scores()'s PyTorch model."""
        first, relu, last = self.score
        d = cand.shape[-1]
        w_c, w_h, w_p, w_d = self._first_layer(d)
        b, n, length, hidden = cand.shape[0], cand.shape[1], hist.shape[1], w_c.shape[0]
        per_unit = hist.unsqueeze(2) * w_p + (w_c + w_d)  # [B, L, H, D]
        action = (hist @ (w_h - w_d).T + first.bias).unsqueeze(-1)  # [B, L, H, 1]
        keys = torch.cat([per_unit, action], dim=-1).reshape(b, length * hidden, d + 1)
        cand1 = torch.cat([cand, torch.ones_like(cand[..., :1])], dim=-1)  # [B, N, D + 1]
        pre = (cand1 @ keys.transpose(1, 2)).reshape(b, n, length, hidden)
        return (relu(pre) @ last.weight.T).squeeze(-1) + last.bias  # [B, N, L]


IGNORED_SPREAD = 1e30  # the spread given to a ranker input that was constant in training: it then reads as 0


class Ranker(nn.Module):
    """DLRM-style ranker of one user's N candidates with CTR and CVR heads and DIN target attention.

    user_cat [B, Fu], user_cont [B, Cu], seq [B, L], seq_kinds [B, L], item_cat [B, N, Fi],
    item_cont [B, N, Ci], cand_dense [B, N, Cd] -> logits [B, N, 2] (click; purchase given click).

    logits = wide(x) + deep(...): a linear model of the standardised dense features x (the recall
    scores are the strongest single signals) plus the deep part, which is switched off (`deep=False`)
    when there are too few training lists to learn it (`ranking.deep_min_lists`). Deep: vectors per candidate: the bottom MLP of the dense features, the used user fields, the item's
    id and attribute vectors, the pooled recent actions and (with din) the candidate's attention over
    them; the top MLP reads the dense vector, all pairwise dot products and x.

    The item-id vectors are the two-tower's item-id table, frozen (`id_table`), through a learned
    projection: a ranker learns from one list per held-out user, far too few examples to learn an
    id embedding per item (learning them cost 8 % NDCG@10 on ml-latest-small). The dense inputs are
    standardised with statistics of the training lists (buffers, exported with the model).
    """

    def __init__(self, user_card, user_tables, user_fields, n_user_cont, item_card, item_tables, n_item_cont, n_dense,
                 seq_len: int, dim: int, bottom: list[int], top: list[int], id_table: nn.Embedding, din: bool = True,
                 dropout: float = 0.0, deep: bool = True, din_length: int = 20, cross: bool = False):
        super().__init__()
        self.din_length = min(int(din_length), int(seq_len))  # the most recent actions the deep part reads
        if bottom[-1] != dim:
            raise ValueError(f"bottom MLP must end in the embedding dim {dim}, got {bottom}")
        self.item_ids = nn.Embedding(id_table.num_embeddings, id_table.embedding_dim)
        self.item_ids.weight.data.copy_(id_table.weight.data)
        self.item_ids.weight.requires_grad_(False)
        self.id_proj = nn.Linear(id_table.embedding_dim, dim)
        self.items = FieldArch(item_card, dim, item_tables, fields=list(range(1, len(item_card)))) if len(item_card) > 1 else None
        self.user = FieldArch(user_card, dim, user_tables, user_fields) if user_fields else None
        self.seq_kind = nn.Embedding(N_KINDS, dim)
        nn.init.normal_(self.seq_kind.weight, std=0.05)
        n_in = n_user_cont + n_item_cont + n_dense
        self.register_buffer("mean", torch.zeros(n_in))
        self.register_buffer("std", torch.ones(n_in))
        self.dense = mlp([n_in, *bottom], final_activation=True, dropout=dropout)
        self.din = TargetAttention(dim) if din else None
        n_vec = (1 + (self.user.n_vectors if self.user else 0) + 1 + (self.items.n_vectors if self.items else 0)
                 + 1 + (1 if din else 0))
        rows, cols = torch.triu_indices(n_vec, n_vec, offset=1)
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)
        self.over = mlp([dim + len(rows) + n_in, *top, 2], dropout=dropout)
        # wide & deep: a linear model of the standardised features plus the deep part's correction,
        # which starts at zero, so training starts from (and cannot drift far from) the stable part
        self.wide = nn.Linear(n_in, 2)
        # user x candidate crosses (`ranking.user_item_cross`): inside one user's list the wide part's user
        # features add the same to every candidate, so they cannot change the order; a bilinear term lets them
        # re-weigh each candidate feature (a heavy user discounting popularity). Starts at zero, as the deep part.
        self.n_user_cont = int(n_user_cont)
        self.cross = nn.Parameter(torch.zeros(n_user_cont, 2 * (n_in - n_user_cont))) if cross and n_user_cont else None
        nn.init.zeros_(self.over[-1].weight)
        nn.init.zeros_(self.over[-1].bias)
        self.register_buffer("deep_on", torch.tensor(1.0 if deep else 0.0))

    def set_normalisation(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """The inputs' training mean and spread. An input that never varied in training (one category in the
        whole catalog: every candidate's category affinity 1) taught the model nothing, and scaled by a tiny
        spread, the first value unlike its constant (an unknown user's 0) would saturate every score. Its
        spread is set so large that the input always reads as 0 (its mean)."""
        self.mean.copy_(mean)
        self.std.copy_(torch.where(std > 1e-6, std, torch.full_like(std, IGNORED_SPREAD)))

    def forward(self, user_cat, user_cont, seq, seq_kinds, item_cat, item_cont, cand_dense, folded: bool = False):
        b, n = item_cat.shape[0], item_cat.shape[1]
        x = torch.cat([user_cont.unsqueeze(1).expand(b, n, user_cont.shape[1]), item_cont, cand_dense], dim=-1)
        x = (x - self.mean) / self.std
        wide = self.wide(x)
        if self.cross is not None:
            wide = wide + self.crossed(x)
        if not bool(self.deep_on > 0):  # a python branch: the exported graph of a wide-only ranker has no deep part
            return wide
        d = self.dense(x)  # [B, N, D]
        seq, seq_kinds = seq[:, : self.din_length], seq_kinds[:, : self.din_length]
        cand = self.id_proj(self.item_ids(item_cat[..., 0]))  # [B, N, D]
        hist = self.id_proj(self.item_ids(seq)) + self.seq_kind(seq_kinds)  # [B, L, D]
        valid = (seq > PAD_CODE).to(hist.dtype)
        hist = hist * valid.unsqueeze(-1)
        pooled = hist.sum(1) / valid.sum(1, keepdim=True).clamp(min=1.0)  # [B, D]
        vecs = [d.unsqueeze(2)]
        if self.user is not None:
            vecs.append(self.user(user_cat, fused=folded).unsqueeze(1).expand(b, n, -1, -1))
        vecs.append(cand.unsqueeze(2))
        if self.items is not None:
            vecs.append(self.items(item_cat, fused=folded))
        vecs.append(pooled.unsqueeze(1).expand(b, n, -1).unsqueeze(2))
        if self.din is not None:
            vecs.append(self.din(cand, hist, valid, folded).unsqueeze(2))
        v = torch.cat(vecs, dim=2)  # [B, N, V, D]
        dots = (v @ v.transpose(-1, -2))[..., self.rows, self.cols]
        return wide + self.over(torch.cat([d, dots, x], dim=-1))

    def crossed(self, x: torch.Tensor) -> torch.Tensor:
        """[B, N, 2]: sum over user feature u and candidate feature c of x_u * W[u, head, c] * x_c."""
        u, c = x[..., : self.n_user_cont], x[..., self.n_user_cont:]
        uw = (u @ self.cross).reshape(*c.shape[:-1], 2, c.shape[-1])
        return (uw * c.unsqueeze(-2)).sum(-1)


class RankerServing(nn.Module):
    """The exported ranker: scores [B, N] = pCTR * (1 + w * pCVR), the expected gain of showing each
    candidate when a purchase counts 1 + w clicks, and the two probabilities [B, N, 2] (pCTR, pCVR) that
    the top-k step blends when a scene, an experiment arm or the request sets another blend. folded: the target
    attention's first layer in its one-matmul form (TargetAttention.folded_scores) and each set of categorical
    fields embedded in one lookup (FieldArch, fused), as export writes it."""

    def __init__(self, ranker: Ranker, cvr_weight: float, folded: bool = False):
        super().__init__()
        self.ranker = ranker
        self.cvr_weight = float(cvr_weight)
        self.folded = bool(folded)

    def forward(self, user_cat, user_cont, seq, seq_kinds, item_cat, item_cont, cand_dense):
        logits = self.ranker(user_cat, user_cont, seq, seq_kinds, item_cat, item_cont, cand_dense, folded=self.folded)
        p = torch.sigmoid(logits)
        # every contract input stays in the exported graph (a wide-only ranker reads few of them), so the
        # step's signature does not depend on the model's size
        keep = sum((t.flatten()[:1].float().sum() * 0.0 for t in (user_cat, user_cont, seq, seq_kinds, item_cat, item_cont)),
                   torch.zeros(()))
        return p[..., 0] * (1 + self.cvr_weight * p[..., 1]) + keep, p + keep
