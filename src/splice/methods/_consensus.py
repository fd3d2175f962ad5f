"""TIES sign election, computed with running sums instead of a stack of K deltas.

mergekit 0.1.5 (``get_mask`` with method "sum") elects, per element, the sign
of the sum of the (weighted) deltas, with a zero sum counting as positive; a
delta takes part where its sign equals the elected one (zeros never do).  The
merged value is the sum of the taking-part deltas, and the divisor (for
``normalize``) the sum of their models' weights, with 0 replaced by 1.

Because the elected side is either "all positive entries" or "all negative
entries", it is enough to keep, per element, the vote sum ``S``, the sums ``P``
and ``N`` of the positive and negative contributions, and (only when a divisor
is needed) the weights behind them.  Memory is a handful of tensors whatever
the number of models, and contributions are summed in model order as mergekit's
``sum(dim=0)`` does.

mergekit also has a "count" election (majority of signs) that none of its
registered methods use; it is not implemented here.
"""

from __future__ import annotations

import torch


class SignConsensus:
    """Accumulate contributions model by model, then ``result()``."""

    def __init__(self, like: torch.Tensor, *, track_weights: bool):
        self.votes = torch.zeros_like(like)
        self.pos = torch.zeros_like(like)
        self.neg = torch.zeros_like(like)
        self.pos_w = torch.zeros_like(like) if track_weights else None
        self.neg_w = torch.zeros_like(like) if track_weights else None
        self._side = torch.empty_like(like)

    def add(self, value: torch.Tensor, weight: float = 1.0, vote: torch.Tensor | None = None) -> None:
        """Add one model's contribution.

        ``value`` is what the model adds to the merged delta where it agrees (for
        TIES its weighted delta) and its sign decides the side it is on; ``vote``
        is what it adds to the election sum (default: ``value``); ``weight`` is
        what it adds to the divisor where it agrees.  ``value`` is clobbered.
        """
        self.votes.add_(value if vote is None else vote)
        side = torch.clamp(value, min=0, out=self._side)
        self.pos.add_(side)
        if self.pos_w is not None:
            self.pos_w.add_(side.sign_(), alpha=weight)  # +weight where value > 0
        value.clamp_(max=0)
        self.neg.add_(value)
        if self.neg_w is not None:
            self.neg_w.sub_(value.sign_(), alpha=weight)  # +weight where value < 0

    def result(self, *, divisor: bool, min_divisor: float | None = None, count_cancelled: bool = False) -> torch.Tensor:
        """The merged delta: the elected side's sum, divided by its weights if ``divisor``.

        ``min_divisor`` None: a zero divisor becomes 1 (mergekit's TIES); a
        number: the divisor is clamped below at it (mergekit's SCE).  With
        ``count_cancelled``, ``self.cancelled`` is set to the number of
        elements whose divisor is 0 although their sum is not (agreeing weights
        that cancel); otherwise it is 0.
        """
        positive = self.votes >= 0
        del self.votes, self._side
        merged = torch.where(positive, self.pos, self.neg, out=self.pos)
        del self.neg
        self.cancelled = 0
        if divisor:
            if self.pos_w is None:
                raise ValueError("SignConsensus built without track_weights")
            div = torch.where(positive, self.pos_w, self.neg_w, out=self.pos_w)
            del self.neg_w
            if min_divisor is None:
                zero = div == 0
                if count_cancelled:
                    self.cancelled = int(torch.count_nonzero(zero & (merged != 0)))
                div.masked_fill_(zero, 1)
            else:
                div.clamp_(min=min_divisor)
            merged.div_(div)
        return merged
