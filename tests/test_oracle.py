"""Oracle tests (micrograd style): numpy reference == torch lowering == exported file.

For every operation of both primitive sets a one-op tree is lowered by the printer
(``codegen``) and compiled in-process, and the same entries are written by ``gp_loss.lang.export``
to a file under ``tmp_path`` and imported from there. Values and gradients are compared with
the float64 numpy reference of ``primitives.py`` (gradients by central finite differences),
first on the per-sample function over arbitrary inputs (including p near 0 and 1), then through
the full ``NAME(logits, target)`` path (softmax, one-hot, class sum, batch mean, sign).
Input ranges avoid the few points where an op is not smooth (|x| = 0, x = -eps, max ties).
"""
import ast
import importlib.util

import numpy as np
import pytest
import torch

from gp_loss.screen.integrity import sign_of
from gp_loss.lang import codegen

from gp_loss.lang import export
from gp_loss.lang.ops import EPS
from gp_loss.lang.psets import load_pset

PSETS = ("paper", "typed")
C_OPS = 5          # classes for elementwise ops and reductions
B = 12


def _args(op, y, p):
    return (p, y) if op.arity == 2 else (p,)


def _cases(pset):
    """(loss name, text, per-sample numpy reference, per-element terms, classes, full text).

    ``terms(y, p)`` has one entry per input element and sums over its row to the per-sample
    reference; it lets finite differences look at one element's own term, whose rounding is
    small even where the step must be tiny (x = 1e-6 next to the kink of abs at 0).
    """
    out = []
    for internal, info in pset.prims.items():
        op = info.op
        name = "op_" + internal.lower()
        args = "p, y" if op.arity == 2 else "p"
        if op.kind == "reduction":
            # Sums over classes (mse: the mean), so a column's term is the op on that column.
            weight = 1.0 / C_OPS if info.display == "mse" else 1.0
            text = f"{info.display}({args})"
            ref = (lambda o: lambda y, p: o.numpy(*_args(o, y, p)))(op)
            terms = (lambda o, w: lambda y, p: w * np.stack(
                [o.numpy(*_args(o, y[:, [j]], p[:, [j]])) for j in range(p.shape[1])], 1))(op, weight)
            out.append((name, text, ref, terms, C_OPS, text))
            continue
        if info.out == "Elem":                 # paper (class sum of the root) or typed on (B, C)
            text = f"{info.display}({args})" if pset.class_sum else f"sum({info.display}({args}))"
            terms = (lambda o: lambda y, p: o.numpy(*_args(o, y, p)))(op)
            out.append((name, text, lambda y, p, t=terms: t(y, p).sum(1), terms, C_OPS, text))
            continue
        # typed, on per-sample values: with one class sum(p) is p itself.
        text = f"{info.display}({'sum(p), sum(y)' if op.arity == 2 else 'sum(p)'})"
        terms = (lambda o: lambda y, p: o.numpy(*_args(o, y, p)))(op)
        full = f"{info.display}({'ce(y, p), dot(y, p)' if op.arity == 2 else 'ce(y, p)'})"
        out.append((name, text, lambda y, p, t=terms: t(y, p)[:, 0], terms, 1, full))
    return out


def _inputs(rng, classes):
    """y, p (B, classes) float64: p-like values near 0 and 1, and general reals in [-3, 3]."""
    special = np.array([1e-6, 1e-3, 0.02, 0.5, 0.98, 1 - 1e-3, 1 - 1e-6])
    def draw():
        x = rng.uniform(-3, 3, size=(B, classes))
        mask = rng.random((B, classes)) < 0.4
        x[mask] = rng.choice(special, size=mask.sum())
        x[np.abs(x) < 1e-7] = 0.3     # |x| = 0 is a kink of abs/relu/sqrt
        return x
    p, y = draw(), draw()
    ties = np.abs(p - y) < 0.02       # max/min have a kink at a tie
    y[ties] += 0.1
    return y, p


def _fd_terms(terms, y, p, which):
    """d(term)/d(element) for every element at once: each element's own term, central
    differences with one Richardson step (the step is 1e-3 |x|, far from every kink)."""
    x = [y, p][which]
    h = 1e-3 * np.maximum(np.abs(x), 1e-6)
    def diff(step):
        args_up, args_down = [y, p], [y, p]
        args_up[which], args_down[which] = x + step, x - step
        return (terms(*args_up) - terms(*args_down)) / (2 * step)
    return (4 * diff(h / 2) - diff(h)) / 3


