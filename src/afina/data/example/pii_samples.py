"""A generated, labeled set of texts with personal data, in Spanish, Portuguese and English.

    samples = labeled_samples(count=600, seed=0)   # [(text, [(type, start, end), ...]), ...]

Each text is a support-ticket-like sentence with one to three planted values (e-mail addresses,
phone numbers in Spanish, Portuguese, Brazilian, US and international formats, IBANs, payment cards,
DNI/NIE, Portuguese NIF, CPF, SSN, IP addresses) and look-alikes that are not personal data (order
numbers, amounts, dates, times, versions, numbers whose check digits are wrong). Deterministic for a
seed: what `afina.data.pii` is measured on (precision and recall per type).
"""

from __future__ import annotations

import random
import re

from afina.data.pii import DNI_LETTERS, cpf_valid, dni_valid, nif_pt_valid

FIRST = ["ana", "joao", "maria", "carlos", "lucia", "pedro", "sofia", "miguel", "ines", "david", "laura", "tiago"]
LAST = ["garcia", "silva", "santos", "lopez", "pereira", "martin", "costa", "fernandez", "souza", "smith"]
DOMAINS = ["example.com", "empresa.es", "correio.pt", "mail.com.br", "acme.co.uk", "hospital-norte.org"]


def luhn_digit(partial: str) -> str:
    total = 0
    for position, char in enumerate(reversed(partial)):
        value = int(char)
        if position % 2 == 0:
            value = value * 2 - 9 if value > 4 else value * 2
        total += value
    return str((10 - total % 10) % 10)


def email(r: random.Random) -> str:
    address = f"{r.choice(FIRST)}{r.choice(['.', '_', ''])}{r.choice(LAST)}{r.choice(['', str(r.randint(1, 99))])}" \
           f"@{r.choice(DOMAINS)}"
    return address.upper() if r.random() < 0.1 else address


def phone(r: random.Random) -> str:
    n = lambda k: "".join(str(r.randint(0, 9)) for _ in range(k))  # noqa: E731
    return r.choice([
        f"+34 6{n(2)} {n(3)} {n(3)}", f"6{n(2)} {n(2)} {n(2)} {n(2)}", f"+34 9{n(2)} {n(2)} {n(2)} {n(2)}",
        f"+351 9{r.choice('1236')}{n(1)} {n(3)} {n(3)}", f"9{r.choice('1236')}{n(1)} {n(3)} {n(3)}",
        f"+55 ({r.randint(11, 99)}) 9{n(4)}-{n(4)}", f"({r.randint(11, 99)}) 9{n(4)}-{n(4)}",
        f"({r.randint(201, 989)}) {r.randint(200, 999)}-{n(4)}", f"+1 {r.randint(201, 989)}-{r.randint(200, 999)}-{n(4)}",
        f"+44 20 {n(4)} {n(4)}", f"+49 30 {n(8)}", f"6{n(2)}-{n(3)}-{n(3)}", f"+34{n(9)}"])


def iban(r: random.Random) -> str:
    country, length = r.choice([("ES", 20), ("PT", 21), ("DE", 18), ("FR", 23), ("IT", 23)])
    bban = "".join(str(r.randint(0, 9)) for _ in range(length))
    numeric = "".join(str(int(c, 36)) for c in bban + country + "00")
    value = f"{country}{98 - int(numeric) % 97:02d}{bban}"
    return " ".join(value[i : i + 4] for i in range(0, len(value), 4)) if r.random() < 0.6 else value


def card(r: random.Random) -> str:
    prefix, length = r.choice([("4", 16), ("51", 16), ("55", 16), ("37", 15), ("6011", 16)])
    partial = prefix + "".join(str(r.randint(0, 9)) for _ in range(length - len(prefix) - 1))
    number = partial + luhn_digit(partial)
    separator = r.choice([" ", "-", ""])
    groups = [number[i : i + 4] for i in range(0, len(number), 4)]
    return separator.join(groups)


def dni(r: random.Random) -> str:
    if r.random() < 0.7:
        number = r.randint(10_000_000, 99_999_999)
        return f"{number}{r.choice(['', '-'])}{DNI_LETTERS[number % 23]}"
    lead = r.choice("XYZ")
    number = r.randint(1_000_000, 9_999_999)
    return f"{lead}{number:07d}{DNI_LETTERS[int(str('XYZ'.index(lead)) + f'{number:07d}') % 23]}"


def nif(r: random.Random) -> str:
    while True:
        body = r.choice("1235") + "".join(str(r.randint(0, 9)) for _ in range(7))
        remainder = sum(int(d) * w for d, w in zip(body, range(9, 1, -1))) % 11
        return body + str(0 if remainder < 2 else 11 - remainder)


def cpf(r: random.Random) -> str:
    number = [r.randint(0, 9) for _ in range(9)]
    for length in (9, 10):
        total = sum(d * w for d, w in zip(number, range(length + 1, 1, -1)))
        number.append(total * 10 % 11 % 10)
    text = "".join(map(str, number))
    return f"{text[:3]}.{text[3:6]}.{text[6:9]}-{text[9:]}" if r.random() < 0.7 else text


def ssn(r: random.Random) -> str:
    area = r.choice([a for a in range(1, 900) if a != 666])
    return f"{area:03d}-{r.randint(1, 99):02d}-{r.randint(1, 9999):04d}"


