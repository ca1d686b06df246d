"""``kmsfs policy check`` / ``suggest`` through the real CLI (its click commands, run in
process by ``invoke_kmsfs``: exit codes, stdout and stderr), and reloading a policy.

``suggest`` is fed the records a learn-mode policy produces for a workload
(the records are built by the same function the daemon will write them
with); its output, loaded back as a config, must permit exactly that workload
and what its generalisation rule says, nothing more.
"""

from __future__ import annotations

import hashlib
import json
import logging
import pwd
import tomllib
from pathlib import Path

import pytest
from support.cli import invoke_kmsfs

from kmsfs.policy import Policy, Requester, audit_record, parse_policy
from kmsfs.server.config import load_server_config
from kmsfs.server.policyfile import load_policy, reload_policy

DAEMON, BACKUP, NOBODY = 1, 34, 65534
DELETED = " (deleted)"

DB_CONFIG = """backing = "/srv/enc"

[policy]
default = "deny"

[[policy.rule]]
users = ["daemon"]
programs = ["/usr/bin/cat"]
paths = ["/db/**"]
effect = "permit"

[[policy.rule]]
users = ["backup"]
actions = ["read", "list"]
paths = "/db/**"
effect = "permit"
audit = true

[[policy.rule]]
paths = "/db/**"
effect = "deny"
"""


