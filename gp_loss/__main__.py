"""`python -m gp_loss ...` = the gp-loss command."""
from gp_loss.cli import main

main()
