"""Scan text for likely personal identifiers (PHI/PII) before it reaches a training set.

    hits = scan(text)                      # [Hit(kind, start, end)], never the value itself
    clean, hits = redact(text)             # "Patient: [NAME]", "[EMAIL]", ...

Kinds (the names counted in metrics/prepare.json `phi`):
  email   user@host.tld
  phone   French (0X XX XX XX XX, +33 X ..., 0033 ...), international (+CC ... with a plus)
          and North-American ((555) 123-4567, 555-123-4567)
  nir     French social security number: sex digit 1/2 + 12 digits + 2-digit key (15 in all)
  ssn     US social security number 123-45-6789 (dashes required)
  dob     a date beside "né(e) le", "date de naissance", "DOB", "date of birth"
  mrn     a record number beside "MRN", "IPP", "dossier n°" (at least 5 characters with
          digits, so "IPP 40 mg", the proton-pump inhibitor, is not one)
  name    a capitalised name beside a patient word or a civility: "Patient: Jean Dupont",
          "Mme Martin", "M. Durand", "Mr Smith" (after a patient word, two capitalised words are
          needed, so "Patient: Homme de 45 ans" is not a name)
Deliberately conservative about numbers: lab values and reference ranges ("K+: 5.9 mmol/L
(N: 3.5-5.0)", "140/90 mmHg") and bare dates (publication years, "2019-03-01") are not
identifiers; a date counts only beside a birth word.
Where a pattern has a `v` group, only that part is the identifier (and is redacted), so
"né le 3/4/1950" becomes "né le [DOB]".
"""
from __future__ import annotations

import re
from dataclasses import dataclass

_DATE = (r"(?:\d{1,2}[/.\-]\d{1,2}[/.\-]\d{2,4}|\d{4}-\d{2}-\d{2}"
         r"|\d{1,2}(?:er)?\s+[A-Za-zéûÉ]{3,9}\.?\s+\d{4}"   # 3 mars 1950
         r"|[A-Z][a-z]{2,8}\.?\s+\d{1,2},?\s+\d{4})")      # March 3, 1950
_CAP = r"[A-ZÀ-Ý][a-zà-ÿ]+(?:-[A-ZÀ-Ý][a-zà-ÿ]+)?"      # Dupont, Jean-Pierre

PATTERNS: dict[str, re.Pattern] = {
    "email": re.compile(r"(?<![\w.+-])[\w.+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}"),
    "nir": re.compile(r"(?<![\d\w])[12][ .]?\d{2}[ .]?(?:0[1-9]|1[0-2]|[2-9]\d)[ .]?"
                      r"(?:\d{2}|2[ABab])[ .]?\d{3}[ .]?\d{3}[ .]?\d{2}(?![\d])"),
    "ssn": re.compile(r"(?<![\d-])(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}(?![\d-])"),
    "phone": re.compile(
        r"(?<![\w+])(?:"
        r"(?:\+|00)33[ .-]?\(?0?\)?[1-9](?:[ .-]?\d{2}){4}"          # +33 6 12 34 56 78
        r"|0[1-9](?:[ .-]?\d{2}){4}"                                  # 06 12 34 56 78
        r"|\+(?!33)\d{1,3}[ .-]?\(?\d{1,4}\)?(?:[ .-]?\d{2,4}){2,4}"  # +44 20 7946 0958
        r"|\(\d{3}\)[ .-]?\d{3}[ .-]\d{4}|\d{3}[.-]\d{3}[.-]\d{4}"    # (555) 123-4567
        r")(?![\d])"),
    "dob": re.compile(
        r"(?i:\bn[ée]e?\s*(?:\(e\))?\s+le|\bdate\s+de\s+naissance|\bD\.?O\.?B\.?"
        r"|\bdate\s+of\s+birth|\bborn\s+on)\s*[:=]?\s*(?P<v>" + _DATE + ")"),
    "mrn": re.compile(
        r"(?:\bMRN|\bIPP|(?i:\bdossier\s*(?:n°|no\.?|num(?:éro|ero)?\.?|#)))\s*[:#°]?\s*"
        r"(?P<v>[A-Z]{0,4}-?\d[\d-]{3,}\d)(?![\d])"),
    "name": re.compile(
        r"(?:(?i:\bpatiente?)\s*:?\s+(?=" + _CAP + r"\s+" + _CAP + r")"  # two names: first + last
        r"|\b(?:Mme|Mlle|Mrs|Ms|Mr|Madame|Monsieur)\.?\s+|(?<![\w.])M\.\s+)"
        r"(?P<v>" + _CAP + r"(?:\s+" + _CAP + r")?)"),
}
PLACEHOLDER = {kind: f"[{kind.upper()}]" for kind in PATTERNS}


@dataclass(frozen=True)
class Hit:
    """One identifier found: its kind and span (the value itself is never kept)."""
    kind: str
    start: int
    end: int


def scan(text: str) -> list[Hit]:
    """Every identifier in `text`, non-overlapping, in order (earliest, then longest wins)."""
    found = []
    for kind, pattern in PATTERNS.items():
        for match in pattern.finditer(text):
            span = match.span("v") if "v" in pattern.groupindex else match.span()
            found.append(Hit(kind, *span))
    found.sort(key=lambda h: (h.start, -(h.end - h.start)))
    hits, end = [], -1
    for hit in found:
        if hit.start >= end:
            hits.append(hit)
            end = hit.end
    return hits


def redact(text: str) -> tuple[str, list[Hit]]:
    """`text` with each identifier replaced by its placeholder ("[EMAIL]"), and the hits."""
    hits = scan(text)
    out, pos = [], 0
    for hit in hits:
        out += [text[pos:hit.start], PLACEHOLDER[hit.kind]]
        pos = hit.end
    out.append(text[pos:])
    return "".join(out), hits
