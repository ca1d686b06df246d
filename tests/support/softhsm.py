"""A private SoftHSM2 token store for tests, and a key tool that runs in a subprocess.

``SoftHSM.create(root)`` writes ``root/softhsm2.conf`` (tokendir ``root/tokens``);
``env`` is what a subprocess needs to use it (``SOFTHSM2_CONF``).  Keys are made
by running this file as a script with that environment, so the test process
itself never has to load the module for another token store:

    python tests/support/softhsm.py aes TOKEN PIN LABEL [--id HEX] [--no-use | --value HEX]
    python tests/support/softhsm.py rsa TOKEN PIN LABEL [--id HEX]
    python tests/support/softhsm.py generic TOKEN PIN LABEL
    python tests/support/softhsm.py delete TOKEN PIN LABEL
    python tests/support/softhsm.py wrap TOKEN PIN LABEL VOLUME_HEX FILE_HEX
        (prints the blob in hex)
    python tests/support/softhsm.py pubkey TOKEN - LABEL
        (prints the RSA public key's modulus and exponent in hex, read without logging in:
        what anyone who can use the token's library can read)
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

MODULE = "/usr/lib/softhsm/libsofthsm2.so"
USER_PIN = "1234"
SO_PIN = "12345678"


def available() -> bool:
    return (
        os.path.exists(MODULE)
        and shutil.which("softhsm2-util") is not None
        and importlib.util.find_spec("pkcs11") is not None
    )


@dataclass
class SoftHSM:
    """Attributes: root (directory), conf (config file), env (for subprocesses)."""

    root: Path

    @classmethod
    def create(cls, root: Path) -> SoftHSM:
        (root / "tokens").mkdir(parents=True)
        (root / "softhsm2.conf").write_text(
            f"directories.tokendir = {root / 'tokens'}\n"
            "objectstore.backend = file\n"
            "log.level = ERROR\n"
        )
        return cls(root)

    @property
    def conf(self) -> Path:
        return self.root / "softhsm2.conf"

    @property
    def env(self) -> dict[str, str]:
        return {"SOFTHSM2_CONF": str(self.conf)}

    def init_token(self, label: str, pin: str = USER_PIN) -> None:
        subprocess.run(
            ["softhsm2-util", "--init-token", "--free", "--label", label, "--pin", pin]
            + ["--so-pin", SO_PIN],
            env={**os.environ, **self.env},
            check=True,
            capture_output=True,
        )

    def pin_file(self, pin: str = USER_PIN, name: str = "user.pin") -> Path:
        path = self.root / name
        path.write_text(pin + "\n")
        path.chmod(0o600)
        return path

    def tool(self, *args: str) -> str:
        """Run this file's key tool against this store; returns its stdout."""
        result = subprocess.run(
            [sys.executable, __file__, *args],
            env={**os.environ, **self.env},
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
        if result.returncode != 0:
            raise RuntimeError(f"softhsm.py {' '.join(args)}: {result.stderr}")
        return result.stdout


def _session(token: str, pin: str):  # type: ignore[no-untyped-def]
    import pkcs11

    return pkcs11.lib(MODULE).get_token(token_label=token).open(rw=True, user_pin=pin)


def main(argv: list[str]) -> None:
    from pkcs11 import Attribute, KeyType, ObjectClass

    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=["aes", "rsa", "generic", "delete", "wrap", "pubkey"])
    parser.add_argument("token")
    parser.add_argument("pin")
    parser.add_argument("label")
    parser.add_argument("rest", nargs="*")
    parser.add_argument("--id", default="")
    parser.add_argument("--no-use", action="store_true", help="AES key without any usage")
    parser.add_argument("--value", default="", help="import this AES key (hex) instead")
    args = parser.parse_args(argv)
    key_id = bytes.fromhex(args.id) if args.id else os.urandom(8)

    if args.command == "wrap":
        sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
        from kmsfs.keys.pkcs11 import Pkcs11Provider
        from kmsfs.keys.provider import KeyContext, random_key

        provider = Pkcs11Provider(MODULE, args.token, args.label, args.pin)
        context = KeyContext(bytes.fromhex(args.rest[0]), bytes.fromhex(args.rest[1]))
        print(provider.wrap(random_key(), context).blob.hex())
        provider.close()
        return

    if args.command == "pubkey":
        import pkcs11

        token = pkcs11.lib(MODULE).get_token(token_label=args.token)
        with token.open() as public:  # no PIN: public objects only
            key = public.get_key(ObjectClass.PUBLIC_KEY, KeyType.RSA, label=args.label)
            print(bytes(key[Attribute.MODULUS]).hex(), bytes(key[Attribute.PUBLIC_EXPONENT]).hex())
        return

    with _session(args.token, args.pin) as session:
        if args.command == "aes" and args.value:
            session.create_object(
                {
                    Attribute.CLASS: ObjectClass.SECRET_KEY,
                    Attribute.KEY_TYPE: KeyType.AES,
                    Attribute.VALUE: bytes.fromhex(args.value),
                    Attribute.LABEL: args.label,
                    Attribute.ID: key_id,
                    Attribute.TOKEN: True,
                    Attribute.PRIVATE: True,
                    **{a: True for a in (Attribute.ENCRYPT, Attribute.DECRYPT)},
                    **{a: True for a in (Attribute.WRAP, Attribute.UNWRAP)},
                }
            )
        elif args.command == "aes":
            use = not args.no_use
            session.generate_key(
                KeyType.AES,
                256,
                label=args.label,
                id=key_id,
                store=True,
                template={
                    Attribute.SENSITIVE: True,
                    Attribute.EXTRACTABLE: False,
                    Attribute.ENCRYPT: use,
                    Attribute.DECRYPT: use,
                    Attribute.WRAP: use,
                    Attribute.UNWRAP: use,
                },
            )
        elif args.command == "rsa":
            session.generate_keypair(
                KeyType.RSA,
                2048,
                label=args.label,
                id=key_id,
                store=True,
                public_template={Attribute.WRAP: True, Attribute.ENCRYPT: True},
                private_template={
                    Attribute.UNWRAP: True,
                    Attribute.DECRYPT: True,
                    Attribute.SENSITIVE: True,
                    Attribute.EXTRACTABLE: False,
                },
            )
        elif args.command == "generic":
            session.generate_key(
                KeyType.GENERIC_SECRET, 256, label=args.label, id=key_id, store=True
            )
        elif args.command == "delete":
            for obj in list(session.get_objects({Attribute.LABEL: args.label})):
                obj.destroy()
        print(key_id.hex())


if __name__ == "__main__":
    main(sys.argv[1:])
