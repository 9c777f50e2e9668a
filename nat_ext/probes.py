"""The classifiers of the evaluation, on frozen features: what :mod:`nat_ext.eval` trains and scores.

* :func:`probe_grid`, :func:`pool_features`: a layer's output pooled to the probe's features (the
  paper's protocol: about 9k features per layer at 224 px; a 2 x 2 grid on small inputs).
* :func:`linear_probe`: full-batch L-BFGS logistic regression on held features (small data).
* :class:`LinearHeads`: one linear head per probed (encoder, layer), trained by SGD on streamed
  batches (any n: nothing of the whole data set is held).
* :class:`FeatureStats`: per-feature mean and standard deviation accumulated over batches (float64).
* :class:`KnnBank`, :func:`knn_topk`: cosine k-NN against a bounded bank of float16 features, the
  similarities computed chunk by chunk and the top k merged per chunk (no n x n matrix).
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["PAPER_FEATURES", "LR_FEATURES", "probe_grid", "pool_features", "FeatureStats", "linear_probe", "LinearHeads",
           "knn_topk", "knn_votes", "KnnBank"]

# Features per layer in the paper's protocol (Zhang et al. 2016, used by NAT's table): AlexNet's
# conv1 pooled to 10 x 10 x 96 = 9600, conv2 6 x 6 x 256 = 9216, conv3-4 5 x 5 x 384, conv5 6 x 6 x 256.
PAPER_FEATURES = 9000
LR_FEATURES = 256  # the sgd probe's --probe-lr is that of a head on this many features


def probe_grid(channels: int, size: int, small_input: bool, grid: int = 0) -> int:
    """The pooling grid of a layer's linear probe.

    Args:
        channels: the layer's channels.
        size: the side of its feature map.
        small_input: inputs of at most 64 x 64 (``DataInfo.small_input``).
        grid: ``--grid``; 0 (auto): 2 on small inputs, else the grid giving about
            :data:`PAPER_FEATURES` features, ``round(sqrt(9000 / channels))``.

    Returns:
        the grid side, at most ``size`` (average pooling does not upsample).
    """
    if grid <= 0:
        grid = 2 if small_input else max(1, round(math.sqrt(PAPER_FEATURES / channels)))
    return max(1, min(grid, size))


def pool_features(x: torch.Tensor, grid: int) -> torch.Tensor:
    """A layer's output as probe features: Tensor[B, C, H, W] average-pooled to ``grid x grid`` then
    flattened (a Tensor[B, F] is returned as it is), float32."""
    if x.dim() == 4:
        x = F.adaptive_avg_pool2d(x, grid)
    return x.flatten(1).float()


class FeatureStats:
    """Per-feature mean and standard deviation, accumulated batch by batch in float64 and summed over
    ranks (:meth:`all_reduce`): the standardisation of the streamed probe."""

    def __init__(self, dim: int, device: torch.device) -> None:
        self.sums = torch.zeros(3, dim, dtype=torch.float64, device=device)  # count, sum, sum of squares

    def add(self, x: torch.Tensor) -> None:
        """Args: x Tensor[B, dim]."""
        x = x.double()
        self.sums[0] += x.shape[0]
        self.sums[1] += x.sum(0)
        self.sums[2] += x.square().sum(0)

    def all_reduce(self) -> None:
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.sums)

    def mean_std(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) float32 Tensor[dim]; the std is the sample std clamped at 1e-6 (as ``_standardize``)."""
        count, total, squares = self.sums
        if float(count[0]) < 2:
            raise ValueError(f"feature statistics need at least 2 images, got {int(count[0])}")
        mean = total / count
        var = ((squares - count * mean.square()) / (count - 1)).clamp_min(0)
        return mean.float(), var.sqrt().float().clamp_min(1e-6)


def _standardize(train_x: torch.Tensor, test_x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    return (train_x - mean) / std, (test_x - mean) / std


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor,
                 test_y: torch.Tensor, num_classes: int, weight_decay: float = 1e-4,
                 iters: int = 300) -> torch.Tensor:
    """Multinomial logistic regression on standardised features (full-batch L-BFGS), the test logits.

    Args:
        train_x: Tensor[N, F] features; train_y: Tensor[N] labels.
        test_x: Tensor[M, F]; test_y: Tensor[M] (unused; kept for the call's symmetry).
        num_classes: number of classes.
        weight_decay: L2 penalty on the weights (added to the mean cross-entropy).
        iters: L-BFGS iterations (full batch, strong-Wolfe line search: no learning rate to tune).

    Returns:
        Tensor[M, num_classes] float64 test logits.
    """
    train_x, test_x = _standardize(train_x.double(), test_x.double())
    w = torch.zeros(train_x.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=iters, history_size=20,
                            line_search_fn="strong_wolfe", tolerance_grad=1e-7, tolerance_change=1e-10)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(train_x @ w + b, train_y) + 0.5 * weight_decay * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return test_x @ w + b


