"""Pipeline stages. Each module has a pure core (data in, data out) and a ``main()`` that dvc.yaml
runs as ``python -m tasks.<stage>``; ``main()`` alone touches paths, params and logging."""
