"""coturn's configuration file format (``turnserver.conf``), read into tsunagu's option keys.

So that a coturn installation can move to tsunagu by pointing ``tsunagu serve -c`` at its
existing file, the file is read the way coturn reads it:

* one option a line; blank lines and lines whose first non-blank character is ``#`` are
  skipped (a ``#`` later in a line is part of the value, as in coturn);
* the name runs up to the first space, tab or ``=``; any run of those follows, and the rest
  of the line, trailing blanks removed, is the value: ``name=value``, ``name = value`` and
  ``name value`` are the same;
* a value opening with a double quote loses it, and its closing one;
* an on/off option may stand alone (on) or take ``1``/``0``, ``yes``/``no``, ``true``/
  ``false``, ``on``/``off`` (coturn judges by the first letter: ``y``, ``t`` or a digit
  other than 0 is on; ``n``, ``f`` or ``0`` is off);
* a list option (``listening-ip``, ``user``, ``denied-peer-ip``...) may be repeated, and
  every line adds an entry; any other option given twice keeps its last value.

Names are coturn's long option names, which tsunagu's flags follow wherever tsunagu has the
option, so most map by name; the tables below hold the few that differ. What a name maps to
comes from the caller (``options``), so an option tsunagu gains later is read from coturn
files with no change here. Names tsunagu has no use for are collected in ``ignored``, each
once, for one warning; never an error, so that a real ``turnserver.conf`` starts.

This module is pure: text in, keys and values out. It imports nothing of tsunagu, and the
values it returns are strings and booleans for :mod:`tsunagu.config` to check like any
other; its errors carry the line, and never a value (values hold passwords and secrets).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final, Literal

__all__ = [
    "CoturnConfig",
    "CoturnConfigError",
    "Option",
    "Setting",
    "has_toml_constructs",
    "read_coturn_config",
    "reads_as_coturn",
]

Kind = Literal["flag", "value", "list"]


@dataclass(frozen=True, slots=True)
class Option:
    """What a name in the file sets: the tsunagu key and how it takes a value."""

    key: str
    kind: Kind


@dataclass(frozen=True, slots=True)
class Setting:
    """One line that set a tsunagu key: the name as written there, its line, and the value
    (``True``/``False`` for an on/off option, else the text)."""

    key: str
    value: str | bool = field(repr=False)
    name: str
    line: int


@dataclass(frozen=True, slots=True)
class CoturnConfig:
    """What a coturn file says in tsunagu's terms."""

    settings: tuple[Setting, ...]
    """Every line that sets a tsunagu key, in file order."""
    kinds: Mapping[str, Kind]
    ignored: tuple[str, ...]
    """coturn option names tsunagu does not honour, each once, in file order."""
    notes: tuple[str, ...]
    """Other things the operator should hear about (lines left out, and why)."""

    @property
    def values(self) -> dict[str, str | bool | list[str]]:
        """Key -> value: every entry of a list option, the last value of any other."""
        out: dict[str, str | bool | list[str]] = {}
        for setting in self.settings:
            if self.kinds[setting.key] == "list":
                entries = out.setdefault(setting.key, [])
                assert isinstance(entries, list)
                entries.append(str(setting.value))
            else:
                out[setting.key] = setting.value
        return out

    def last(self, key: str) -> Setting | None:
        """The line that decided ``key`` (for a list, its last entry)."""
        found = [setting for setting in self.settings if setting.key == key]
        return found[-1] if found else None


class CoturnConfigError(ValueError):
    """A line that cannot be taken. ``str()`` names the option, never its value."""

    def __init__(self, line: int, name: str, message: str) -> None:
        super().__init__(f"{name}: {message}")
        self.line = line
        self.name = name


# coturn names whose tsunagu option has another name: coturn name -> (tsunagu name, whether
# the on/off value is inverted).
_RENAMED: Final[dict[str, tuple[str, bool]]] = {
    # coturn's "extra verbose"; tsunagu's verbose already logs everything.
    "Verbose": ("verbose", False),
    # tsunagu's one switch covers both: answering Binding requests without the magic cookie
    # (RFC 3489) and sending MAPPED-ADDRESS.
    "rfc3489-compatibility": ("stun-backward-compatibility", False),
    # coturn is strict unless told; tsunagu accepts RFC 5766's wider range unless told.
    "rfc5766-channel-numbers": ("strict-channel-numbers", True),
    # coturn's aliases of its database options.
    "db": ("userdb", False),
    "sql-userdb": ("psql-userdb", False),
    "prometheus-address": ("prometheus-ip", False),
}

