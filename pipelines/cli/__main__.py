"""``python -m pipelines.cli``: the ``diki`` command without its console script."""

from pipelines.cli import main

if __name__ == "__main__":
    main()
