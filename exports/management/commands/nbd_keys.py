import getpass
import os
from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from exports import helper_client
from exports.actions import record_event
from exports.conf import nbd_conf
from exports.helper_client import HelperFailed, SubprocessHelper
from exports.nbd_protocol import TlsX509


def write_client_file(path: Path, identity: str, key: str, replace: bool) -> None:
    """A psktool-format key file for one client, readable by its owner only, written atomically."""
    if path.exists() and not replace:
        raise CommandError(f"{path} exists; pass --force to overwrite it")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="ascii") as fh:
            fh.write(f"{identity}:{key}\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class Command(BaseCommand):
    help = (
        "NBD over TLS pre-shared keys, one identity per VMA (and one for the portal itself), kept by the "
        "privileged helper in the server's root-only key file. add/rotate write the client's key file "
        "(--out, mode 0600) to install on the VMA; rotate leaves open transfers running, new connections "
        "need the new key. 'import' gives an identity the key in a client key file made on another OMA "
        "node (--key-file), so one VMA key opens every node. 'portal' (re)keys the portal's own identity "
        "into OMA_NBD_TLS_PSK_FILE. With nbd-server (OMA_NBD_TLS_CERT_DIR set) an identity holds a client "
        "certificate instead: add/rotate write its libnbd certificate folder (--out), 'portal' writes "
        "OMA_NBD_TLS_CERT_DIR."
    )

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("action", choices=["list", "add", "rotate", "import", "remove", "portal"])
        parser.add_argument("identity", nargs="?", help="the client's identity (add, rotate, import, remove)")
        parser.add_argument("--key-file", help="import: the client's key file (ID:KEY, as add --out wrote it)")
        parser.add_argument(
            "--out", help="write the client's key file (nbdkit) or certificate folder (nbd-server) here (add, rotate)"
        )
        parser.add_argument("--force", action="store_true", help="overwrite --out if it exists")

    def handle(self, *args: Any, **options: Any) -> None:
        conf = nbd_conf()
        helper = SubprocessHelper(conf.helper_command, conf.helper_config)
        action, identity = options["action"], options["identity"]
        actor = f"nbd_keys:{getpass.getuser()}"
        if conf.tls_cert_dir:
            self._certificates(helper, action, identity, options, actor)
            return
        try:
            if action == "list":
                reply = helper_client.psk(helper, "psk-list")
                if not reply.get("tls"):
                    self.stdout.write("TLS is off: the helper config has no tls_psk_file")
                for name in reply.get("identities", []):
                    self.stdout.write(name)
                return
            if action == "portal":
                if not conf.tls_psk_file:
                    raise CommandError("OMA_NBD_TLS_PSK_FILE is empty: the portal connects without TLS")
                identity = conf.tls_identity
                listed = helper_client.psk(helper, "psk-list").get("identities", [])
                verb = "psk-rotate" if identity in listed else "psk-add"
                reply = helper_client.psk(helper, verb, identity)
                write_client_file(Path(conf.tls_psk_file), identity, reply["key"], replace=True)
                self._record(verb, identity, actor)
                self.stdout.write(f"portal key for {identity} written to {conf.tls_psk_file}")
                return
            if not identity:
                raise CommandError(f"{action} needs an identity")
            if action == "import":
                self._import(helper, identity, options["key_file"], actor)
                return
            if action == "remove":
                reply = helper_client.psk(helper, "psk-remove", identity)
                if reply.get("removed"):
                    self._record("psk-remove", identity, actor)
                self.stdout.write(f"{identity}: {'removed' if reply.get('removed') else 'had no key'}")
                return
            out = Path(options["out"]) if options["out"] else None
            if out is not None and out.exists() and not options["force"]:
                raise CommandError(f"{out} exists; pass --force to overwrite it")  # before any key changes
            reply = helper_client.psk(helper, "psk-add" if action == "add" else "psk-rotate", identity)
            self._record(f"psk-{action}", identity, actor)
        except HelperFailed as exc:
            raise CommandError(str(exc)) from exc
        if out is None:
            self.stdout.write(f"{identity}:{reply['key']}")
            self.stderr.write("shown once: save it as the VMA's key file (mode 0600), e.g. with --out")
        else:
            write_client_file(out, identity, reply["key"], replace=True)
            self.stdout.write(f"key for {identity} written to {out}; install it on the VMA (mode 0600)")

    def _certificates(
        self, helper: SubprocessHelper, action: str, identity: str | None, options: dict[str, Any], actor: str
    ) -> None:
        """nbd-server: each identity is a client certificate the server trusts (the helper's cert-* verbs)."""
        conf = nbd_conf()
        try:
            if action == "list":
                for name in helper_client.psk(helper, "cert-list").get("identities", []):
                    self.stdout.write(name)
                return
            if action == "import":
                raise CommandError(
                    "import is for pre-shared keys (nbdkit); with nbd-server each node trusts its own certificates"
                )
            if action == "portal":
                identity = conf.tls_identity
            elif not identity:
                raise CommandError(f"{action} needs an identity")
            if action == "remove":
                reply = helper_client.psk(helper, "cert-remove", identity)
                if reply.get("removed"):
                    self._record("cert-remove", identity, actor)
                self.stdout.write(f"{identity}: {'removed' if reply.get('removed') else 'had no certificate'}")
                return
            if action == "portal":
                out, verb = Path(str(conf.tls_cert_dir)), "cert-add"
                if identity in helper_client.psk(helper, "cert-list").get("identities", []):
                    verb = "cert-rotate"
            else:
                if not options["out"]:
                    raise CommandError("certificates go to a folder: pass --out DIR (libnbd's tls-certificates)")
                out, verb = Path(options["out"]), "cert-add" if action == "add" else "cert-rotate"
                if out.exists() and not options["force"]:
                    raise CommandError(f"{out} exists; pass --force to overwrite it")  # before any change
            reply = helper_client.psk(helper, verb, identity)
            self._record(verb, identity, actor)
        except HelperFailed as exc:
            raise CommandError(str(exc)) from exc
        TlsX509.save(out, reply["certificate"], reply["key"], reply["server_certificate"])
        self.stdout.write(
            f"certificate for {identity} written to {out} (ca-cert.pem, client-cert.pem, client-key.pem); "
            + ("the portal uses it at once" if action == "portal" else "install the folder on the VMA (mode 0700)")
        )

    def _import(self, helper: SubprocessHelper, identity: str, key_file: str | None, actor: str) -> None:
        if not key_file:
            raise CommandError("import needs --key-file: the key file made for this identity on another node")
        try:
            text = Path(key_file).read_text(encoding="ascii")
        except (OSError, UnicodeDecodeError) as exc:
            raise CommandError(f"cannot read {key_file}: {exc}") from exc
        lines = text.splitlines()
        given, _, key = (lines[0] if len(lines) == 1 else "").partition(":")
        if given != identity or not key:
            raise CommandError(f"{key_file} is not a key file for {identity} (one line: {identity}:KEY)")
        reply = helper_client.psk_import(helper, identity, key)
        if reply.get("changed"):
            self._record("psk-import", identity, actor)
        said = "replaced" if reply.get("replaced") else "added" if reply.get("changed") else "already held"
        self.stdout.write(f"{identity}: key {said} on this node")

    def _record(self, verb: str, identity: str, actor: str) -> None:
        kinds = {
            "psk-add": "tls.key_added",
            "psk-rotate": "tls.key_rotated",
            "psk-import": "tls.key_imported",
            "psk-remove": "tls.key_removed",
            "cert-add": "tls.key_added",
            "cert-rotate": "tls.key_rotated",
            "cert-remove": "tls.key_removed",
        }
        kind = kinds[verb]
        record_event(kind, message=f"NBD TLS key for {identity}", data={"identity": identity}, actor=actor)