# coturn's switch that turns its exporter on, on this port unless prometheus-port says.
_PROMETHEUS_PORT: Final = "9641"

# On/off options asking for what tsunagu always does: silent when they ask for it (the
# value here), named among the ignored when they ask for the opposite.
_ALWAYS: Final[dict[str, bool]] = {
    "lt-cred-mech": True,  # long-term credentials are tsunagu's only mechanism
    "fingerprint": True,  # every response carries FINGERPRINT
    "no-multicast-peers": True,  # the peer policy denies multicast
    "no-loopback-peers": True,  # and loopback (older coturn's option)
    "response-origin-only-with-rfc5780": True,
}

# Options coturn lets stand without a value to mean its default, which is tsunagu's too.
_OPTIONAL_VALUE: Final = frozenset(
    {"stale-nonce", "max-allocate-lifetime", "channel-lifetime", "permission-lifetime"}
)

# coturn's log-file values that are not file names.
_LOG_TO_STDOUT: Final = frozenset({"stdout", "-"})

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*\Z")
_SEPARATORS = " \t="


def _split(line: str) -> tuple[str, str]:
    """``name`` and ``value`` of a stripped, non-comment line ("" when bare)."""
    end = next((i for i, c in enumerate(line) if c in _SEPARATORS), len(line))
    name, value = line[:end], line[end:].lstrip(_SEPARATORS)
    if value.startswith('"'):
        value = value[1:].rstrip()
        if value.endswith('"'):
            value = value[:-1]
    return name, value


def _lines(text: str) -> list[tuple[int, str]]:
    out = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if line and not line.startswith("#"):
            out.append((number, line))
    return out


def _toml_only(line: str, value: str) -> bool:
    """A ``[table]`` header, or an array or inline table value: TOML's, never coturn's (an
    ``[ipv6]:port`` value is coturn's)."""
    if line.startswith("[") or value.startswith("{"):
        return True
    return value.startswith("[") and (value.endswith("]") or "]:" not in value)


def has_toml_constructs(text: str) -> bool:
    """Whether ``text`` has a line only TOML writes: a table header, an array or an inline
    table."""
    return any(_toml_only(line, _split(line)[1]) for _, line in _lines(text))


def reads_as_coturn(text: str) -> bool:
    """Whether every option line of ``text`` is a coturn line (a name, then perhaps a
    value) and none is TOML's own."""
    for _, line in _lines(text):
        name, value = _split(line)
        if not _NAME.match(name) or _toml_only(line, value):
            return False
    return True


def _on(value: str) -> bool | None:
    """coturn's reading of an on/off value; None when it is neither."""
    if not value:
        return True
    if value[0] in "0nNfF":
        return False
    if value[0] in "yYtT123456789":
        return True
    if value in ("on", "ON", "On"):
        return True
    if value in ("off", "OFF", "Off"):
        return False
    return None


_BAD_SWITCH = "must be on or off (1/0, yes/no, true/false), or stand alone for on"


