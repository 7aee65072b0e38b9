"""The language commands of ``gp-loss`` (simplify, check, same, export), in-process via CliRunner.

Covers the issue's "done when" commands, the DESIGN §7 exit codes (0 ok, 1 negative answer,
2 bad input without a traceback, 3 internal error with the traceback written to a file), the
--json keys, the lazy extension mechanism the run commands use, and that ``import gp_loss`` /
``gp-loss --help`` do not import torch or sympy.
"""
import importlib.util
import json
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

import gp_loss
from gp_loss.cli import app as cli_mod
from gp_loss.cli.app import cli, main
from gp_loss.lang.ops import EPS


@pytest.fixture
def run():
    runner = CliRunner()

    def invoke(*args):
        return runner.invoke(cli, list(args), catch_exceptions=False)
    return invoke


@pytest.fixture(autouse=True)
def _private_dirs(tmp_path, monkeypatch):
    """Relative outputs land in this test's folder, and the traceback files of the exit-3
    tests too (not the shared /tmp)."""
    import tempfile
    (tmp_path / "tmpdir").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmpdir"))
    monkeypatch.chdir(tmp_path)


def _load(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _assert_clean_error(result, code=2):
    assert result.exit_code == code, (result.exit_code, result.output)
    assert "Traceback" not in result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert lines and len(lines) <= 4 and all(len(ln) < 400 for ln in lines), result.stderr
    assert "Error" in result.stderr
    assert result.stdout == ""


# ----------------------------------------------------------------------------- done when

def test_check_cross_entropy_accepted_with_sign_plus_one(run):
    result = run("check", "neg(mul(y, log(p)))")
    assert result.exit_code == 0
    assert result.stdout.strip() == "accepted, sign +1"


def test_same_doubled_cross_entropy(run):
    result = run("same", "add(mul(y, log(p)), mul(y, log(p)))", "mul(add(y, y), log(p))")
    assert (result.exit_code, result.stdout) == (0, "same\n")


def test_log_and_log10_are_different(run):
    result = run("same", "mul(y, log(p))", "mul(y, log10(p))")
    assert (result.exit_code, result.stdout) == (1, "different\n")


def test_export_baikal_matches_its_formula(run, tmp_path):
    out = tmp_path / "b.py"
    result = run("export", "--expr", "baikal", "-o", str(out))
    assert result.exit_code == 0, result.output
    assert "wrote 1 loss (baikal)" in result.stderr
    module = _load(out, "b_exported")
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float64):
        logits = (torch.randn(64, 10, generator=gen) * 2).to(dtype)
        target = torch.randint(0, 10, (64,), generator=gen)
        p = torch.softmax(logits.double(), 1)
        y = torch.nn.functional.one_hot(target, 10).double()
        want = (y / (p + EPS) - torch.log(p + EPS)).sum(1).mean()
        got = module.LOSSES["baikal"](logits, target)
        tol = 1e-5 if dtype == torch.float32 else 1e-12
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
    assert "y/(p + 1e-07) - log(p + 1e-07)" in module.baikal.__doc__
    assert isinstance(module.Baikal(), torch.nn.Module)


# ----------------------------------------------------------------------------- answers and keys

def test_check_json_keys_and_negative_sign(run):
    result = run("check", "mul(y, log(p))", "--json")
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    assert set(data) == {"accepted", "reason", "sign"}
    assert data["accepted"] is True and data["sign"] == -1


@pytest.mark.parametrize("expr", ["add(y, log(p))", "1", "p", "mul(y, 0)",
                                  "exp(exp(exp(recip(p))))"])
def test_check_rejections_exit_1(run, expr):
    result = run("check", expr, "--json")
    assert result.exit_code == 1, result.output
    data = json.loads(result.stdout)
    assert data["accepted"] is False and data["reason"] and data["sign"] == 1
    plain = run("check", expr)
    assert plain.exit_code == 1 and plain.stdout.startswith("rejected: ")


def test_check_and_same_on_typed(run):
    assert run("check", "ce(y, p)", "--pset", "typed").exit_code == 0
    assert run("same", "ce(y, p)", "neg(sum(mul(y, log(p))))", "--pset", "typed").exit_code == 0


