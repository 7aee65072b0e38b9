"""The ``gp-loss`` command line: the click group, the shared error handling, the language commands.

``cli`` is the group; ``main`` is the console-script entry point. This module holds the loss
language commands (``simplify``, ``check``, ``same``, ``export``); each is a thin layer over the
Python API in ``gp_loss/__init__.py``. The run commands (``search``, ``resume``, ``show``,
``train``, ...) live in extension modules listed in :data:`EXTENSIONS`, imported lazily the
first time the group lists or looks up a command; such a module registers its commands with
``from gp_loss.cli.app import cli`` and ``@cli.command()`` and may reuse :func:`pset_option` and
:class:`UserError`. Heavy imports (torch, sympy) happen inside commands so ``--help`` is fast.

Exit codes (DESIGN §7), the same for every command:
0 success; 1 a negative answer (``check`` rejected, ``same`` different); 2 bad input or usage --
one short line on stderr, never a traceback; 3 an internal error -- one short line naming the
file where the full traceback was written. A closed standard output (``gp-loss show RUN | head
-1``) ends any command quietly with exit 0, as a Unix filter stops when its reader has gone; a
broken pipe anywhere else is an internal error.
"""
from __future__ import annotations

import importlib
import json
import logging
import os
import sys
import tempfile
import time
import traceback

import click

from ..version import __version__
from ..errors import first_line

log = logging.getLogger("gp_loss")

# Modules that add commands to the group (imported on first command lookup; absent is fine).
EXTENSIONS = ("gp_loss.cli.run", "gp_loss.cli.protocol")

# Exceptions meaning "bad input" (exit 2), matched by class name anywhere in the MRO so that
# importing this module does not import config/store/trees just to name their classes.
USER_ERROR_NAMES = frozenset({"ParseError", "PSetError", "ConfigError", "StoreError", "InputError"})

FORMATS = ("python", "latex", "sympy", "json")  # = gp_loss.export.FORMATS (a test checks)
_SUFFIX_FORMAT = {".tex": "latex", ".json": "json"}


class UserError(click.ClickException):
    """Bad input or usage: a one-line message, exit code 2."""

    exit_code = 2


class InternalError(click.ClickException):
    """A bug: a one-line message naming the traceback file, exit code 3."""

    exit_code = 3


def is_user_error(exc: BaseException) -> bool:
    return any(cls.__name__ in USER_ERROR_NAMES and cls.__module__.startswith("gp_loss")
               for cls in type(exc).__mro__)


def write_traceback(exc: BaseException) -> str | None:
    """Write the full traceback (and the command line) to a fresh file; its path, or None."""
    try:
        fd, path = tempfile.mkstemp(prefix=f"gp-loss-error-{time.strftime('%Y%m%d-%H%M%S')}-",
                                    suffix=".txt")
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(f"gp-loss {__version__}, Python {sys.version.split()[0]}\n")
            fh.write(f"command: {' '.join(sys.argv)}\n\n")
            fh.write("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
        return path
    except OSError:
        return None


def translate(exc: Exception) -> click.ClickException:
    """Any exception -> the ClickException carrying its exit code and one-line message."""
    if is_user_error(exc):
        log.debug("bad input", exc_info=exc)
        return UserError(first_line(exc, 380))
    path = write_traceback(exc)
    where = f"full traceback in {path}" if path else "the traceback could not be written"
    return InternalError(f"internal error ({type(exc).__name__}: {first_line(str(exc), 380)}); {where}")


def stdout_closed() -> bool:
    """Whether standard output is a pipe whose reader has gone (``gp-loss ... | head -1``)."""
    stream = sys.stdout
    try:
        stream.flush()  # what a failed write left in the buffer fails again
    except BrokenPipeError:
        return True
    except (AttributeError, OSError, ValueError):
        pass
    try:  # an empty buffer: ask the descriptor (an error = no reader; POSIX only)
        import select

        poller = select.poll()
        poller.register(stream.fileno(), 0)  # errors and hang-ups are always reported
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no descriptor (a test's buffer), no poll
        return False


def end_if_stdout_closed(exc: BaseException) -> None:
    """A BrokenPipeError from a closed standard output ends the command: exit 0, no message
    (the reader has what it wanted). Standard output is pointed at the null device so that the
    interpreter's last flush is quiet too. Any other exception returns to the caller."""
    if not isinstance(exc, BrokenPipeError) or not stdout_closed():
        return
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, sys.stdout.fileno())
        finally:
            os.close(devnull)
    except (AttributeError, OSError, ValueError):
        pass
    raise click.exceptions.Exit(0)




_extensions_loaded = False


def _load_extensions() -> None:
    global _extensions_loaded
    if _extensions_loaded:
        return
    _extensions_loaded = True
    for name in EXTENSIONS:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:  # the module exists but something it imports is missing
                raise


class Group(click.Group):
    """A click group that maps every exception to the exit codes of DESIGN §7."""

    def list_commands(self, ctx):
        _load_extensions()
        return super().list_commands(ctx)

    def get_command(self, ctx, name):
        _load_extensions()
        return super().get_command(ctx, name)

    def make_context(self, info_name, args, parent=None, **extra):
        try:  # --help and --version print while the command line is parsed
            return super().make_context(info_name, args, parent=parent, **extra)
        except BrokenPipeError as exc:
            end_if_stdout_closed(exc)
            raise

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except Exception as exc:
            end_if_stdout_closed(exc)
            raise translate(exc) from exc


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at emit time (click's test runner swaps it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value):
        pass


def setup_logging(level: int) -> None:
    log.setLevel(level)
    if not any(isinstance(h, _StderrHandler) for h in log.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.propagate = False


def pset_option(default="paper"):
    """The shared ``--pset NAME|FILE.toml`` option."""
    return click.option(
        "--pset", default=default, show_default=default is not None, metavar="NAME|FILE.toml",
        help="Primitive set: a name (paper, typed, or one in $GP_LOSS_PSET_PATH) or a .toml path.")


def json_option(what: str):
    return click.option("--json", "as_json", is_flag=True, help=f"Print a JSON object ({what}).")


def _echo_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=False))


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"],
                                          "max_content_width": 100})