class LinearHeads(nn.Module):
    """One linear classifier per probed (encoder, layer), on standardised features, trained together.

    Args:
        dims: the feature width of each head.
        num_classes: classes.
        means, stds: per head, Tensor[dim] standardisation (:class:`FeatureStats`), kept as buffers.
    """

    def __init__(self, dims: list[int], num_classes: int, means: list[torch.Tensor],
                 stds: list[torch.Tensor]) -> None:
        super().__init__()
        self.heads = nn.ModuleList(nn.Linear(d, num_classes) for d in dims)
        for h in self.heads:  # start from zero, as the L-BFGS probe does
            nn.init.zeros_(h.weight)
            nn.init.zeros_(h.bias)
        for k, (m, s) in enumerate(zip(means, stds)):
            self.register_buffer(f"mean{k}", m.clone())
            self.register_buffer(f"inv_std{k}", 1.0 / s)

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        """Args: feats, per head Tensor[B, dim]. Returns: per head Tensor[B, num_classes] logits."""
        return [h((x - getattr(self, f"mean{k}")) * getattr(self, f"inv_std{k}"))
                for k, (h, x) in enumerate(zip(self.heads, feats))]

    def optimizer(self, lr: float, weight_decay: float, momentum: float = 0.9) -> torch.optim.SGD:
        """SGD with the L2 penalty on the weights only (as :func:`linear_probe`'s).

        ``lr`` is that of a head on :data:`LR_FEATURES` features; a head on F features takes
        ``lr x LR_FEATURES / F``. Standardised features have ``E ||x||^2 = F``, so each image moves
        the logits by about the same amount in every head, from conv1's few hundred features to the
        paper protocol's 9k (on Fashion-MNIST's 64 to 784 features the scaled rate was within 0.3
        points of L-BFGS on every layer, docs/training.md).
        """
        groups = []
        for h in self.heads:
            head_lr = lr * LR_FEATURES / h.in_features
            groups += [{"params": [h.weight], "weight_decay": weight_decay, "lr": head_lr},
                       {"params": [h.bias], "weight_decay": 0.0, "lr": head_lr}]
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)

    def sum_gradients(self, world: int) -> None:
        """Sum the gradients over the ranks (one all-reduce of all of them). Each rank's loss is its
        images' summed loss over the global batch, so the sum is the gradient of the whole batch,
        whatever the ranks' shares; a rank that has read no image yet adds zeros."""
        for p in self.parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if world == 1:
            return
        grads = [p.grad for p in self.parameters()]
        flat = torch.cat([g.flatten() for g in grads])
        dist.all_reduce(flat)
        off = 0
        for g in grads:
            g.copy_(flat[off:off + g.numel()].view_as(g))
            off += g.numel()


