"""``kmsfs policy check`` and ``kmsfs policy suggest``: the access policy's operator tools."""

from __future__ import annotations

import grp
import json
import os
import pwd
import sys
from typing import TYPE_CHECKING

import click

from kmsfs.cli.common import handle_errors
from kmsfs.cli.configfile import config_option
from kmsfs.errors import ConfigError, UsageError
from kmsfs.policy import ACTIONS

if TYPE_CHECKING:
    from kmsfs.policy import Requester

DENIED = 1
RELOAD_TIMEOUT = 60.0  # the daemon resolves names (NSS, maybe LDAP) and stats programs


@click.group()
def policy() -> None:
    """Access policy tools (the [policy] of a volume config; docs/POLICY.md)."""


def _resolve_user(user: str) -> tuple[int, str | None, int | None]:
    """--user NAME or UID -> (uid, name or None, primary gid or None); UsageError if unknown."""
    try:
        entry = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
    except KeyError:
        if user.isdigit():
            return int(user), None, None
        raise UsageError(f"--user: no such user {user!r}") from None
    return entry.pw_uid, entry.pw_name, entry.pw_gid


def _resolve_group(group: str) -> int:
    if group.isdigit():
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise UsageError(f"--group: no such group {group!r}") from None


def _requester(user: str, groups: tuple[str, ...], program: str) -> tuple[Requester, str]:
    """The requester described by the options, and how to print it."""
    from kmsfs.policy import Requester

    uid, name, primary = _resolve_user(user)
    if groups:
        gids = [_resolve_group(group) for group in groups]
    elif name is not None and primary is not None:
        gids = [primary] + [g for g in os.getgrouplist(name, primary) if g != primary]
    else:
        raise UsageError(f"uid {uid} has no passwd entry: give its groups with --group")
    who = f"{name} (uid {uid})" if name else f"uid {uid}"
    shown = ", ".join(str(g) for g in gids)
    # the same identity the mount reads from /proc/PID/exe: the file at that path
    requester = Requester(uid, gids[0], exe=program, groups=frozenset(gids), blocking=True)
    running = program
    if requester.exe_text != program:
        running += f" (a symlink to {requester.exe_text})"
    if requester.unknown_program is not None:
        running += f" ({requester.unknown_program}: an unknown program)"
    return requester, f"{who}, groups {shown}, running {running}"


@policy.command()
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--user", required=True, help="User name or uid of the requester.")
@click.option(
    "--group",
    "groups",
    multiple=True,
    help="Group name or gid (repeat for each; the first is the request's gid)."
    " Default: the user's groups from the user database.",
)
@click.option("--program", required=True, help="Absolute path of the requesting executable.")
@click.option("--path", "path", required=True, help="Path inside the volume, e.g. /db/base/1.")
@click.option("--action", required=True, type=click.Choice(ACTIONS), help="The request's action.")
@handle_errors
def check(
    config: str, user: str, groups: tuple[str, ...], program: str, path: str, action: str
) -> None:
    """Show which rule of CONFIG decides a request, and why.

    The program is identified as the mount identifies it: by the file at
    --program (symlinks followed), compared with the files the rules' programs
    name.  Exit 0 if the rules permit it, 1 if they deny it (also in learn
    mode, where the request would be let through and audited), 2 for bad
    options, 3 if CONFIG is refused.
    """
    from kmsfs.policy.globs import GlobError, split_path
    from kmsfs.server.config import load_server_config

    try:
        split_path(path)
    except GlobError as exc:
        raise UsageError(f"--path: {exc}") from None
    if not os.path.isabs(program):
        raise UsageError(f"--program: {program!r} is not an absolute path")
    requester, who = _requester(user, groups, program)
    loaded = load_server_config(config).policy
    click.echo(f"{action} {path} by {who}")
    for _, note in loaded.programs.notes if loaded is not None else ():
        click.echo(f"  note: {note}")
    if loaded is None:
        click.echo(f"permitted: {config} has no [policy], so every request is permitted")
        return
    if loaded.mode == "off":
        click.echo(f"permitted: policy.mode is off in {config}, so every request is permitted")
        return
    if loaded.needs_sha256:
        digest = requester.sha256
        click.echo(f"sha256 of {program}: {digest or 'unreadable'}")
    decision = loaded.decide(requester, action, path)
    for rule, reason in loaded.explain(requester, action, path):
        if reason is not None:
            click.echo(f"  rule {rule.number}: no match: {reason}")
        else:
            click.echo(f"  rule {rule.number}: matches, effect {rule.effect}")
            click.echo("    " + rule.toml().replace("\n", "\n    "))
    verdict = "denied" if decision.effect == "deny" else "permitted"
    by = "the default" if decision.rule is None else f"rule {decision.rule}"
    if decision.rule is None:
        by += f" (no rule matches; default = {loaded.default!r})"
    learn = " (learn mode: let through and audited)" if decision.mode == "learn" else ""
    if decision.effect == "deny" and learn:
        verdict += learn
    click.echo(f"{verdict} by {by}")
    if decision.effect == "deny":
        sys.exit(DENIED)


@policy.command()
@click.argument("auditlog", type=click.Path(dir_okay=False, exists=True))
@handle_errors
def suggest(auditlog: str) -> None:
    """Print [[policy.rule]] entries that permit the would-be denies in AUDITLOG.

    Reads the audit log of a learn-mode run (policy.mode = "learn") and prints
    TOML to review and paste; malformed lines are reported on stderr and
    skipped.  Exit 0, or 1 if AUDITLOG cannot be read.
    """
    from kmsfs.policy.records import parse_record
    from kmsfs.policy.suggest import suggest_toml

    seen = []
    with open(auditlog, encoding="utf-8", errors="surrogateescape") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = parse_record(json.loads(line))
            except ValueError as exc:
                click.echo(f"kmsfs: {auditlog}:{number}: skipped: {exc}", err=True)
                continue
            if record is not None:
                seen.append(record)
    text, count = suggest_toml(seen, auditlog)
    click.echo(text, nl=False)
    denies = sum(1 for r in seen if r.effect == "deny" and r.mode == "learn")
    click.echo(f"kmsfs: {count} rules suggested for {denies} would-be denies", err=True)


@policy.command()
@click.argument("mountpoint", required=False, type=click.Path(file_okay=False))
@config_option
@handle_errors
def reload(mountpoint: str | None) -> None:
    """Have the daemon of MOUNTPOINT re-read its [policy] and wait for its verdict.

    The daemon re-reads the config file it was mounted with (--config).  This
    is what ``systemctl reload kmsfs@NAME`` runs.  Exit 0 if the daemon serves
    the new policy; 3 if it refused the file and keeps the current policy (the
    reason is printed and logged; also for a file this command cannot load);
    7 if no daemon answers for MOUNTPOINT or it was mounted without a config file.
    """
    from kmsfs.server.status import query

    if mountpoint is None:
        raise UsageError("MOUNTPOINT missing: give it or --config FILE")
    reply = query(os.path.abspath(mountpoint), "reload-policy", timeout=RELOAD_TIMEOUT)
    if not reply.get("reloaded"):
        raise ConfigError(
            f"the daemon of {mountpoint} refused the new policy and keeps its current one"
            f" ({reply.get('policy')}): {reply.get('refused')}"
        )
    click.echo(f"policy reloaded for {mountpoint}: {reply.get('policy')}")
