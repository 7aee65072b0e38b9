"""The loss found on real MNIST digits (results/mnist5k), shipped in the zoo as `i1e_ratio` and
as code in gp_loss/found_losses.py: the packaged file is still the printer's output for the zoo
expression, and it still equals its formula, written out by hand, in value and gradient."""
from __future__ import annotations

from pathlib import Path

import torch
from click.testing import CliRunner

import gp_loss
from gp_loss.cli.app import cli
from gp_loss.found_losses import LOSSES, I1eRatio, i1e_ratio

PACKAGED = Path(gp_loss.__file__).parent / "found_losses.py"
EXPR = "div(relu(i1e(mul(p, 1))), i1e(inv1p(asinh(y))))"


def by_hand(logits, target):
    """-(1/B) sum_b sum_c relu(i1e(p_bc)) / (i1e(1 / (1 + |asinh(y_bc)|)) + 1e-7); the sign
    -1 is the one the integrity check gives the expression."""
    p = torch.softmax(logits, dim=1)
    y = torch.nn.functional.one_hot(target, p.shape[1]).to(p.dtype)
    num = torch.relu(torch.special.i1e(p))
    den = torch.special.i1e(1.0 / (1.0 + torch.abs(torch.asinh(y)))) + 1e-7
    return -(num / den).sum(dim=1).mean()


def test_the_zoo_name_and_the_packaged_code_are_the_found_expression(tmp_path):
    assert gp_loss.load_pset("paper").zoo["i1e_ratio"] == EXPR
    out = tmp_path / "again.py"
    res = CliRunner().invoke(cli, ["export", "--expr", "i1e_ratio", "-o", str(out)])
    assert res.exit_code == 0, res.output
    # after a printer or version change: gp-loss export --expr i1e_ratio -o gp_loss/found_losses.py
    assert out.read_text() == PACKAGED.read_text()
    assert list(LOSSES) == ["i1e_ratio"] and LOSSES["i1e_ratio"] is i1e_ratio


def test_it_equals_its_formula_in_value_and_gradient():
    gen = torch.Generator().manual_seed(0)
    for classes in (2, 10, 100):
        logits = (3 * torch.randn(32, classes, generator=gen, dtype=torch.float64))
        target = torch.randint(0, classes, (32,), generator=gen)
        a = logits.clone().requires_grad_(True)
        b = logits.clone().requires_grad_(True)
        ours, want = i1e_ratio(a, target), by_hand(b, target)
        torch.testing.assert_close(ours, want, rtol=1e-12, atol=1e-12)
        ours.backward()
        want.backward()
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(I1eRatio()(logits, target), want.detach())
