"""Held-out tasks of the kind afina's users bring, generated deterministically (seeded, offline).

    from tasks import make_task
    splits = make_task("invoices", train=300, validation=30, test=60, seed=0)
    splits["train"][0]  # {"messages": [{"role": "system", ...}, {"role": "user", ...}, {"role": "assistant", ...}]}

- `invoices`: structured extraction. Invoices and orders written in Spanish, Portuguese or English, as
  a text a user pastes from a PDF: labels, line order and surface formats vary ("3 de marzo de 2025",
  "03/03/2025", "March 3, 2025"; "1.234,56 €", "R$ 1.234,56", "$1,234.56"), with distractors (a due
  date, a subtotal and tax line). The answer is one JSON object whose date is ISO and whose total is a
  number with its ISO currency code. Main metric: field accuracy.
- `intents`: classification among 14 banking and insurance request types, in the same three
  languages, with greetings, signatures and typos around the request. The answer is the label alone.
  Main metric: accuracy (exact match).
- `replies`: a short free-text answer: a customer writes about a delivery in Spanish, Portuguese or
  English; the answer is the one-sentence reply an agent would send, in the customer's language, with
  the order number, date and city carried over. Main metric: ROUGE-L.
- `tickets`: afina's bundled IT-support tickets (src/afina/data/example/tickets.jsonl), triaged into
  JSON. Main metric: field accuracy.

Every split is a list of chat rows (`{"messages": [...]}`), written as JSONL by `write_task`. The test
rows are distinct from every training and validation row (no content is shared), so the tuned model
never sees them. The same name, sizes and seed always give the same rows.
"""

from __future__ import annotations

import json
import random
from datetime import date, timedelta
from pathlib import Path

MONTHS = {"es": ["enero", "febrero", "marzo", "abril", "mayo", "junio", "julio", "agosto", "septiembre", "octubre",
                 "noviembre", "diciembre"],
          "pt": ["janeiro", "fevereiro", "março", "abril", "maio", "junho", "julho", "agosto", "setembro", "outubro",
                 "novembro", "dezembro"],
          "en": ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
                 "November", "December"]}
LANGUAGES = ("es", "pt", "en")


# ---------------------------------------------------------------- surface formats

def format_date(day: date, language: str, rng: random.Random) -> str:
    """`day` as a document in `language` might write it."""
    month = MONTHS[language][day.month - 1]
    styles = {"es": [f"{day.day} de {month} de {day.year}", f"{day:%d/%m/%Y}", f"{day.day}/{day.month}/{day.year}",
                     f"{day:%d-%m-%Y}", f"{day:%Y-%m-%d}"],
              "pt": [f"{day.day} de {month} de {day.year}", f"{day:%d/%m/%Y}", f"{day:%d.%m.%Y}", f"{day:%Y-%m-%d}"],
              "en": [f"{month} {day.day}, {day.year}", f"{day.day} {month[:3]} {day.year}", f"{day:%Y-%m-%d}",
                     f"{day.day} {month} {day.year}"]}
    return rng.choice(styles[language])


def group_thousands(cents: int, thousands: str, decimal: str) -> str:
    """An amount in cents written with the given separators: 123456 -> "1.234,56"."""
    whole, fraction = divmod(cents, 100)
    grouped = f"{whole:,}".replace(",", thousands)
    return f"{grouped}{decimal}{fraction:02d}"


def format_amount(cents: int, currency: str, rng: random.Random) -> str:
    """An amount as invoices in that currency write it ("1.234,56 €", "R$ 1.234,56", "$1,234.56")."""
    european = group_thousands(cents, rng.choice([".", ".", " ", ""]), ",")
    english = group_thousands(cents, rng.choice([",", ",", ""]), ".")
    styles = {"EUR": [f"{european} €", f"{european} EUR", f"€{european}", f"EUR {european}"],
              "BRL": [f"R$ {european}", f"R${european}", f"{european} BRL", f"BRL {european}"],
              "USD": [f"${english}", f"USD {english}", f"{english} USD", f"US$ {english}"]}
    return rng.choice(styles[currency])


# ---------------------------------------------------------------- invoices: extraction into JSON