def ip(r: random.Random) -> str:
    if r.random() < 0.75:
        return ".".join(str(r.randint(1, 254)) for _ in range(4))
    groups = [f"{r.randint(0, 65535):x}" for _ in range(8)]
    return ":".join(groups) if r.random() < 0.5 else f"fe80::{groups[5]}:{groups[6]}:{groups[7]}"


GENERATORS = {"EMAIL": email, "PHONE": phone, "IBAN": iban, "CARD": card, "DNI": dni, "NIF": nif, "CPF": cpf,
              "SSN": ssn, "IP": ip}



def distractor(r: random.Random) -> str:
    """A look-alike that is not personal data. Identifier-shaped numbers get wrong check digits: one
    whose check digits hold is the identifier it looks like, whatever the text calls it."""
    n = lambda k: "".join(str(r.randint(0, 9)) for _ in range(k))  # noqa: E731

    def failing(make, valid):
        while True:
            value = make()
            if not valid(value):
                return value

    return r.choice([
        f"pedido #{n(6)}", f"order {r.choice('ABCD')}-{n(5)}", f"{r.randint(1, 9)}.{n(3)},{n(2)} €",
        f"${r.randint(1, 99)},{n(3)}.{n(2)}", f"{r.randint(1, 28):02d}/{r.randint(1, 12):02d}/20{r.randint(20, 26)}",
        f"20{r.randint(20, 26)}-{r.randint(1, 12):02d}-{r.randint(1, 28):02d}", f"{r.randint(7, 19)}:{r.randint(0, 5)}0",
        f"v{r.randint(1, 9)}.{r.randint(0, 20)}.{r.randint(0, 9)}", f"ticket {n(7)}", f"ref. {n(4)}-{n(2)}",
        "4111 1111 1111 1112",  # a card number with a wrong check digit
        "ES00 0000 0000 0000 0000 0001",  # an IBAN with a wrong check
        failing(lambda: f"{n(3)}.{n(3)}.{n(3)}-{n(2)}", lambda v: cpf_valid(re.sub(r"\D", "", v))),
        "expediente " + failing(lambda: r.choice("1235") + n(8), nif_pt_valid),
        "albarán " + failing(lambda: n(11), cpf_valid),
        f"000-{n(2)}-{n(4)}",  # an SSN never issued
        failing(lambda: f"{n(8)}{r.choice('ABCDEFGH')}", dni_valid),
        f"{r.randint(1, 9)}.{n(3)}.{n(3)}",  # a large count
    ])


TEMPLATES = {
    "es": ["Hola, soy cliente desde hace años. {0}. Gracias.", "Buenas, os escribo por {d}: {0}, y también {1}.",
           "No puedo acceder al portal ({d}). Mis datos: {0}.", "Por favor, actualizad {0} en mi ficha; {d}."],
    "pt": ["Olá, preciso de ajuda com {d}. Os meus dados: {0}.", "Bom dia, {0} e {1}, conforme {d}.",
           "O sistema não aceita {0}. Obrigado!", "Favor atualizar o cadastro: {0}; {1}; {2}."],
    "en": ["Hi, my details are {0} ({d}).", "Please update {0} and {1} on my account.",
           "The VPN drops every hour; {d}. Contact: {0}.", "Refund for {d}: {0}, {1}, {2}."],
}
LABELS = {"EMAIL": ["correo {v}", "e-mail {v}", "email {v}"],
          "PHONE": ["teléfono {v}", "telefone {v}", "phone {v}", "{v}", "móvil {v}"],
          "IBAN": ["IBAN {v}", "cuenta {v}", "account {v}"], "CARD": ["tarjeta {v}", "cartão {v}", "card {v}"],
          "DNI": ["DNI {v}", "NIE {v}", "documento {v}"], "NIF": ["NIF {v}", "contribuinte {v}", "{v}"],
          "CPF": ["CPF {v}", "{v}"], "SSN": ["SSN {v}", "social security number {v}"],
          "IP": ["IP {v}", "desde la IP {v}", "from {v}"]}


def labeled_samples(count: int = 600, seed: int = 0) -> list[tuple[str, list[tuple[str, int, int]]]]:
    """`count` texts with their personal data's types and spans, every type planted about equally."""
    r = random.Random(seed)
    types = list(GENERATORS)
    samples = []
    for index in range(count):
        template = r.choice(TEMPLATES[r.choice(list(TEMPLATES))])
        slots = template.count("{") - template.count("{d}")
        planted = [types[(index + k) % len(types)] if k == 0 else r.choice(types) for k in range(slots)]
        values = [(kind, GENERATORS[kind](r)) for kind in planted]
        pieces = {str(i): r.choice(LABELS[kind]) for i, (kind, _) in enumerate(values)}
        text, labels = "", []
        for part in _split(template):
            if part.startswith("{") and part != "{d}":
                slot = part[1:-1]
                kind, value = values[int(slot)]
                label = pieces[slot]
                before, after = label.split("{v}")
                text += before
                labels.append((kind, len(text), len(text) + len(value)))
                text += value + after
            elif part == "{d}":
                text += distractor(r)
            else:
                text += part
        samples.append((text, labels))
    return samples


def _split(template: str) -> list[str]:
    parts, current = [], ""
    for char in template:
        if char == "{":
            parts.append(current)
            current = "{"
        elif char == "}":
            parts.append(current + "}")
            current = ""
        else:
            current += char
    return parts + [current]