def _fd_scalar(fn, x, h=1e-5):
    """Central differences of the scalar fn(x) w.r.t. every element of x."""
    grad = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        old = x[idx]
        x[idx] = old + h
        up = fn(x)
        x[idx] = old - h
        down = fn(x)
        x[idx] = old
        grad[idx] = (up - down) / (2 * h)
    return grad


def _import_file(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module", params=PSETS)
def lowered(request, tmp_path_factory):
    """For one set: the cases, the in-process compiled namespace and the exported module."""
    pset = load_pset(request.param)
    cases = _cases(pset)
    entries = []
    for i, (name, text, _ref, _terms, _c, full) in enumerate(cases):
        sign = 1 if i % 2 == 0 else -1   # both orientations go through the printer
        entries.append(export.make_entry(text, pset, name=name, sign=sign))
        entries.append(export.make_entry(full, pset, name=name + "_full", sign=sign))
    source = codegen.module_source(entries)
    namespace = codegen.compile_printed(source)
    path = tmp_path_factory.mktemp("oracle") / f"ops_{pset.name}.py"
    export.write(entries, path)
    assert path.read_text() == source, "the exported file is not the text training compiles"
    module = _import_file(path, f"ops_{pset.name}")
    return pset, cases, entries, namespace, module


def test_every_op_of_the_set_is_covered(lowered):
    pset, cases, *_ = lowered
    assert len(cases) == len(pset.prims)
    if pset.name == "paper":
        assert len(cases) == 34


def test_per_sample_value_and_gradient(lowered):
    pset, cases, _entries, namespace, module = lowered
    rng = np.random.default_rng(0)
    for name, text, ref, terms, classes, _full in cases:
        y, p = _inputs(rng, classes)
        want = ref(y, p)
        np.testing.assert_allclose(terms(y, p).sum(1), want, rtol=1e-12, atol=1e-12)
        want_gp = _fd_terms(terms, y, p, 1)
        want_gy = _fd_terms(terms, y, p, 0)
        for source, fn in (("compiled", namespace[f"{name}_per_sample"]),
                           ("exported", getattr(module, f"{name}_per_sample"))):
            ty = torch.tensor(y, requires_grad=True)
            tp = torch.tensor(p, requires_grad=True)
            got = fn(ty, tp)
            assert got.shape == (B,), (text, source)
            got.sum().backward()
            where = f"{text} ({source})"
            np.testing.assert_allclose(got.detach().numpy(), want, rtol=1e-9, atol=1e-12,
                                       err_msg=where)
            np.testing.assert_allclose(tp.grad.numpy(), want_gp, rtol=1e-5, atol=1e-6,
                                       err_msg=f"d/dp {where}")
            gy = ty.grad.numpy() if ty.grad is not None else np.zeros_like(y)  # unary: no y
            np.testing.assert_allclose(gy, want_gy, rtol=1e-5, atol=1e-6,
                                       err_msg=f"d/dy {where}")


def _np_softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _np_full(ref_text, pset):
    """numpy batch loss of an expression from the op table (independent of the printer)."""
    from gp_loss.lang.trees import parse, var_name
    from deap import gp
    tree = parse(ref_text, pset)

    def per_sample(y, p):
        stack = []
        for node in reversed(tree):
            if isinstance(node, gp.Primitive):
                args = [stack.pop() for _ in range(node.arity)]
                stack.append(pset.prims[node.name].op.numpy(*args))
            elif var_name(node, pset):
                stack.append(y if var_name(node, pset) == "y" else p)
            else:
                stack.append(float(node.value))
        root = stack.pop()
        return root.sum(1) if pset.class_sum else root
    return per_sample


def test_full_path_value_and_gradient(lowered):
    pset, cases, entries, namespace, module = lowered
    rng = np.random.default_rng(1)
    signs = {e["name"]: e["sign"] for e in entries}
    for name, _text, _ref, _terms, _c, full in cases:
        per_sample = _np_full(full, pset)
        sign = signs[name + "_full"]
        z = rng.normal(0, 2, size=(8, C_OPS))
        z[0, 2] = 9.0                      # a confident row: some p ~ 1e-5, one ~ 1
        target = rng.integers(0, C_OPS, size=8)
        onehot = np.eye(C_OPS)[target]

        def batch(z_):
            return np.array(sign * per_sample(onehot, _np_softmax(z_)).mean())
        want = batch(z)
        want_g = _fd_scalar(batch, z)
        for source, fn in (("compiled", namespace[name + "_full"]),
                           ("exported", getattr(module, name + "_full"))):
            tz = torch.tensor(z, requires_grad=True)
            got = fn(tz, torch.tensor(target))
            assert got.dim() == 0
            got.backward()
            np.testing.assert_allclose(got.item(), want, rtol=1e-8, atol=1e-10,
                                       err_msg=f"{full} ({source})")
            scale = max(1.0, np.abs(want_g).max())
            np.testing.assert_allclose(tz.grad.numpy(), want_g, rtol=1e-5, atol=1e-7 * scale,
                                       err_msg=f"d/dlogits {full} ({source})")


def test_exported_file_imports_only_torch_and_math(lowered):
    _pset, _cases, entries, _ns, module = lowered
    tree = ast.parse(open(module.__file__).read())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0])
    assert imported == {"torch", "math"}
    assert list(module.LOSSES) == [e["name"] for e in entries]
    for e in entries:
        assert e["formula"] in getattr(module, e["name"]).__doc__