INVOICE_SYSTEM = ('Extract the document into JSON only: {"type": "invoice"|"order", "number": ..., "date": '
                  '"YYYY-MM-DD" (issue date), "customer": ..., "total": number, "currency": "EUR"|"BRL"|"USD"}')
COMPANIES = ["Distribuciones Ibéricas S.L.", "Talleres Gómez e Hijos", "Clínica Dental Sonrisa", "Agro Levante SA",
             "Comercial Andina Ltda.", "Padaria Pão Quente Ltda", "Construtora Horizonte S.A.", "Farmácia Vida Ltda",
             "Northwind Traders Inc.", "Blue Harbor Logistics LLC", "Greenfield Analytics Ltd", "Acme Office Supply",
             "Hotel Mirador del Sur", "Bufete Ortega & Asociados", "Transportes Rápidos do Norte", "Café Aurora Lda",
             "Lisboa Print Services Lda", "Summit Legal Partners", "Laboratorio Análisis Norte", "Metalúrgica Paulista"]
ITEMS = {"es": ["Tóner HP 85A", "Sillas de oficina", "Mantenimiento mensual", "Licencias de software", "Papel A4",
                "Servicio de limpieza", "Portátiles Lenovo", "Consultoría fiscal"],
         "pt": ["Toner HP 85A", "Cadeiras de escritório", "Manutenção mensal", "Licenças de software", "Papel A4",
                "Serviço de limpeza", "Notebooks Dell", "Consultoria tributária"],
         "en": ["HP 85A toner", "Office chairs", "Monthly maintenance", "Software licenses", "A4 paper",
                "Cleaning service", "Lenovo laptops", "Tax advisory"]}
INVOICE_LABELS = {  # type -> language -> (title, number labels, issue-date labels, customer labels, total labels)
    "invoice": {"es": (["FACTURA", "Factura", "FACTURA SIMPLIFICADA"], ["Nº", "Número", "Factura nº"],
                       ["Fecha", "Fecha de emisión", "Emitida el"], ["Cliente", "Facturar a", "Destinatario"],
                       ["TOTAL", "Total a pagar", "Importe total"]),
                "pt": (["FATURA", "Fatura", "NOTA FISCAL"], ["Nº", "Número", "Fatura n.º"],
                       ["Data", "Data de emissão", "Emitida em"], ["Cliente", "Faturar a", "Destinatário"],
                       ["TOTAL", "Total a pagar", "Valor total"]),
                "en": (["INVOICE", "Invoice", "TAX INVOICE"], ["No.", "Invoice #", "Number"],
                       ["Date", "Issue date", "Issued on"], ["Bill to", "Customer", "Client"],
                       ["TOTAL", "Amount due", "Total"])},
    "order": {"es": (["PEDIDO", "Pedido de compra", "ORDEN DE COMPRA"], ["Nº", "Pedido nº", "Referencia"],
                     ["Fecha", "Fecha del pedido", "Realizado el"], ["Cliente", "Comprador", "Solicitante"],
                     ["TOTAL", "Total pedido", "Importe"]),
              "pt": (["PEDIDO", "Pedido de compra", "ORDEM DE COMPRA"], ["Nº", "Pedido n.º", "Referência"],
                     ["Data", "Data do pedido", "Feito em"], ["Cliente", "Comprador", "Solicitante"],
                     ["TOTAL", "Total do pedido", "Valor"]),
              "en": (["PURCHASE ORDER", "Order", "PO"], ["No.", "Order #", "Reference"],
                     ["Date", "Order date", "Placed on"], ["Customer", "Buyer", "Ordered by"],
                     ["TOTAL", "Order total", "Amount"])}}
DUE_LABELS = {"es": "Vencimiento", "pt": "Vencimento", "en": "Due date"}
TAX_LABELS = {"es": ("Base imponible", "IVA 21%"), "pt": ("Subtotal", "Impostos"), "en": ("Subtotal", "Tax")}
CURRENCIES = {"es": ["EUR"], "pt": ["BRL", "BRL", "EUR"], "en": ["USD", "USD", "EUR"]}


