"""The national identifier validators: valid numbers in the layouts the rules match, and near misses.

Every valid value here was generated for these tests (random digits, the check digit computed), never a
real person's number; the invalid ones are mostly the same numbers with the check digit changed.
"""

from __future__ import annotations

import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extproc.detect import validators
from extproc.detect.validators import (
    VALIDATORS,
    au_medicare,
    au_tfn,
    br_cnpj,
    br_cpf,
    ca_sin,
    de_tax_id,
    es_dni,
    es_nie,
    eu_vat,
    fr_nir,
    imei,
    in_aadhaar,
    in_pan,
    it_fiscal_code,
    jp_my_number,
    mrz_td3,
    nl_bsn,
    pl_pesel,
    se_personnummer,
    sg_nric_fin,
    uk_nhs,
    uk_nino,
)

# Non-ASCII look-alikes stdnum's own compact() would fold: the validators must refuse them (the rules
# read the normalised view, where such digits are already ASCII).
FULLWIDTH_ONE = "\uff11"
ARABIC_INDIC_ONE = "\u0661"

CASES: dict[str, tuple[list[str], list[str]]] = {
    "uk_nino": (
        ["AB123456C", "AB 12 34 56 C", "JG 103759 A", "ce123456d", "ZY 99 88 77 B"],
        [
            "QQ 12 34 56 C",  # HMRC's documentation example: Q is never a prefix letter
            "DA123456A",  # D, F, I, Q, U, V never start a prefix
            "AO123456A",  # O is never the second letter
            "GB123456A",  # unallocated prefixes
            "TN 12 34 56 B",
            "AB123456E",  # suffix A-D only
            "AB12345C",
            "AB1234567C",
            "AB-12-34-56-C",  # the rule only reads spaces
            "",
        ],
    ),
    "uk_nhs": (
        ["4757628331", "475 762 8331", "475-762-8331", "4444945443", "4034093056"],
        [
            "4757628330",  # check digit
            "4444945440",
            "475762833",  # 9 digits
            "47576283310",
            "1111111111",  # passes mod 11, never issued
            "0000000000",
            "475 762 833" + FULLWIDTH_ONE,
            "475.762.8331",
        ],
    ),
    "ca_sin": (
        ["126464460", "126 464 460", "734-207-509", "737293068", "940 560 865"],
        [
            "126464461",  # Luhn
            "734207500",
            "026464460",  # 0 is never a first digit
            "826464465",  # 8: business numbers
            "12646446",
            "1264644600",
            "999999999",
            "126.464.460",
        ],
    ),
    "in_aadhaar": (
        ["348654659255", "3486 5465 9255", "5143-0154-0486", "444643114367", "859413468367"],
        [
            "348654659250",  # Verhoeff
            "514301540480",
            "148654659255",  # first digit 0 or 1 is never issued
            "34865465925",
            "3486546592550",
            "222222222222",
            "3486 5465 925" + ARABIC_INDIC_ONE,
        ],
    ),
    "in_pan": (
        ["ABCPE1234F", "BNZPM2501F", "AAACR5055K", "ZYXTQ9876Z"],
        [
            "ABCDE1234F",  # D is no holder type
            "ABCPE0000F",  # serial 0000
            "ABCPE1234",
            "ABCPE12345",
            "ABC1E1234F",
            "abcpe1234f",  # the rule is upper case, so is the validator
            "ABCPE 1234 F",
        ],
    ),
    "au_tfn": (
        ["346019528", "346 019 528", "292-327-523", "782991843", "679747566"],
        ["346019520", "292327520", "34601952", "3460195281", "000000000", "346.019.528"],
    ),
    "au_medicare": (
        ["4136984857", "4136 98485 7", "6956-82307-5", "2571259054", "4136 98485 7 1", "5320494524"],
        [
            "4136984867",  # check digit (ninth)
            "4136984850",  # issue number 0
            "41369848570",  # individual reference number 0
            "1136984857",  # first digit 2-6
            "7136984857",
            "413698485",
            "413698485712",
        ],
    ),
    "de_tax_id": (
        ["13570869260", "13 570 869 260", "97041569232", "47062965185", "71225629435"],
        [
            "13570869261",  # mod 11,10
            "97041569230",
            "03570869260",  # never starts with 0
            "12345678903",  # no digit repeated in the first ten
            "11111234569",  # a digit four times
            "1357086926",
            "13-570-869-260",
        ],
    ),
    "fr_nir": (
        [
            "271117299119536",
            "2 71 11 72 991 195 36",
            "2 58 01 76 296 054 56",
            "185052A00412356",  # Corsica: 2A and 2B count as 19 and 18 in the key
            "1 85 05 2B 004 123 83",
        ],
        [
            "271117299119530",  # key
            "271117299119546",
            "571117299119536",  # sex digit
            "185052C00412356",  # only 2A and 2B
            "27111729911953",
            "2711172991195360",
            "2-71-11-72-991-195-36",
        ],
    ),
    "es_dni": (
        ["47265023T", "47265023-T", "55205168Q", "14272573S", "83854288z"],
        ["47265023A", "55205168R", "4726502T", "472650231T", "X5444567N", "47265023-1"],
    ),
    "es_nie": (
        ["Z5444567N", "Y0334589E", "X9857541V", "Y-4931965-C"],
        ["Z5444567M", "Y0334589F", "A5444567N", "Z544456N", "Z54445677N", "47265023T"],
    ),
    "it_fiscal_code": (
        ["QZXKJW85C12H501I", "XWKZQJ92T55F205L", "JXQWZK70A01L219F", "QZXKJW85C12H50MA", "jxqwzk70a01l2mvf"],
        [
            "QZXKJW85C12H501J",  # check letter
            "XWKZQJ92T55F205M",
            "QZXKJW85Z12H501I",  # Z is no month
            "QZXKJW85C72H501I",  # day 72 is no date (1-31, +40 for women)
            "QZXKJW85C12H501",
            "12345678903",  # an 11-digit company code is not a person's
        ],
    ),
    "nl_bsn": (
        ["211299972", "2112.99.972", "245 292 755", "136935552", "281116635"],
        ["211299970", "245292750", "11299972", "2112999720", "000000000", "24529275a"],
    ),
    "br_cpf": (
        ["99539231590", "995.392.315-90", "251.766.551-60", "37804109741", "29555528284"],
        ["99539231591", "251.766.551-61", "111.111.111-11", "00000000000", "9953923159", "995539231590"],
    ),
    "br_cnpj": (
        ["62062789000162", "62.062.789/0001-62", "50.966.766/0001-01", "42334017000125", "7KQ3B9R2NW5T83"],
        ["62062789000160", "50.966.766/0001-00", "11.111.111/1111-11", "6206278900016", "7KQ3B9R2NW5T8A"],
    ),
    "pl_pesel": (
        ["99102572447", "84041384927", "99030753042", "72091655762"],
        [
            "99102572440",  # check digit
            "84041384920",
            "99133172449",  # month 13 is none of the centuries' months
            "9910257244",
            "991025724470",
        ],
    ),
    "se_personnummer": (
        ["711206-8759", "561124-4624", "19930925-3467", "5406286194", "195406286194", "711206+8759"],
        [
            "711206-8750",  # Luhn
            "561124-4620",
            "711306-8757",  # month 13
            "711266-8756",  # Luhn-valid, but a coordination number (day + 60) is not a personnummer
            "71120-68759",
            "711206/8759",
        ],
    ),
    "sg_nric_fin": (
        ["S1234567D", "M3049435T", "S1837872H", "T7519486I", "F0125307R", "M1234567K"],
        ["S1234567A", "M3049435N", "T7519486J", "X1837872H", "S183787H", "S18378722H", "G0125307R"],
    ),
    "jp_my_number": (
        ["164436615984", "1644 3661 5984", "8855-2038-3826", "736135327227", "386640165567"],
        ["164436615980", "885520383820", "16443661598", "1644366159841", "000000000000"],
    ),
    "imei": (
        ["356832677131696", "35-683267-713169-6", "35 186760 748036 2", "359631885057777", "351065477852782"],
        [
            "356832677131690",  # Luhn
            "351867607480360",
            "35683267713169",  # 14 digits: no check digit to verify
            "3568326771316961",  # IMEISV: none either
            "000000000000000",
        ],
    ),
    "eu_vat": (
        [
            "DE205978870",
            "DE 186735881",
            "FR35583532155",
            "NL729337728B01",
            "ATU85286547",
            "IT64678030780",
            "PL8723968958",
            "BE0809100853",
            "ESB69176816",
            "IE4969624G",
            "de205978870",
        ],
        [
            "DE205978871",  # check digit
            "FR35583532156",
            "NL729337729B01",
            "EU372000041",  # the OSS scheme's numbers are no member state's
            "GB980780684",  # the United Kingdom is no member state (Northern Ireland is XI)
            "XX205978870",
            "DE20597887",
            "DE-205978870",
            "",
        ],
    ),
    "mrz_td3": (
        [
            "QX72048150UTO8503127F3307113ZK8830192<<<<<46",
            "K04Y933162UTO9201280M2904054<<<<<<<<<<<<<<<4",
            "5583021AB9UTO0112307<3401011<<<<<<<<<<<<<<<6",
            "P<UTOQZXKWINSKI<<JANE<MARA<<<<<<<<<<<<<<<<<<\nQX72048150UTO8503127F3307113ZK8830192<<<<<46",
            # ICAO 9303's specimen, which the rule lets through: it confirms the implementation
            "L898902C36UTO7408122F1204159ZE184226B<<<<<10",
        ],
        [
            "QX72048151UTO8503127F3307113ZK8830192<<<<<46",  # document number check digit
            "QX72048150UTO8503128F3307113ZK8830192<<<<<46",  # birth date check digit
            "QX72048150UTO8503127F3307114ZK8830192<<<<<46",  # expiry check digit
            "QX72048150UTO8503127F3307113ZK8830193<<<<<46",  # personal number check digit
            "QX72048150UTO8503127F3307113ZK8830192<<<<<47",  # composite
            "QX72048150UTO8503127F3307113ZK883019<<<<<<46",  # a personal number without its check digit
            "QX72048150UTO8503127F3307113ZK8830192<<<<<4",
            "qx72048150uto8503127f3307113zk8830192<<<<<46",
            "",
        ],
    ),
}