@click.version_option(__version__, "-V", "--version", prog_name="gp-loss")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors on stderr.")
@click.option("-v", "--verbose", is_flag=True, help="Debug messages on stderr.")
def cli(quiet: bool, verbose: bool) -> None:
    """Discover loss functions for image classifiers by genetic programming.

    A loss is an expression in prefix notation over the one-hot target y and the softmax
    prediction p, e.g. cross-entropy is neg(mul(y, log(p))); the names ce, baikal, focal, mse
    and i1e_ratio (found on MNIST) stand for zoo losses. Exit codes: 0 ok, 1 negative answer
    (check rejected, same different), 2 bad input, 3 internal error.

    \b
    Examples:
      gp-loss simplify 'sub(div(y, p), log(p))'
      gp-loss check 'neg(mul(y, log(p)))'
      gp-loss same 'mul(y, log(p))' ce
      gp-loss export --expr baikal -o baikal.py
    """
    if quiet and verbose:
        raise click.UsageError("--quiet and --verbose exclude each other")
    setup_logging(logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO)


@cli.command(short_help="Print the simplified formula of an expression.")
@click.argument("expr", metavar="EXPR")
@pset_option()
@json_option("expr, formula, latex, key, per_class, per_class_reason")
def simplify(expr: str, pset: str, as_json: bool) -> None:
    """Print the simplified formula of EXPR, and its per-class form.

    The formula equals the loss on its domain (y in {0, 1}, p in [1e-4, 1 - 1e-4]): log and
    1/x read plainly only where eps changes nothing, else as log(x + 1e-07), 1/(x + 1e-07).
    The per-class form (paper set) is the per-sample loss as T(p_t) + sum over the other
    classes of O(p_c), with y-only parts folded into numbers; no sign is applied.

    With --json also the canonical expression text, the LaTeX form, the canonical key (two
    expressions with equal keys are the same candidate) and per_class (target, other, their
    LaTeX and exact forms, constant_dropped; null with per_class_reason where the set has no
    per-class form). Everything printed is a pure function of the expression.

    \b
    Examples:
      gp-loss simplify 'add(mul(y, log(p)), mul(y, log(p)))'
      gp-loss simplify baikal --json
    """
    import gp_loss
    result = gp_loss.simplify(expr, pset)
    if as_json:
        _echo_json(result)
    else:
        click.echo(result["formula"])
        form = result["per_class"]
        if form is not None:
            note = "  (an additive constant dropped)" if form["constant_dropped"] else ""
            click.echo(f"  true class: {form['target']}\n  other classes: {form['other']}{note}")


@cli.command(short_help="Screen an expression: exit 0 accepted, 1 rejected.")
@click.argument("expr", metavar="EXPR")
@pset_option()
@json_option("accepted, reason, sign")
@click.pass_context
def check(ctx, expr: str, pset: str, as_json: bool) -> None:
    """Screen EXPR as the search does before any training; exit 0 if accepted, 1 if rejected.

    Runs the paper's integrity check (which also picks the sign that makes the loss decrease
    toward correct predictions), then the checks that the loss depends on both p and y
    and is finite with a finite gradient. Malformed expressions are bad input (exit 2), not rejections.

    \b
    Examples:
      gp-loss check 'neg(mul(y, log(p)))'      # accepted, sign +1
      gp-loss check 'mul(y, log(p))' --json    # accepted, sign -1
      gp-loss check 'add(y, log(p))'           # rejected (exit 1)
    """
    import gp_loss
    result = gp_loss.check(expr, pset)
    if as_json:
        _echo_json({k: result[k] for k in ("accepted", "reason", "sign")})
    elif result["accepted"]:
        click.echo(f"accepted, sign {result['sign']:+d}")
    else:
        click.echo(f"rejected: {result['reason']}")
    ctx.exit(0 if result["accepted"] else 1)


