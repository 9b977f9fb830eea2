"""Sanctions screening: fuzzy name matching against a consolidated list.

Lists are read in the format of the US Treasury OFAC SDN list files
(`SDN.CSV`: ent_num, SDN_Name, SDN_Type, Program, Title, Call_Sign, Vess_type,
Tonnage, GRT, Vess_flag, Vess_owner, Remarks, no header, "-0-" for empty; and
`ALT.CSV`: ent_num, alt_num, alt_type, alt_name, alt_remarks), so the real
published files load unchanged. Names are normalised (case, accents,
punctuation) and compared with rapidfuzz's token_sort_ratio, which ignores word
order ("DOE, John" and "John Doe" score 100). A score at or above the hit
threshold is a hit; at or above the possible-match threshold, a possible match.
Below that the best score is still reported (a near miss), naming no entry.
"""

from __future__ import annotations

import csv
import io
import re
import unicodedata
from dataclasses import dataclass

from rapidfuzz import fuzz, process

from policy_plane.model import PaymentInput, Screening
from triplane.runtime.errors import InvalidArgument

_NON_WORD = re.compile(r"[^\w\s]+")
_SPACES = re.compile(r"\s+")
_EMPTY = "-0-"
MATCH_MEMO_ENTRIES = 100_000


def normalise_name(name: str) -> str:
    """Case-folded, accents stripped, punctuation removed, spaces collapsed."""
    decomposed = unicodedata.normalize("NFKD", name)
    stripped = "".join(c for c in decomposed if not unicodedata.combining(c))
    return _SPACES.sub(" ", _NON_WORD.sub(" ", stripped.casefold())).strip()


@dataclass(frozen=True, slots=True)
class SanctionsEntry:
    entry_id: str
    name: str
    entry_type: str
    program: str


def _rows(text: str, field: str) -> list[list[str]]:
    try:
        return [row for row in csv.reader(io.StringIO(text)) if row and any(c.strip() for c in row)]
    except csv.Error as exc:
        raise InvalidArgument("SANCTIONS_LIST_UNREADABLE", f"sanctions list: {exc}", field) from exc


def _check_list_bounds(
    count: int, name: str, number: int, max_entries: int, max_name_length: int, field: str
) -> None:
    """A list's entries (names or aliases) and each name's length are bounded:
    every name is compared with every screened party, at a cost that grows
    with both lengths."""
    if count > max_entries:
        raise InvalidArgument(
            "SANCTIONS_LIST_TOO_LARGE", f"more than {max_entries} sanctions entries", field
        )
    if len(name) > max_name_length:
        raise InvalidArgument(
            "SANCTIONS_NAME_TOO_LONG",
            f"sanctions list line {number}: a name of {len(name)} characters, "
            f"over {max_name_length}",
            field,
        )


def parse_sdn_csv(
    text: str, max_entries: int, max_name_length: int, field: str = "sanctions_list_csv"
) -> list[SanctionsEntry]:
    entries: list[SanctionsEntry] = []
    for number, row in enumerate(_rows(text, field), start=1):
        if len(row) < 4:
            raise InvalidArgument(
                "SANCTIONS_LIST_UNREADABLE",
                f"sanctions list line {number}: expected the SDN.CSV columns "
                "(ent_num, SDN_Name, SDN_Type, Program, ...)",
                field,
            )
        clean = ["" if c.strip() == _EMPTY else c.strip() for c in row]
        entries.append(SanctionsEntry(clean[0], clean[1], clean[2], clean[3]))
        _check_list_bounds(len(entries), clean[1], number, max_entries, max_name_length, field)
    return entries


def parse_alt_csv(
    text: str, max_entries: int, max_name_length: int, field: str = "sanctions_aliases_csv"
) -> list[tuple[str, str]]:
    """(ent_num, alias name) pairs."""
    aliases: list[tuple[str, str]] = []
    for number, row in enumerate(_rows(text, field), start=1):
        if len(row) < 4:
            raise InvalidArgument(
                "SANCTIONS_LIST_UNREADABLE",
                f"aliases line {number}: expected the ALT.CSV columns "
                "(ent_num, alt_num, alt_type, alt_name, ...)",
                field,
            )
        aliases.append((row[0].strip(), row[3].strip()))
        _check_list_bounds(
            len(aliases), aliases[-1][1], number, max_entries, max_name_length, field
        )
    return aliases


class Screener:
    """Screens the parties of a payment. Immutable once built."""

    def __init__(
        self,
        entries: list[SanctionsEntry],
        aliases: list[tuple[str, str]],
        hit_threshold: float,
        possible_match_threshold: float,
        blocked_countries: frozenset[str],
    ) -> None:
        assert 0 < possible_match_threshold <= hit_threshold <= 100
        by_id = {e.entry_id: e for e in entries}
        names: list[str] = []
        owners: list[SanctionsEntry] = []
        for entry in entries:
            names.append(normalise_name(entry.name))
            owners.append(entry)
        for entry_id, alias in aliases:
            owner = by_id.get(entry_id)
            if owner is not None and alias:
                names.append(normalise_name(alias))
                owners.append(owner)
        self._names = names
        self._owners = owners
        self.hit_threshold = hit_threshold
        self.possible_match_threshold = possible_match_threshold
        self.blocked_countries = blocked_countries
        self.entry_count = len(entries)
        # Names repeat (a customer pays many times; replay re-screens history):
        # memoise the pure match, bounded so memory cannot grow without limit.
        self._memo: dict[str, tuple[float, SanctionsEntry | None]] = {}

    def match(self, name: str) -> tuple[float, SanctionsEntry | None]:
        """Best score (0-100) of `name` against the list, with its entry."""
        found = self._memo.get(name)
        if found is None:
            found = self._match(name)
            if len(self._memo) >= MATCH_MEMO_ENTRIES:
                self._memo.clear()
            self._memo[name] = found
        return found

    def _match(self, name: str) -> tuple[float, SanctionsEntry | None]:
        # No cutoff: the best score is reported even below the possible-match
        # threshold (a near miss at 75 tells a reviewer or a rule more than 0).
        query = normalise_name(name)
        if not query or not self._names:
            return 0.0, None
        _, score, index = process.extractOne(
            query, self._names, scorer=fuzz.token_sort_ratio, processor=None
        )
        return float(score), self._owners[index]

    def screen(self, payment: PaymentInput, kyc_country: str) -> Screening:
        best_score, best_entry = 0.0, None
        for party in (payment.customer, payment.counterparty):
            score, entry = self.match(party.name)
            if entry is not None and score > best_score:
                best_score, best_entry = score, entry
        # The entry is named only when it matched: a near miss is a score, not
        # an accusation.
        if best_score < self.possible_match_threshold:
            best_entry = None
        countries = {payment.customer.country, payment.counterparty.country, kyc_country}
        return Screening(
            hit=best_score >= self.hit_threshold,
            possible_match=self.possible_match_threshold <= best_score < self.hit_threshold,
            best_score=round(best_score, 4),
            matched_entry_id=best_entry.entry_id if best_entry else "",
            matched_name=best_entry.name if best_entry else "",
            country_blocked=bool(countries & self.blocked_countries),
        )