def _params() -> list[object]:
    params = []
    for name, (valid, invalid) in CASES.items():
        params += [pytest.param(name, value, True, id=f"{name}-valid-{value}") for value in valid]
        params += [pytest.param(name, value, False, id=f"{name}-invalid-{value}") for value in invalid]
    return params


@pytest.mark.parametrize(("name", "value", "expected"), _params())
def test_national_validator(name: str, value: str, expected: bool) -> None:
    assert VALIDATORS[name](value) is expected


def test_every_national_validator_is_tested() -> None:
    national = {
        uk_nino,
        uk_nhs,
        ca_sin,
        in_aadhaar,
        in_pan,
        au_tfn,
        au_medicare,
        de_tax_id,
        fr_nir,
        es_dni,
        es_nie,
        it_fiscal_code,
        nl_bsn,
        br_cpf,
        br_cnpj,
        pl_pesel,
        se_personnummer,
        sg_nric_fin,
        jp_my_number,
        imei,
        eu_vat,
        mrz_td3,
    }
    assert {VALIDATORS[name] for name in CASES} == national


def test_stdnum_exceptions_are_not_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    """A library bug must not turn into an exception in the scan: the validator answers False."""

    def broken(number: str) -> bool:
        raise RuntimeError(number)

    monkeypatch.setattr(validators.stdnum_ca_sin, "is_valid", broken)
    assert ca_sin("126464460") is False


