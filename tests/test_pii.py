"""PII redaction: each recogniser finds its entity, validators reject look-alikes, content stays."""

from __future__ import annotations

import json

import pytest

from labelmatch.data.pii import PiiRedactor, luhn_valid, redact_text


@pytest.mark.parametrize(
    ("text", "entity", "secret"),
    [
        ("Write to jane.doe@example.com today.", "EMAIL", "jane.doe@example.com"),
        ("Call +44 7700 900318 after five.", "PHONE", "+44 7700 900318"),
        ("Ring 07700 900318 please.", "PHONE", "07700 900318"),
        ("My number is 555-0142.", "PHONE", "555-0142"),
        ("IBAN DE00TEST0000000000000000, thanks", "IBAN", "DE00TEST0000000000000000"),
        ("Card 4111 1111 1111 1111 was charged.", "CREDIT_CARD", "4111 1111 1111 1111"),
        ("Login from 192.168.10.20 failed.", "IP_ADDRESS", "192.168.10.20"),
        ("Login from 2001:db8::1 failed.", "IP_ADDRESS", "2001:db8::1"),
        ("SSN 123-45-6789 on file.", "NATIONAL_ID", "123-45-6789"),
        ("NINO AB 12 34 56 C on file.", "NATIONAL_ID", "AB 12 34 56 C"),
        ("Italian tax code RSSMRA00A00H000X. Thanks", "NATIONAL_ID", "RSSMRA00A00H000X"),
        ("Steuer-ID 00 000 000 000. Danke", "NATIONAL_ID", "00 000 000 000"),
        ("VAT number NL000000000B01, rate 21%", "NATIONAL_ID", "NL000000000B01"),
        ("passport number X0000000, address", "NATIONAL_ID", "X0000000"),
        ("sort code 00-00-00, account 00000000.", "BANK_ACCOUNT", "00000000"),
        ("She was born on 12.03.1980 in Oslo.", "DATE_OF_BIRTH", "12.03.1980"),
        ("Dear Mr Mustermann, the refund", "PERSON", "Mustermann"),
        ("Hello, I'm Kari Nordmann. The levy", "PERSON", "Kari Nordmann"),
        ("Kind regards, Sam Sample, tax adviser", "PERSON", "Sam Sample"),
        ("Reminder: 42 Example Close, Sampletown", "ADDRESS", "42 Example Close"),
        ("Musterstraße 1, 12345 Musterstadt", "ADDRESS", "Musterstraße 1"),
    ],
)
def test_each_recogniser_redacts_its_entity(text: str, entity: str, secret: str) -> None:
    redacted, found = redact_text(text)
    assert entity in found
    assert secret not in redacted
    assert f"<{entity}>" in redacted


def test_tax_content_is_kept() -> None:
    text = "The FY2024 return for tax year 2021/22 applies a 20% rate to EUR 1,250,000 due 31 January 2025."
    assert redact_text(text) == (text, [])


def test_validators_reject_look_alikes() -> None:
    assert luhn_valid("4111111111111111") and not luhn_valid("4111111111111112")
    assert "CREDIT_CARD" not in redact_text("Order 4111 1111 1111 1112 shipped")[1]
    assert "IP_ADDRESS" not in redact_text("Meeting at 12:30:45 and version 1.2.3.999")[1]
    assert "DATE_OF_BIRTH" not in redact_text("The deadline is 12.03.2024.")[1]


def test_entity_filter_and_overlap() -> None:
    redactor = PiiRedactor(entities=["EMAIL"])
    redacted, found = redactor.redact("Jane Doe here, jane@example.org, +44 7700 900318")
    assert found == ["EMAIL"] and "+44 7700 900318" in redacted
    spans = PiiRedactor().find("Tax number DE000TEST0001.")
    assert [(s.entity, s.start, s.end) for s in spans] == [("NATIONAL_ID", 11, 24)]


def test_sample_pii_documents_lose_their_emails_and_phones(sample_dir) -> None:
    """Every e-mail address in the bundled sample data is redacted, and no clean doc is touched much."""
    flagged = clean_changed = 0
    for line in (sample_dir / "docs.jsonl").read_text().splitlines():
        doc = json.loads(line)
        redacted, found = redact_text(doc["text"])
        assert "@example." not in redacted
        if "pii_bearing" in doc["labels"]:
            flagged += bool(found)
        elif found:
            clean_changed += 1
    assert flagged >= 55
    assert clean_changed <= 10
