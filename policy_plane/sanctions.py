"""Sanctions screening: name matching against a consolidated list.

Lists are read in the format of the US Treasury OFAC SDN list files
(`SDN.CSV`: ent_num, SDN_Name, SDN_Type, Program, Title, Call_Sign, Vess_type,
Tonnage, GRT, Vess_flag, Vess_owner, Remarks, no header, "-0-" for empty; and
`ALT.CSV`: ent_num, alt_num, alt_type, alt_name, alt_remarks), so the real
published files load unchanged.

Two matchers, named by the bundle's source (`BundleSource.sanctions_matcher`):

- `name_parts` (every bundle loaded from this release on) compares names the
  way a compliance officer reads them. A name is cut into parts after
  transliteration to Latin letters with `anyascii` (Cyrillic, Greek, Arabic,
  Hebrew, Chinese characters one syllable each, Hangul), titles dropped and
  particles joined to what follows (`Al-Rashid`, `Al Rashid` and `Alrashid`
  are one part). Parts match in any order (family name first or last), two
  adjacent parts match one (`Wei Ming` / `Weiming`), and a part matches
  another when they are equal, equal after common spelling swaps (k/q/c, w/v,
  ph/f, z/s, x/ks, kh/h, -off/-ov, doubled letters, y/i), equal with their
  vowels folded (Mohammed / Muhammad, Olena / Elena), equal in their
  consonants when one side was written in an abjad (Arabic or Hebrew script
  writes no short vowels), or close in spelling. The score (0-100) is the
  share of the screened name that matched, weighted by how much of the listed
  name it covers, and it stays below 70 unless the match includes the listed
  family name and a given name (for an individual; the part before the comma
  in the list) or most of an entity's distinctive words: a common given name,
  or a family name alone, is never a match. All keys of the list are computed
  once, when the bundle loads; a screening looks up the candidates sharing a
  key with the name and scores a bounded number of them.
- `token_sort` (bundles stored before matchers had names): rapidfuzz's
  token_sort_ratio of the normalised name against each listed name, kept so
  that replaying those bundles' decisions stays bit for bit.

A score at or above the hit threshold is a hit; at or above the
possible-match threshold, a possible match. Below that the best score is
still reported (a near miss), naming no entry.
"""

from __future__ import annotations

import csv
import io
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache

from anyascii import anyascii
from rapidfuzz import fuzz, process

from policy_plane.model import PaymentInput, Screening
from triplane.runtime.errors import InvalidArgument

_NON_WORD = re.compile(r"[^\w\s]+")
_SPACES = re.compile(r"\s+")
_EMPTY = "-0-"
MATCH_MEMO_ENTRIES = 100_000

# The matchers a bundle source may name (see the module docstring).
MATCHER_NAME_PARTS = "name_parts"
MATCHER_TOKEN_SORT = "token_sort"
MATCHERS = (MATCHER_NAME_PARTS, MATCHER_TOKEN_SORT)


def normalise_name(name: str) -> str:
    """Case-folded, accents stripped, punctuation removed, spaces collapsed
    (the `token_sort` matcher's normal form)."""
    decomposed = unicodedata.normalize("NFKD", name)
    stripped = "".join(c for c in decomposed if not unicodedata.combining(c))
    return _SPACES.sub(" ", _NON_WORD.sub(" ", stripped.casefold())).strip()


@dataclass(frozen=True, slots=True)
class SanctionsEntry:
    entry_id: str
    name: str
    entry_type: str
    program: str

    @property
    def individual(self) -> bool:
        return self.entry_type.casefold() == "individual"


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


# ---------------------------------------------------------------- name parts

