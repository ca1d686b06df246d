"""The access policy's rules: loading from the host's TOML config, globs, decisions.

In-process: ``[policy]`` is read by the real config loader from real files,
and requests are decided with requesters whose program and groups are given
(tests/unit/policy/test_policy_identity.py reads them from real processes).
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from support.properties import examples

from kmsfs.errors import ConfigError
from kmsfs.policy import ACTIONS, HashPending, Policy, Requester, audit_record, parse_policy
from kmsfs.policy.globs import PathPattern, escape
from kmsfs.server.config import load_server_config

# uids and gids present on every Debian system
DAEMON, BACKUP, NOBODY = 1, 34, 65534


def load(tmp_path: Path, text: str) -> Policy:
    path = tmp_path / "vol.toml"
    path.write_text('backing = "/srv/enc"\n' + text)
    policy = load_server_config(path).policy
    assert policy is not None
    return policy


def load_error(tmp_path: Path, text: str) -> str:
    path = tmp_path / "vol.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_server_config(path)
    assert info.value.exit_code == 3
    message = str(info.value)
    assert message.startswith(f"{path}: "), message
    return message[len(f"{path}: ") :]


def who(
    uid: int, gid: int | None = None, exe: str | None = "/usr/bin/cat", **kw: object
) -> Requester:
    return Requester(uid, uid if gid is None else gid, exe=exe, **kw)  # type: ignore[arg-type]


def policy_of(rules: list[dict[str, object]], **top: object) -> Policy:
    return parse_policy({**top, "rule": rules}, "test.toml")


# -- errors at load: file, rule number, key, problem ----------------------------

BAD_RULES = [
    ('users = ["nosuchuser"]', "policy rule 2: users: unknown user 'nosuchuser'"),
    ('users = ["1000"]', "policy rule 2: users: unknown user '1000' (write a numeric ID as an"),
    ('groups = ["nosuchgroup"]', "policy rule 2: groups: unknown group 'nosuchgroup'"),
    ("users = [true]", "policy rule 2: users: True is not a user name (a string) or ID"),
    ("users = [-1]", "policy rule 2: users: -1 is not a valid user ID"),
    ("users = []", "policy rule 2: users is empty (leave it out to match any user)"),
    ('paths = ["/a/[b"]', "policy rule 2: paths: bad glob '/a/[b': [ without its ] in '[b'"),
    ('paths = ["data/**"]', "policy rule 2: paths: bad glob 'data/**': 'data/**' does not start"),
    (
        'paths = ["/a/../b"]',
        "policy rule 2: paths: bad glob '/a/../b': '/a/../b' has a .. component",
    ),
    ('paths = ["/a**"]', "policy rule 2: paths: bad glob '/a**': ** must be a whole component"),
    ('paths = ["/db/"]', "policy rule 2: paths: bad glob '/db/': '/db/' ends with /"),
    ("paths = 3", "policy rule 2: paths must be a string or a list of strings, not int (3)"),
    ('actions = ["reed"]', "policy rule 2: actions: unknown action 'reed' (did you mean read?)"),
    (
        'actions = ["execute"]',
        "policy rule 2: actions: unknown action 'execute' (did you mean exec?)",
    ),
    ('user = ["daemon"]', "policy rule 2: unknown key user (did you mean users?); known: users,"),
    ('program = "/bin/sh"', "policy rule 2: unknown key program (did you mean programs?)"),
    ('programs = ["bin/sh"]', "policy rule 2: programs: 'bin/sh' is not a normalised absolute"),
    ('programs = ["/usr//bin/sh"]', "policy rule 2: programs: '/usr//bin/sh' is not a normalised"),
    ('sha256 = "abc"', "policy rule 2: sha256: 'abc' is not 64 hexadecimal digits"),
    ('audit = "yes"', "policy rule 2: audit must be true or false, not 'yes'"),
]


@pytest.mark.parametrize(("line", "expected"), BAD_RULES)
def test_each_malformed_rule_is_refused_with_file_rule_number_and_problem(
    tmp_path: Path, line: str, expected: str
) -> None:
    message = load_error(
        tmp_path,
        '[policy]\n[[policy.rule]]\neffect = "permit"\n\n'
        f'[[policy.rule]]\neffect = "deny"\n{line}\n',
    )
    assert message.startswith(expected), message


def test_effect_is_required_and_checked(tmp_path: Path) -> None:
    assert load_error(tmp_path, '[[policy.rule]]\npaths = ["/a"]\n') == (
        "policy rule 1: effect is missing (permit or deny)"
    )
    assert load_error(tmp_path, '[[policy.rule]]\neffect = "allow"\n') == (
        "policy rule 1: effect must be 'permit' or 'deny', not 'allow'"
    )


def test_policy_table_errors(tmp_path: Path) -> None:
    assert load_error(tmp_path, '[policy]\nmode = "learning"\n') == (
        "policy.mode must be 'enforce', 'learn' or 'off', not 'learning' (did you mean learn?)"
    )
    assert load_error(tmp_path, '[policy]\ndefault = "denied"\n').startswith(
        "policy.default must be 'permit' or 'deny', not 'denied' (did you mean deny?)"
    )
    assert load_error(tmp_path, "[policy]\nrules = []\n").startswith(
        "unknown key policy.rules (did you mean policy.rule?)"
    )
    assert load_error(tmp_path, '[policy.rule]\neffect = "deny"\n') == (
        "policy.rule must be an array of tables, written [[policy.rule]]"
    )
    assert load_error(tmp_path, 'policy = "on"\n').startswith("policy must be a table, not str")


def test_a_config_without_policy_has_none(tmp_path: Path) -> None:
    path = tmp_path / "vol.toml"
    path.write_text('backing = "/srv/enc"\n')
    assert load_server_config(path).policy is None


def test_names_are_resolved_at_load_and_ids_kept(tmp_path: Path) -> None:
    policy = load(
        tmp_path,
        '[[policy.rule]]\nusers = ["daemon", 4242]\ngroups = "backup"\neffect = "permit"\n',
    )
    rule = policy.rule(1)
    assert rule.uids == {DAEMON, 4242}
    assert rule.gids == {BACKUP}
    assert rule.actions == set(ACTIONS)  # missing actions: all


def test_a_program_that_does_not_exist_is_a_warning_not_an_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    policy = load(tmp_path, '[[policy.rule]]\nprograms = "/opt/nothing/here"\neffect = "permit"\n')
    with caplog.at_level(logging.WARNING):
        policy.programs.log_notes()  # as the daemon does once its log is set up
    assert caplog.messages == [
        f"{tmp_path / 'vol.toml'}: policy rule 1: programs: nothing at /opt/nothing/here (yet):"
        " the rule matches once a process runs a file there"
    ]


# -- globs ------------------------------------------------------------------------

GLOBS = [
    ("/db", "/db", True),
    ("/db", "/db/a", False),  # a literal path is that path only
    ("/db/**", "/db", True),  # ... /** is the directory and everything below it
    ("/db/**", "/db/a/b/c", True),
    ("/db/**", "/dbx", False),
    ("/db/**", "/dbx/a", False),
    ("/**", "/", True),
    ("/**", "/any/thing", True),
    ("/", "/", True),
    ("/", "/a", False),
    ("/logs/*.log", "/logs/a.log", True),
    ("/logs/*.log", "/logs/.log", True),
    ("/logs/*.log", "/logs/x/a.log", False),  # * stays inside one component
    ("/**/*.key", "/k.key", True),
    ("/**/*.key", "/a/b/k.key", True),
    ("/**/*.key", "/a/b/k.key.bak", False),
    ("/a/**/z", "/a/z", True),
    ("/a/**/z", "/a/b/c/z", True),
    ("/a/**/z", "/a/bz", False),
    ("/f?", "/f1", True),
    ("/f?", "/f12", False),
    ("/f[0-9]", "/f7", True),
    ("/f[0-9]", "/fa", False),
    ("/f[!0-9]", "/fa", True),
    ("/f[!0-9]", "/f7", False),
    ("/f[]]", "/f]", True),
    ("/home/*/secret/**", "/home/alice/secret/x", True),
    ("/home/*/secret/**", "/home/alice/public/x", False),
    ("/a/**", "/a/new\nline", True),  # names may hold any byte but / and NUL
    ("/a/*", "/a/new\nline", True),
]


@pytest.mark.parametrize(("pattern", "path", "expected"), GLOBS)
def test_globs(pattern: str, path: str, expected: bool) -> None:
    assert PathPattern(pattern).matches(path) is expected
    # the same through a compiled rule (exact set, prefix/suffix pre-checks, index)
    policy = policy_of([{"paths": [pattern, "/elsewhere"], "effect": "deny"}])
    assert (policy.decide(who(NOBODY), "read", path).rule == 1) is expected


def test_escape_matches_only_the_literal_name() -> None:
    name = "/data/we*rd [1]?"
    pattern = PathPattern(escape(name))
    assert pattern.matches(name)
    assert not pattern.matches("/data/weXrd [1]?")
    assert not pattern.matches("/data/we*rd 1!")


# -- decisions --------------------------------------------------------------------


def test_first_match_wins() -> None:
    policy = policy_of(
        [
            {"users": "daemon", "paths": "/db/**", "effect": "permit"},
            {"paths": "/db/**", "effect": "deny"},
            {"users": "daemon", "effect": "deny"},  # never reached for /db
        ]
    )
    assert policy.decide(who(DAEMON), "read", "/db/t").rule == 1
    assert policy.decide(who(DAEMON), "read", "/db/t").allowed
    denied = policy.decide(who(NOBODY), "read", "/db/t")
    assert (denied.rule, denied.allowed, denied.effect) == (2, False, "deny")
    assert policy.decide(who(DAEMON), "read", "/other").rule == 3


def test_the_default_decides_unmatched_requests() -> None:
    rules = [{"users": "daemon", "paths": "/db/**", "effect": "permit"}]
    permitting = policy_of(rules)  # default permit: volumes behave as before
    d = permitting.decide(who(NOBODY), "read", "/db/t")
    assert (d.allowed, d.rule, d.effect, d.audit) == (True, None, "permit", False)
    denying = policy_of(rules, default="deny")
    d = denying.decide(who(NOBODY), "read", "/db/t")
    assert (d.allowed, d.rule, d.effect, d.audit) == (False, None, "deny", True)


def test_actions_select_rules() -> None:
    policy = policy_of(
        [{"paths": "/db/**", "actions": ["read", "list"], "effect": "permit"}], default="deny"
    )
    assert policy.decide(who(NOBODY), "read", "/db/t").allowed
    assert policy.decide(who(NOBODY), "list", "/db").allowed
    for action in ("write", "create", "delete", "rename", "exec"):
        assert not policy.decide(who(NOBODY), action, "/db/t").allowed, action
    everything = policy_of([{"actions": "all", "effect": "deny"}])
    assert all(not everything.decide(who(NOBODY), a, "/x").allowed for a in ACTIONS)


def test_root_is_matched_like_anyone_else() -> None:
    # a rule can deny root the plaintext ...
    policy = policy_of([{"users": "root", "paths": "/db/**", "effect": "deny"}])
    assert not policy.decide(who(0), "read", "/db/t").allowed
    assert policy.decide(who(DAEMON), "read", "/db/t").allowed
    # ... and a default deny applies to root as to everyone
    closed = policy_of([{"users": "daemon", "effect": "permit"}], default="deny")
    d = closed.decide(who(0), "read", "/db/t")
    assert (d.allowed, d.rule) == (False, None)


def test_users_and_groups_by_name_and_id() -> None:
    by_name = policy_of([{"groups": "backup", "effect": "permit"}], default="deny")
    by_id = policy_of([{"groups": BACKUP, "effect": "permit"}], default="deny")
    for policy in (by_name, by_id):
        assert policy.decide(who(NOBODY, BACKUP), "read", "/x").allowed  # request gid
        member = who(NOBODY, NOBODY, groups=frozenset({BACKUP}))
        assert policy.decide(member, "read", "/x").allowed  # supplementary group
        assert not policy.decide(who(NOBODY), "read", "/x").allowed
    users = policy_of([{"users": ["daemon", NOBODY], "effect": "permit"}], default="deny")
    assert users.decide(who(DAEMON), "read", "/x").allowed
    assert users.decide(who(NOBODY), "read", "/x").allowed
    assert not users.decide(who(BACKUP), "read", "/x").allowed
    both = policy_of([{"users": "daemon", "groups": "backup", "effect": "permit"}], default="deny")
    assert not both.decide(who(DAEMON), "read", "/x").allowed  # every condition must hold
    assert both.decide(who(DAEMON, BACKUP), "read", "/x").allowed


def test_program_path(tmp_path: Path) -> None:
    policy = policy_of(
        [{"programs": "/usr/bin/cat", "paths": "/db/**", "effect": "permit"}], default="deny"
    )
    assert policy.decide(who(NOBODY, exe="/usr/bin/cat"), "read", "/db/t").allowed
    assert not policy.decide(who(NOBODY, exe="/tmp/x/cat"), "read", "/db/t").allowed
    assert not policy.decide(who(NOBODY, exe=None), "read", "/db/t").allowed  # unknown program
    assert not policy.decide(who(NOBODY, exe="/nonexistent/cat"), "read", "/db/t").allowed


def test_program_sha256(tmp_path: Path) -> None:
    genuine = tmp_path / "tool"
    genuine.write_bytes(b"\x7fELF genuine")
    other = tmp_path / "other"
    other.write_bytes(b"\x7fELF other")
    digest = hashlib.sha256(b"\x7fELF genuine").hexdigest()
    policy = policy_of([{"sha256": digest.upper(), "effect": "permit"}], default="deny")
    assert policy.needs_sha256
    assert policy.decide(who(NOBODY, exe=str(genuine)), "read", "/x").allowed
    assert not policy.decide(who(NOBODY, exe=str(other)), "read", "/x").allowed
    # the same file content anywhere is the same program
    (tmp_path / "copy").write_bytes(genuine.read_bytes())
    assert policy.decide(who(NOBODY, exe=str(tmp_path / "copy")), "read", "/x").allowed
    # a requester that may not block asks for the hash to be computed elsewhere
    waiting = who(NOBODY, exe=str(genuine), blocking=False)
    with pytest.raises(HashPending):
        policy.decide(waiting, "read", "/x")
    assert waiting.compute_sha256() == digest
    assert policy.decide(waiting, "read", "/x").allowed


def test_learn_mode_denies_nothing_and_audits_every_would_be_deny() -> None:
    policy = policy_of(
        [
            {"users": "daemon", "paths": "/db/**", "effect": "permit"},
            {"paths": "/db/secret/**", "effect": "deny"},
            {"paths": "/logs/**", "effect": "permit", "audit": True},
        ],
        mode="learn",
        default="deny",
    )
    d = policy.decide(who(NOBODY), "read", "/db/secret/k")
    assert (d.allowed, d.effect, d.rule, d.audit, d.mode) == (True, "deny", 2, True, "learn")
    d = policy.decide(who(NOBODY), "read", "/elsewhere")
    assert (d.allowed, d.effect, d.rule, d.audit) == (True, "deny", None, True)
    d = policy.decide(who(DAEMON), "read", "/db/t")
    assert (d.allowed, d.audit) == (True, False)
    d = policy.decide(who(NOBODY), "read", "/logs/a")
    assert (d.allowed, d.effect, d.audit) == (True, "permit", True)


def test_audit_record_fields() -> None:
    from datetime import UTC, datetime

    policy = policy_of([{"paths": "/db/**", "effect": "deny"}])
    requester = Requester(33, 44, 4242, exe="/usr/bin/cat")
    decision = policy.decide(requester, "read", "/db/t")
    when = datetime(2025, 6, 1, 10, 0, 0, 123456, tzinfo=UTC)
    assert audit_record(requester, "read", "/db/t", decision, when) == {
        "time": "2025-06-01T10:00:00.123456+00:00",
        "operation": "policy",
        "action": "read",
        "path": "/db/t",
        "uid": 33,
        "gid": 44,
        "pid": 4242,
        "exe": "/usr/bin/cat",
        "rule": 1,
        "effect": "deny",
        "allowed": False,
        "mode": "enforce",
        "unknown_program": None,
        "unknown_path": None,
    }


def test_path_is_computed_only_when_a_rule_tests_paths() -> None:
    calls: list[int] = []

    def path() -> str:
        calls.append(1)
        return "/db/t"

    policy = policy_of([{"users": "daemon", "paths": "/db/**", "effect": "deny"}])
    assert policy.decide(who(NOBODY), "read", path).allowed  # no rule for this uid
    assert calls == []
    assert not policy.decide(who(DAEMON), "read", path).allowed
    assert calls == [1]
    assert not policy.applies("exec") or policy.applies("exec")  # every action named (all)


def test_whether_list_decisions_depend_on_the_requester() -> None:
    # names for everyone, content for one user: the kernel's caches may keep entries
    uniform = policy_of(
        [
            {"paths": "/**", "actions": "list", "effect": "permit"},
            {"users": "daemon", "paths": "/db/**", "effect": "permit"},
        ],
        default="deny",
    )
    assert not uniform.varies_by_requester("list")
    assert uniform.varies_by_requester("read")
    for condition in ({"users": "daemon"}, {"groups": 34}, {"programs": "/bin/ls"}):
        varies = policy_of([{**condition, "actions": ["list"], "effect": "deny"}])
        assert varies.varies_by_requester("list"), condition
    assert policy_of([{"sha256": "0" * 64, "effect": "deny"}]).varies_by_requester("list")
    assert not Policy.permit_all().varies_by_requester("list")


PER_USER_LIST: list[dict[str, object]] = [
    {"paths": "/**/*.key", "actions": "list", "effect": "deny"},
    {"users": "nobody", "paths": "/home/**", "actions": "list", "effect": "deny"},
    {"programs": "/usr/bin/db", "paths": ["/db", "/db/*"], "actions": "list", "effect": "permit"},
    {"paths": "/db/**", "actions": "list", "effect": "deny"},
]


def test_list_decisions_vary_only_on_paths_a_rule_testing_the_requester_matches_first() -> None:
    policy = policy_of(PER_USER_LIST)
    varying = ["/home", "/home/a", "/home/a/b", "/db", "/db/a"]
    uniform = ["/", "/homer", "/tmp/a", "/home/x.key", "/db/a/b", "/db/a/x.key"]
    assert [p for p in varying + uniform if policy.varies_for(p, "list")] == varying
    assert policy.varies_for(None, "list")  # a path not established: as for every path
    assert not any(policy.varies_for(p, "read") for p in varying + [None])
    assert not Policy.permit_all().varies_for(None, "list")
    below = ["/", "/home", "/home/a", "/db", "/db/a"]  # /db/a: "/db/*" cannot, "/db/**" can
    assert [d for d in below + ["/tmp", "/homer", "/dbx"] if policy.varies_below(d, "list")] == (
        below[:-1]
    )
    assert policy.varies_below(None, "list") and not policy.varies_below("/", "read")


VARIANCE_RULES: list[dict[str, object]] = [
    *PER_USER_LIST,
    {"groups": "backup", "paths": "/*/b", "actions": "list", "effect": "permit"},
    {"paths": ["/", "/tmp/**"], "actions": "list", "effect": "permit"},
    {"users": 4242, "actions": "list", "effect": "deny"},
    {"sha256": "0" * 64, "paths": "/a/*", "actions": "list", "effect": "deny"},
]
REQUESTERS = [
    Requester(uid, gid, exe=exe, groups=frozenset({gid}), sha256="1" * 64)
    for uid in (0, NOBODY, 4242)
    for gid in (0, BACKUP)
    for exe in ("/usr/bin/db", "/usr/bin/cat")
]


@examples(300)
@given(
    rules=st.lists(st.sampled_from(VARIANCE_RULES), max_size=5),
    parts=st.lists(st.sampled_from(["db", "home", "homer", "tmp", "x.key", "a", "b"]), max_size=4),
    default=st.sampled_from(["permit", "deny"]),
)
def test_a_path_said_not_to_vary_gets_one_decision_for_every_requester(
    rules: list[dict[str, object]], parts: list[str], default: str
) -> None:
    """What the kernel's caches rely on: one requester's answer is every requester's."""
    policy = policy_of(rules, default=default)
    path = "/" + "/".join(parts)
    if policy.varies_for(path, "list"):
        return
    assert len({policy.decide(r, "list", path) for r in REQUESTERS}) == 1, path


