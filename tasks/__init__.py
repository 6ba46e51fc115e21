"""The DVC stages, one thin module each (``python -m tasks.<stage>``): load params, call touchvl, write.

Nothing imports these modules (tests/test_layout.py checks it); the library is :mod:`touchvl`.
"""
