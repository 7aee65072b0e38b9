"""``export`` carries the per-class form (issue 12 §2): each entry holds ``formula.per_class``
with its sign applied (the loss that is minimised) or, where there is none, the reason; the
python docstrings, ``--format latex`` and ``--format json`` all read it from that one entry.

The expected texts come from ``formula.per_class`` itself, never from a guess, and one test
checks numerically that the per-class form stated in a docstring is the exported function's
loss (sign applied, constant aside).
"""
import importlib.util
import json

import numpy as np
import pytest
import sympy
import torch

from gp_loss.screen.integrity import sign_of
from gp_loss.lang import codegen

from gp_loss.lang import export
from gp_loss.runs import export as run_export
from gp_loss.lang import formula as F
from gp_loss.lang.psets import load_pset
from gp_loss.lang.trees import parse

CE = "neg(mul(y, log(p)))"


def _import_file(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _doc_lines(form):
    return [f"true class:    T(p) = {form['target']}", f"other classes: O(p) = {form['other']}"]


def test_docstring_states_the_per_class_form(tmp_path):
    entries = export.expr_entries([CE], names=["ce"], sign_of=sign_of)
    path = tmp_path / "ce_losses.py"
    export.write(entries, path)
    # One printer: the file is the text training compiles, and it still compiles and runs.
    assert path.read_text() == codegen.module_source(entries)
    module = _import_file(path, "ce_losses")
    form = F.per_class(parse(CE))
    doc = module.ce.__doc__
    for line in _doc_lines(form):
        assert line in doc, doc
    assert "log(p" in form["target"]
    assert "constant dropped" not in doc
    logits = torch.randn(8, 5, generator=torch.Generator().manual_seed(0))
    target = torch.arange(8) % 5
    torch.testing.assert_close(module.ce(logits, target),
                               torch.nn.functional.cross_entropy(logits, target),
                               rtol=1e-5, atol=1e-5)


def test_the_docstring_has_the_sign_applied():
    plus = export.make_entry(CE, name="plus", sign=1)
    minus = export.make_entry(CE, name="minus", sign=-1)
    assert plus["per_class"] == F.per_class(parse(CE), sign=1)
    assert minus["per_class"] == F.per_class(parse(CE), sign=-1)
    text = str(codegen.module_source([plus, minus]))
    namespace = codegen.compile_printed(codegen.module_source([plus, minus]))
    for entry in (plus, minus):
        for line in _doc_lines(entry["per_class"]):
            assert line in namespace[entry["name"]].__doc__
    assert plus["per_class"]["target"] != minus["per_class"]["target"]
    p = sympy.Symbol("p")
    t_plus, t_minus = (sympy.parse_expr(e["per_class"]["target"], local_dict={"p": p})
                       for e in (plus, minus))
    for value in (1e-4, 0.3, 0.9):
        assert float(t_minus.subs(p, value)) == -float(t_plus.subs(p, value))
    assert "Sign: -1" in text


def test_the_stated_form_is_the_exported_loss(tmp_path):
    """sign * mean(T(p_t) + sum_{c != t} O(p_c)) is what NAME(logits, target) returns, up to the
    dropped constant -- so the docstring describes the loss that is minimised."""
    exprs = ["mul(y, log(p))", "baikal", "focal", "mse", "i1e_ratio",
             "add(neg(mul(y, log(p))), mul(y, sub(1, p)))"]
    entries = export.expr_entries(exprs, names=[f"l{i}" for i in range(len(exprs))],
                                  sign_of=sign_of)
    path = tmp_path / "several.py"
    export.write(entries, path)
    module = _import_file(path, "several_losses")
    p = sympy.Symbol("p")
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(64, 6, generator=gen, dtype=torch.float64)
    target = torch.randint(0, 6, (64,), generator=gen)
    probs = torch.softmax(logits, 1).numpy()
    onehot = np.eye(6, dtype=bool)[target.numpy()]
    for e in entries:
        form = e["per_class"]
        t_fn, o_fn = (sympy.lambdify(p, sympy.parse_expr(form[k], local_dict=dict(F.FUNCTIONS, p=p)),
                                     ["numpy", "scipy"]) for k in ("target", "other"))
        per_sample = (np.where(onehot, np.broadcast_to(t_fn(probs), probs.shape), 0.0).sum(1)
                      + np.where(onehot, 0.0, np.broadcast_to(o_fn(probs), probs.shape)).sum(1))
        got = getattr(module, e["name"])(logits, target).item()
        stated = per_sample.mean()
        if form["constant_dropped"]:
            # A constant c per class adds c * classes to every sample: compare differences.
            got2 = getattr(module, e["name"])(logits * 0.5, target).item()
            probs2 = torch.softmax(logits * 0.5, 1).numpy()
            per2 = (np.where(onehot, np.broadcast_to(t_fn(probs2), probs2.shape), 0.0).sum(1)
                    + np.where(onehot, 0.0, np.broadcast_to(o_fn(probs2), probs2.shape)).sum(1))
            got, stated = got - got2, stated - per2.mean()
        np.testing.assert_allclose(got, stated, rtol=2e-5, atol=1e-9, err_msg=e["expr"])


def test_constant_dropped_is_said():
    entry = export.make_entry("add(neg(mul(y, log(p))), mul(y, sub(1, p)))", name="poly1",
                              sign=1)
    assert entry["per_class"]["constant_dropped"] is True
    text = str(codegen.module_source([entry]))
    assert "additive constant dropped" in text
    assert "additive constant dropped" in export.render([entry], "latex")


def test_json_entries_carry_per_class(tmp_path):
    entries = export.expr_entries([CE, "mul(y, log(p))"], names=["ce", "mine"],
                                  sign_of=sign_of)
    data = json.loads(export.render(entries, "json"))
    for item, expr in zip(data["losses"], [CE, "mul(y, log(p))"]):
        assert {"target", "other", "constant_dropped"} <= set(item["per_class"])
        assert item["per_class"] == F.per_class(parse(expr), sign=item["sign"])
        assert item["per_class_reason"] is None
    # mul(y, log(p)) gets sign -1: its per-class form is the negated one, i.e. ce's.
    assert data["losses"][1]["sign"] == -1
    assert data["losses"][1]["per_class"]["target"] == data["losses"][0]["per_class"]["target"]


def test_latex_shows_the_per_class_form():
    entries = export.expr_entries(["baikal", "focal"], sign_of=sign_of)
    tex = export.render(entries, "latex")
    for e in entries:
        assert e["per_class"]["target_latex"] in tex
        assert e["per_class"]["other_latex"] in tex
    assert r"T_{\mathrm{baikal}}(p) &= " + entries[0]["per_class"]["target_latex"] in tex
    body = tex.split(r"\begin{align}")[1].split(r"\end{align}")[0].strip().splitlines()
    # Every row but the last ends the line; the formula row comes before its T and O rows.
    assert all(r" \\" in row for row in body[:-1]) and r"\\" not in body[-1]
    assert body[0].startswith(r"\ell_{\mathrm{baikal}}")


def test_typed_set_has_no_per_class_form_and_says_why(tmp_path):
    pset = load_pset("typed")
    entries = export.expr_entries(["ce(y, p)"], pset=pset, sign_of=sign_of)
    assert entries[0]["per_class"] is None
    reason = F.per_class_reason(pset)
    assert reason and entries[0]["per_class_reason"] == reason
    data = json.loads(export.render(entries, "json"))
    assert data["losses"][0]["per_class"] is None
    assert data["losses"][0]["per_class_reason"] == reason
    path = tmp_path / "typed_losses.py"
    export.write(entries, path)
    doc = " ".join(_import_file(path, "typed_losses").loss.__doc__.split())
    assert "Per-class form: none" in doc and " ".join(reason.split()) in doc
    tex = export.render(entries, "latex")
    assert "no per-class form" in tex and r"T_{" not in tex


def test_run_export_applies_each_candidate_sign(tmp_path):
    from gp_loss.runs.store import RunStore
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with RunStore.create(run_dir, {"search": {"pset": "paper"}}) as store:
        store.add_candidate("mul(y, log10(p))", "evaluated", fitness=0.95, sign=-1, key="b")
        store.add_candidate(CE, "evaluated", fitness=0.9, sign=1, key="a")
    entries = run_export.run_entries(run_dir, top=2)
    assert [e["sign"] for e in entries] == [-1, 1]
    namespace = codegen.compile_printed(codegen.module_source(entries))
    for e, (expr, sign) in zip(entries, [("mul(y, log10(p))", -1), (CE, 1)]):
        assert e["per_class"] == F.per_class(parse(expr), sign=sign)
        for line in _doc_lines(e["per_class"]):
            assert line in namespace[e["name"]].__doc__


def test_the_readme_shows_the_current_export_docstring(tmp_path):
    from pathlib import Path

    from click.testing import CliRunner

    from gp_loss.cli.app import cli
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text().splitlines()
    at = readme.index("$ sed -n '/^def poly1(/,/^    \"\"\"$/p' poly1.py")
    shown = readme[at + 1:readme.index("```", at)]
    out = tmp_path / "poly1.py"
    result = CliRunner().invoke(cli, ["export", "--expr",
                                      "add(neg(mul(y, log(p))), mul(y, sub(1, p)))",
                                      "--name", "poly1", "-o", str(out)])
    assert result.exit_code == 0, result.output
    lines = out.read_text().splitlines()
    start = lines.index("def poly1(logits, target):")
    end = lines.index('    """', start)
    assert lines[start:end + 1] == shown


def test_expressions_are_checked_in_turn_name_after_expression(tmp_path):
    """Each expression is parsed and named before the next: the first bad one is the error."""
    import gp_loss
    with pytest.raises(gp_loss.InputError, match="bad loss name '1bad'"):
        gp_loss.export(["ce", "bad("], tmp_path / "x.py", names=["1bad", "x"])
    with pytest.raises(gp_loss.ParseError):
        gp_loss.export(["bad(", "ce"], tmp_path / "x.py", names=["1bad", "x"])
    with pytest.raises(gp_loss.InputError, match="bad loss name"):
        gp_loss.to_source("ce", name="1bad")
    assert not (tmp_path / "x.py").exists()