def invoice_row(rng: random.Random) -> dict:
    """One invoice or order as pasted text, and its JSON answer."""
    language, kind = rng.choice(LANGUAGES), rng.choice(["invoice", "invoice", "order"])
    titles, number_labels, date_labels, customer_labels, total_labels = INVOICE_LABELS[kind][language]
    currency = rng.choice(CURRENCIES[language])
    issued = date(2024, 1, 1) + timedelta(days=rng.randrange(730))
    prefix = {"invoice": ["F-", "FAC-", "INV-", "NF ", "A"], "order": ["PO-", "PED-", "OC-", "P"]}[kind]
    number = f"{rng.choice(prefix)}{issued.year if rng.random() < 0.5 else ''}{rng.randrange(10, 99999):05d}"
    customer = rng.choice(COMPANIES)
    cents = rng.randrange(1_000, 2_500_000)
    lines = [f"{rng.choice(titles)} {rng.choice(number_labels)} {number}",
             f"{rng.choice(date_labels)}: {format_date(issued, language, rng)}",
             f"{rng.choice(customer_labels)}: {customer}",
             f"{rng.randrange(1, 40)} x {rng.choice(ITEMS[language])}"]
    if kind == "invoice" and rng.random() < 0.6:  # a later date that is not the issue date
        due = issued + timedelta(days=rng.choice([15, 30, 45, 60]))
        lines.insert(rng.randrange(2, len(lines) + 1), f"{DUE_LABELS[language]}: {format_date(due, language, rng)}")
    if rng.random() < 0.5:  # amounts that are not the total
        net = round(cents / 1.21)
        lines += [f"{TAX_LABELS[language][0]}: {format_amount(net, currency, rng)}",
                  f"{TAX_LABELS[language][1]}: {format_amount(cents - net, currency, rng)}"]
    lines.append(f"{rng.choice(total_labels)}: {format_amount(cents, currency, rng)}")
    answer = {"type": kind, "number": number, "date": issued.isoformat(), "customer": customer,
              "total": cents / 100, "currency": currency}
    return chat(INVOICE_SYSTEM, "\n".join(lines), json.dumps(answer, ensure_ascii=False))


# ---------------------------------------------------------------- intents: many-label classification

