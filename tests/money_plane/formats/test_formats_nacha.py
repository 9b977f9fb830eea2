"""NACHA files, checked field by field against the record layouts (1-based
positions, as the NACHA Operating Rules print them)."""

from __future__ import annotations

import datetime as dt

import pytest
from formats_samples import refused

from money_plane.formats.beneficiary import us_bank_account
from money_plane.formats.nacha import (
    RETURN_REASONS,
    AchBatch,
    AchEntry,
    ReturnToWrite,
    SecCode,
    WrittenAchFile,
    ach_changes,
    ach_returns,
    entry_hash,
    read_ach_returns,
    read_nacha,
    write_ach_returns,
    write_nacha,
)

CREATED = dt.datetime(2026, 12, 7, 9, 30)  # a Monday
NEXT_DAY = dt.date(2026, 12, 8)
ODFI = "091000019"
CHECKING = us_bank_account("021000021", "123456789")
SAVINGS = us_bank_account("011000015", "98765", "savings")


def pos(line: str, start: int, end: int) -> str:
    return line[start - 1 : end]


def lines_of(data: bytes) -> list[str]:
    return data.decode("ascii").rstrip("\n").split("\n")


def write(batches: list[AchBatch], **kw: object) -> WrittenAchFile:
    args: dict[str, object] = {
        "immediate_destination": ODFI,
        "immediate_origin": "1234567890",
        "odfi_routing": ODFI,
        "created_at": CREATED,
        "destination_name": "Fed Reserve Bank",
        "origin_name": "Triplane Payouts",
        "reference_code": "REF00001",
    }
    args.update(kw)
    return write_nacha(batches, **args)  # type: ignore[arg-type]


def ppd(*entries: AchEntry, same_day: bool = False, effective: dt.date = NEXT_DAY) -> AchBatch:
    return AchBatch(
        sec_code=SecCode.PPD,
        company_name="Triplane Marketplace Inc",
        company_id="1123456789",
        entry_description="PAYOUT",
        effective_date=effective,
        entries=entries,
        same_day=same_day,
        company_discretionary_data="SETTLEMENT 2026-12",
    )


def sample_file() -> WrittenAchFile:
    return write(
        [
            ppd(
                AchEntry(CHECKING, 12_345, "Jane Doe", identification="SELLER-1"),
                AchEntry(SAVINGS, 500, "Jürgen Müller", payment_info="Payout INV-42"),
            ),
            AchBatch(
                sec_code=SecCode.CCD,
                company_name="Triplane",
                company_id="1123456789",
                entry_description="SETTLEMENT",
                effective_date=CREATED.date(),
                same_day=True,
                same_day_window="1700",
                entries=(AchEntry(CHECKING, 99_999, "Acme Corp", identification="MERCHANT-77"),),
            ),
        ]
    )


def test_every_record_is_94_characters_and_blocked_by_ten() -> None:
    lines = lines_of(sample_file().data)
    assert all(len(line) == 94 for line in lines)
    assert len(lines) % 10 == 0
    # 1 header + (5, 6, 6, 7, 8) + (5, 6, 8) + 9 = 10 records: no padding needed
    assert [line[0] for line in lines] == list("1566785689")


def test_padding_is_nines() -> None:
    lines = lines_of(write([ppd(AchEntry(CHECKING, 100, "A"))]).data)
    assert [line[0] for line in lines[:5]] == list("15689")
    assert lines[5:] == ["9" * 94] * 5
    assert pos(lines[4], 8, 13) == "000001"  # block count


def test_file_header_fields() -> None:
    header = lines_of(sample_file().data)[0]
    assert pos(header, 1, 1) == "1"
    assert pos(header, 2, 3) == "01"
    assert pos(header, 4, 13) == " 091000019"
    assert pos(header, 14, 23) == "1234567890"
    assert pos(header, 24, 29) == "261207"
    assert pos(header, 30, 33) == "0930"
    assert pos(header, 34, 34) == "A"
    assert pos(header, 35, 37) == "094"
    assert pos(header, 38, 39) == "10"
    assert pos(header, 40, 40) == "1"
    assert pos(header, 41, 63) == "FED RESERVE BANK".ljust(23)
    assert pos(header, 64, 86) == "TRIPLANE PAYOUTS".ljust(23)
    assert pos(header, 87, 94) == "REF00001"