# ----------------------------------------------------------------------------- the zoo file

@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    path = tmp_path_factory.mktemp("zoo") / "zoo_losses.py"
    export.write(export.expr_entries(["ce", "baikal", "focal", "mse"], sign_of=sign_of), path)
    return _import_file(path, "zoo_losses")


def test_exported_ce_matches_torch_cross_entropy(zoo):
    gen = torch.Generator().manual_seed(0)
    for classes, scale in ((2, 3.0), (10, 3.0), (100, 1.0), (100, 6.0)):
        logits = torch.randn(64, classes, generator=gen, dtype=torch.float64) * scale
        target = torch.randint(0, classes, (64,), generator=gen)
        ours = zoo.LOSSES["ce"](logits, target)
        ref = torch.nn.functional.cross_entropy(logits, target)
        # Only the eps protection differs: 0 <= log(p_t + eps) - log(p_t) <= eps / p_t.
        p_t = torch.softmax(logits, 1).gather(1, target[:, None])[:, 0]
        assert 0 <= (ref - ours).item() <= (EPS / p_t).mean().item() * (1 + 1e-9) + 1e-12
        lg = logits.clone().requires_grad_(True)
        zoo.ce(lg, target).backward()
        lr = logits.clone().requires_grad_(True)
        torch.nn.functional.cross_entropy(lr, target).backward()
        # d/dz of -log(p_t + eps) is (p_t / (p_t + eps)) (p - y): off by at most eps / p_t.
        bound = (EPS / p_t).max().item() + 1e-12
        assert (lg.grad - lr.grad).abs().max().item() <= bound
    logits = torch.randn(256, 10, generator=gen)                 # float32, everyday logits
    target = torch.randint(0, 10, (256,), generator=gen)
    torch.testing.assert_close(zoo.ce(logits, target),
                               torch.nn.functional.cross_entropy(logits, target),
                               rtol=1e-5, atol=1e-5)


def test_exported_baikal_matches_its_formula(zoo):
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(32, 10, generator=gen, dtype=torch.float64)
    target = torch.randint(0, 10, (32,), generator=gen)
    p = torch.softmax(logits, 1)
    y = torch.nn.functional.one_hot(target, 10).double()
    want = (y / (p + EPS) - torch.log(p + EPS)).sum(1).mean()
    torch.testing.assert_close(zoo.LOSSES["baikal"](logits, target), want)


def test_integer_and_one_hot_targets_agree(zoo):
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(16, 7, generator=gen)
    target = torch.randint(0, 7, (16,), generator=gen)
    onehot = torch.nn.functional.one_hot(target, 7).float()
    for name, fn in zoo.LOSSES.items():
        torch.testing.assert_close(fn(logits, target), fn(logits, onehot), msg=name)