INTENT_REQUESTS = {  # label -> language -> requests. Slots: {card} {amount} {date}
    "card_lost": {"es": ["He perdido mi tarjeta terminada en {card}.", "No encuentro mi tarjeta de débito, creo que la perdí."],
                  "pt": ["Perdi meu cartão final {card}.", "Não encontro meu cartão de débito, acho que perdi."],
                  "en": ["I lost my card ending in {card}.", "I can't find my debit card anywhere, I think I lost it."]},
    "card_blocked": {"es": ["Mi tarjeta {card} aparece bloqueada al pagar.", "El cajero rechaza mi tarjeta, dice bloqueada."],
                     "pt": ["Meu cartão {card} aparece bloqueado nas compras.", "O caixa eletrônico recusa meu cartão bloqueado."],
                     "en": ["My card {card} shows as blocked when I pay.", "The ATM keeps declining my card as blocked."]},
    "transfer_failed": {"es": ["La transferencia de {amount} del {date} no ha llegado.", "Hice un envío de {amount} y salió con error."],
                        "pt": ["A transferência de {amount} do dia {date} não chegou.", "Fiz um PIX de {amount} e deu erro."],
                        "en": ["My transfer of {amount} on {date} never arrived.", "I sent {amount} and the transfer failed."]},
    "refund_request": {"es": ["Quiero que me devuelvan el cargo de {amount} que no reconozco de la tienda.",
                              "Me cobraron {amount} dos veces, pido el reembolso."],
                       "pt": ["Quero o estorno da cobrança de {amount} em duplicidade.", "Fui cobrado {amount} duas vezes, peço reembolso."],
                       "en": ["I was charged {amount} twice, please refund one.", "Please refund the {amount} charge from the store."]},
    "loan_inquiry": {"es": ["¿Qué condiciones tiene un préstamo personal de {amount}?", "Quiero pedir un préstamo para un coche."],
                     "pt": ["Quais as condições de um empréstimo pessoal de {amount}?", "Quero pedir um empréstimo para carro."],
                     "en": ["What are the terms for a personal loan of {amount}?", "I'd like to apply for a car loan."]},
    "mortgage_rate": {"es": ["¿A cuánto está el tipo de interés de la hipoteca fija?", "Quiero revisar el interés de mi hipoteca."],
                      "pt": ["Qual a taxa de juros do financiamento imobiliário?", "Quero revisar os juros do meu financiamento da casa."],
                      "en": ["What is the current fixed mortgage rate?", "I want to review the interest rate on my mortgage."]},
    "account_opening": {"es": ["Quiero abrir una cuenta corriente nueva.", "¿Cómo abro una cuenta para mi hija?"],
                        "pt": ["Quero abrir uma conta corrente nova.", "Como abro uma conta para minha filha?"],
                        "en": ["I want to open a new checking account.", "How do I open an account for my daughter?"]},
    "account_closure": {"es": ["Quiero cerrar mi cuenta y llevarme el saldo.", "Por favor den de baja mi cuenta el {date}."],
                        "pt": ["Quero encerrar minha conta e sacar o saldo.", "Por favor encerrem minha conta no dia {date}."],
                        "en": ["I want to close my account and withdraw the balance.", "Please close my account on {date}."]},
    "address_change": {"es": ["Me he mudado, necesito cambiar mi dirección postal.", "Actualicen mi domicilio, por favor."],
                       "pt": ["Mudei de casa, preciso alterar meu endereço.", "Atualizem meu endereço de correspondência, por favor."],
                       "en": ["I moved, I need to update my mailing address.", "Please change the address on my account."]},
    "fraud_report": {"es": ["Veo compras de {amount} que yo no hice, creo que es fraude.", "Alguien ha usado mis datos para pagar {amount}."],
                     "pt": ["Tem compras de {amount} que eu não fiz, acho que é fraude.", "Alguém usou meus dados para pagar {amount}."],
                     "en": ["There are purchases of {amount} I didn't make, this is fraud.", "Someone used my details to pay {amount}."]},
    "fee_complaint": {"es": ["¿Por qué me cobran {amount} de comisión de mantenimiento?", "No estoy de acuerdo con la comisión de este mes."],
                      "pt": ["Por que me cobraram {amount} de tarifa de manutenção?", "Não concordo com a tarifa deste mês."],
                      "en": ["Why was I charged a {amount} maintenance fee?", "I disagree with this month's account fee."]},
    "statement_request": {"es": ["Necesito el extracto de la cuenta de {date}.", "Envíenme el certificado de saldos para Hacienda."],
                          "pt": ["Preciso do extrato da conta de {date}.", "Me enviem o informe de rendimentos para o IR."],
                          "en": ["I need my account statement for {date}.", "Please send me a balance certificate for taxes."]},
    "insurance_claim": {"es": ["Tuve un accidente con el coche el {date}, quiero dar parte al seguro.",
                               "Se inundó la cocina, quiero abrir un siniestro del seguro de hogar."],
                        "pt": ["Bati o carro no dia {date}, quero acionar o seguro.", "A cozinha alagou, quero abrir um sinistro do seguro."],
                        "en": ["I had a car accident on {date} and want to file a claim.", "My kitchen flooded, I need to open a home insurance claim."]},
    "password_reset": {"es": ["No puedo entrar en la app, olvidé la contraseña.", "Necesito restablecer la clave de la banca online."],
                       "pt": ["Não consigo entrar no app, esqueci a senha.", "Preciso redefinir a senha do internet banking."],
                       "en": ["I can't log into the app, I forgot my password.", "I need to reset my online banking password."]},
}
INTENT_SYSTEM = "Classify the customer's message. Reply with one label only: " + ", ".join(INTENT_REQUESTS) + "."
GREETINGS = {"es": ["Hola,", "Buenos días.", "Buenas tardes,", "Estimados:", ""],
             "pt": ["Olá,", "Bom dia.", "Boa tarde,", "Prezados,", ""],
             "en": ["Hi,", "Good morning.", "Hello team,", "Dear support,", ""]}
CLOSINGS = {"es": ["Gracias.", "Un saludo, {name}", "Es urgente.", "Quedo atento.", ""],
            "pt": ["Obrigado.", "Abraço, {name}", "É urgente.", "Fico no aguardo.", ""],
            "en": ["Thanks.", "Regards, {name}", "This is urgent.", "Thank you in advance.", ""]}