@examples(300)
@given(
    rules=st.lists(st.sampled_from(VARIANCE_RULES), max_size=5),
    parts=st.lists(st.sampled_from(["db", "home", "tmp", "a", "b"]), max_size=2),
    below=st.lists(st.sampled_from(["db", "home", "x.key", "a", "b"]), min_size=1, max_size=3),
)
def test_a_directory_said_not_to_vary_below_lists_alike_for_every_requester(
    rules: list[dict[str, object]], parts: list[str], below: list[str]
) -> None:
    """What a listing kept by the kernel for every opener relies on."""
    policy = policy_of(rules)
    directory = "/" + "/".join(parts)
    if policy.varies_below(directory, "list"):
        return
    path = directory.rstrip("/") + "/" + "/".join(below)
    assert not policy.varies_for(path, "list"), path


# -- renaming a directory renames everything below it -------------------------------


def test_renaming_an_ancestor_cannot_move_a_protected_tree() -> None:
    # the attack: /srv/db/** is denied to nobody, but renaming /srv (not matched by the
    # rule) would move the database to a path no rule protects
    policy = policy_of(
        [
            {"users": "daemon", "paths": "/srv/db/**", "effect": "permit"},
            {"paths": "/srv/db/**", "effect": "deny"},
        ]
    )
    assert policy.decide(who(NOBODY), "rename", "/srv").allowed  # the directory alone
    tree = policy.decide_tree(who(NOBODY), "rename", "/srv")
    assert (tree.allowed, tree.rule) == (False, 2)
    assert policy.decide_tree(who(DAEMON), "rename", "/srv").allowed
    assert policy.decide_tree(who(NOBODY), "rename", "/other").allowed
    assert not policy.decide_tree(who(NOBODY), "rename", "/srv/db").allowed