def test_soft_targets_are_used_as_given(zoo):
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(8, 4, generator=gen, dtype=torch.float64)
    soft = torch.softmax(torch.randn(8, 4, generator=gen, dtype=torch.float64), 1)
    p = torch.softmax(logits, 1)
    want = -(soft * torch.log(p + EPS)).sum(1).mean()
    torch.testing.assert_close(zoo.ce(logits, soft), want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_logits_get_float32_softmax(zoo, dtype):
    gen = torch.Generator().manual_seed(4)
    logits = (torch.randn(16, 10, generator=gen) * 4).to(dtype)
    target = torch.randint(0, 10, (16,), generator=gen)
    for name, fn in zoo.LOSSES.items():
        got = fn(logits, target)
        assert got.dtype == torch.float32, name
        torch.testing.assert_close(got, fn(logits.float(), target), msg=name)
    lg = logits.clone().requires_grad_(True)
    zoo.focal(lg, target).backward()
    assert lg.grad.dtype == dtype and torch.isfinite(lg.grad.float()).all()


def test_float64_logits_stay_float64(zoo):
    logits = torch.randn(4, 3, dtype=torch.float64)
    assert zoo.mse(logits, torch.tensor([0, 1, 2, 0])).dtype == torch.float64


def test_camel_case_wrappers(zoo):
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(8, 5, generator=gen)
    target = torch.randint(0, 5, (8,), generator=gen)
    for name, cls in (("ce", "Ce"), ("baikal", "Baikal"), ("focal", "Focal"), ("mse", "Mse")):
        module = getattr(zoo, cls)()
        assert isinstance(module, torch.nn.Module)
        torch.testing.assert_close(module(logits, target), zoo.LOSSES[name](logits, target))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_exported_file_runs_on_cuda(zoo):
    logits = torch.randn(32, 10, device="cuda", requires_grad=True)
    target = torch.randint(0, 10, (32,), device="cuda")
    for name, fn in zoo.LOSSES.items():
        got = fn(logits, target)
        assert got.device.type == "cuda"
        torch.testing.assert_close(got.cpu(), fn(logits.detach().cpu(), target.cpu()),
                                   rtol=1e-5, atol=1e-6, msg=name)
        got.backward()


# ----------------------------------------------------------------------------- other formats

def test_sympy_export_is_the_exact_formula(tmp_path):
    import sympy
    entries = export.expr_entries(["baikal", "focal"], sign_of=sign_of)
    path = tmp_path / "zoo_sympy.py"
    export.write(entries, path, "sympy")
    namespace: dict = {}
    exec(compile(path.read_text(), str(path), "exec"), namespace)  # our own output, in a test
    y, p, eps = namespace["y"], namespace["p"], namespace["eps"]
    pv = np.array([1e-6, 0.1, 0.5, 0.999])
    for name, numpy_form in (("baikal", lambda y_, p_: y_ / (p_ + EPS) - np.log(p_ + EPS)),
                             ("focal", lambda y_, p_: -(1 - p_) ** 2 * y_ * np.log(p_ + EPS))):
        expr, sign = namespace["LOSSES"][name]
        assert sign in (1, -1)
        fn = sympy.lambdify((y, p), expr.subs(eps, namespace["EPS_VALUE"]), "numpy")
        for yv in (0.0, 1.0):
            np.testing.assert_allclose(fn(yv, pv), numpy_form(yv, pv), rtol=1e-12)


def test_json_and_latex_exports(tmp_path):
    import json
    entries = export.expr_entries(["ce", "mul(y, log(p))"], names=["ce", "mine"],
                                  sign_of=sign_of)
    export.write(entries, tmp_path / "l.json", "json")
    data = json.loads((tmp_path / "l.json").read_text())
    assert [x["name"] for x in data["losses"]] == ["ce", "mine"]
    assert data["losses"][1]["expr"] == "mul(y, log(p))"
    assert {"formula", "latex", "key", "sign", "pset"} <= set(data["losses"][0])
    export.write(entries, tmp_path / "l.tex", "latex")
    tex = (tmp_path / "l.tex").read_text()
    assert r"\begin{align}" in tex and r"\mathrm{mine}" in tex
