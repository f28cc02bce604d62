"""PII redaction with a documented set of pattern recognisers.

Why not Presidio: ``presidio-analyzer`` installs here, but its ``AnalyzerEngine`` needs a spaCy
language model for names and context, and the official spaCy models are not on PyPI (only
unofficial re-uploads, which we will not put into a data pipeline); the model hub is not
reachable either. The recognisers below follow Presidio's pattern recognisers (a regular
expression, an optional validator such as a checksum, an optional context keyword) and are
applied without any model, so redaction is deterministic, fast and runs in every image.

Recognisers (entity type → what it matches):

==================  ==============================================================================
``EMAIL``           ``local@domain.tld``
``PHONE``           international (``+44 7700 900123``), national trunk-prefixed (``07700 900318``),
                    North-American (``555-0142``, ``(212) 555-0142``); 7–15 digits
``IBAN``            country code, 2 check digits, 11–30 alphanumerics (structure only: test IBANs
                    with ``TEST`` or zeros fail the mod-97 checksum but are still account numbers)
``CREDIT_CARD``     13–19 digits (spaces/dashes allowed) passing the Luhn checksum
``IP_ADDRESS``      IPv4 and IPv6, validated with :mod:`ipaddress`
``NATIONAL_ID``     US SSN, UK National Insurance number, Italian codice fiscale, EU VAT ids,
                    and any ID-shaped token after a keyword (tax number/ID, UTR, TIN, SSN, PESEL,
                    BSN, NIF, Steuer-ID, passport number, national/personal ID, partita IVA, ...)
``BANK_ACCOUNT``    account numbers and UK sort codes after ``account``/``sort code``
``DATE_OF_BIRTH``   a date after ``born``, ``date of birth``, ``DOB``, ``geboren``; other dates
                    are kept (tax years and deadlines are content, not PII)
``PERSON``          names in typical contexts only: after an honorific (``Mr Doe``), in a
                    self-introduction (``I'm Jane Doe``, ``Jane Doe here``), a sign-off
                    (``Regards, Sam Sample``) or after ``from``/``signed by``/``for``/``to``
``ADDRESS``         street addresses (``42 Example Close``, ``Musterstraße 1``, ``calle Ejemplo 1``)
==================  ==============================================================================

Limitations, stated plainly: names outside those contexts and addresses in other shapes are not
found (that needs NER); the patterns err towards redacting too much for identifiers.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

#: Placeholder format of a redacted span (Presidio's default anonymiser uses the same shape).
PLACEHOLDER = "<{entity}>"

_MONTH = r"(?:Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Sept|Oct|Nov|Dec)[a-z]*\.?"
_DATE = (
    rf"(?:\d{{4}}-\d{{2}}-\d{{2}}|\d{{1,2}}[./-]\d{{1,2}}[./-]\d{{2,4}}|\d{{1,2}}\s+{_MONTH}\s+\d{{4}}"
    rf"|{_MONTH}\s+\d{{1,2}},?\s+\d{{4}})"
)
# An ID-shaped token: upper-case letters and digits, optionally grouped by single spaces or
# dashes, with at least one digit (so "VAT number for zero-rating" is not an ID).
_ID_TOKEN = r"(?=[A-Z0-9 -]*\d)[A-Z0-9]+(?:[ -][A-Z0-9]+){0,5}"
_ID_KEYWORDS = (
    r"tax (?:number|no\.?|id|code|reference)|taxpayer (?:number|id)|utr|tin|ssn|social security number"
    r"|tax identification number|national insurance number|nino|pesel|bsn|nif|nie|steuer-?id|steuernummer"
    r"|codice fiscale"
    r"|partita iva|vat (?:id|number|no\.?)|passport (?:number|no\.?)|(?:national|personal) id(?: number)?"
    r"|id number|identity card"
)
_NAME = r"[A-Z][a-zà-ÿ'’-]+(?:\s+(?:[a-z]{2,3}\s+)?[A-Z][a-zà-ÿ'’-]+)"
_STREET = r"(?:Street|St\.|Avenue|Ave\.?|Road|Rd\.?|Close|Lane|Drive)"
_EU_VAT = r"(?:AT|BE|BG|CY|CZ|DE|DK|EE|EL|ES|FI|FR|HR|HU|IE|IT|LT|LU|LV|MT|NL|PL|PT|RO|SE|SI|SK)"


def luhn_valid(digits: str) -> bool:
    """True when the digit string passes the Luhn checksum (payment card numbers)."""
    total = 0
    for i, char in enumerate(reversed(digits)):
        value = int(char)
        if i % 2 == 1:
            value = value * 2 - 9 if value > 4 else value * 2
        total += value
    return total % 10 == 0


def _card_valid(match: str) -> bool:
    digits = re.sub(r"\D", "", match)
    return 13 <= len(digits) <= 19 and luhn_valid(digits)


def _ip_valid(match: str) -> bool:
    try:
        ipaddress.ip_address(match)
    except ValueError:
        return False
    return True


def _phone_valid(match: str) -> bool:
    return 7 <= len(re.sub(r"\D", "", match)) <= 15


@dataclass(frozen=True)
class Recognizer:
    """One pattern recogniser.

    Attributes:
        entity: Entity type it reports (the placeholder name).
        pattern: Compiled regular expression; when it has a group named ``pii`` only that
            group is redacted (the rest is context such as a keyword).
        validator: Optional check of the matched text (a checksum, a parser).
    """

    entity: str
    pattern: re.Pattern[str]
    validator: Callable[[str], bool] | None = None


@dataclass(frozen=True)
class PiiSpan:
    """A found piece of PII: ``text[start:end]`` is of type ``entity``."""

    entity: str
    start: int
    end: int


def _r(entity: str, pattern: str, validator: Callable[[str], bool] | None = None) -> Recognizer:
    return Recognizer(entity, re.compile(pattern), validator)


def default_recognizers() -> list[Recognizer]:
    """The recogniser set documented in the module docstring, most specific first."""
    return [
        _r("EMAIL", r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b"),
        _r("CREDIT_CARD", r"\b\d(?:[ -]?\d){12,18}\b", _card_valid),
        _r("IP_ADDRESS", r"\b(?:\d{1,3}\.){3}\d{1,3}\b", _ip_valid),
        _r("IP_ADDRESS", r"(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{1,4}\b", _ip_valid),
        _r("NATIONAL_ID", rf"(?i:\b(?:{_ID_KEYWORDS}))\s*(?:[:#]|is|no\.?)?\s*(?P<pii>{_ID_TOKEN})\b"),
        _r("NATIONAL_ID", r"\b\d{3}-\d{2}-\d{4}\b"),
        _r("NATIONAL_ID", r"\b[A-CEGHJ-PR-TW-Z]{2} ?\d{2} ?\d{2} ?\d{2} ?[A-D]\b"),
        _r("NATIONAL_ID", r"\b[A-Z]{6}\d{2}[A-Z]\d{2}[A-Z]\d{3}[A-Z]\b"),
        _r("NATIONAL_ID", rf"\b{_EU_VAT}U?\d{{8,12}}(?:B\d{{2}})?\b"),
        _r("IBAN", r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,4})?\b"),
        _r("BANK_ACCOUNT", r"(?i:\bsort code)\s*:?\s*(?P<pii>\d{2}-\d{2}-\d{2})\b"),
        _r("BANK_ACCOUNT", r"(?i:\baccount(?: number| no\.?)?)\s*:?\s*(?P<pii>\d{6,12})\b"),
        _r(
            "DATE_OF_BIRTH",
            rf"(?i:\b(?:born(?: on)?|date of birth|d\.?o\.?b\.?|geboren(?: am)?|birth ?date))"
            rf"\s*:?\s*(?P<pii>{_DATE})",
        ),
        _r("PHONE", r"(?<![\w+])\+\d{1,3}(?:[ .-]?\(?\d{1,4}\)?){2,6}\b", _phone_valid),
        _r("PHONE", r"(?<![\w.,/-])0\d{2,4}[ -]?\d{3,4}[ -]?\d{3,4}\b(?![.,/-]\d)", _phone_valid),
        _r("PHONE", r"(?<![\w-])(?:\(\d{3}\)\s?|\d{3}[ .-])?\d{3}-\d{4}\b(?!-)"),
        _r(
            "PERSON",
            rf"\b(?:Mr|Mrs|Ms|Miss|Dr|Prof|Herr|Frau|Mme|Mlle)\.?\s+"
            rf"(?P<pii>{_NAME}|[A-Z][a-zà-ÿ'’-]+)",
        ),
        _r("PERSON", rf"(?i:\b(?:my name is|i am|i'm|this is|it's))\s+(?P<pii>{_NAME})"),
        _r("PERSON", rf"\b(?P<pii>{_NAME})\s+here\b"),
        _r(
            "PERSON",
            rf"(?i:\b(?:regards|thanks|best|sincerely|cheers|signed by|signatory:?|from|for|to|by"
            rf"|contact:?))"
            rf",?\s+(?P<pii>{_NAME})",
        ),
        _r("ADDRESS", rf"\b\d{{1,4}}\s+(?:[A-Z][a-z]+\s+){{1,3}}{_STREET}\b"),
        _r("ADDRESS", rf"\b(?:[A-Z][a-z]+\s+){{1,3}}{_STREET}\s+\d{{1,4}}[a-z]?\b"),
        _r(
            "ADDRESS",
            r"\b[A-Z][a-zäöüß]+(?:straße|strasse|weg|gata|veien|vej|straat|gasse|platz|laan)"
            r"\s+\d{1,4}[a-z]?\b",
        ),
        _r(
            "ADDRESS",
            r"\b(?:\d{1,4}\s+)?(?i:rue|calle|via|avenida|piazza)\s+"
            r"(?:de\s+la\s+|de\s+l['’]|d[eiu]l?\s+|l['’])?[A-Z][\w'’-]+(?:\s+\d{1,4})?",
        ),
    ]


class PiiRedactor:
    """Finds PII spans and replaces them with ``<ENTITY>`` placeholders.

    Args:
        recognizers: The recognisers to apply; default :func:`default_recognizers`.
        entities: Only report these entity types (``None``: all).

    Example::

        redactor = PiiRedactor()
        redactor.redact("Mail jane.doe@example.com")  # ('Mail <EMAIL>', ['EMAIL'])
    """

    def __init__(
        self, recognizers: Sequence[Recognizer] | None = None, entities: Sequence[str] | None = None
    ) -> None:
        chosen = list(recognizers) if recognizers is not None else default_recognizers()
        self.recognizers = [r for r in chosen if entities is None or r.entity in entities]

    def find(self, text: str) -> list[PiiSpan]:
        """All non-overlapping PII spans in ``text``, left to right.

        Where spans overlap the longer wins, and on a tie the recogniser listed first (the
        more specific one).
        """
        candidates: list[tuple[int, int, PiiSpan]] = []
        for rank, recognizer in enumerate(self.recognizers):
            for match in recognizer.pattern.finditer(text):
                group = "pii" if "pii" in recognizer.pattern.groupindex else 0
                start, end = match.span(group)
                if start == end or (recognizer.validator and not recognizer.validator(match.group(group))):
                    continue
                candidates.append((-(end - start), rank, PiiSpan(recognizer.entity, start, end)))
        chosen: list[PiiSpan] = []
        for _, _, span in sorted(candidates, key=lambda c: (c[0], c[1], c[2].start)):
            if all(span.end <= other.start or span.start >= other.end for other in chosen):
                chosen.append(span)
        return sorted(chosen, key=lambda s: s.start)

    def redact(self, text: str) -> tuple[str, list[str]]:
        """``(redacted text, sorted entity types found)``."""
        spans = self.find(text)
        parts, last = [], 0
        for span in spans:
            parts.append(text[last : span.start])
            parts.append(PLACEHOLDER.format(entity=span.entity))
            last = span.end
        parts.append(text[last:])
        return "".join(parts), sorted({s.entity for s in spans})


def redact_text(text: str, entities: Sequence[str] | None = None) -> tuple[str, list[str]]:
    """Redact PII in one text with the default recognisers.

    Args:
        text: The text.
        entities: Only redact these entity types (``None``: all of them).

    Returns:
        ``(redacted text, sorted list of the entity types that were found)``.
    """
    return PiiRedactor(entities=entities).redact(text)
