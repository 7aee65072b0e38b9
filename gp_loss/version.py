"""The package version (``gp_loss.__version__``), in a module of its own so that every layer
(the exporters' headers, the CLI's ``--version``) can read it without importing the package
root; setup.cfg reads it (``version = attr: gp_loss.version.__version__``)."""

__version__ = "0.1.0"
