"""Volume config files (/etc/kmsfs/NAME.toml): loading, validation, precedence.

In-process tests of the loader and of the click integration, then the real
CLI: a mount described only by a config file, and the command line winning
over the file, which wins over the settings recorded in the volume.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from support.cli import run_kmsfs
from support.fuse import requires_fuse
from support.volumes import Volume

from kmsfs.cli.configfile import config_option, current_config
from kmsfs.cli.mounthelper import HelperUsage, translate
from kmsfs.errors import ConfigError
from kmsfs.server.config import load_server_config, parse_listen_address


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    return write(tmp_path / "data.key", "not parsed by the loader\n")


# -- loading and validation ----------------------------------------------------


@pytest.mark.nomount
def test_smallest_file(tmp_path: Path, key_file: Path) -> None:
    path = write(
        tmp_path / "data.toml",
        f'backing = "/srv/enc"\nmountpoint = "/srv/data"\n\n'
        f'[provider]\ntype = "local"\nkey_file = "{key_file}"\n',
    )
    config = load_server_config(path)
    assert config.backing == "/srv/enc"
    assert config.mountpoint == "/srv/data"
    assert config.provider_type == "local"
    assert config.provider_options == {"key_file": str(key_file)}
    assert config.cli_defaults() == {
        "backing": "/srv/enc",
        "mountpoint": "/srv/data",
        "key_file": str(key_file),
    }


@pytest.mark.nomount
def test_full_file(tmp_path: Path) -> None:
    path = write(
        tmp_path / "kms.toml",
        """
backing = "/srv/enc"
mountpoint = "/srv/data"
options = ["allow_other", "ro,noatime"]
log_level = "DEBUG"
log_file = "/var/log/kmsfs/data.log"
audit_log = "/var/log/kmsfs/data-audit.jsonl"
metrics_listen = "127.0.0.1:9750"

[provider]
type = "aws-kms"
key_id = "alias/data"
region = "eu-west-1"
endpoint_url = "https://kms.eu-west-1.amazonaws.com"
profile = "storage"