# Chinese characters and Hangul syllables are one syllable each: anyascii
# writes them run together ("ZhaoWeiMing"), so each is spaced out first.
_SYLLABIC = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af]")
# Scripts that write no short vowels: their parts also match on consonants.
_ABJAD = re.compile(
    r"[\u0590-\u05ff\u0600-\u06ff\u0700-\u074f\u0750-\u077f\u08a0-\u08ff\ufb1d-\ufdff\ufe70-\ufeff]"
)
_APOSTROPHES = re.compile(r"['\u2018\u2019\u02bc\u02bb`\u00b4]")
_LETTERS = re.compile(r"[a-z0-9]+")
_VOWELS = re.compile(r"[aeiou]+")
_VOWELS_Y = re.compile(r"[aeiouy]")
_DOUBLES = re.compile(r"(.)\1+")


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


# Words that say who someone is, not which one: dropped.
TITLES = _words(
    "mr mrs ms miss mx dr prof sir dame lord lady sheikh shaikh sheik haji hajji hadji "
    "jr sr ii iii iv"
)
# Joined to the part that follows them: "al rashid", "al-rashid" and
# "alrashid" are one part (whose core, "rashid", also matches).
PARTICLES = _words(
    "al el ul as ash ad ar at az abd abdel abdul abu bin ibn bint "
    "van von der den de del della di da dos das du mac mc st"
)
# An entity's legal form says nothing about which entity it is.
LEGAL_FORMS = _words(
    "llc ltd limited co company inc incorporated corp corporation plc gmbh ag sa sas sarl "
    "srl spa bv nv llp lp jsc ojsc pjsc ooo zao oao fze fzco pte pty kg ab oy"
)
# Words many entity names share: weak evidence on their own.
GENERIC_WORDS = _words(
    "trading trade exchange money transfer shipping maritime marine bank group holding "
    "holdings international global general services service industries industrial "
    "enterprises enterprise investment investments finance financial capital partners "
    "import export logistics line lines the and of for"
)
_PINYIN = re.compile(
    r"^(zh|ch|sh|[bpmfdtnlgkhjqxrzcsyw])?"
    r"(iang|iong|uang|ueng|iao|ian|ing|uai|uan|ang|eng|ong|ai|ei|ao|ou|an|en|er|ia|ie|iu|in"
    r"|ua|uo|ui|un|ue|a|o|e|i|u|v)$"
)

_KEY_RULES: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern), replacement)
    for pattern, replacement in (
        (r"(off|of|ow|ov)$", "ov"),
        (r"(eff|ef|ew|ev)$", "ev"),
        (r"^ye", "e"),
        (r"^yu", "iu"),
        (r"^ya", "ia"),
        (r"dzh|dj", "j"),
        (r"sch", "sh"),
        (r"tch", "ch"),
        (r"ph", "f"),
        (r"ck", "k"),
        (r"qu", "k"),
        (r"q", "k"),
        (r"kh", "h"),
        (r"gh", "g"),
        (r"th", "t"),
        (r"dh", "d"),
        (r"zh", "j"),
        (r"w", "v"),
        (r"x", "ks"),
        (r"z", "s"),
        (r"c(?=[eiy])", "s"),
        (r"c(?!h)", "k"),
        (r"iy$", "i"),
        (r"(?<=.)y", "i"),
        (r"ee|ii", "i"),
        (r"oo|ou", "u"),
    )
)


@lru_cache(maxsize=65_536)
def spelling_key(part: str) -> str:
    """A part with common spelling variants folded to one form."""
    key = part
    for pattern, replacement in _KEY_RULES:
        key = pattern.sub(replacement, key)
    return _DOUBLES.sub(r"\1", key)


@dataclass(frozen=True, slots=True)
class Part:
    """One part of a name, with every form it is compared in."""

    text: str
    # Without the particles joined in front of it ("rashid" of "alrashid").
    core: str
    key: str
    # The key with its vowels folded to one (Mohammed / Muhammad).
    loose: str
    # Consonants only, compared where a side was written in an abjad.
    skeleton: str
    abjad: bool
    kind: str  # "name", "legal" or "generic"


def _part(text: str, core: str, abjad: bool) -> Part:
    key = spelling_key(text)
    kind = "legal" if text in LEGAL_FORMS else "generic" if text in GENERIC_WORDS else "name"
    return Part(
        text=text,
        core=core,
        key=key,
        loose=_DOUBLES.sub(r"\1", _VOWELS.sub("a", key)),
        skeleton=_DOUBLES.sub(r"\1", _VOWELS_Y.sub("", key)),
        abjad=abjad,
        kind=kind,
    )