def write_config(tmp_path: Path, text: str, name: str = "db.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def check(config: Path, *args: str) -> tuple[int, str, str]:
    result = invoke_kmsfs("policy", "check", config, *args, check=False)
    return result.returncode, result.stdout, result.stderr


# -- check ---------------------------------------------------------------------------


def test_check_names_the_deciding_rule_and_exits_0_when_permitted(tmp_path: Path) -> None:
    config = write_config(tmp_path, DB_CONFIG)
    code, out, err = check(
        config, "--user", "daemon", "--program", "/usr/bin/cat", "--path", "/db/t",
        "--action", "write",
    )  # fmt: skip
    assert (code, err) == (0, "")
    assert out == (
        "write /db/t by daemon (uid 1), groups 1, running /usr/bin/cat\n"
        "  rule 1: matches, effect permit\n"
        "    [[policy.rule]]\n"
        '    users = ["daemon"]\n'
        '    programs = ["/usr/bin/cat"]\n'
        '    paths = ["/db/**"]\n'
        '    effect = "permit"\n'
        "permitted by rule 1\n"
    )


def test_check_says_why_earlier_rules_do_not_match_and_exits_1_when_denied(
    tmp_path: Path,
) -> None:
    config = write_config(tmp_path, DB_CONFIG)
    code, out, _ = check(
        config, "--user", "backup", "--program", "/usr/bin/tar", "--path", "/db/t",
        "--action", "write",
    )  # fmt: skip
    assert code == 1
    lines = out.splitlines()
    assert lines[1] == "  rule 1: no match: uid 34 is not in its users"
    assert lines[2] == "  rule 2: no match: action write is not in its actions"
    assert lines[3] == "  rule 3: matches, effect deny"
    assert lines[-1] == "denied by rule 3"


def test_check_default_and_root(tmp_path: Path) -> None:
    config = write_config(tmp_path, DB_CONFIG)
    code, out, _ = check(
        config, "--user", "root", "--program", "/usr/bin/cat", "--path", "/etc/x",
        "--action", "read",
    )  # fmt: skip
    assert code == 1
    assert out.splitlines()[-1] == "denied by the default (no rule matches; default = 'deny')"
    code, out, _ = check(
        config, "--user", "0", "--program", "/usr/bin/cat", "--path", "/db/t", "--action", "read"
    )
    assert (code, out.splitlines()[-1]) == (1, "denied by rule 3")


def test_check_groups_option_and_learn_mode(tmp_path: Path) -> None:
    config = write_config(
        tmp_path,
        '[policy]\nmode = "learn"\ndefault = "deny"\n'
        '[[policy.rule]]\ngroups = ["backup"]\neffect = "permit"\n',
    )
    args = ("--program", "/usr/bin/tar", "--path", "/x", "--action", "read")
    code, out, _ = check(config, "--user", "nobody", "--group", "nogroup", "--group", "34", *args)
    assert (code, out.splitlines()[-1]) == (0, "permitted by rule 1")
    assert (
        out.splitlines()[0]
        == "read /x by nobody (uid 65534), groups 65534, 34, running /usr/bin/tar"
    )
    code, out, _ = check(config, "--user", "nobody", *args)
    assert code == 1  # what enforce mode would do
    assert out.splitlines()[-1] == (
        "denied (learn mode: let through and audited) by the default (no rule matches;"
        " default = 'deny')"
    )


def test_check_hashes_the_program_when_a_rule_pins_one(tmp_path: Path) -> None:
    program = tmp_path / "tool"
    program.write_bytes(b"#!/bin/sh\n")
    digest = hashlib.sha256(b"#!/bin/sh\n").hexdigest()
    config = write_config(tmp_path, f'[[policy.rule]]\nsha256 = "{digest}"\neffect = "deny"\n')
    code, out, _ = check(
        config, "--user", "nobody", "--program", str(program), "--path", "/x", "--action", "exec"
    )
    assert code == 1
    assert f"sha256 of {program}: {digest}" in out.splitlines()


def test_check_without_policy_permits(tmp_path: Path) -> None:
    config = write_config(tmp_path, 'backing = "/srv/enc"\n')
    code, out, _ = check(
        config, "--user", "nobody", "--program", "/bin/ls", "--path", "/", "--action", "list"
    )
    assert code == 0
    assert (
        out.splitlines()[-1]
        == f"permitted: {config} has no [policy], so every request is permitted"
    )


def test_check_exit_codes_for_bad_input(tmp_path: Path) -> None:
    config = write_config(tmp_path, DB_CONFIG)
    base = ("--program", "/usr/bin/cat", "--action", "read")
    code, _, err = check(config, "--user", "nosuchuser", "--path", "/db", *base)
    assert (code, err) == (2, "kmsfs: error: --user: no such user 'nosuchuser'\n")
    code, _, err = check(config, "--user", "daemon", "--path", "db/t", *base)
    assert code == 2
    assert err.startswith("kmsfs: error: --path: 'db/t' does not start with /")
    code, _, err = check(config, "--user", "daemon", "--path", "/db", "--program", "cat",
                         "--action", "read")  # fmt: skip
    assert (code, err) == (2, "kmsfs: error: --program: 'cat' is not an absolute path\n")
    bad = write_config(tmp_path, DB_CONFIG.replace('"backup"]', '"bakup"]'), "bad.toml")
    code, _, err = check(bad, "--user", "daemon", "--path", "/db", *base)
    assert code == 3
    assert err == f"kmsfs: error: {bad}: policy rule 2: users: unknown user 'bakup'\n"


def test_mount_refuses_a_config_with_a_bad_policy_before_anything_else(tmp_path: Path) -> None:
    bad = write_config(tmp_path, '[[policy.rule]]\nactions = ["reed"]\neffect = "deny"\n')
    result = invoke_kmsfs("mount", "--config", bad, check=False)
    assert result.returncode == 3
    assert result.stderr == (
        f"kmsfs: error: {bad}: policy rule 1: actions: unknown action 'reed' (did you mean"
        " read?); actions are read, write, create, delete, rename, list, exec and all\n"
    )


# -- suggest -------------------------------------------------------------------------

# (uid, program, action, path): a learn-mode workload
WORKLOAD = [
    (DAEMON, "/usr/bin/cat", "read", "/data/a/1"),
    (DAEMON, "/usr/bin/cat", "read", "/data/a/2"),
    (DAEMON, "/usr/bin/cat", "write", "/data/a/1"),
    (DAEMON, "/usr/bin/cat", "read", "/data/a/deep/3"),
    (DAEMON, "/usr/bin/cat", "read", "/data/b/only"),
    (DAEMON, "/usr/bin/cat", "list", "/data"),
    (DAEMON, "/usr/bin/cat", "read", "/data/c/we*rd"),
    (BACKUP, "/usr/bin/tar", "read", "/data/b/only"),
    (BACKUP, "/usr/bin/tar (deleted)", "list", "/data/b/only"),
]


def learn_log(tmp_path: Path) -> Path:
    """Run WORKLOAD through a learn-mode, default-deny policy; write its audit log."""
    learning = parse_policy(
        {"mode": "learn", "default": "deny", "rule": [{"paths": "/data/c/**", "effect": "deny"}]},
        "learn.toml",
    )
    lines = []
    for uid, exe, action, path in WORKLOAD:
        requester = Requester(uid, uid, 4242, exe=exe.removesuffix(DELETED))
        decision = learning.decide(requester, action, path)
        assert decision.allowed and decision.audit
        record = audit_record(requester, action, path, decision)
        record["exe"] = exe  # as the daemon records a process whose file was replaced
        lines.append(json.dumps(record))
    # what else an audit log holds: a key record, an enforce-mode deny, a broken line
    lines.append(json.dumps({"operation": "unwrap", "path": "/data/a/1", "result": "ok"}))
    enforce = parse_policy({"default": "deny"}, "enforce.toml")
    stranger = Requester(NOBODY, NOBODY, 1, exe="/usr/bin/cat")
    lines.append(
        json.dumps(audit_record(stranger, "read", "/x", enforce.decide(stranger, "read", "/x")))
    )
    lines.append('{"operation": "policy", "truncated')
    log = tmp_path / "audit.jsonl"
    log.write_text("\n".join(lines) + "\n")
    return log


def suggested_policy(tmp_path: Path) -> tuple[Policy, str, str]:
    log = learn_log(tmp_path)
    result = invoke_kmsfs("policy", "suggest", log)
    text = '[policy]\ndefault = "deny"\n\n' + result.stdout
    tomllib.loads(text)  # valid TOML as printed
    policy = load_server_config(write_config(tmp_path, text, "suggested.toml")).policy
    assert policy is not None
    return policy, result.stdout, result.stderr


def test_suggest_permits_exactly_the_recorded_workload(tmp_path: Path) -> None:
    policy, out, err = suggested_policy(tmp_path)
    for uid, exe, action, path in WORKLOAD:
        requester = Requester(uid, uid, exe=exe.removesuffix(DELETED))
        assert policy.decide(requester, action, path).allowed, (
            uid,
            action,
            path,
        )

    def allowed(uid: int, exe: str, action: str, path: str) -> bool:
        return policy.decide(Requester(uid, uid, exe=exe), action, path).allowed

    cat, tar = "/usr/bin/cat", "/usr/bin/tar"
    # the generalisation: 2+ entries of /data/a seen -> /data/a/** with the union of actions
    assert allowed(DAEMON, cat, "read", "/data/a/new")
    assert allowed(DAEMON, cat, "write", "/data/a/2")
    assert allowed(DAEMON, cat, "read", "/data/a/x/y/z")
    # ... and nothing broader
    assert not allowed(DAEMON, cat, "delete", "/data/a/1")  # an action never seen there
    assert not allowed(DAEMON, cat, "read", "/data/b/other")  # one entry of /data/b: exact
    assert not allowed(DAEMON, cat, "read", "/data/c/weXrd")  # a * in a name is literal
    assert not allowed(DAEMON, cat, "list", "/data/x")  # list of /data itself, exact
    assert not allowed(DAEMON, cat, "read", "/data")
    assert not allowed(DAEMON, "/usr/bin/head", "read", "/data/a/1")  # another program
    assert not allowed(BACKUP, cat, "read", "/data/a/1")  # another user ...
    assert not allowed(BACKUP, tar, "read", "/data/a/1")
    assert not allowed(BACKUP, tar, "write", "/data/b/only")
    assert not allowed(NOBODY, cat, "read", "/x")  # the enforce-mode deny was left out
    assert "# 1 requests denied in enforce mode were left out." in out
    assert "would have been denied by the default, rule 1" in out  # /data/c was rule 1's
    assert f"{tmp_path / 'audit.jsonl'}:12: skipped:" in err
    assert err.splitlines()[-1] == "kmsfs: 4 rules suggested for 9 would-be denies"


def test_suggest_groups_rules_by_user_program_and_actions(tmp_path: Path) -> None:
    _, out, _ = suggested_policy(tmp_path)
    rules = tomllib.loads(out)["policy"]["rule"]
    daemon_cat = {"users": ["daemon"], "programs": ["/usr/bin/cat"], "effect": "permit"}
    assert rules == [
        {**daemon_cat, "paths": ["/data"], "actions": ["list"]},
        {**daemon_cat, "paths": ["/data/a/**"], "actions": ["read", "write"]},
        {**daemon_cat, "paths": ["/data/b/only", "/data/c/we[*]rd"], "actions": ["read"]},
        {
            "users": ["backup"],
            "programs": ["/usr/bin/tar"],
            "paths": ["/data/b/only"],
            "actions": ["read", "list"],
            "effect": "permit",
        },
    ]
    assert out.count("# daemon (uid 1) running /usr/bin/cat: 7 requests") == 1


def test_suggest_with_nothing_to_suggest(tmp_path: Path) -> None:
    log = tmp_path / "empty.jsonl"
    log.write_text("")
    result = invoke_kmsfs("policy", "suggest", log)
    assert "# No would-be denies in learn mode: nothing to suggest." in result.stdout
    missing = invoke_kmsfs("policy", "suggest", tmp_path / "nothing.jsonl", check=False)
    assert missing.returncode == 2  # click: the file does not exist


# -- reload --------------------------------------------------------------------------


def test_reload_returns_the_new_policy(tmp_path: Path) -> None:
    config = write_config(tmp_path, DB_CONFIG)
    current = load_policy(config)
    config.write_text(DB_CONFIG.replace('default = "deny"', 'default = "permit"'))
    new, refused = reload_policy(config, current)
    assert refused is None and new is not current
    assert (new.default, len(new.rules)) == ("permit", 3)


def test_reload_keeps_the_old_policy_when_the_new_one_is_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = write_config(tmp_path, DB_CONFIG)
    current = load_policy(config)
    config.write_text(DB_CONFIG.replace('paths = "/db/**"', 'paths = "/db/[oops"'))
    with caplog.at_level(logging.ERROR, logger="kmsfs.server.policyfile"):
        kept, refused = reload_policy(config, current)
    assert kept is current
    reason = f"{config}: policy rule 2: paths: bad glob '/db/[oops': [ without its ] in '[oops'"
    assert refused == reason
    assert caplog.messages == [
        f"policy not reloaded, keeping the current one (3 rules, default deny, mode enforce):"
        f" {reason}"
    ]


def test_a_config_without_policy_reloads_as_permit_all(tmp_path: Path) -> None:
    config = write_config(tmp_path, 'backing = "/srv/enc"\n')
    policy = load_policy(config)
    assert (policy.rules, policy.default, policy.mode) == ((), "permit", "enforce")
    assert policy.summary() == "no [policy]: every request permitted"
    again, refused = reload_policy(config, policy)  # nothing was enforced: nothing to lose
    assert refused is None and not again.from_table


def test_a_reload_that_drops_the_policy_is_refused_unless_it_says_off(tmp_path: Path) -> None:
    # the mistake: the table deleted (or lost by a template), which would permit everything
    config = write_config(tmp_path, DB_CONFIG)
    current = load_policy(config)
    config.write_text('backing = "/srv/enc"\n')
    kept, refused = reload_policy(config, current)
    assert kept is current
    assert refused == (
        f"{config} has no [policy] table: reloading it would permit every request. To switch"
        ' the access policy off, write [policy] with mode = "off"'
    )
    # the explicit form: rules may stay (checked, not applied)
    config.write_text(DB_CONFIG.replace('default = "deny"', 'mode = "off"'))
    off, refused = reload_policy(config, current)
    assert refused is None
    assert (off.mode, off.rules, off.ignored) == ("off", (), 3)
    assert off.summary() == "mode off: every request permitted (3 rules not applied)"
    assert off.decide(Requester(NOBODY, NOBODY, exe="/usr/bin/cat"), "read", "/db/x").allowed
    # from off, dropping the table changes nothing and is not refused
    config.write_text('backing = "/srv/enc"\n')
    assert reload_policy(config, off)[1] is None
    code, out, _ = check(
        write_config(tmp_path, DB_CONFIG.replace('default = "deny"', 'mode = "off"'), "o.toml"),
        *("--user", "root", "--program", "/usr/bin/cat", "--path", "/db/x", "--action", "read"),
    )
    assert code == 0 and "policy.mode is off" in out


# -- POLICY.md's worked example decides as POLICY.md says --------------------------------


def documented_example(tmp_path: Path) -> tuple[Path, int, str]:
    """The example config, its database user's uid and name (daemon if there is no postgres)."""
    text = (Path(__file__).parents[3] / "docs" / "POLICY.md").read_text()
    start = text.index("# /etc/kmsfs/pgdata.toml\n")
    example = text[start : text.index("```", start)]
    try:
        uid, user = pwd.getpwnam("postgres").pw_uid, "postgres"
    except KeyError:  # the example names postgres; the test needs a user that exists
        uid, user = DAEMON, "daemon"
        example = example.replace('users = ["postgres"]', 'users = ["daemon"]')
    return write_config(tmp_path, example, "pgdata.toml"), uid, user


def test_the_documented_example(tmp_path: Path) -> None:
    config, postgres, user = documented_example(tmp_path)
    policy = load_policy(config)
    server = "/usr/lib/postgresql/15/bin/postgres"

    def decide(uid: int, exe: str, action: str, path: str) -> tuple[bool, int | None, bool]:
        d = policy.decide(Requester(uid, uid, exe=exe), action, path)
        return d.allowed, d.rule, d.audit

    table = "/15/main/base/1/1259"
    assert decide(postgres, server, "write", table) == (True, 2, False)
    assert decide(postgres, server, "create", "/15/main/pg_wal/000001") == (True, 2, False)
    assert decide(0, "/usr/bin/cat", "read", table) == (False, None, True)  # root: no plaintext
    assert decide(BACKUP, "/usr/bin/borg", "read", table) == (False, None, True)
    assert decide(0, "/usr/bin/ls", "list", "/15/main/base") == (True, 1, False)  # names: all
    assert decide(postgres, "/usr/bin/cat", "read", table) == (False, None, True)  # other program
    basebackup = "/usr/lib/postgresql/15/bin/pg_basebackup"
    assert decide(postgres, basebackup, "read", table) == (True, 3, True)
    assert decide(postgres, basebackup, "write", table) == (False, None, True)
    assert not policy.varies_by_requester("list")  # so the kernel's caches stay on
    code, out, _ = check(
        config, "--user", user, "--program", server, "--path", table, "--action", "write"
    )
    assert code == 0
    assert out.splitlines()[1:3] == [
        "  rule 1: no match: action write is not in its actions",
        "  rule 2: matches, effect permit",
    ]
