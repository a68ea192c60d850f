"""Hungarian matching of predicted moments to ground-truth moments (the authors' music_detr/matcher.py).

cost(query, target) = 10 * L1(center/width) - 1 * gIoU(start/end) - 4 * p(foreground).
With one query and one target the assignment is trivially (0, 0) and the solver is
skipped; otherwise scipy's linear_sum_assignment solves each sample on the CPU.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .spans import generalized_temporal_iou, span_cw_to_se


class HungarianMatcher(nn.Module):
    def __init__(self, cost_span: float = 10.0, cost_giou: float = 1.0, cost_class: float = 4.0,
                 foreground_label: int = 0):
        super().__init__()
        self.cost_span = cost_span
        self.cost_giou = cost_giou
        self.cost_class = cost_class
        self.foreground_label = foreground_label

    @torch.no_grad()
    def cost_matrices(self, pred_logits: Tensor, pred_spans: Tensor,
                      targets: list[Tensor]) -> list[Tensor]:
        """Per sample a [Q, T_b] cost matrix (the targets with width > 0)."""
        prob_fg = pred_logits.softmax(-1)[..., self.foreground_label]     # [B, Q]
        costs = []
        for b, tgt in enumerate(targets):
            spans = pred_spans[b]
            cost = (self.cost_span * torch.cdist(spans, tgt, p=1)
                    - self.cost_giou * generalized_temporal_iou(span_cw_to_se(spans), span_cw_to_se(tgt))
                    - self.cost_class * prob_fg[b][:, None])
            costs.append(cost)
        return costs

    @torch.no_grad()
    def forward(self, outputs: dict, targets: Tensor | list[Tensor]) -> list[tuple[Tensor, Tensor]]:
        """outputs: pred_logits [B, Q, 2], pred_spans [B, Q, 2] (center, width);
        targets: [B, T, 2] or a list of [T_b, 2] (center, width); zero-width targets are ignored.
        Returns per sample (query indices, target indices), int64, sorted by query index.
        """
        targets = [t[t[:, 1] > 0] for t in targets]
        num_queries = outputs["pred_spans"].shape[1]
        empty = torch.zeros(0, dtype=torch.int64)
        if num_queries == 1 and all(t.shape[0] == 1 for t in targets):
            zero = torch.zeros(1, dtype=torch.int64)
            return [(zero, zero) for _ in targets]
        # Imported here: scipy.optimize takes ~0.4 s to import, and the paper's single query never needs it.
        from scipy.optimize import linear_sum_assignment
        costs = self.cost_matrices(outputs["pred_logits"].float(), outputs["pred_spans"].float(),
                                   [t.float() for t in targets])
        indices = []
        for cost in costs:
            if cost.numel() == 0:
                indices.append((empty, empty))
                continue
            rows, cols = linear_sum_assignment(cost.cpu().numpy())
            indices.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
        return indices
