"""Logged-in clients in each role, and the NBD server row the pages show."""

from __future__ import annotations

import pytest
from django.test import Client

from exports.models import NbdServerState
from tests.support.factories import UserFactory, client_as


@pytest.fixture
def operator(make_user: UserFactory) -> Client:
    return client_as(make_user("operator"))


@pytest.fixture
def viewer(make_user: UserFactory) -> Client:
    return client_as(make_user("viewer"))


@pytest.fixture
def nbd_state(db: None) -> NbdServerState:
    return NbdServerState.objects.create(
        backend="nbdkit", version="1.32.5", address="127.0.0.1:10809", health="ok", exports_expected=4, exports_served=4
    )