@cli.command(short_help="Are two expressions the same candidate? exit 0 same, 1 different.")
@click.argument("expr_a", metavar="EXPR_A")
@click.argument("expr_b", metavar="EXPR_B")
@pset_option()
@click.pass_context
def same(ctx, expr_a: str, expr_b: str, pset: str) -> None:
    """Print 'same' (exit 0) if EXPR_A and EXPR_B are the same candidate, else 'different' (exit 1).

    Two losses are the same when they train identically: the same oriented gradient with
    respect to the logits on every valid input. Constant offsets, algebraic rewrites and the
    overall sign do not matter; a rescaling (log vs log10) does. This is the test the search
    uses to reject duplicates.

    \b
    Examples:
      gp-loss same 'add(mul(y, log(p)), mul(y, log(p)))' 'mul(add(y, y), log(p))'   # same
      gp-loss same 'mul(y, log(p))' 'mul(y, log10(p))'                              # different
    """
    import gp_loss
    answer = gp_loss.same(expr_a, expr_b, pset)
    click.echo("same" if answer else "different")
    ctx.exit(0 if answer else 1)


@cli.command(short_help="Write losses as standalone PyTorch code (or LaTeX, SymPy, JSON).")
@click.argument("run_dir", required=False, metavar="[RUN_DIR]")
@click.option("--expr", "exprs", multiple=True, metavar="EXPR|ZOO_NAME",
              help="An expression or zoo name to export (repeatable).")
@click.option("--name", "names", multiple=True, metavar="NAME",
              help="Function name for each --expr, in order (default: the zoo name, else loss).")
@click.option("--top", type=click.IntRange(min=1), default=5, show_default=True,
              help="With RUN_DIR: how many of the best distinct candidates (rank1 ... rankK).")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default=None,
              help="Output format [default: from the file suffix: .tex latex, .json json, "
                   "else python].")
@click.option("-o", "--output", required=True, metavar="FILE",
              help="Where to write ('-' for standard output).")
@pset_option(default=None)
def export(run_dir, exprs, names, top, fmt, output, pset) -> None:
    """Write losses as a standalone PyTorch module (or LaTeX, SymPy, JSON).

    Either --expr (expressions you give) or RUN_DIR (the best candidates of a search run,
    named rank1 ... rankK). The Python module imports only torch and math and is the very code
    the search trains with: for each loss NAME(logits, target) (integer or soft targets, batch
    mean), a torch.nn.Module wrapper in CamelCase, the formula in the docstring, and a LOSSES
    dict in rank order. It runs on CPU and CUDA tensors.

    \b
    Examples:
      gp-loss export --expr baikal -o baikal.py
      gp-loss export --expr 'neg(mul(sqrt(p), mul(y, log(p))))' --name sqrt_ce -o mine.py
      gp-loss export runs/quick --top 3 -o losses.py
    """
    from ..lang import export as exporter
    if bool(run_dir) == bool(exprs):
        raise click.UsageError("give --expr EXPR (repeatable) or a RUN_DIR, not both"
                               if exprs else "nothing to export: give --expr EXPR or a RUN_DIR")
    fmt = fmt or _SUFFIX_FORMAT.get(os.path.splitext(output)[1].lower(), "python")
    if run_dir:
        if names or pset:
            raise click.UsageError("--name and --pset apply to --expr only (a run names its "
                                   "losses rank1 ... rankK and records its primitive set)")
        from ..runs.export import run_entries
        entries = run_entries(run_dir, top)
    else:
        if names and len(names) != len(exprs):
            raise click.UsageError(f"{len(names)} --name for {len(exprs)} --expr")
        from ..screen.integrity import sign_of
        entries = exporter.expr_entries(exprs, pset or "paper", list(names) or None,
                                        sign_of=sign_of)
    exporter.write(entries, output, fmt)
    what = ", ".join(e["name"] for e in entries)
    log.info("wrote %d loss%s (%s) to %s as %s", len(entries), "" if len(entries) == 1 else "es",
             what, "stdout" if output == "-" else output, fmt)


def main(argv=None) -> None:
    """Console-script entry point: run the group and exit with the DESIGN §7 code."""
    try:
        cli.main(args=argv, prog_name="gp-loss", standalone_mode=True)
    except SystemExit:
        raise
    except Exception as exc:  # raised outside a command (e.g. while loading an extension)
        try:
            end_if_stdout_closed(exc)
        except click.exceptions.Exit as done:
            sys.exit(done.exit_code)
        err = translate(exc)
        err.show()
        sys.exit(err.exit_code)


if __name__ == "__main__":  # pragma: no cover
    main()