def _latin(name: str) -> tuple[str, bool]:
    """The name in lower-case Latin letters, and whether it was written in an abjad."""
    text = unicodedata.normalize("NFKC", name)
    abjad = _ABJAD.search(text) is not None
    text = _SYLLABIC.sub(lambda m: f" {anyascii(m.group())} ", text)
    text = _APOSTROPHES.sub("", text)
    return anyascii(text).casefold(), abjad


def name_parts(name: str) -> tuple[tuple[Part, ...], int]:
    """The parts of a name, and how many come before its comma (the family
    name of an individual as a list writes it: "VOLKOV, Dmitri"); 0 when
    it has none."""
    text, abjad = _latin(name)
    parts: list[Part] = []
    family = 0
    segments = text.split(",", 1) if "," in text else [text]
    for index, segment in enumerate(segments):
        words = [w for w in _LETTERS.findall(segment) if w not in TITLES]
        pending = ""
        for position, word in enumerate(words):
            if word in PARTICLES and position < len(words) - 1:
                pending += word
                continue
            parts.append(_part(pending + word, word, abjad))
            pending = ""
        if index == 0 and len(segments) == 2:
            family = len(parts)
    return tuple(parts), family


def _similarity(a: Part, b: Part) -> float:
    """How well one part matches another, 0..1, memoised on the strings that
    decide it (a dataclass's own hash would cost more than the answer)."""
    if a.text == b.text:
        return 1.0
    memo_key = (a.text, a.core, a.abjad, b.text, b.core, b.abjad)
    found = _SIMILARITIES.get(memo_key)
    if found is None:
        found = _compare(a, b)
        if len(_SIMILARITIES) >= SIMILARITY_MEMO_ENTRIES:
            _SIMILARITIES.clear()
        _SIMILARITIES[memo_key] = found
    return found


SIMILARITY_MEMO_ENTRIES = 262_144
_SIMILARITIES: dict[tuple[str, str, bool, str, str, bool], float] = {}


def _compare(a: Part, b: Part) -> float:
    if a.text == b.text:
        return 1.0
    if a.key == b.key or (a.core == b.core and len(a.core) >= 3):
        return 0.95
    if (
        (a.core != a.text or b.core != b.text)
        and len(a.core) >= 3
        and spelling_key(a.core) == spelling_key(b.core)
    ):
        return 0.92
    if len(a.loose) >= 4 and a.loose == b.loose:
        return 0.9
    if (a.abjad or b.abjad) and len(a.skeleton) >= 2 and a.skeleton == b.skeleton:
        return 0.9
    if min(len(a.key), len(b.key)) >= 4:
        ratio = fuzz.ratio(a.key, b.key) / 100.0
        if ratio >= 0.85:
            return 0.9 * ratio
    return 0.0


@dataclass(frozen=True, slots=True)
class _Unit:
    """A part, or two adjacent parts read as one ("wei ming" as "weiming")."""

    positions: tuple[int, ...]
    part: Part


def _units(parts: tuple[Part, ...]) -> tuple[_Unit, ...]:
    units = [_Unit((i,), p) for i, p in enumerate(parts)]
    for i in range(len(parts) - 1):
        a, b = parts[i], parts[i + 1]
        if a.kind == "name" and b.kind == "name":
            joined = _part(a.text + b.text, a.core + b.text, a.abjad)
            units.append(_Unit((i, i + 1), joined))
    return tuple(units)