[cache]
max_entries = 500
max_age = 60
""",
    )
    config = load_server_config(path)
    assert config.mount_options == ("allow_other", "ro", "noatime")
    assert config.log_level == "debug"
    assert config.cache_max_entries == 500
    assert config.cache_max_age == 60.0
    assert config.provider_options == {
        "kms_key_id": "alias/data",
        "kms_region": "eu-west-1",
        "kms_endpoint_url": "https://kms.eu-west-1.amazonaws.com",
        "kms_profile": "storage",
    }
    defaults = config.cli_defaults()
    assert defaults["audit_log"] == "/var/log/kmsfs/data-audit.jsonl"
    assert defaults["metrics_listen"] == "127.0.0.1:9750"
    assert "mount_options" not in defaults  # added to the command line's, not replaced


@pytest.mark.nomount
def test_pkcs11_names(tmp_path: Path) -> None:
    module = write(tmp_path / "libsofthsm2.so", "")
    pin = write(tmp_path / "pin", "1234\n")
    path = write(
        tmp_path / "hsm.toml",
        f'[provider]\ntype = "pkcs11"\nmodule = "{module}"\ntoken = "kmsfs"\n'
        f'key = "wrap"\npin_file = "{pin}"\n',
    )
    assert load_server_config(path).provider_options == {
        "pkcs11_module": str(module),
        "pkcs11_token": "kmsfs",
        "pkcs11_key": "wrap",
        "pkcs11_pin_file": str(pin),
    }


@pytest.mark.nomount
@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('backing = "/a"\nmountpont = "/b"\n', "unknown key mountpont (did you mean mountpoint?)"),
        ('backing = "relative/dir"\n', "backing must be an absolute path, not 'relative/dir'"),
        ("backing = 3\n", "backing must be a string, not int (3)"),
        ("options = [1, 2]\n", "options must be a list of strings"),
        ('log_level = "loud"\n', "log_level 'loud' is not one of debug, info, warning, error"),
        ('metrics_listen = "9750"\n', "metrics_listen: '9750' is not HOST:PORT"),
        ('metrics_listen = "localhost:http"\n', "port 'http' is not a number"),
        ("[cache]\nmax_entries = -1\n", "cache.max_entries must not be negative"),
        ('[cache]\nmax_age = "1h"\n', "cache.max_age must be an integer or a number, not str"),
        ("[cache]\nmax_entries = true\n", "cache.max_entries must be an integer, not bool"),
        ("[cache]\nsize = 3\n", "unknown key cache.size"),
        ('[provider]\nkey_file = "/k"\n', "provider.type is missing"),
        ('[provider]\ntype = "vault"\n', "provider.type 'vault' is not one of aws-kms, local"),
        (
            '[provider]\ntype = "local"\nkey_id = "alias/x"\n',
            "provider.key_id is not an option of the local provider (it belongs to the aws-kms"
            " provider)",
        ),
        (
            '[provider]\ntype = "local"\nkey_file = "/nonexistent/data.key"\n',
            "provider.key_file: /nonexistent/data.key does not exist",
        ),
        ('[provider]\ntype = "aws-kms"\nkey_id = ""\n', "provider.key_id is empty"),
        ('options = "config=/x.toml"\n', "'config=/x.toml' makes no sense inside a config file"),
        ("backing = \n", "not valid TOML"),
    ],
)
def test_bad_files_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path / "bad.toml", text)
    with pytest.raises(ConfigError) as info:
        load_server_config(path)
    assert str(info.value).startswith(f"{path}: ")
    assert message in str(info.value)


@pytest.mark.nomount
@pytest.mark.parametrize(
    ("text", "where", "hint"),
    [
        (
            '[provider]\ntype = "local"\npassphrase = "hunter2"\n',
            "provider.passphrase",
            "passphrase_file",
        ),
        ('[provider]\ntype = "pkcs11"\npin = "1234"\n', "provider.pin", "LoadCredential=kmsfs-pin"),
        ('secret = "x"\n', "secret", "file readable only by root"),
        (
            '[provider]\ntype = "aws-kms"\naws_secret_access_key = "x"\n',
            "aws_secret_access_key",
            "",
        ),
    ],
)
def test_secrets_refused(tmp_path: Path, text: str, where: str, hint: str) -> None:
    path = write(tmp_path / "secret.toml", text)
    with pytest.raises(ConfigError) as info:
        load_server_config(path)
    message = str(info.value)
    assert f"{where}: secrets never go in the config file" in message
    assert hint in message
    assert "hunter2" not in message and "1234" not in message


@pytest.mark.nomount
def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_server_config(tmp_path / "nope.toml")


def test_a_config_file_that_is_a_fifo_is_refused_at_once(tmp_path: Path) -> None:
    """A FIFO named as the config file: refused on opening (O_NONBLOCK), not waited on."""
    fifo = tmp_path / "data.toml"
    os.mkfifo(fifo, 0o644)
    os.chown(fifo, 65534, 65534)
    result = run_kmsfs("mount", "--config", fifo, check=False, timeout=30)
    assert result.returncode == 3, result.stderr
    assert result.stderr.strip() == (
        f"kmsfs: error: config file {fifo} is a FIFO, not a regular file"
    )


@pytest.mark.nomount
def test_listen_address() -> None:
    assert parse_listen_address("127.0.0.1:9750") == ("127.0.0.1", 9750)
    assert parse_listen_address("[::1]:0") == ("::1", 0)
    with pytest.raises(ValueError, match="out of range"):
        parse_listen_address("127.0.0.1:70000")


# -- precedence through click --------------------------------------------------


def _probe_command() -> click.Command:
    @click.command()
    @click.argument("backing", required=False)
    @click.option("--log-level", default="info")
    @click.option("--key-file")
    @click.option("--cache-max-entries", type=int)
    @config_option
    def probe(backing: str | None, log_level: str, key_file: str | None, **kw: object) -> None:
        config = current_config()
        extra = config.mount_options if config else ()
        click.echo(f"{backing} {log_level} {key_file} {kw.get('cache_max_entries')} {extra}")

    return probe


@pytest.mark.nomount
def test_command_line_wins_over_file(tmp_path: Path, key_file: Path) -> None:
    path = write(
        tmp_path / "v.toml",
        f'backing = "/from/file"\nlog_level = "debug"\noptions = "allow_other"\n'
        f'[provider]\ntype = "local"\nkey_file = "{key_file}"\n[cache]\nmax_entries = 7\n',
    )
    runner = CliRunner()
    probe = _probe_command()
    result = runner.invoke(probe, ["--config", str(path)])
    assert result.output == f"/from/file debug {key_file} 7 ('allow_other',)\n"
    result = runner.invoke(
        probe,
        ["/from/cli", "--log-level", "error", "--key-file", "/cli.key", "--config", str(path)],
    )
    assert result.output == "/from/cli error /cli.key 7 ('allow_other',)\n"
    result = runner.invoke(probe, [])
    assert result.output == "None info None None ()\n"


@pytest.mark.nomount
def test_bad_config_is_exit_3(tmp_path: Path) -> None:
    path = write(tmp_path / "v.toml", 'backing = "x"\n')
    result = CliRunner().invoke(_probe_command(), ["--config", str(path)])
    assert result.exit_code == 3
    assert f"kmsfs: error: {path}: backing must be an absolute path" in result.output


def test_kmsfs_mount_bad_config(tmp_path: Path) -> None:
    path = write(tmp_path / "v.toml", '[provider]\ntype = "local"\npassphrase = "hunter2"\n')
    result = run_kmsfs("mount", "--config", path, check=False)
    assert result.returncode == 3
    assert "provider.passphrase: secrets never go in the config file" in result.stderr
    assert "hunter2" not in result.stderr


def test_kmsfs_mount_without_paths(tmp_path: Path) -> None:
    path = write(tmp_path / "v.toml", 'log_level = "info"\n')
    result = run_kmsfs("mount", "--config", path, check=False)
    assert result.returncode == 2
    assert "BACKING and MOUNTPOINT missing" in result.stderr


# -- mount helper argument translation ----------------------------------------


@pytest.mark.nomount
def test_helper_translation() -> None:
    assert translate(
        ["/srv/enc", "/srv/data", "-o", "rw,config=/etc/kmsfs/d.toml,_netdev,nofail,allow_other"]
    ) == ["mount", "/srv/enc", "/srv/data", "--config", "/etc/kmsfs/d.toml", "-o", "allow_other"]
    # mount.fuse3's form adds dev,suid; x-systemd options are for systemd only
    assert translate(
        ["/e", "/d", "-o", "config=/c.toml,x-systemd.requires=network-online.target,dev,suid"]
    ) == ["mount", "/e", "/d", "--config", "/c.toml"]
    assert translate(["kmsfs#/e", "/d", "-n", "-t", "fuse.kmsfs", "-olog_level=debug"]) == [
        "mount",
        "/e",
        "/d",
        "--log-level",
        "debug",
    ]
    assert translate(["/e", "/d", "-f"]) is None
    with pytest.raises(HelperUsage, match="need BACKING and MOUNTPOINT"):
        translate(["/e"])
    with pytest.raises(HelperUsage, match="config needs a value"):
        translate(["/e", "/d", "-o", "config"])


# -- real mounts ---------------------------------------------------------------


def _config(volume: Volume, key_file: Path, extra: str = "") -> Path:
    return write(
        volume.root / "volume.toml",
        f'backing = "{volume.backing}"\nmountpoint = "{volume.mountpoint}"\n'
        f'log_file = "{volume.log_file}"\nlog_level = "debug"\n{extra}\n'
        f'[provider]\ntype = "local"\nkey_file = "{key_file}"\n',
    )


@requires_fuse
@pytest.mark.mount
def test_mount_from_config_only(volume: Volume) -> None:
    config = _config(volume, volume.key_file, 'options = ["ro"]')
    run_kmsfs("mount", "--config", config)
    volume.mounted = True
    assert os.path.ismount(volume.mountpoint)
    with pytest.raises(OSError) as info:
        (volume.mountpoint / "f").write_text("x")
    assert info.value.errno == 30  # EROFS: the file's mount options were applied
    run_kmsfs("umount", "--config", config)
    volume.mounted = False
    assert not os.path.ismount(volume.mountpoint)


@requires_fuse
@pytest.mark.mount
def test_precedence_cli_file_volume(volume: Volume, tmp_path: Path) -> None:
    # the volume recorded key_file = volume.key_file at init; move the key so that
    # only the config file's key_file finds it (file over volume config)
    moved = tmp_path / "moved.key"
    shutil.move(volume.key_file, moved)
    config = _config(volume, moved)
    run_kmsfs("mount", "--config", config)
    volume.mounted = True
    (volume.mountpoint / "f").write_text("data")
    volume.umount()

    # a command-line key file wins over the file's: another volume's key is refused
    other = tmp_path / "other"
    other.mkdir()
    run_kmsfs("init", other, "--key-file", tmp_path / "other.key")
    result = run_kmsfs(
        "mount", "--config", config, "--key-file", tmp_path / "other.key", check=False
    )
    assert result.returncode == 6, result.stderr
    assert "wrong key" in result.stderr

    # a command-line mount point wins over the file's
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    run_kmsfs("mount", "--config", config, volume.backing, elsewhere)
    try:
        assert (elsewhere / "f").read_text() == "data"
        assert not os.path.ismount(volume.mountpoint)
    finally:
        run_kmsfs("umount", elsewhere)


@requires_fuse
@pytest.mark.mount
def test_provider_type_must_fit_volume(volume: Volume) -> None:
    config = write(
        volume.root / "kms.toml",
        f'backing = "{volume.backing}"\nmountpoint = "{volume.mountpoint}"\n'
        '[provider]\ntype = "aws-kms"\nkey_id = "alias/data"\n',
    )
    result = run_kmsfs("mount", "--config", config, check=False)
    assert result.returncode == 3
    assert "provider.type is 'aws-kms' but the volume" in result.stderr
    assert "has no such master key (it has local local:" in result.stderr
