"""console/actions.py's list helpers, as every page uses them: the next-page
link keeps the filters a person set (not the empty ones, not the old page
token), and a filter outside its bounds names itself."""

from __future__ import annotations

import pytest

from console.actions import BadFilter, choice_filter, next_page_link, tenant_filter, text_filter


def test_the_next_page_link_keeps_the_filters_set_and_replaces_the_token() -> None:
    params = {"tenant": "acme", "status": "", "page_token": "old", "outcome": "deny"}
    assert next_page_link("/cases", params, "t2") == (
        "/cases?tenant=acme&outcome=deny&page_token=t2"
    )
    assert next_page_link("/ledger/a%20b/accounts/x", {"as_of": "2026-12-06 14:00"}, "n") == (
        "/ledger/a%20b/accounts/x?as_of=2026-12-06+14%3A00&page_token=n"
    )


def test_the_last_page_has_no_next_link() -> None:
    assert next_page_link("/cases", {"tenant": "acme"}, "") == ""


def test_a_choice_defaults_when_empty_and_names_itself_when_unknown() -> None:
    statuses = ("open", "claimed", "resolved", "all")
    assert choice_filter({}, "status", statuses, "open") == "open"
    assert choice_filter({"status": ""}, "status", statuses, "open") == "open"
    assert choice_filter({"status": "all"}, "status", statuses, "open") == "all"
    # "" among the choices (deliveries: any status) is "any", not named as a choice.
    assert choice_filter({}, "status", ("", "dead"), "") == ""
    with pytest.raises(BadFilter) as bad:
        choice_filter({"status": "gone"}, "status", ("", "pending", "dead"), "")
    assert bad.value.field == "status"
    assert str(bad.value) == "status must be one of pending, dead"


def test_a_text_filter_is_stripped_and_bounded() -> None:
    assert text_filter({"endpoint": "  https://x  "}, "endpoint", 12) == "https://x"
    assert tenant_filter({}) == ""
    with pytest.raises(BadFilter) as bad:
        tenant_filter({"tenant": "t" * 129})
    assert (bad.value.field, str(bad.value)) == ("tenant", "tenant is too long")
    assert tenant_filter({"tenant": "t" * 128}) == "t" * 128