def test_tree_decision_with_default_deny() -> None:
    policy = policy_of(
        [
            {"users": "daemon", "paths": "/home/*/keys/**", "effect": "deny"},
            {"users": "daemon", "paths": "/home/**", "effect": "permit"},
        ],
        default="deny",
    )
    assert not policy.decide_tree(who(DAEMON), "rename", "/home/alice").allowed
    assert policy.decide_tree(who(DAEMON), "rename", "/home/alice/docs").allowed
    covered = policy_of([{"paths": "/a/*/**", "effect": "permit"}], default="deny")
    assert covered.decide_tree(who(NOBODY), "rename", "/a/b").allowed
    uncovered = policy_of([{"paths": ["/a/b", "/a/b/*.txt"], "effect": "permit"}], default="deny")
    assert uncovered.decide(who(NOBODY), "rename", "/a/b").allowed
    assert not uncovered.decide_tree(who(NOBODY), "rename", "/a/b").allowed


# -- decide() and the independent explain() always agree ---------------------------

AGREEMENT_RULES: list[dict[str, object]] = [
    {"paths": "/**/*.key", "effect": "deny"},
    {"users": ["daemon", 4242], "programs": "/usr/bin/db", "paths": "/db/**", "effect": "permit"},
    {"groups": "backup", "actions": ["read", "list"], "paths": "/**", "effect": "permit"},
    {"users": "nobody", "paths": ["/pub", "/pub/*"], "effect": "permit", "audit": True},
    {"paths": "/db/**", "effect": "deny"},
    {"users": 4242, "effect": "permit"},
    {"paths": ["/", "/tmp/**"], "actions": ["list", "create"], "effect": "permit"},
]
COMPONENTS = st.sampled_from(["db", "pub", "tmp", "x.key", "a", "b", "home", "*"])