def test_pset_as_toml_path(run):
    path = gp_loss.load_pset("paper").source
    assert run("check", "ce", "--pset", path).exit_code == 0


def test_simplify_plain_and_json(run):
    plain = run("simplify", "add(mul(y, log(p)), mul(y, log(p)))")
    assert plain.exit_code == 0
    assert plain.stdout.splitlines() == ["2*y*log(p + 1e-07)", "  true class: 2*log(p + 1e-07)",
                                         "  other classes: 0"]
    result = run("simplify", "baikal", "--json")
    data = json.loads(result.stdout)
    assert set(data) == {"expr", "formula", "latex", "key", "per_class", "per_class_reason"}
    assert data["expr"] == "sub(div(y, p), log(p))"
    assert data["formula"] == "y/(p + 1e-07) - log(p + 1e-07)"
    assert set(data["per_class"]) == {"target", "other", "target_latex", "other_latex",
                                      "target_exact", "other_exact", "constant_dropped"}
    assert data["per_class"]["other"] == "-log(p + 1e-07)" and data["per_class_reason"] is None
    typed = json.loads(run("simplify", "ce(y, p)", "--pset", "typed", "--json").stdout)
    assert typed["per_class"] is None and "per-sample" in typed["per_class_reason"]
    # The key is oriented: ce and its negation share it; log vs log10 do not.
    keys = [json.loads(run("simplify", e, "--json").stdout)["key"]
            for e in ("ce", "mul(y, log(p))", "mul(y, log10(p))")]
    assert keys[0] == keys[1] != keys[2]


def test_export_several_names_and_formats(run, tmp_path):
    out = tmp_path / "two.py"
    result = run("export", "--expr", "ce", "--expr", "neg(mul(sqrt(p), mul(y, log(p))))",
                 "--name", "ce", "--name", "sqrt_ce", "-o", str(out))
    assert result.exit_code == 0, result.output
    module = _load(out, "two_exported")
    assert list(module.LOSSES) == ["ce", "sqrt_ce"] and module.SqrtCe
    result = run("export", "--expr", "mul(y, log(p))", "-o", str(tmp_path / "l.json"))
    data = json.loads((tmp_path / "l.json").read_text())
    assert data["losses"][0]["name"] == "loss" and data["losses"][0]["sign"] == -1
    result = run("-q", "export", "--expr", "focal", "--format", "latex", "-o", "-")
    assert result.exit_code == 0 and r"\begin{align}" in result.stdout and result.stderr == ""


def test_export_run_dir(run, tmp_path):
    from gp_loss.runs.store import RunStore
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with RunStore.create(run_dir, {"search": {"pset": "paper"}}) as store:
        store.add_candidate("neg(mul(y, log(p)))", "evaluated", fitness=0.9, sign=1, key="a")
        store.add_candidate("mul(y, log10(p))", "evaluated", fitness=0.95, sign=-1, key="b")
        store.add_candidate("square(sub(y, p))", "evaluated", fitness=0.5, sign=1, key="c")
    out = tmp_path / "losses.py"
    result = run("export", str(run_dir), "--top", "2", "-o", str(out))
    assert result.exit_code == 0, result.output
    module = _load(out, "run_exported")
    assert list(module.LOSSES) == ["rank1", "rank2"]
    assert "mul(y, log10(p))" in module.rank1.__doc__ and "-1" in module.rank1.__doc__
    _assert_clean_error(run("export", str(tmp_path / "nothing-here"), "-o", str(out)))
    _assert_clean_error(run("export", str(run_dir), "--name", "x", "-o", str(out)))


# ----------------------------------------------------------------------------- bad input: exit 2

MALFORMED = ["foo(p)", "log(p, y)", "log(p", "log(p))", "log(p) y", "", "inf", "nan", "1e999",
             "Log(p)", "neg(" * 9 + "p" + ")" * 9, "neg(" * 5000 + "p" + ")" * 5000,
             "p" + " " * 1_000_000, "__import__('os').system('true')", "ce(y, p)"]


