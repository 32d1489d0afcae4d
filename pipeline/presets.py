"""``sppscl presets``: the built-in presets, listed, and one printed resolved with every default, ready to copy."""

from __future__ import annotations

import typer
import yaml

from .config import PRESET_DIR, ConfigError, load_config, preset_names

app = typer.Typer(
    help="The built-in presets: `sppscl presets` lists them, `sppscl presets show NAME` prints one with every default.",
    invoke_without_command=True,
)


class _Dumper(yaml.SafeDumper):
    """Block style for sections, flow style for lists (``classes: [positive, neutral, negative]``)."""


_Dumper.add_representer(list, lambda dumper, data: dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=True))


def preset_yaml(name: str, overrides: list[str] | None = None) -> str:
    """Preset ``name`` as YAML with every key of every section, defaults included, and how to use a copy; with
    ``overrides`` (``--set`` items, any section), resolved with them as a command would."""
    cfg = load_config(name, list(overrides or []))
    body = cfg.to_dict()
    del body["source"]
    header = (
        f"# preset {name}, resolved: every key with its value ({PRESET_DIR / (name + '.yaml')} over the defaults).\n"
        + (f"# with --set {' --set '.join(overrides)}\n" if overrides else "")
        + "# To change it, save this to a file, edit it and pass --config FILE. In your own file a relative\n"
        "# dataset.data_dir resolves against the file's folder; in the built-in preset, against the current directory.\n"
    )
    return header + yaml.dump(body, Dumper=_Dumper, sort_keys=False, width=120)


@app.callback()
def list_presets(ctx: typer.Context) -> None:
    """List the built-in presets; `sppscl presets show NAME` prints one in full."""
    if ctx.invoked_subcommand is not None:
        return
    names = preset_names()
    width = max(map(len, names))
    for name in names:
        c = load_config(name)
        typer.echo(
            f"{name:<{width}}  format {c.dataset.format:<9}  data_dir {c.dataset.data_dir:<18}  "
            f"encoders {c.encoders.image} + {c.encoders.text}"
        )
    typer.echo(f"({len(names)} presets in {PRESET_DIR}; `sppscl presets show NAME` prints one with every default)")


@app.command("show")
def show(
    name: str = typer.Argument(..., help="A preset name (see `sppscl presets`)."),
    set_: list[str] = typer.Option([], "--set", help="Resolve with overrides, e.g. --set epochs=20 --set encoders.text=minilm-l6 (unknown keys are an error)."),
) -> None:
    """Print a preset resolved with every default (and any --set), as YAML to copy and edit."""
    try:
        text = preset_yaml(name, set_)
    except ConfigError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(code=2) from None
    typer.echo(text, nl=False)
