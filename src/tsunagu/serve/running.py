"""What one worker runs with and what a reload changes in it: the configuration in force,
the certificate in service (reloaded, or renewed by ACME), and SIGHUP's reload."""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..config import Config, ConfigError, state_dir
from ..logs import set_log_level, structured
from ..workers import WorkerShare
from .settings import certificate_hosts, rest_secrets, with_worker_count
from .turn_side import TurnSide

if TYPE_CHECKING:
    from ..acme_certificates import AcmeCertificates
    from ..config_reload import ReloadPlan
    from ..tls import ServingCertificate, TlsMaterial

log = logging.getLogger("tsunagu")


@dataclass
class Running:
    """What one worker runs with and what a reload changes in it."""

    config: Config
    share: WorkerShare
    listening: list[str]
    certificate: ServingCertificate | None = None
    turn: TurnSide | None = None
    web: Any = None
    """The web app's runner, in worker 0."""
    endpoint: Any = None
    """Worker 0's admin endpoint, which reaches every worker."""

    def material(self, config: Config) -> TlsMaterial:
        """The certificate ``config`` names (or ACME keeps, or the generated one), read
        from disk again: a renewed file under the same name is what a reload is usually for."""
        from ..tls import ensure_certificate

        hosts = certificate_hosts(config, self.listening)
        if config.acme_domains:
            from ..acme_certificates import AcmeCertificates

            cert, key = AcmeCertificates.from_config(config, state_dir()).paths()
            if os.path.exists(cert) and os.path.exists(key):
                return ensure_certificate(cert, key, hosts, state_dir())
            # Not obtained yet (the CA did not answer at start): the generated one serves
            # until the certificate arrives, rather than no TLS at all.
        return ensure_certificate(config.cert, config.pkey, hosts, state_dir())

    def reload_certificate(self) -> dict[str, Any]:
        """Load the running configuration's certificate from its files again (renewed)."""
        if self.certificate is None:
            return {}
        try:
            material = self.material(self.config)
            self.certificate.replace(material)
        except ConfigError as exc:
            log.error("the TLS certificate stays as it was: %s", exc)
            return {"error": str(exc), "certificate": self.certificate.material.sha256_fingerprint}
        return {"certificate": material.sha256_fingerprint}

    def check(self, config: Config) -> None:
        """Raise ConfigError if ``config`` cannot be applied (a certificate that does not
        load), before any worker changes anything."""
        if self.certificate is not None:
            from ..tls import server_ssl_context

            server_ssl_context(self.material(config))

    async def reconfigure(self, config: Config) -> dict[str, Any]:
        """Apply ``config`` (already planned by :func:`~tsunagu.config_reload.reload_plan`)
        in this worker; what it did, for reload's answer."""
        set_log_level(config.effective_log_level)
        self.config = config
        done: dict[str, Any] = {"error": "", **self.reload_certificate()}
        secrets = rest_secrets(config, self.share)
        if self.turn is not None:
            self.turn.reconfigure(config, secrets)
        if self.web is not None:
            from ..signaling.server import reconfigure

            reconfigure(self.web, config, None if config.no_turn else secrets[0])
        return done


def prepare_reload(running: Running, reread: Callable[[], Config]) -> ReloadPlan:
    """Read the configuration again and plan the reload; raise ConfigError, with nothing
    changed anywhere, if the new configuration is not valid or cannot be applied."""
    from ..config_reload import reload_plan

    plan = reload_plan(running.config, with_worker_count(reread()))
    running.check(plan.config)
    return plan


async def acme_at_start(config: Config) -> AcmeCertificates:
    """The ACME certificates, obtained now unless a current one is kept from before. A CA
    that cannot give one now does not stop the start: the generated certificate serves
    meanwhile, and :meth:`AcmeCertificates.run` keeps trying."""
    from ..acme_certificates import AcmeCertificates

    acme = AcmeCertificates.from_config(config, state_dir())
    if acme.current():
        log.info(
            "acme: the certificate for %s kept from before is current", ", ".join(acme.domains)
        )
        return acme
    log.info("acme: ordering a certificate for %s from %s", ", ".join(acme.domains), acme.directory)
    try:
        await acme.obtain()
    except Exception as exc:  # every failure is the CA's or the network's: keep serving
        log.error(
            "%s; serving a self-signed certificate meanwhile, and trying again",
            exc,
            extra=structured({"event": "acme", "cause": "certificate not obtained"}),
        )
    else:
        log.info("acme: certificate for %s obtained", ", ".join(acme.domains))
    return acme


async def keep_acme_current(acme: AcmeCertificates, running: Running) -> None:
    """Renew before expiry and put each renewed certificate in service in every worker."""

    async def renewed(cert: str, key: str) -> None:
        if running.endpoint is not None:
            await running.endpoint.certificate_renewed()
        else:
            running.reload_certificate()

    await acme.run(renewed)


async def reload_on_signal(handler: Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]) -> None:
    """SIGHUP (systemd's ``ExecReload``): what ``tsunagu reload`` does, through the same
    admin request, and its outcome in the log."""
    log.info("SIGHUP: reloading, as tsunagu reload does")
    try:
        answer = await handler({"command": "reload"})
    except Exception:
        log.exception("SIGHUP: reload failed")
        return
    if answer.get("ok") is not True:
        return  # refused, and the reason logged, by the handler
    missing = answer.get("not_answering") or []
    errors = [
        f"worker {part['worker']}: {part['user_database']['error']}"
        for part in answer.get("per_worker", [])
        if part.get("user_database") and part["user_database"].get("error")
    ]
    log.info(
        "SIGHUP: reload done: %d workers answered%s%s",
        len(answer.get("per_worker", [])),
        f", {len(missing)} did not" if missing else "",
        f"; {'; '.join(errors)}" if errors else "",
    )