@pytest.mark.parametrize("text", MALFORMED, ids=lambda t: repr(t[:20]) + f"[{len(t)}]")
def test_malformed_expressions_exit_2_on_every_command(run, tmp_path, text):
    for args in (["simplify", text], ["check", text], ["check", text, "--json"],
                 ["same", text, "ce"], ["same", "ce", text],
                 ["export", "--expr", text, "-o", str(tmp_path / "x.py")]):
        _assert_clean_error(run(*args))
    assert not (tmp_path / "x.py").exists()


@pytest.mark.parametrize("args", [
    ["check", "mul(y, p)", "--pset", "typed"],          # type error: root must be a Sample
    ["check", "ce(sum(p), sum(y))", "--pset", "typed"],  # reduction given Sample arguments
    ["check", "ce", "--pset", "nope"],
    ["check", "ce", "--pset", "/no/such/set.toml"],
    ["simplify", "ce", "--pset", "../etc/passwd"],
    ["export", "--expr", "ce", "--name", "Bad Name", "-o", "x.py"],
    ["export", "--expr", "ce", "--name", "import", "-o", "x.py"],
    ["export", "--expr", "ce", "--expr", "mse", "--name", "a", "-o", "x.py"],
    ["export", "--expr", "ce", "--expr", "ce", "--name", "a", "--name", "a", "-o", "x.py"],
    ["export", "--expr", "ce", "-o", "/no/such/folder/x.py"],
    ["export", "--expr", "ce", "--format", "pdf", "-o", "x.py"],
    ["export", "-o", "x.py"],
    ["export", "runs/x", "--expr", "ce", "-o", "x.py"],
    ["export", "--expr", "ce"],
    ["check"], ["same", "ce"], ["nonsense"], ["check", "ce", "--bogus"], ["-q", "-v", "check", "ce"],
])
def test_bad_usage_exits_2(run, args):
    _assert_clean_error(run(*args))