@examples(400)
@given(
    uid=st.sampled_from([0, DAEMON, BACKUP, NOBODY, 4242, 5000]),
    gid=st.sampled_from([0, BACKUP, NOBODY, 5000]),
    groups=st.frozensets(st.sampled_from([BACKUP, 27, 5000]), max_size=2),
    exe=st.sampled_from(["/usr/bin/db", "/usr/bin/cat", None]),
    action=st.sampled_from(ACTIONS),
    parts=st.lists(COMPONENTS, max_size=4),
    default=st.sampled_from(["permit", "deny"]),
)
def test_decide_agrees_with_explain(
    uid: int,
    gid: int,
    groups: frozenset[int],
    exe: str | None,
    action: str,
    parts: list[str],
    default: str,
) -> None:
    policy = policy_of(AGREEMENT_RULES, default=default)
    path = "/" + "/".join(parts)
    requester = Requester(uid, gid, exe=exe, groups=groups)
    decision = policy.decide(requester, action, path)
    steps = policy.explain(Requester(uid, gid, exe=exe, groups=groups), action, path)
    deciding = steps[-1][0].number if steps and steps[-1][1] is None else None
    assert decision.rule == deciding
    assert decision.effect == (policy.rule(deciding).effect if deciding else default)
    # twice: the second answer comes from the (action, uid, component) index
    assert policy.decide(requester, action, path) is decision


@examples(300)
@given(
    uid=st.sampled_from([0, DAEMON, BACKUP, NOBODY, 4242]),
    exe=st.sampled_from(["/usr/bin/db", "/usr/bin/cat"]),
    top=st.lists(COMPONENTS, max_size=2),
    below=st.lists(st.lists(COMPONENTS, min_size=1, max_size=3), min_size=1, max_size=6),
    default=st.sampled_from(["permit", "deny"]),
)
def test_a_tree_decision_never_permits_what_a_path_below_would_deny(
    uid: int, exe: str, top: list[str], below: list[list[str]], default: str
) -> None:
    policy = policy_of(AGREEMENT_RULES, default=default)
    requester = Requester(uid, uid, exe=exe, groups=frozenset())
    directory = "/" + "/".join(top)
    if not policy.decide_tree(requester, "rename", directory).allowed:
        return
    for parts in below:
        path = directory.rstrip("/") + "/" + "/".join(parts)
        assert policy.decide(requester, "rename", path).allowed, path
