"""Bank formats: what the money plane writes to rails and reads back from banks.

A pure library (no servers, no I/O beyond the bytes it is given, no gRPC): the
foundation the payout rail adapters, the sandbox bank and statement matching
are built on.

Named `formats`, not `rails`: a rail (instant, ACH, SEPA, card) is an adapter
with cut-offs, limits, connections and state, and the issue's rail adapters
will live beside this package under that name. This package only knows the
files and messages those adapters and the sandbox bank exchange:

- `beneficiary`: IBAN + BIC, US ABA routing + account number, card/wallet tokens.
- `iso20022_out`: `pacs.008.001.08` (instant credit transfer) and
  `pain.001.001.09` (SEPA credit transfer initiation) writers, XSD-valid.
- `iso20022_in`: `pacs.002` status reports and `pacs.004` returns (any `.001.xx`).
- `nacha`: the ACH file writer (PPD/CCD credits, same-day) and a strict reader
  (return entries with addenda type 99, notifications of change type 98).
- `statement`: the one normalized `StatementLine` / `Statement` model, with
  content fingerprints.
- `camt`: `camt.052`, `camt.053`, `camt.054` reader (`.001.02` to `.001.08`,
  version from the namespace) and writers (`.001.08`).
- `mt940`: MT940 reader (field grammar from the `mt-940` package) and writer.

Every refusal is a `triplane.runtime.errors.InvalidArgument` with a
machine-readable reason and the field at fault: a request field for
beneficiaries, an XPath-ish element path (`Document/BkToCstmrStmt/Stmt[1]/
Ntry[2]/Amt`) or `line N` for files. A file that cannot be read is refused
whole: readers return everything or raise.

The ISO 20022 schemas the writers and the camt reader validate against ship
in `xsd/` (see `xsd/NOTICE.md`); nothing is fetched at run time.
"""