# --- hand-written checks against their definitions ----------------------------------------------------


def _medicare_check(first_eight: str) -> str:
    weights = (1, 3, 7, 9, 1, 3, 7, 9)
    return str(sum(w * int(d) for w, d in zip(weights, first_eight, strict=True)) % 10)


@settings(max_examples=200, deadline=None)
@given(body=st.text(alphabet="0123456789", min_size=7, max_size=7), first=st.sampled_from("23456"))
def test_au_medicare_accepts_every_computed_check_digit(body: str, first: str) -> None:
    eight = first + body
    number = eight + _medicare_check(eight) + "1"
    assert au_medicare(number) is (len(set(number)) > 1)
    wrong = str((int(_medicare_check(eight)) + 1) % 10)
    assert not au_medicare(eight + wrong + "1")


def _nric_letter(series: str, digits: str) -> str:
    total = sum(w * int(d) for w, d in zip((2, 7, 6, 5, 4, 3, 2), digits, strict=True))
    if series == "M":
        return "KLJNPQRTUWX"[10 - (total + 3) % 11]
    offset = 4 if series in "TG" else 0
    letters = "JZIHGFEDCBA" if series in "ST" else "XWUTRQPNMLK"
    return letters[(total + offset) % 11]


@settings(max_examples=200, deadline=None)
@given(series=st.sampled_from("STFGM"), digits=st.text(alphabet="0123456789", min_size=7, max_size=7))
def test_sg_nric_fin_has_exactly_one_check_letter(series: str, digits: str) -> None:
    valid = [letter for letter in string.ascii_uppercase if sg_nric_fin(series + digits + letter)]
    assert valid == [_nric_letter(series, digits)]


@settings(max_examples=200, deadline=None)
@given(value=st.text(alphabet=string.ascii_uppercase + string.digits + " ", max_size=20))
def test_uk_nino_is_structure_only(value: str) -> None:
    """Any two allowed prefix letters, six digits and A-D are a NINO; nothing else is."""
    compact = value.replace(" ", "")
    expected = (
        len(compact) == 9
        and compact[0] not in "DFIQUV0123456789"
        and compact[1] not in "DFIOQUV0123456789"
        and compact[:2] not in {"BG", "GB", "KN", "NK", "NT", "TN", "ZZ"}
        and compact[2:8].isdigit()
        and compact[8] in "ABCD"
    )
    assert uk_nino(value) is expected