NAMES = ["Lucía", "Carlos", "Marta", "João", "Ana Paula", "Rafael", "Emily", "David", "Priya", "Tomás", "Inês", "Sofía"]


def add_typo(text: str, rng: random.Random) -> str:
    """Swap two neighbouring letters of one word, as a hurried writer does."""
    words = text.split(" ")
    index = rng.randrange(len(words))
    word = words[index]
    if len(word) > 3:
        at = rng.randrange(1, len(word) - 2)
        words[index] = word[:at] + word[at + 1] + word[at] + word[at + 2 :]
    return " ".join(words)


def intent_row(rng: random.Random) -> dict:
    """One customer message and its label."""
    label, language = rng.choice(list(INTENT_REQUESTS)), rng.choice(LANGUAGES)
    currency = {"es": "EUR", "pt": "BRL", "en": "USD"}[language]
    slots = {"card": f"{rng.randrange(10000):04d}", "amount": format_amount(rng.randrange(500, 500_000), currency, rng),
             "date": format_date(date(2025, 1, 1) + timedelta(days=rng.randrange(365)), language, rng)}
    request = rng.choice(INTENT_REQUESTS[label][language]).format(**slots)
    if rng.random() < 0.3:
        request = add_typo(request, rng)
    parts = [rng.choice(GREETINGS[language]), request, rng.choice(CLOSINGS[language]).format(name=rng.choice(NAMES))]
    return chat(INTENT_SYSTEM, " ".join(p for p in parts if p), label)


# ---------------------------------------------------------------- replies: a short free-text answer

REPLY_SYSTEM = "Reply to the customer in one sentence, in their language, confirming what will happen."
REPLY_TEMPLATES = {  # request -> language -> (customer message, agent reply). Slots: {name} {order} {date} {city}
    "reschedule": {
        "es": ("Hola, soy {name}. No estaré en casa para el pedido {order}, ¿pueden entregarlo el {date}?",
               "Hola {name}, hemos cambiado la entrega del pedido {order} al {date}."),
        "pt": ("Oi, aqui é {name}. Não estarei em casa para o pedido {order}, podem entregar no dia {date}?",
               "Olá {name}, alteramos a entrega do pedido {order} para {date}."),
        "en": ("Hi, this is {name}. I won't be home for order {order}, could you deliver it on {date}?",
               "Hi {name}, we have moved the delivery of order {order} to {date}.")},
    "redirect": {
        "es": ("Buenas, {name} aquí. Me he mudado: envíen el pedido {order} a mi nueva casa en {city}.",
               "Hola {name}, enviaremos el pedido {order} a su nueva dirección en {city}."),
        "pt": ("Olá, sou {name}. Mudei de cidade: enviem o pedido {order} para minha casa nova em {city}.",
               "Olá {name}, enviaremos o pedido {order} para o novo endereço em {city}."),
        "en": ("Hello, {name} here. I moved: please ship order {order} to my new place in {city}.",
               "Hi {name}, we will ship order {order} to your new address in {city}.")},
    "cancel": {
        "es": ("Soy {name}, ya no necesito el pedido {order}, cancélenlo por favor.",
               "Hola {name}, hemos cancelado el pedido {order} y le devolveremos el importe."),
        "pt": ("Sou {name}, não preciso mais do pedido {order}, cancelem por favor.",
               "Olá {name}, cancelamos o pedido {order} e vamos devolver o valor."),
        "en": ("It's {name}, I no longer need order {order}, please cancel it.",
               "Hi {name}, we have cancelled order {order} and will refund you.")},
    "damaged": {
        "es": ("Hola, el pedido {order} llegó roto a {city}. {name}.",
               "Hola {name}, le enviaremos un nuevo pedido {order} a {city} sin coste."),
        "pt": ("Olá, o pedido {order} chegou quebrado em {city}. {name}.",
               "Olá {name}, enviaremos um novo pedido {order} para {city} sem custo."),
        "en": ("Hi, order {order} arrived broken in {city}. {name}.",
               "Hi {name}, we will send a replacement for order {order} to {city} at no cost.")},
    "where": {
        "es": ("¿Dónde está mi pedido {order}? Lo espero en {city}. Gracias, {name}",
               "Hola {name}, su pedido {order} ya está en camino a {city}."),
        "pt": ("Cadê meu pedido {order}? Estou esperando em {city}. Obrigado, {name}",
               "Olá {name}, seu pedido {order} já está a caminho de {city}."),
        "en": ("Where is my order {order}? I'm waiting for it in {city}. Thanks, {name}",
               "Hi {name}, your order {order} is on its way to {city}.")},
}
CITIES = {"es": ["Madrid", "Sevilla", "Valencia", "Bilbao", "Zaragoza", "Málaga", "Bogotá", "Lima"],
          "pt": ["São Paulo", "Curitiba", "Recife", "Porto Alegre", "Lisboa", "Porto", "Salvador", "Belo Horizonte"],
          "en": ["Boston", "Denver", "Austin", "Seattle", "Leeds", "Bristol", "Dublin", "Toronto"]}