def test_batch_header_fields() -> None:
    lines = lines_of(sample_file().data)
    bh = lines[1]
    assert pos(bh, 1, 1) == "5"
    assert pos(bh, 2, 4) == "220"  # credits only
    assert pos(bh, 5, 20) == "TRIPLANE MARKETP"  # cut to 16
    assert pos(bh, 21, 40) == "SETTLEMENT 2026-12  "
    assert pos(bh, 41, 50) == "1123456789"
    assert pos(bh, 51, 53) == "PPD"
    assert pos(bh, 54, 63) == "PAYOUT    "
    assert pos(bh, 64, 69) == "      "  # not same-day: no descriptive date
    assert pos(bh, 70, 75) == "261208"
    assert pos(bh, 76, 78) == "   "  # settlement date: the ACH operator's
    assert pos(bh, 79, 79) == "1"
    assert pos(bh, 80, 87) == "09100001"
    assert pos(bh, 88, 94) == "0000001"
    second = lines[6]
    assert pos(second, 51, 53) == "CCD"
    assert pos(second, 64, 69) == "SD1700"
    assert pos(second, 70, 75) == "261207"  # same-day: effective = creation date
    assert pos(second, 88, 94) == "0000002"


def test_entry_detail_fields_and_trace_numbers() -> None:
    written = sample_file()
    lines = lines_of(written.data)
    first, second = lines[2], lines[3]
    assert pos(first, 1, 1) == "6"
    assert pos(first, 2, 3) == "22"  # checking credit
    assert pos(first, 4, 11) == "02100002"
    assert pos(first, 12, 12) == "1"
    assert pos(first, 13, 29) == "123456789        "
    assert pos(first, 30, 39) == "0000012345"
    assert pos(first, 40, 54) == "SELLER-1       "
    assert pos(first, 55, 76) == "JANE DOE".ljust(22)
    assert pos(first, 77, 78) == "  "
    assert pos(first, 79, 79) == "0"
    assert pos(first, 80, 94) == "091000010000001"
    assert pos(second, 2, 3) == "32"  # savings credit
    assert pos(second, 55, 76) == "JURGEN MULLER".ljust(22)  # transliterated
    assert pos(second, 79, 79) == "1"
    assert pos(second, 80, 94) == "091000010000002"
    assert written.trace_numbers == ("091000010000001", "091000010000002", "091000010000003")


def test_addenda_05_fields() -> None:
    addenda = lines_of(sample_file().data)[4]
    assert pos(addenda, 1, 3) == "705"
    assert pos(addenda, 4, 83) == "PAYOUT INV-42".ljust(80)
    assert pos(addenda, 84, 87) == "0001"
    assert pos(addenda, 88, 94) == "0000002"  # the entry's trace sequence


def test_batch_control_fields() -> None:
    lines = lines_of(sample_file().data)
    bc = lines[5]
    assert pos(bc, 1, 4) == "8220"
    assert pos(bc, 5, 10) == "000003"  # 2 entries + 1 addenda
    assert pos(bc, 11, 20) == "0003200003"  # 02100002 + 01100001
    assert pos(bc, 21, 32) == "000000000000"
    assert pos(bc, 33, 44) == "000000012845"
    assert pos(bc, 45, 54) == "1123456789"
    assert pos(bc, 55, 79) == " " * 25
    assert pos(bc, 80, 87) == "09100001"
    assert pos(bc, 88, 94) == "0000001"


def test_file_control_fields() -> None:
    written = sample_file()
    fc = lines_of(written.data)[9]
    assert pos(fc, 1, 1) == "9"
    assert pos(fc, 2, 7) == "000002"
    assert pos(fc, 8, 13) == "000001"
    assert pos(fc, 14, 21) == "00000004"
    assert pos(fc, 22, 31) == "0005300005"
    assert pos(fc, 32, 43) == "000000000000"
    assert pos(fc, 44, 55) == "000000112844"
    assert pos(fc, 56, 94) == " " * 39
    assert written.total_credit_minor == 112_844


def test_entry_hash_keeps_the_last_ten_digits() -> None:
    assert entry_hash(["99999999"] * 200) == "9999999800"  # 19999999800
    assert entry_hash(["02100002", "01100001"]) == "0003200003"


def test_prenote_codes_and_zero_amount() -> None:
    lines = lines_of(
        write(
            [ppd(AchEntry(CHECKING, 0, "A", prenote=True), AchEntry(SAVINGS, 0, "B", prenote=True))]
        ).data
    )
    assert pos(lines[2], 2, 3) == "23" and pos(lines[3], 2, 3) == "33"
    assert pos(lines[2], 30, 39) == "0000000000"
    with refused("AMOUNT_INVALID", "batches[0].entries[0].amount_minor"):
        write([ppd(AchEntry(CHECKING, 5, "A", prenote=True))])