def knn_topk(queries: torch.Tensor, bank: torch.Tensor, k: int, chunk: int = 16384
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """The k most similar bank rows of each query, the bank read ``chunk`` rows at a time.

    Each chunk's similarities (float32 products) give its own top k, merged with the running top k,
    so at most ``M x (chunk + k)`` similarities exist at once, never ``M x N``.

    Args:
        queries: Tensor[M, F] (unit rows for cosine similarity).
        bank: Tensor[N, F], any float dtype (float16 in :class:`KnnBank`).
        k: neighbours (at most N).
        chunk: bank rows per chunk.

    Returns:
        (Tensor[M, k] float32 similarities, descending; Tensor[M, k] int64 bank rows).
    """
    q = queries.float()
    best_sim = torch.full((q.shape[0], 0), float("-inf"), device=q.device)
    best_idx = torch.zeros((q.shape[0], 0), dtype=torch.int64, device=q.device)
    for lo in range(0, bank.shape[0], chunk):
        sim = q @ bank[lo:lo + chunk].float().t()
        s, i = sim.topk(min(k, sim.shape[1]), dim=1)
        best_sim, order = torch.cat([best_sim, s], 1).topk(min(k, best_sim.shape[1] + s.shape[1]), dim=1)
        best_idx = torch.cat([best_idx, i + lo], 1).gather(1, order)
    return best_sim, best_idx


def knn_votes(sim: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Similarity-weighted votes of the neighbours: Tensor[M, num_classes] (a neighbour votes
    ``max(sim, 0) + 1e-6`` for its label)."""
    votes = torch.zeros(sim.shape[0], num_classes, device=sim.device)
    return votes.scatter_add_(1, labels, sim.clamp_min(0) + 1e-6)


class KnnBank:
    """The k-NN classifier's memory: ``size`` training images' features, float16, standardised by
    their own statistics and L2-normalised, with their labels.

    Fill rows with :meth:`put` (any order; rows never put keep label -1 and are dropped), then
    :meth:`finish` (gathers the ranks' rows, standardises, normalises); :meth:`predict` then scores
    queries chunk by chunk (:func:`knn_topk`).

    Args:
        size: images in the bank.
        dim: features per image.
        device: where the bank lives (the evaluation device).
    """

    def __init__(self, size: int, dim: int, device: torch.device) -> None:
        self.feats = torch.zeros(size, dim, dtype=torch.float16, device=device)
        self.labels = torch.full((size,), -1, dtype=torch.int64, device=device)
        self.mean = self.std = None

    @property
    def nbytes(self) -> int:
        return self.feats.numel() * self.feats.element_size() + self.labels.numel() * 8

    def put(self, rows: torch.Tensor, feats: torch.Tensor, labels: torch.Tensor) -> None:
        """Args: rows Tensor[B] bank rows; feats Tensor[B, dim]; labels Tensor[B]."""
        self.feats[rows] = feats.to(torch.float16)
        self.labels[rows] = labels

    def finish(self, shards: list[tuple[int, int]] | None = None, chunk: int = 16384) -> None:
        """Gather the rows (``shards``: each rank's (lo, hi) rows, equal lengths but the last; None: one
        process), drop rows never put, then standardise and normalise in place, chunk by chunk."""
        if shards is not None and len(shards) > 1:
            for r, (lo, hi) in enumerate(shards):  # each rank broadcasts its own rows
                if hi > lo:
                    dist.broadcast(self.feats[lo:hi], r)
                    dist.broadcast(self.labels[lo:hi], r)
        keep = self.labels >= 0
        if not bool(keep.all()):
            self.feats, self.labels = self.feats[keep], self.labels[keep]
        if self.labels.numel() == 0:
            raise ValueError("the k-NN bank is empty (every image was skipped)")
        stats = FeatureStats(self.feats.shape[1], self.feats.device)
        for lo in range(0, self.feats.shape[0], chunk):
            stats.add(self.feats[lo:lo + chunk])
        if self.feats.shape[0] > 1:
            self.mean, self.std = stats.mean_std()
        else:
            self.mean, self.std = torch.zeros_like(stats.sums[1]).float(), torch.ones_like(stats.sums[1]).float()
        for lo in range(0, self.feats.shape[0], chunk):
            part = self.feats[lo:lo + chunk].float()
            self.feats[lo:lo + chunk] = F.normalize((part - self.mean) / self.std, dim=1).to(torch.float16)

    def normalize(self, feats: torch.Tensor) -> torch.Tensor:
        """Raw features Tensor[M, dim] as the bank holds its own: standardised by the bank's statistics, unit
        rows, float32 (call after :meth:`finish`)."""
        return F.normalize((feats.float() - self.mean) / self.std, dim=1)

    def neighbours(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``k`` (at most the bank's size) nearest bank rows of each query by cosine similarity.

        Args: queries Tensor[M, dim] raw features.
        Returns: (Tensor[M, k] similarities, descending; Tensor[M, k] int64 bank rows), as :func:`knn_topk`.
        """
        return knn_topk(self.normalize(queries), self.feats, min(k, self.feats.shape[0]))

    def predict(self, queries: torch.Tensor, k: int, num_classes: int) -> torch.Tensor:
        """Args: queries Tensor[M, dim] raw features. Returns: Tensor[M, num_classes] votes."""
        sim, idx = self.neighbours(queries, k)
        return knn_votes(sim, self.labels[idx], num_classes)
