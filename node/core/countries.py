"""ISO 3166-1 alpha-2 country codes: a node's country and the licences it holds.

Routing matches a request's country against a consultant's licensed jurisdictions
as text, so a typo ("UK", "IRL") silently matches nobody: codes are checked here.
"""

from __future__ import annotations

from node.core.errors import ConfigError

# fmt: off
ISO_3166_ALPHA2 = frozenset({
    "AD", "AE", "AF", "AG", "AI", "AL", "AM", "AO", "AQ", "AR", "AS", "AT", "AU", "AW",
    "AX", "AZ", "BA", "BB", "BD", "BE", "BF", "BG", "BH", "BI", "BJ", "BL", "BM", "BN",
    "BO", "BQ", "BR", "BS", "BT", "BV", "BW", "BY", "BZ", "CA", "CC", "CD", "CF", "CG",
    "CH", "CI", "CK", "CL", "CM", "CN", "CO", "CR", "CU", "CV", "CW", "CX", "CY", "CZ",
    "DE", "DJ", "DK", "DM", "DO", "DZ", "EC", "EE", "EG", "EH", "ER", "ES", "ET", "FI",
    "FJ", "FK", "FM", "FO", "FR", "GA", "GB", "GD", "GE", "GF", "GG", "GH", "GI", "GL",
    "GM", "GN", "GP", "GQ", "GR", "GS", "GT", "GU", "GW", "GY", "HK", "HM", "HN", "HR",
    "HT", "HU", "ID", "IE", "IL", "IM", "IN", "IO", "IQ", "IR", "IS", "IT", "JE", "JM",
    "JO", "JP", "KE", "KG", "KH", "KI", "KM", "KN", "KP", "KR", "KW", "KY", "KZ", "LA",
    "LB", "LC", "LI", "LK", "LR", "LS", "LT", "LU", "LV", "LY", "MA", "MC", "MD", "ME",
    "MF", "MG", "MH", "MK", "ML", "MM", "MN", "MO", "MP", "MQ", "MR", "MS", "MT", "MU",
    "MV", "MW", "MX", "MY", "MZ", "NA", "NC", "NE", "NF", "NG", "NI", "NL", "NO", "NP",
    "NR", "NU", "NZ", "OM", "PA", "PE", "PF", "PG", "PH", "PK", "PL", "PM", "PN", "PR",
    "PS", "PT", "PW", "PY", "QA", "RE", "RO", "RS", "RU", "RW", "SA", "SB", "SC", "SD",
    "SE", "SG", "SH", "SI", "SJ", "SK", "SL", "SM", "SN", "SO", "SR", "SS", "ST", "SV",
    "SX", "SY", "SZ", "TC", "TD", "TF", "TG", "TH", "TJ", "TK", "TL", "TM", "TN", "TO",
    "TR", "TT", "TV", "TW", "TZ", "UA", "UG", "UM", "US", "UY", "UZ", "VA", "VC", "VE",
    "VG", "VI", "VN", "VU", "WF", "WS", "YE", "YT", "ZA", "ZM", "ZW"
})
# fmt: on
# Codes people type that ISO spells otherwise.
_INSTEAD = {"UK": "GB", "EL": "GR"}


def parse_country(text: str, what: str = "country") -> str:
    """``ie`` or `` IE `` -> ``IE``; anything not an ISO 3166-1 alpha-2 code is refused."""
    code = text.strip().upper()
    if code in ISO_3166_ALPHA2:
        return code
    hint = f" (use {_INSTEAD[code]})" if code in _INSTEAD else ""
    raise ConfigError(
        f"{what} {text.strip()[:20]!r} is not an ISO 3166-1 alpha-2 code{hint}: two letters "
        "such as IE, GB, FR, DE, US"
    )


def parse_countries(text: str, what: str = "jurisdiction") -> list[str]:
    """A comma-separated list of codes, each checked, in order, without repeats."""
    codes: list[str] = []
    for part in text.split(","):
        if part.strip() and (code := parse_country(part, what)) not in codes:
            codes.append(code)
    return codes
