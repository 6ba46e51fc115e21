"""``python -m touchvl``: the same CLI as the ``touchvl`` console script."""
from touchvl.cli import entry

entry()