@dataclass(frozen=True, slots=True)
class ListedName:
    """One name of the list (an entry's or an alias), ready to compare."""

    owner: SanctionsEntry
    parts: tuple[Part, ...]
    units: tuple[_Unit, ...]
    # Positions of the family name and of the given names (individuals whose
    # name has a comma); empty when the list does not say.
    family: frozenset[int]
    given: frozenset[int]
    # A Chinese given name ("Wei Ming") is one name written as two syllables:
    # only both together are a given-name match.
    given_whole: bool
    weights: tuple[float, ...]

    @staticmethod
    def of(owner: SanctionsEntry, name: str) -> ListedName:
        parts, family_count = name_parts(name)
        individual = owner.individual
        family = frozenset(range(family_count)) if individual else frozenset()
        given = (
            frozenset(range(family_count, len(parts)))
            if individual and family_count
            else frozenset()
        )
        given_whole = len(given) >= 2 and all(_PINYIN.match(p.text) for p in parts) and bool(family)
        weights = tuple(_weight(p, individual) for p in parts)
        return ListedName(owner, parts, _units(parts), family, given, given_whole, weights)


def _weight(part: Part, listed_individual: bool) -> float:
    """What a part counts for in a name compared with an individual's or an
    entity's listed name: an entity's legal form nothing, its generic words
    little; with an individual, a legal form still counts a little (a
    company named after a person is not that person)."""
    if part.kind == "legal":
        return 0.3 if listed_individual else 0.0
    if part.kind == "generic" and not listed_individual:
        return 0.3
    return 1.0


# Candidates scored in full per screened name, the ones sharing the rarest
# keys with it first: bounds the cost of a name made of very common parts.
MAX_CANDIDATES = 12
# A key shared by more listed names than this is not used to find candidates
# when the name has other keys (a very common given name finds too many).
MAX_POSTING = 2_000
# Without the family name and a given name (or an entity's distinctive
# words), a score is held below this: never a possible match.
UNSUPPORTED_CAP = 70.0


def _index_keys(part: Part) -> Iterable[str]:
    yield "k:" + part.key
    yield "k:" + spelling_key(part.core)
    if len(part.loose) >= 4:
        yield "l:" + part.loose
    if len(part.skeleton) >= 2:
        yield "s:" + part.skeleton


def _query_keys(part: Part) -> Iterable[str]:
    yield "k:" + part.key
    yield "k:" + spelling_key(part.core)
    if len(part.loose) >= 4:
        yield "l:" + part.loose
    if part.abjad and len(part.skeleton) >= 2:
        yield "s:" + part.skeleton
    # A close spelling ("volkvo") reaches its candidates through its other
    # parts; its first letters keep a name with one part in reach too.
    if len(part.key) >= 5:
        yield "p:" + part.key[:4]


def score_name(
    query: tuple[Part, ...], query_units: tuple[_Unit, ...], listed: ListedName
) -> float:
    """0-100: how much of the screened name matched, weighted by how much of
    the listed name it covers; held below UNSUPPORTED_CAP without the family
    name and a given name (or an entity's distinctive words)."""
    individual = listed.owner.individual
    query_weights = [_weight(p, individual) for p in query]
    query_total = sum(query_weights)
    listed_total = sum(listed.weights)
    if query_total <= 0 or listed_total <= 0:
        return 0.0
    pairs = []
    for q in query_units:
        for item in listed.units:
            similarity = _similarity(q.part, item.part)
            if similarity > 0:
                pairs.append((similarity, len(q.positions) + len(item.positions), q, item))
    pairs.sort(key=lambda pair: (pair[0], pair[1]), reverse=True)
    query_sims = [0.0] * len(query)
    listed_sims = [0.0] * len(listed.parts)
    for similarity, _, q, item in pairs:
        if any(query_sims[i] for i in q.positions) or any(listed_sims[i] for i in item.positions):
            continue
        for i in q.positions:
            query_sims[i] = similarity
        for i in item.positions:
            listed_sims[i] = similarity
    query_cover = sum(s * w for s, w in zip(query_sims, query_weights, strict=True)) / query_total
    listed_cover = (
        sum(s * w for s, w in zip(listed_sims, listed.weights, strict=True)) / listed_total
    )
    score = 100.0 * query_cover * (0.7 + 0.3 * listed_cover)
    if not _supported(listed, listed_sims):
        score = min(score, UNSUPPORTED_CAP * query_cover)
    return score


