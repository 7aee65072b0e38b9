"""Loss functions discovered/exported by gp-loss 0.1.0.

Each NAME(logits, target) takes logits (B, C) and either integer class indices (B,) or (B, C)
target probabilities, applies softmax in float32 (or float64), and returns the batch-mean loss.
Protected operations use eps = 1e-7 exactly as in the search: log(x) = ln(|x| + eps),
recip(x) = 1/(x + eps), div(a, b) = a/(b + eps).
"""
import math

import torch

EPS = 1e-7
LN10 = math.log(10.0)


def i1e_ratio_per_sample(y, p):
    """Per-sample loss (B,) of `div(relu(i1e(mul(p, 1))), i1e(inv1p(asinh(y))))` from targets y and probabilities p, both (B, C)."""
    t0 = torch.asinh(y)
    t1 = 1.0 / (1.0 + torch.abs(t0))
    t2 = torch.special.i1e(t1)
    t3 = p * 1.0
    t4 = torch.special.i1e(t3)
    t5 = torch.relu(t4)
    t6 = t5 / (t2 + EPS)
    return t6.sum(dim=1)


def i1e_ratio(logits, target):
    """exp(-p)*i1(p)/(1e-07 + exp(-1/(asinh(y) + 1))*i1(1/(asinh(y) + 1)))

    Per class, with the sign applied (the loss minimised): a sample of true class t
    costs T(p_t) + sum over the other classes c of O(p_c), where
      true class:    T(p) = -6.18153*exp(-p)*i1(p)
      other classes: O(p) = -4.80976*exp(-p)*i1(p)

    Expression: div(relu(i1e(mul(p, 1))), i1e(inv1p(asinh(y))))
    Sign: -1 (the expression is negated). Softmax inside (float32 or better); target: class indices (B,) or
    probabilities (B, C). Returns the mean over the batch.
    """
    z = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
    p = torch.softmax(z, dim=1)
    if target.dim() == 1:
        y = torch.nn.functional.one_hot(target, p.shape[1]).to(p.dtype)
    else:
        y = target.to(p.dtype)
    per_sample = i1e_ratio_per_sample(y, p)
    return -per_sample.mean()


class I1eRatio(torch.nn.Module):
    """torch.nn.Module wrapper of `i1e_ratio`: div(relu(i1e(mul(p, 1))), i1e(inv1p(asinh(y))))"""

    def forward(self, logits, target):
        return i1e_ratio(logits, target)


# Losses in rank order.
LOSSES = {
    'i1e_ratio': i1e_ratio,
}