def test_same_day_rules() -> None:
    with refused("EFFECTIVE_DATE_INVALID", "batches[0].effective_date"):
        write([ppd(AchEntry(CHECKING, 100, "A"), same_day=True, effective=NEXT_DAY)])
    with refused("EFFECTIVE_DATE_INVALID", "batches[0].effective_date"):
        write([ppd(AchEntry(CHECKING, 100, "A"), effective=CREATED.date())])
    with refused("AMOUNT_OVER_LIMIT", "batches[0].entries[0].amount_minor"):
        write([ppd(AchEntry(CHECKING, 100_000_001, "A"), same_day=True, effective=CREATED.date())])
    # exactly $1,000,000.00 is allowed same-day
    write([ppd(AchEntry(CHECKING, 100_000_000, "A"), same_day=True, effective=CREATED.date())])
    bad_window = AchBatch(
        SecCode.PPD, "X", "1", "PAYOUT", CREATED.date(), (AchEntry(CHECKING, 1, "A"),),
        same_day=True, same_day_window="0900",
    )  # fmt: skip
    with refused("SAME_DAY_WINDOW_INVALID", "batches[0].same_day_window"):
        write([bad_window])
    with refused("EFFECTIVE_DATE_INVALID", "batches[0].effective_date"):
        write([ppd(AchEntry(CHECKING, 100, "A"), effective=dt.date(2026, 12, 12))])  # Saturday


def test_writer_refusals_name_the_field() -> None:
    with refused("FIELD_TOO_LONG", "batches[0].entries[0].identification"):
        write([ppd(AchEntry(CHECKING, 1, "A", identification="X" * 16))])
    with refused("AMOUNT_INVALID", "batches[0].entries[0].amount_minor"):
        write([ppd(AchEntry(CHECKING, 10_000_000_000, "A"))])
    with refused("AMOUNT_INVALID", "batches[0].entries[0].amount_minor"):
        write([ppd(AchEntry(CHECKING, 0, "A"))])
    with refused("ROUTING_NUMBER_INVALID", "odfi_routing"):
        write([ppd(AchEntry(CHECKING, 1, "A"))], odfi_routing="091000018")
    with refused("FIELD_REQUIRED", "batches[0].entries"):
        write([ppd()])
    with refused("FIELD_REQUIRED", "batches"):
        write([])


def test_read_back_what_was_written() -> None:
    written = sample_file()
    parsed = read_nacha(written.data)
    assert parsed.immediate_destination == "091000019"
    assert parsed.created_at == CREATED
    assert len(parsed.batches) == 2
    first = parsed.batches[0]
    assert (first.sec_code, first.company_id, first.effective_date) == (
        "PPD",
        "1123456789",
        NEXT_DAY,
    )
    assert not first.same_day and parsed.batches[1].same_day
    assert [e.trace_number for b in parsed.batches for e in b.entries] == list(
        written.trace_numbers
    )
    assert first.entries[1].addenda[0].payment_info == "PAYOUT INV-42"
    assert parsed.total_credit_minor == written.total_credit_minor
    assert parsed.entry_hash == written.entry_hash


def _tamper(data: bytes, line: int, start: int, value: str) -> bytes:
    lines = lines_of(data)
    row = lines[line - 1]
    lines[line - 1] = row[: start - 1] + value + row[start - 1 + len(value) :]
    return ("\n".join(lines) + "\n").encode()


def test_reader_refuses_broken_controls_naming_line_and_positions() -> None:
    data = sample_file().data
    with refused("CONTROL_TOTAL_MISMATCH", "line 6") as r:
        read_nacha(_tamper(data, 3, 30, "0000012346"))  # amount changed, control not
    assert r.error is not None and r.error.metadata["positions"] == "33-44"
    with refused("CONTROL_TOTAL_MISMATCH", "line 6") as r:
        read_nacha(_tamper(data, 6, 11, "0003200004"))
    assert r.error is not None and r.error.metadata["name"] == "entry hash"
    with refused("CONTROL_TOTAL_MISMATCH", "line 10"):
        read_nacha(_tamper(data, 10, 2, "000003"))
    with refused("FIELD_INVALID", "line 3"):
        read_nacha(_tamper(data, 3, 30, "00000123X5"))


def test_reader_refuses_malformed_files() -> None:
    data = sample_file().data
    lines = lines_of(data)
    with refused("RECORD_LENGTH_INVALID", "line 3"):
        read_nacha(("\n".join([*lines[:2], lines[2][:93], *lines[3:]]) + "\n").encode())
    with refused("FILE_TRUNCATED", "line 6"):
        read_nacha(("\n".join(lines[:5]) + "\n").encode())
    with refused("RECORD_UNEXPECTED", "line 1"):
        read_nacha(("\n".join(lines[1:]) + "\n").encode())
    with refused("CHARSET_INVALID", "line 1"):
        read_nacha("é".encode() + data)
    with refused("RECORD_MISSING", "line 4"):
        read_nacha(("\n".join([*lines[:4], *lines[5:]]) + "\n").encode())


