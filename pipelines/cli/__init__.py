"""The ``diki`` command line. Each group of commands lives in its own module of this package."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="diki",
    help="Continual learning for CLIP classifiers: learn each new labelled dataset without forgetting.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)


@app.callback()
def _root() -> None:
    """Continual learning for CLIP classifiers: learn each new labelled dataset without forgetting."""


@app.command()
def version() -> None:
    """Print the version of the diki package."""
    from importlib.metadata import version as _version

    typer.echo(_version("diki"))


def main() -> None:
    app()


# Command groups, each in its own module (imported after `app` exists).
from pipelines.cli import bench, config, data, datasets, demo, serve, stack, train  # noqa: E402

app.add_typer(config.config_app, name="config")
app.add_typer(stack.stack_app, name="stack")
app.add_typer(bench.bench_app, name="bench")
app.add_typer(data.data_app, name="data")
train.register(app)
datasets.register(app)
serve.register(app)
demo.register(app)
