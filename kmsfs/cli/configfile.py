"""``--config FILE``: a volume config file (kmsfs/server/config.py) as a command's defaults.

The option is eager: the file is loaded and validated before the other
options are read, and its values become click defaults, so the command line
wins over the file.  ``current_config`` hands the loaded file to the command
(its mount options, shared mode and policy are not click options).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click

from kmsfs.errors import ConfigError

if TYPE_CHECKING:
    from kmsfs.server.config import ServerConfig

CONTEXT_KEY = "kmsfs.server_config"


def _load_into_context(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
    """Eager --config callback: the file's values become the command's defaults."""
    if value is None or ctx.resilient_parsing:
        return
    from kmsfs.server.config import load_server_config

    try:
        config = load_server_config(value)
    except ConfigError as exc:
        click.echo(f"kmsfs: error: {exc}", err=True)
        ctx.exit(ConfigError.exit_code)
    ctx.meta[CONTEXT_KEY] = config
    ctx.default_map = {**(ctx.default_map or {}), **config.cli_defaults()}


def config_option(func: Callable[..., Any]) -> Callable[..., Any]:
    """The ``--config FILE`` option: values from the file fill what the command line omits."""
    return click.option(
        "--config",
        "config_file",
        type=click.Path(dir_okay=False),
        is_eager=True,
        expose_value=False,
        callback=_load_into_context,
        help="Volume config file (/etc/kmsfs/NAME.toml); the command line wins over it.",
    )(func)


def current_config() -> ServerConfig | None:
    """The config file loaded by --config for the running command, if any."""
    ctx = click.get_current_context(silent=True)
    if ctx is None:
        return None
    config: ServerConfig | None = ctx.meta.get(CONTEXT_KEY)
    return config