def test_broken_pset_file_exits_2(run, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("name = [unclosed\n")
    _assert_clean_error(run("check", "ce", "--pset", str(bad)))
    bad.write_text('name = "x"\ntypes = ["Elem"]\nroot = "Elem"\n[terminals]\ny = "Elem"\n'
                   '[elementwise]\nElem = ["nosuchop"]\n')
    _assert_clean_error(run("check", "ce", "--pset", str(bad)))


def test_export_to_a_directory_exits_2(run, tmp_path):
    _assert_clean_error(run("export", "--expr", "ce", "-o", str(tmp_path)))


# ----------------------------------------------------------------------------- internal error: 3

def test_internal_error_exits_3_with_traceback_file(run, monkeypatch, tmp_path):
    from gp_loss.screen import integrity as screen
    def boom(*_args, **_kwargs):
        raise RuntimeError("simulated bug")
    monkeypatch.setattr(screen, "screen", boom)
    result = run("check", "ce")
    assert result.exit_code == 3
    assert "Traceback" not in result.output
    assert "internal error" in result.stderr and "simulated bug" in result.stderr
    files = list((tmp_path / "tmpdir").glob("gp-loss-error-*.txt"))
    assert len(files) == 1 and str(files[0]) in result.stderr
    text = files[0].read_text()
    assert "Traceback" in text and "simulated bug" in text and "boom" in text


def test_main_exit_codes(monkeypatch):
    for argv, code in ((["check", "ce"], 0), (["same", "ce", "mse"], 1),
                       (["check", "log(p"], 2), (["--help"], 0)):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == code, argv

    def broken(*_args):
        raise RuntimeError("extension failed to load")
    monkeypatch.setattr(cli_mod, "_load_extensions", broken)
    with pytest.raises(SystemExit) as info:
        main(["check", "ce"])
    assert info.value.code == 3


# ----------------------------------------------------------------------------- closed stdout

@pytest.fixture
def closed_pipe():
    """A text stream on a pipe whose reader has gone (``gp-loss ... | head -0``)."""
    import os
    r, w = os.pipe()
    os.close(r)
    stream = open(w, "w", encoding="utf-8")
    yield stream
    try:
        stream.close()
    except OSError:
        pass


@pytest.mark.parametrize("argv", [["same", "ce", "ce"], ["check", "ce"], ["--version"],
                                  ["check", "--help"]])
def test_closed_stdout_ends_quietly(closed_pipe, capsys, monkeypatch, argv):
    monkeypatch.setattr(sys, "stdout", closed_pipe)  # here: capsys swaps it when the test starts
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code in (0, None), argv
    assert capsys.readouterr().err == ""
    closed_pipe.write("late output\n")
    closed_pipe.flush()  # as the interpreter's last flush: quiet too (stdout is now /dev/null)


def test_broken_pipe_elsewhere_is_still_an_internal_error(run, monkeypatch):
    # e.g. a worker's pipe: only a closed standard output ends a command quietly
    from gp_loss.screen import integrity as screen
    def boom(*_args, **_kwargs):
        raise BrokenPipeError(32, "Broken pipe")
    monkeypatch.setattr(screen, "screen", boom)
    result = run("check", "ce")
    assert result.exit_code == 3 and "internal error (BrokenPipeError" in result.stderr


def test_closed_stdout_subprocess(tmp_path):
    import os
    r, w = os.pipe()
    os.close(r)  # the reader is gone before the command writes a byte
    try:
        proc = subprocess.run([sys.executable, "-m", "gp_loss", "check", "ce"], stdout=w,
                              stderr=subprocess.PIPE, timeout=120,
                              env={**os.environ, "TMPDIR": str(tmp_path)})  # tracebacks
    finally:
        os.close(w)
    assert (proc.returncode, proc.stderr.decode()) == (0, "")


# ----------------------------------------------------------------------------- the group

def test_help_of_every_command_has_an_example(run):
    top = run("--help")
    assert top.exit_code == 0
    for name in ("simplify", "check", "same", "export"):
        assert name in top.stdout
        result = run(name, "--help")
        assert result.exit_code == 0 and "Example" in result.stdout and f"gp-loss {name}" in result.stdout
    assert run("--version").stdout.strip().endswith(gp_loss.__version__)


def test_extensions_register_commands_lazily(run, tmp_path, monkeypatch):
    (tmp_path / "gp_loss_test_ext.py").write_text(
        "import click\nfrom gp_loss.cli.app import cli\n\n"
        "@cli.command()\ndef hello():\n    \"\"\"Say hi.\"\"\"\n    click.echo('hi')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(cli_mod, "EXTENSIONS", ("gp_loss_test_ext", "gp_loss_no_such_module"))
    monkeypatch.setattr(cli_mod, "_extensions_loaded", False)
    monkeypatch.setattr(cli, "commands", dict(cli.commands))
    monkeypatch.delitem(sys.modules, "gp_loss_test_ext", raising=False)
    assert run("hello").stdout == "hi\n"
    assert "hello" in run("--help").stdout


def test_formats_agree():
    from gp_loss.lang import export
    assert cli_mod.FORMATS == export.FORMATS


def test_import_and_help_stay_light():
    code = ("import sys, gp_loss, gp_loss.cli.app\n"
            "from click.testing import CliRunner\n"
            "assert CliRunner().invoke(gp_loss.cli.app.cli, ['--help']).exit_code == 0\n"
            "heavy = {'torch', 'sympy', 'deap', 'numpy'} & set(sys.modules)\n"
            "assert not heavy, heavy\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_python_api_round_trip(tmp_path):
    assert gp_loss.check("ce") == {"accepted": True, "reason": "ok", "sign": 1}
    assert gp_loss.same("mul(y, log(p))", "ce") is True
    assert gp_loss.to_text(gp_loss.parse("ce")) == "neg(mul(y, log(p)))"
    assert "def focal(" in gp_loss.to_source("focal", name="focal")
    assert gp_loss.ZOO["baikal"] == "sub(div(y, p), log(p))"
    loss = gp_loss.compile_loss("mul(y, log(p))")          # sign -1 from the integrity check
    logits, target = torch.randn(8, 5), torch.randint(0, 5, (8,))
    torch.testing.assert_close(loss(logits, target), gp_loss.compile_loss("ce")(logits, target))
    entries = gp_loss.export(["ce", "baikal"], tmp_path / "z.py")
    assert [e["name"] for e in entries] == ["ce", "baikal"]
    assert list(_load(tmp_path / "z.py", "z_api").LOSSES) == ["ce", "baikal"]
    with pytest.raises(gp_loss.ParseError):
        gp_loss.check("log(p")
