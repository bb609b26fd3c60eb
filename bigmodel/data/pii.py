"""PII scrubbing: a data-pipeline stage that replaces personal data in text by typed placeholders.

On with `DataConfig.scrub_pii = True`, for every text the pipelines read (LM and BERT
documents from files or TFDS, classification and prompted-SFT table columns, translation
lines, CoNLL tokens one at a time), train and eval alike. Found, in this order (an earlier
kind wins where two overlap):

  <URL_CREDENTIALS>  scheme://user:password@host... (the whole URL)
  <EMAIL>            local@domain.tld
  <IBAN>             2 letters, 2 check digits, 11-30 alphanumerics (spaces every 4 allowed)
                     whose ISO 13616 mod-97 check is 1
  <CARD>             13-19 digits (single spaces or dashes between groups) with a card brand's
                     prefix and length (Visa, Mastercard, Amex, ...) passing the Luhn check
  <IP>               IPv4 a.b.c.d (each 0-255, not inside a longer dotted number) and IPv6
                     with at least 3 groups and '::' or 8 groups
  <PHONE>            +CC and 7-15 digits, or (NNN) NNN-NNNN / NNN-NNN-NNNN / NNN.NNN.NNNN, or
                     0NN NNN NNNN style local numbers (at least 9 digits with separators)

Near-misses that survive on purpose: a 16-digit order number failing Luhn; a bare run of digits
(order or tracking ids such as 113542617735902: no separators, no '+'); an IBAN-shaped string
failing mod 97; `user@host` without a dot in the domain; dates (2024-01-15); a version string
`v1.2.3.4` or `1.2.3.4-beta` or `version 1.2.3.4`: a dotted quad preceded by 'v', 'version' or
followed by '-'/'.' and more is a version, not an address. A bare `1.2.3.4` IS scrubbed as an
<IP>: it is a valid address and the scrubber errs on the side of removal there.

Counts per type accumulate in the process-wide `COUNTS` (reset by `reset()`): the pipelines log
them, and `bigmodel train`/`finetune` put them in summary.json under "pii".
"""

from __future__ import annotations

import collections
import logging
import re
from typing import Iterable

log = logging.getLogger(__name__)

TYPES = ("URL_CREDENTIALS", "EMAIL", "IBAN", "CARD", "IP", "PHONE")
COUNTS: collections.Counter = collections.Counter()
STATS = {"texts": 0, "chars": 0}

_URL_CRED = r"(?P<URL_CREDENTIALS>\b[a-zA-Z][a-zA-Z0-9+.-]{1,15}://[^\s:/@\"'<>]+:[^\s/@\"'<>]+@[^\s\"'<>]+)"
_EMAIL = r"(?P<EMAIL>\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b)"
_IBAN = r"(?P<IBAN>\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,4})?\b)"
_CARD = r"(?P<CARD>(?<![\d.-])\d(?:[ -]?\d){12,18}(?!\d|[.-]\d))"
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_IPV4 = (r"(?<![\w.-])(?<!\bv)(?<!\b[Vv]ersion )(?<!\b[Vv]er )" + _OCTET + r"(?:\." + _OCTET +
         r"){3}(?![\w.-]*\w)(?!\.\d)")
_H = r"[0-9a-fA-F]{1,4}"
_IPV6 = (r"(?<![\w:])(?:(?:" + _H + r":){7}" + _H + r"|(?:" + _H + r":){1,6}:(?:" + _H + r":){0,5}"
         + _H + r"|::(?:" + _H + r":){1,6}" + _H + r")(?![\w:])")
_IP = r"(?P<IP>" + _IPV4 + "|" + _IPV6 + ")"
_PHONE = (r"(?P<PHONE>(?<![\w+.-])(?:"
          r"\+\d{1,3}[ .-]?(?:\(\d{1,4}\)[ .-]?)?\d{1,4}(?:[ .-]?\d{2,4}){1,4}"   # +CC ...
          r"|\(\d{3}\) ?\d{3}[ .-]\d{4}"                                              # (NNN) NNN-NNNN
          r"|\d{3}(?P<psep>[.-])\d{3}(?P=psep)\d{4}"                                                 # NNN-NNN-NNNN
          r"|0\d{1,4}[ ]\d{3,4}[ ]\d{3,4}"                                            # 0NN NNN NNNN
          r")(?![\w-]|\.\d))")