def reply_row(rng: random.Random) -> dict:
    """A customer's message about a delivery and the agent's one-sentence reply."""
    request, language = rng.choice(list(REPLY_TEMPLATES)), rng.choice(LANGUAGES)
    day = date(2025, 1, 1) + timedelta(days=rng.randrange(365))
    slots = {"name": rng.choice(NAMES), "order": f"{rng.choice(['#', 'A', 'PED-', ''])}{rng.randrange(10000, 999999)}",
             "date": f"{day.day} de {MONTHS[language][day.month - 1]}" if language != "en"
             else f"{MONTHS['en'][day.month - 1]} {day.day}", "city": rng.choice(CITIES[language])}
    message, reply = REPLY_TEMPLATES[request][language]
    return chat(REPLY_SYSTEM, message.format(**slots), reply.format(**slots))


# ---------------------------------------------------------------- tasks

def chat(system: str, user: str, answer: str) -> dict:
    return {"messages": [{"role": "system", "content": system}, {"role": "user", "content": user},
                         {"role": "assistant", "content": answer}]}


def bundled_tickets() -> list[dict]:
    """afina's bundled IT-support tickets, shuffled in a fixed order."""
    from afina.pipeline.prepare import resolve_data_path

    rows = [json.loads(line) for line in resolve_data_path("bundled:tickets").read_text().splitlines() if line.strip()]
    random.Random(0).shuffle(rows)
    return rows


GENERATORS = {"invoices": invoice_row, "intents": intent_row, "replies": reply_row}
TASKS = (*GENERATORS, "tickets")
MAIN_METRIC = {"invoices": "field_accuracy_mean", "intents": "exact_match", "replies": "rouge_l",
               "tickets": "field_accuracy_mean"}
MAX_NEW_TOKENS = {"invoices": 96, "intents": 12, "replies": 48, "tickets": 40}  # the longest answers, with room


def distinct_rows(rows, count: int, taken: set[str]) -> list[dict]:
    """The first `count` rows of `rows` whose content is not in `taken` (which grows with them)."""
    chosen = []
    for row in rows:
        if len(chosen) == count:
            break
        key = json.dumps(row, ensure_ascii=False, sort_keys=True)
        if key not in taken:
            taken.add(key)
            chosen.append(row)
    if len(chosen) < count:
        raise ValueError(f"only {len(chosen)} distinct rows for {count} wanted")
    return chosen


def make_task(name: str, train: int, validation: int, test: int, seed: int = 0) -> dict[str, list[dict]]:
    """The task's {"train", "validation", "test"} rows: test first, then the others, none repeating a row."""
    if name == "tickets":
        rows = iter(bundled_tickets())
    else:
        rng = random.Random(f"{name}-{seed}")
        rows = (GENERATORS[name](rng) for _ in range(100 * (train + validation + test)))
    taken: set[str] = set()
    splits = {"test": distinct_rows(rows, test, taken)}
    splits["validation"] = distinct_rows(rows, validation, taken)
    splits["train"] = distinct_rows(rows, train, taken)
    return splits


def write_task(splits: dict[str, list[dict]], folder: Path) -> dict[str, Path]:
    """Each split as `folder/<split>.jsonl`; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, rows in splits.items():
        paths[split] = folder / f"{split}.jsonl"
        paths[split].write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    return paths