def test_reader_accepts_crlf_and_unbroken_streams() -> None:
    data = sample_file().data
    assert read_nacha(data.replace(b"\n", b"\r\n")).entry_hash == read_nacha(data).entry_hash
    assert len(read_nacha(data.replace(b"\n", b"")).batches) == 2


def _return_file() -> bytes:
    """A return file composed field by field here (not by our writer): two
    returns (R01, R03) and a notification of change (C01)."""

    def entry(account: str, amount: str, ident: str, name: str, seq: str) -> str:
        return (
            "6" + "21" + "09100001" + "9" + account.ljust(17) + amount + ident.ljust(15)
            + name.ljust(22) + "  " + "1" + "02100002" + seq
        )  # fmt: skip

    records = [
        "1" + "01" + " 091000019" + " 021000021" + "261209" + "0800" + "A" + "094" + "10" + "1"
        + "TRIPLANE BANK".ljust(23) + "SANDBOX RDFI".ljust(23) + " " * 8,
        "5" + "220" + "TRIPLANE MARKETP" + " " * 20 + "1123456789" + "PPD" + "PAYOUT".ljust(10)
        + " " * 6 + "261209" + "   " + "1" + "02100002" + "0000001",
        entry("123456789", "0000012345", "SELLER-1", "JANE DOE", "0000001"),
        "7" + "99" + "R01" + "091000010000001" + " " * 6 + "02100002"
        + "INSUFFICIENT FUNDS".ljust(44) + "021000020000001",
        entry("555555555", "0000000700", "SELLER-2", "JOHN ROE", "0000002"),
        "7" + "99" + "R03" + "091000010000002" + " " * 6 + "02100002" + " " * 44
        + "021000020000002",
        entry("000111222", "0000000000", "SELLER-3", "ANN POE", "0000003"),
        "7" + "98" + "C01" + "091000010000003" + " " * 6 + "02100002" + "987654321".ljust(29)
        + " " * 15 + "021000020000003",
        "8" + "220" + "000006" + "0027300003" + "0" * 12 + "000000013045" + "1123456789"
        + " " * 25 + "02100002" + "0000001",
        "9" + "000001" + "000001" + "00000006" + "0027300003" + "0" * 12 + "000000013045"
        + " " * 39,
    ]  # fmt: skip
    return ("\n".join(records) + "\n").encode()


def test_return_file_written_by_hand_parses() -> None:
    data = _return_file()
    assert all(len(line) == 94 for line in lines_of(data))
    returns = read_ach_returns(data)
    assert [r.reason_code for r in returns] == ["R01", "R03"]
    first = returns[0]
    assert first.reason == RETURN_REASONS["R01"] == "Insufficient funds"
    assert first.original_trace == "091000010000001"
    assert first.original_rdfi == "02100002"
    assert first.amount_minor == 12_345
    assert first.account_number == "123456789"
    assert first.addenda_info == "INSUFFICIENT FUNDS"
    assert first.trace_number == "021000020000001"
    assert first.transaction_code == "21"
    assert first.effective_date == dt.date(2026, 12, 9)
    assert returns[1].reason == "No account / unable to locate account"
    changes = ach_changes(read_nacha(data))
    assert [(c.change_code, c.corrected_data, c.original_trace) for c in changes] == [
        ("C01", "987654321", "091000010000003")
    ]


def test_returns_written_for_the_sandbox_bank_round_trip() -> None:
    sent = sample_file()
    entry = AchEntry(CHECKING, 12_345, "Jane Doe", identification="SELLER-1")
    data = write_ach_returns(
        [ReturnToWrite(entry, sent.trace_numbers[0], "R02", "ACCOUNT CLOSED")],
        rdfi_routing="021000021",
        odfi_routing=ODFI,
        original_sec_code=SecCode.PPD,
        company_name="Triplane",
        company_id="1123456789",
        created_at=dt.datetime(2026, 12, 9, 8, 0),
    )
    (ret,) = ach_returns(read_nacha(data))
    assert (ret.reason_code, ret.original_trace, ret.amount_minor) == (
        "R02",
        "091000010000001",
        12_345,
    )
    assert ret.original_rdfi == "02100002"
    with refused("RETURN_REASON_INVALID", "returns[0].reason_code"):
        write_ach_returns(
            [ReturnToWrite(entry, sent.trace_numbers[0], "X99")],
            rdfi_routing="021000021",
            odfi_routing=ODFI,
            original_sec_code=SecCode.PPD,
            company_name="T",
            company_id="1",
            created_at=CREATED,
        )


def test_unknown_addenda_type_refused() -> None:
    data = _tamper(_return_file(), 4, 2, "42")
    with refused("FIELD_INVALID", "line 4"):
        read_nacha(data)


@pytest.mark.parametrize("code", ["R01", "R03", "R10", "R29"])
def test_known_return_reasons_described(code: str) -> None:
    assert RETURN_REASONS[code]
