"""A TLS certificate from an ACME certificate authority (Let's Encrypt, step-ca...), renewed.

:class:`AcmeCertificates` keeps one certificate for a set of DNS names in ``state_dir/acme``
and renews it before it expires, answering the CA's HTTP-01 challenge on ``http_port``
(80 for a public CA) with a small web server that listens only while an order is open. The
ACME account's key is made once and kept beside the certificate, so that every renewal is
made by the same account (the CA's rate limits and any revocation are per account).

The ``acme`` library is blocking (``requests``): each of its steps runs in a thread, with a
timeout on every request and a deadline on the whole order. Every failure becomes an
:class:`AcmeError` whose one-line message names the cause (the directory unreachable, the
CA's reason a challenge failed, a rate limit...).
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import json
import logging
import math
import os
import re
import secrets
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import requests
from acme import challenges, client, crypto_util, errors, messages
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from josepy.jwa import ES256
from josepy.jwk import JWK, JWKEC

from tsunagu.config import Config

__all__ = ["AcmeCertificates", "AcmeError", "describe"]

log = logging.getLogger("tsunagu.acme")

_CERT_NAME = "cert.pem"
_KEY_NAME = "key.pem"
_RETRY_FIRST = 60.0
_RETRY_MAX = 6 * 3600.0
# Wake up at least this often while waiting to renew: a suspended machine or a clock that
# jumped must not sleep past the renewal date on a stale timer.
_WAKE_EVERY = 6 * 3600.0
_SHORTEST_WAIT = 5.0


class AcmeError(Exception):
    """An order failed. ``str()`` is one line: the step and its cause."""


def _write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (a reader sees the old or the new file, whole),
    readable by the owner only."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _inner_cause(text: str) -> str:
    # requests buries the cause ("[Errno 111] Connection refused", "[SSL: ...] certificate
    # verify failed: ...") inside urllib3's reprs of its retries.
    for pattern in (r"\[Errno -?\d+\] ([^'\"()]+)", r"\[SSL(?:: \w+)?\] ([^'\"()]+?) \("):
        found = re.findall(pattern, text)
        if found:
            return str(found[-1]).strip().rstrip(".").lower()
    return text


def _problem(error: messages.Error) -> str:
    if error.code == "rateLimited":
        return f"rate limited by the CA: {error.detail}"
    kind = error.code or error.typ
    return f"{kind}: {error.detail}" if error.detail else str(kind)


def describe(exc: BaseException, *, timeout: float, order_timeout: float) -> str:
    """One line saying why ``exc`` happened, in the words an operator acts on."""
    if isinstance(exc, AcmeError):
        return str(exc)
    if isinstance(exc, requests.exceptions.SSLError):
        return (
            f"TLS with the ACME server failed ({_inner_cause(str(exc))}); a private CA's"
            " certificate goes in acme_ca_file"
        )
    if isinstance(exc, requests.exceptions.Timeout):
        return f"the ACME server did not answer within {timeout:g} s"
    if isinstance(exc, requests.exceptions.RequestException):
        return f"cannot reach the ACME server: {_inner_cause(str(exc))}"
    if isinstance(exc, messages.Error):
        return _problem(exc) if exc.code == "rateLimited" else f"the CA refused: {_problem(exc)}"
    if isinstance(exc, errors.ValidationError):
        failures = [
            f"{authzr.body.identifier.value}: {_problem(challb.error)}"
            for authzr in exc.failed_authzrs
            for challb in authzr.body.challenges
            if challb.error is not None
        ]
        return "the CA could not validate the challenge: " + "; ".join(failures)
    if isinstance(exc, errors.TimeoutError):
        return f"the CA did not validate and issue within {order_timeout:g} s"
    if isinstance(exc, errors.IssuanceError):
        return f"the CA would not issue: {_problem(exc.error)}"
    return f"{type(exc).__name__}: {exc}".rstrip(": ")


class AcmeCertificates:
    """One certificate for ``domains`` from the ACME CA at ``directory``, kept current.

    ``http_host`` is the address the HTTP-01 answerer binds (None: every address);
    ``ca_file`` a CA bundle to trust for a private ACME server instead of the system's.
    ``timeout`` bounds each request to the CA, ``order_timeout`` a whole order's validation
    and issuance.
    """

    def __init__(
        self,
        domains: Sequence[str],
        *,
        email: str | None,
        directory: str,
        ca_file: str | None,
        http_port: int,
        http_host: str | None,
        state_dir: Path | str,
        renew_before: datetime.timedelta = datetime.timedelta(days=30),
        timeout: float = 30.0,
        order_timeout: float = 120.0,
        retry_first: float = _RETRY_FIRST,
        retry_max: float = _RETRY_MAX,
    ) -> None:
        if not domains:
            raise ValueError("AcmeCertificates needs at least one domain")
        self.domains = tuple(d.lower().rstrip(".") for d in domains)
        self.email = email
        self.directory = directory
        self.ca_file = ca_file
        self.http_port = http_port
        self.http_host = http_host
        self.renew_before = renew_before
        self.timeout = timeout
        self.order_timeout = order_timeout
        self.retry_first = retry_first
        self.retry_max = retry_max
        self._dir = Path(state_dir) / "acme"
        # One account per CA: an account URL means nothing to another directory.
        tag = hashlib.sha256(directory.encode()).hexdigest()[:16]
        self._account_path = self._dir / f"account-{tag}.json"
        # Set by obtain() when its certificate is due at once (see _earliest_next).
        self._earliest: datetime.datetime | None = None

    @classmethod
    def from_config(cls, config: Config, state_dir: Path | str) -> AcmeCertificates:
        """The certificates ``config``'s acme options ask for (``acme_domains`` must be set)."""
        return cls(
            config.acme_domains,
            email=config.acme_email,
            directory=config.acme_directory,
            ca_file=config.acme_ca_file,
            http_port=config.acme_http_port,
            http_host=None,
            state_dir=state_dir,
        )

    def paths(self) -> tuple[str, str]:
        """Where the certificate (full chain, PEM) and its key (PEM, mode 0600) are kept."""
        return str(self._dir / _CERT_NAME), str(self._dir / _KEY_NAME)

    def _renewal_due(self) -> datetime.datetime | None:
        """When the kept certificate is due for renewal; None if there is none usable."""
        cert_path, key_path = self.paths()
        try:
            chain = x509.load_pem_x509_certificates(Path(cert_path).read_bytes())
            key = serialization.load_pem_private_key(Path(key_path).read_bytes(), password=None)
            leaf = chain[0]
            san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except (OSError, ValueError, TypeError, x509.ExtensionNotFound):
            return None
        names = {name.lower() for name in san.get_values_for_type(x509.DNSName)}
        # A crash between writing the key and the certificate leaves a pair that does not
        # match; it is replaced like a missing one.
        if not set(self.domains) <= names or key.public_key() != leaf.public_key():
            return None
        return leaf.not_valid_after_utc - self.renew_before

    def current(self) -> bool:
        """The kept certificate exists, matches its key, covers the domains and is not
        within ``renew_before`` of its expiry."""
        due = self._renewal_due()
        return due is not None and datetime.datetime.now(datetime.UTC) < due

    def _not_after(self) -> datetime.datetime:
        chain = x509.load_pem_x509_certificates(Path(self.paths()[0]).read_bytes())
        return chain[0].not_valid_after_utc

    # --- one order ---------------------------------------------------------------------------

    async def obtain(self) -> tuple[str, str]:
        """Order a certificate now, whatever the kept one; return :meth:`paths`.

        Raises AcmeError naming the step that failed and why.
        """
        step = "cannot fetch the ACME directory " + self.directory
        try:
            acme = await asyncio.to_thread(self._client)
            step = "cannot register the ACME account"
            account_key = await asyncio.to_thread(self._account, acme)
            key_pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            csr = crypto_util.make_csr(key_pem, list(self.domains))
            step = "cannot place the order"
            order = await asyncio.to_thread(self._new_order, acme, csr)
            answers: dict[str, str] = {}
            pending: list[tuple[messages.ChallengeBody, challenges.ChallengeResponse]] = []
            for authzr in order.authorizations:
                if authzr.body.status == messages.STATUS_VALID:
                    continue  # the CA still trusts an earlier validation of this name
                challb = next(
                    (c for c in authzr.body.challenges if isinstance(c.chall, challenges.HTTP01)),
                    None,
                )
                if challb is None:
                    raise AcmeError(
                        f"the CA offers no HTTP-01 challenge for {authzr.body.identifier.value}"
                    )
                response, validation = challb.response_and_validation(account_key)
                answers[challb.chall.path] = str(validation)
                pending.append((challb, response))
            step = "the order failed"
            runner = await self._answer(answers) if answers else None
            try:
                for challb, response in pending:
                    await asyncio.to_thread(acme.answer_challenge, challb, response)
                # The library compares its deadline with naive local time.
                deadline = datetime.datetime.now() + datetime.timedelta(seconds=self.order_timeout)
                order = await asyncio.to_thread(acme.poll_and_finalize, order, deadline)
            finally:
                if runner is not None:
                    await runner.cleanup()
            step = "cannot keep the certificate in " + str(self._dir)
            await asyncio.to_thread(self._store, key_pem, order.fullchain_pem.encode())
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            cause = describe(exc, timeout=self.timeout, order_timeout=self.order_timeout)
            # A CA's detail may span lines; the log and the CLI want one.
            message = " ".join(f"acme: {', '.join(self.domains)}: {step}: {cause}".split())
            raise AcmeError(message) from exc
        log.info(
            "acme: certificate for %s issued by %s, valid until %s",
            ", ".join(self.domains),
            self.directory,
            self._not_after().strftime("%Y-%m-%d %H:%M UTC"),
        )
        self._earliest = self._earliest_next()
        return self.paths()

    def _client(self) -> client.ClientV2:
        # requests takes a CA bundle's path where the library's signature says bool.
        verify: Any = self.ca_file or True
        net = client.ClientNetwork(
            None,
            alg=ES256,
            verify_ssl=verify,
            user_agent="tsunagu (acme-python)",
            timeout=math.ceil(self.timeout),
        )
        directory = client.ClientV2.get_directory(self.directory, net)
        # The key only once the CA answered: no account file for a directory never reached.
        net.key = self._account_key()
        return client.ClientV2(directory, net)

    def _account_key(self) -> JWK:
        saved = self._load_account()
        if saved.get("key"):
            private = serialization.load_pem_private_key(saved["key"].encode(), password=None)
            if not isinstance(private, ec.EllipticCurvePrivateKey):
                raise AcmeError(f"the ACME account key in {self._account_path} is not ECDSA")
            return JWKEC(key=private)
        private = ec.generate_private_key(ec.SECP256R1())
        pem = private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        self._save_account({"directory": self.directory, "key": pem.decode()})
        return JWKEC(key=private)

    def _load_account(self) -> dict[str, Any]:
        try:
            data = json.loads(self._account_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise AcmeError(f"cannot read the ACME account {self._account_path}: {exc}") from exc
        return data if isinstance(data, dict) else {}

    def _save_account(self, data: dict[str, Any]) -> None:
        self._dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        _write_private(self._account_path, json.dumps(data, indent=2).encode())

    def _account(self, acme: client.ClientV2) -> JWK:
        """Use the saved account, or register one (once) and save its URL."""
        saved = self._load_account()
        # The library's annotation names josepy's JWK through a path mypy cannot follow.
        key: JWK | None = acme.net.key
        assert key is not None
        if saved.get("uri"):
            acme.net.account = messages.RegistrationResource(
                uri=saved["uri"], body=messages.Registration()
            )
        else:
            self._register(acme, saved)
        return key

    def _register(self, acme: client.ClientV2, saved: dict[str, Any]) -> None:
        fields: dict[str, Any] = {"terms_of_service_agreed": True}
        if self.email:
            fields["email"] = self.email
        try:
            regr = acme.new_account(messages.NewRegistration.from_data(**fields))
            uri = regr.uri
        except errors.ConflictError as exc:
            # The CA knows this key already (the URL was lost): it answers with the account.
            uri = exc.location
            acme.net.account = messages.RegistrationResource(uri=uri, body=messages.Registration())
        self._save_account({**saved, "directory": self.directory, "uri": uri})
        log.info("acme: registered account %s with %s", uri, self.directory)

    def _new_order(self, acme: client.ClientV2, csr: bytes) -> messages.OrderResource:
        try:
            return acme.new_order(csr)
        except messages.Error as exc:
            # A CA that forgot the account (a test CA restarted, an account deactivated):
            # register the same key again, once.
            if exc.code not in ("accountDoesNotExist", "unauthorized"):
                raise
            log.warning("acme: the CA does not know the saved account (%s); registering", exc)
            self._register(acme, self._load_account())
            return acme.new_order(csr)

    async def _answer(self, answers: dict[str, str]) -> web.AppRunner:
        """Serve the key authorizations on ``http_port`` until the runner is cleaned up."""

        async def challenge(request: web.Request) -> web.Response:
            body = answers.get(request.path)
            log.info(
                "acme: HTTP-01 request %s from %s: %s",
                request.path,
                request.remote,
                "answered" if body is not None else "unknown token",
            )
            if body is None:
                return web.Response(status=404)
            return web.Response(text=body, content_type="text/plain")

        app = web.Application()
        app.router.add_get("/.well-known/acme-challenge/{token}", challenge)
        # The CA's validators hold no connection open for long; ending the order must not
        # wait the default minute for one.
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
        await runner.setup()
        try:
            await web.TCPSite(runner, self.http_host, self.http_port).start()
        except OSError as exc:
            await runner.cleanup()
            hint = " (ports below 1024 need CAP_NET_BIND_SERVICE)" if self.http_port < 1024 else ""
            raise AcmeError(
                f"cannot listen on port {self.http_port} for the HTTP-01 challenge:"
                f" {exc.strerror or exc}{hint}"
            ) from exc
        return runner

    def _store(self, key_pem: bytes, fullchain_pem: bytes) -> None:
        self._dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        cert_path, key_path = self.paths()
        # Key first: a crash in between leaves a pair that current() rejects, never a
        # certificate served with the wrong key.
        _write_private(Path(key_path), key_pem)
        _write_private(Path(cert_path), fullchain_pem)

    # --- renewal -----------------------------------------------------------------------------

    async def run(self, on_renewed: Callable[[str, str], Awaitable[None]]) -> None:
        """Renew forever: sleep until renewal is due, obtain, ``await on_renewed(cert, key)``.

        A failed order is logged with its cause and tried again after 1 minute, doubling up
        to 6 hours. Returns never; raises nothing but CancelledError.
        """
        delay = self.retry_first
        while True:
            now = datetime.datetime.now(datetime.UTC)
            due = self._renewal_due() or now
            if self._earliest is not None and due < self._earliest:
                due = self._earliest
            if due > now:
                await asyncio.sleep(min((due - now).total_seconds(), _WAKE_EVERY))
                continue
            try:
                cert, key = await self.obtain()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.error("%s; trying again in %s", exc, _duration(delay))
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.retry_max)
                continue
            delay = self.retry_first
            try:
                await on_renewed(cert, key)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("acme: the renewed certificate could not be put in service")

    def _earliest_next(self) -> datetime.datetime | None:
        """A certificate just obtained but not current would be renewed again at once, and
        again: when ``renew_before`` exceeds what the CA issues, :meth:`run` waits for two
        thirds of the new certificate's lifetime instead."""
        if self.current():
            return None
        now = datetime.datetime.now(datetime.UTC)
        remaining = self._not_after() - now
        log.warning(
            "acme: renew_before (%s) is longer than the new certificate's remaining lifetime"
            " (%s); renewing at two thirds of it instead",
            self.renew_before,
            remaining,
        )
        # Short-lived certificates (a test CA's) renew at two thirds too; the floor only
        # keeps an already expired one from being ordered in a tight loop.
        return now + max(remaining * 2 / 3, datetime.timedelta(seconds=_SHORTEST_WAIT))


def _duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:g} h"
    return f"{seconds / 60:g} min" if seconds >= 60 else f"{seconds:g} s"