@dataclass
class _Reader:
    options: Mapping[str, Option]
    settings: list[Setting] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    no_auth: int = 0
    stun_only: bool = False
    first_secret: int = 0
    prometheus: int = 0

    def ignore(self, name: str) -> None:
        if name not in self.ignored:
            self.ignored.append(name)

    def lookup(self, name: str) -> tuple[Option, bool] | None:
        """The option ``name`` sets, and whether its on/off value is inverted."""
        target, inverted = _RENAMED.get(name, (name, False))
        target = target.replace("_", "-")
        option = self.options.get(target)
        if option is not None:
            return option, inverted
        if target.startswith("no-"):
            # coturn's "no-X" where tsunagu has the switch X (no-rfc5780,
            # no-software-attribute, no-stun-backward-compatibility).
            option = self.options.get(target[3:])
            if option is not None and option.kind == "flag" and not option.key.startswith("no_"):
                return option, not inverted
        return None

    def switch(self, number: int, name: str, value: str) -> bool:
        on = _on(value)
        if on is None:
            raise CoturnConfigError(number, name, _BAD_SWITCH)
        return on

    def read(self, number: int, line: str) -> None:
        name, value = _split(line)
        if not _NAME.match(name):
            # Not echoed: a stray line may be a password pasted on its own.
            self.notes.append(f"line {number} is not an option line and was left out")
            return
        if line.endswith(";"):
            self.notes.append(
                f"line {number} ({name}) ends with ';', which is taken as part of the value"
            )
        if name == "no-auth":
            if self.switch(number, name, value):
                self.no_auth = self.no_auth or number
            return
        if name == "prometheus":
            self.prometheus = number if self.switch(number, name, value) else 0
            return
        if name in _ALWAYS:
            if self.switch(number, name, value) != _ALWAYS[name]:
                self.ignore(name)
            return
        if name == "log-file" and value in _LOG_TO_STDOUT:
            return  # tsunagu logs to standard error unless given a file
        if name == "log-file" and value == "syslog":
            self.ignore("log-file (syslog)")
            return
        found = self.lookup(name)
        if found is None:
            self.ignore(name)
            return
        option, inverted = found
        if option.kind == "flag":
            on = self.switch(number, name, value)
            self.settings.append(Setting(option.key, on != inverted, name, number))
            if option.key == "stun_only":
                self.stun_only = on != inverted
            return
        if not value:
            if name in _OPTIONAL_VALUE:
                return
            raise CoturnConfigError(number, name, "needs a value")
        if name == "user" and value.partition(":")[2].startswith("0x"):
            # turnadmin -k's key (an MD5 of name, realm and password): tsunagu keeps
            # passwords and derives keys itself, so the entry cannot be used.
            user = value.partition(":")[0]
            self.notes.append(
                f"line {number}: user {user!r} is given as a 0x key, which tsunagu cannot"
                " use; the user is left out (give name:password)"
            )
            return
        if name == "static-auth-secret" and not self.first_secret:
            self.first_secret = number
        self.settings.append(Setting(option.key, value, name, number))


def read_coturn_config(text: str, options: Mapping[str, Option]) -> CoturnConfig:
    """Read a coturn configuration file's ``text``.

    ``options`` maps the names tsunagu takes (dashed: ``listening-ip``, ``min-port``) to
    what they set. Raises :class:`CoturnConfigError` for a line tsunagu cannot take: a bad
    on/off value, an option without its value, and ``no-auth`` (tsunagu always
    authenticates TURN; with ``stun-only`` there is nothing to authenticate and it is
    accepted).
    """
    reader = _Reader(options)
    for number, line in _lines(text):
        reader.read(number, line)
    if reader.no_auth and not reader.stun_only:
        raise CoturnConfigError(
            reader.no_auth,
            "no-auth",
            "tsunagu always authenticates TURN with long-term credentials: remove no-auth and"
            " give user=name:password or static-auth-secret, or set stun-only",
        )
    secret_switch = options.get("use-auth-secret")
    if reader.first_secret and secret_switch is not None:
        # As in coturn, a static-auth-secret turns on TURN REST credentials only.
        implied = Setting(secret_switch.key, True, "static-auth-secret", reader.first_secret)
        reader.settings.append(implied)
    port = options.get("prometheus-port")
    if reader.prometheus and port is not None:
        if not any(setting.key == port.key for setting in reader.settings):
            reader.settings.append(
                Setting(port.key, _PROMETHEUS_PORT, "prometheus", reader.prometheus)
            )
        if not any(setting.name == "prometheus-address" for setting in reader.settings):
            reader.notes.append(
                f"line {reader.prometheus}: prometheus: the metrics are served on loopback,"
                " where coturn serves them on every address; give prometheus-address to"
                " choose"
            )
    kinds = {option.key: option.kind for option in options.values()}
    return CoturnConfig(tuple(reader.settings), kinds, tuple(reader.ignored), tuple(reader.notes))