def _supported(listed: ListedName, sims: list[float]) -> bool:
    """Does the match rest on what identifies the listed name?"""
    matched = [s >= 0.75 for s in sims]
    if listed.family:
        if not any(matched[i] for i in listed.family):
            return False
        if not listed.given:
            return True
        if listed.given_whole:
            return all(matched[i] for i in listed.given)
        return any(matched[i] for i in listed.given)
    if listed.owner.individual:
        # No comma: which part is the family name is unknown. Two parts, or
        # the whole name when it has one.
        return sum(matched) >= min(2, len(matched))
    core = [i for i, p in enumerate(listed.parts) if p.kind == "name"]
    if not core:
        return all(matched)
    return sum(1 for i in core if matched[i]) * 2 >= len(core)


class Screener:
    """Screens the parties of a payment. Immutable once built."""

    def __init__(
        self,
        entries: list[SanctionsEntry],
        aliases: list[tuple[str, str]],
        hit_threshold: float,
        possible_match_threshold: float,
        blocked_countries: frozenset[str],
        matcher: str = MATCHER_NAME_PARTS,
    ) -> None:
        assert 0 < possible_match_threshold <= hit_threshold <= 100
        assert matcher in MATCHERS, matcher
        by_id = {e.entry_id: e for e in entries}
        named: list[tuple[SanctionsEntry, str]] = [(e, e.name) for e in entries if e.name]
        for entry_id, alias in aliases:
            owner = by_id.get(entry_id)
            if owner is not None and alias:
                named.append((owner, alias))
        self.matcher = matcher
        self._names = [normalise_name(name) for _, name in named]
        self._owners = [owner for owner, _ in named]
        self._listed: list[ListedName] = []
        self._index: dict[str, list[int]] = {}
        if matcher == MATCHER_NAME_PARTS:
            self._build_index(named)
        self.hit_threshold = hit_threshold
        self.possible_match_threshold = possible_match_threshold
        self.blocked_countries = blocked_countries
        self.entry_count = len(entries)
        # Names repeat (a customer pays many times; replay re-screens history):
        # memoise the pure match, bounded so memory cannot grow without limit.
        self._memo: dict[str, tuple[float, SanctionsEntry | None]] = {}

    def _build_index(self, named: list[tuple[SanctionsEntry, str]]) -> None:
        """Every key of every listed name, computed once at load."""
        for number, (owner, name) in enumerate(named):
            listed = ListedName.of(owner, name)
            self._listed.append(listed)
            keys = {key for unit in listed.units for key in _index_keys(unit.part)}
            keys |= {"p:" + u.part.key[:4] for u in listed.units if len(u.part.key) >= 5}
            for key in keys:
                self._index.setdefault(key, []).append(number)

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
        if self.matcher == MATCHER_TOKEN_SORT:
            return self._match_token_sort(name)
        parts, _ = name_parts(name)
        if not parts or not self._listed:
            return 0.0, None
        units = _units(parts)
        postings = [
            self._index[key]
            for key in {key for unit in units for key in _query_keys(unit.part)}
            if key in self._index
        ]
        postings.sort(key=len)
        # Rare keys count more: a candidate sharing a family name with the
        # screened name outranks hundreds sharing "mohamed".
        hits: dict[int, float] = {}
        for index, posting in enumerate(postings):
            if index and len(posting) > MAX_POSTING:
                break
            weight = 1.0 / len(posting)
            for number in posting:
                hits[number] = hits.get(number, 0.0) + weight
        best_score, best_entry = 0.0, None
        for number in sorted(hits, key=lambda n: (-hits[n], n))[:MAX_CANDIDATES]:
            listed = self._listed[number]
            score = score_name(parts, units, listed)
            if score > best_score:
                best_score, best_entry = score, listed.owner
        return min(100.0, best_score), best_entry

    def _match_token_sort(self, name: str) -> tuple[float, SanctionsEntry | None]:
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
