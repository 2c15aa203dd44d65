"""Configuration reaches the TURN core's settings."""

from __future__ import annotations

from tsunagu.config import load_config
from tsunagu.serve import settings_from_config


def test_flags_reach_the_core() -> None:
    settings = settings_from_config(
        load_config(
            [
                "--strict-channel-numbers",
                "--stun-backward-compatibility",
                "--user-quota",
                "3",
                "-X",
                "203.0.113.10/10.0.0.10",
                "--alternate-server",
                "198.51.100.1:3478",
            ]
        )
    )
    assert settings.strict_channel_numbers and settings.rfc3489_compat
    assert settings.user_quota == 3
    assert settings.external_ips == (("203.0.113.10", "10.0.0.10"),)
    assert settings.alternate_servers == (("198.51.100.1", 3478),)
    assert not settings_from_config(load_config([])).strict_channel_numbers
