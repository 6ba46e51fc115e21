"""touchvl: touch-vision-language training infrastructure.

The library behind the DVC stages (``tasks/``), the Prefect flows (``flows/``) and the ``touchvl`` CLI.
It never reads ``params.yaml`` by itself: typed params (:mod:`touchvl.params`) and data in, data out.
See the README's "Architecture" section for the map.
"""
__version__ = "0.3.0"