PATTERN = re.compile("|".join((_URL_CRED, _EMAIL, _IBAN, _CARD, _IP, _PHONE)))


def luhn_ok(digits: str) -> bool:
  total = 0
  for i, ch in enumerate(reversed(digits)):
    d = int(ch)
    if i % 2:
      d = d * 2 - 9 if d > 4 else d * 2
    total += d
  return total % 10 == 0


# (prefixes, lengths) of the card brands: Visa, Mastercard, Amex, Discover, JCB, Diners, UnionPay,
# Maestro. A Luhn-valid digit run outside these (an order number, 1 in 10 pass Luhn) is no card.
_BRANDS = ((("4",), (13, 16, 19)), (tuple(map(str, range(51, 56))), (16,)),
           (tuple(map(str, range(2221, 2721))), (16,)), (("34", "37"), (15,)),
           (("6011", "65") + tuple(map(str, range(644, 650))), (16, 17, 18, 19)),
           (tuple(map(str, range(3528, 3590))), (16, 17, 18, 19)),
           (("36", "38", "39") + tuple(map(str, range(300, 306))), (14, 15, 16)),
           (("62",), (16, 17, 18, 19)), (("50", "56", "57", "58"), (16, 17, 18, 19)))


def card_ok(digits: str) -> bool:
  """A payment card number: a brand's prefix and length, and the Luhn check."""
  return any(len(digits) in lengths and digits.startswith(prefixes)
             for prefixes, lengths in _BRANDS) and luhn_ok(digits)


def iban_ok(iban: str) -> bool:
  """ISO 13616: move the first 4 characters to the end, letters to 10..35, the number mod 97 is 1."""
  s = iban.replace(" ", "")
  if not 15 <= len(s) <= 34:
    return False
  moved = s[4:] + s[:4]
  return int("".join(str(int(c, 36)) for c in moved)) % 97 == 1


def _digit_count(s: str) -> int:
  return sum(c.isdigit() for c in s)


def _replacement(m: re.Match, counts: collections.Counter) -> str:
  kind = m.lastgroup
  text = m.group(0)
  if kind == "IBAN" and not iban_ok(text):
    return text
  if kind == "CARD" and not card_ok(re.sub(r"\D", "", text)):
    return _phone_inside(text, counts)
  if kind == "PHONE" and not 7 <= _digit_count(text) <= 15:
    return text
  counts[kind] += 1
  return f"<{kind}>"


def _phone_inside(text: str, counts: collections.Counter) -> str:
  """A digit run that is no card may still be a phone number (+CC is never a card)."""
  m = re.fullmatch(_PHONE, text)
  if m and 7 <= _digit_count(text) <= 15 and any(c in text for c in " -"):
    counts["PHONE"] += 1
    return "<PHONE>"
  return text


def scrub(text: str, counts: collections.Counter | None = None) -> str:
  """`text` with PII replaced by <TYPE> placeholders; adds to `counts` (default: COUNTS)."""
  counts = COUNTS if counts is None else counts
  STATS["texts"] += 1
  STATS["chars"] += len(text)
  if not text or not any(c.isdigit() or c == "@" for c in text):
    return text       # every pattern needs a digit or an '@': the common case costs one scan
  return PATTERN.sub(lambda m: _replacement(m, counts), text)


def scrub_all(texts: Iterable[str]) -> list[str]:
  return [scrub(t) for t in texts]


def scrub_rows(rows: Iterable[tuple[str, ...]]) -> list[tuple[str, ...]]:
  return [tuple(scrub(t) for t in row) for row in rows]


def reset() -> None:
  COUNTS.clear()
  STATS.update(texts=0, chars=0)


def report(what: str) -> dict:
  """Logs and returns the counts so far ({type: n} for every type, and texts scanned)."""
  out = {k: COUNTS.get(k, 0) for k in TYPES}
  log.info("PII scrubbing (%s): %s in %d texts (%.1f MB)", what,
           ", ".join(f"{k} {v}" for k, v in out.items()), STATS["texts"], STATS["chars"] / 1e6)
  return {**out, "texts": STATS["texts"]}
