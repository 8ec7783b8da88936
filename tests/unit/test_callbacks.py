"""The callback allow-list (composition/callbacks.py): what it admits and what it refuses."""

from __future__ import annotations

import pytest

from composition.callbacks import CallbackRefused, check_callback_url


@pytest.mark.parametrize(
    "url, allow",
    [
        ("https://hooks.example.com/x", ["hooks.example.com"]),
        ("https://HOOKS.example.com./x", ["hooks.example.com"]),
        ("https://h.example:8443/", ["h.example:8443"]),
        ("http://127.0.0.1:8080/h/a/b", ["http://127.0.0.1:8080/h/"]),
        ("http://127.0.0.1:8080/h", ["http://127.0.0.1:8080/h"]),
        ("http://127.0.0.1:8080/h/sub", ["http://127.0.0.1:8080/h"]),
        ("http://127.0.0.1:8080/h/", ["other.example", "http://127.0.0.1:8080/h/"]),
    ],
)
def test_allowed_callbacks_are_admitted(url: str, allow: list[str]) -> None:
    assert check_callback_url(url, allow) == url


@pytest.mark.parametrize(
    "url, allow, reason",
    [
        ("https://hooks.example.com.evil.com/x", ["hooks.example.com"], "not on the callback allow-list"),
        ("https://evil.com/?hooks.example.com", ["hooks.example.com"], "not on the callback allow-list"),
        ("https://hooks.example.com:444/", ["hooks.example.com"], "port 444"),
        ("http://127.0.0.1:8080/h-evil", ["http://127.0.0.1:8080/h"], "not on the callback allow-list"),
        ("http://127.0.0.1:8080/h/../admin", ["http://127.0.0.1:8080/h/"], "not on the callback allow-list"),
        ("http://127.0.0.1:8080/h/%2e%2e/admin", ["http://127.0.0.1:8080/h/"], "must not encode"),
        ("https://127.0.0.1:8080/h/", ["http://127.0.0.1:8080/h/"], "not on the callback allow-list"),
        ("https://u:p@hooks.example.com/", ["hooks.example.com"], "credentials"),
        ("ftp://hooks.example.com/", ["hooks.example.com"], "http or https"),
        ("file:///etc/passwd", ["hooks.example.com"], "http or https"),
        ("https:///nohost", ["hooks.example.com"], "no host"),
        ("https://hooks.example.com/a b", ["hooks.example.com"], "whitespace"),
        ("https://hooks.example.com:99999/", ["hooks.example.com"], "not a valid URL"),
        ("https://hooks.example.com/" + "a" * 3000, ["hooks.example.com"], "longer than"),
        ("https://hooks.example.com/", [], "callbacks are off"),
    ],
)
def test_other_callbacks_are_refused_with_the_reason(url: str, allow: list[str], reason: str) -> None:
    with pytest.raises(CallbackRefused, match=reason):
        check_callback_url(url, allow)
