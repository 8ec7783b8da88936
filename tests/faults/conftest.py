"""Fixtures of the fault tier: the webhook receiver every fault stack delivers to."""

from __future__ import annotations

import pytest

from tests.webhook import Webhook


@pytest.fixture
def hook():
    """A real HTTP receiver on 127.0.0.1 that answers 200 at once and records every POST."""
    with Webhook() as h:
        yield h
