"""Generate the bundled example data: multilingual IT-support tickets triaged into JSON.

    python -m afina.data.example.generate_tickets   # rewrites tickets.jsonl next to this file

Deterministic (fixed seed): the same script always writes the same file. Each ticket is written in
Spanish, English or Portuguese (sometimes mixing in English tech words), with varied tone, length
and typos; the answer is {"category", "priority", "team"} decided by rules a support desk would
use, so a model can learn them from examples.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SYSTEM = ('Classify the IT support ticket. Reply with JSON only: {"category": network|hardware|access|'
          'software|email|security|printer, "priority": low|medium|high|critical, "team": ...}')

TEAMS = {"network": "network_ops", "hardware": "field_support", "printer": "field_support",
         "access": "identity", "software": "apps_support", "email": "apps_support", "security": "security_ops"}
PRIORITIES = ["low", "medium", "high", "critical"]

# category -> language -> (template, base priority). Slots: {app} {device} {place} {code} {person}
ISSUES = {
    "network": {
        "es": [("La VPN no conecta desde casa, da error {code}.", 1), ("El wifi de {place} se cae cada pocos minutos.", 1),
               ("Internet va lentísimo en {place}, las páginas no cargan.", 1), ("No tengo red en el puerto de mi mesa, el cable parece bien.", 1),
               ("Se ha caído la conexión en toda la oficina de {place}.", 3)],
        "en": [("VPN keeps disconnecting with error {code}.", 1), ("The wifi in {place} drops every few minutes.", 1),
               ("Network is super slow in {place}, nothing loads.", 1), ("My desk ethernet port has no link.", 1),
               ("The whole {place} office lost internet connection.", 3)],
        "pt": [("A VPN não conecta de casa, aparece o erro {code}.", 1), ("O wifi da {place} cai a cada poucos minutos.", 1),
               ("A internet está muito lenta na {place}, nada carrega.", 1), ("O ponto de rede da minha mesa não funciona.", 1),
               ("Caiu a internet do escritório inteiro de {place}.", 3)],
    },
    "hardware": {
        "es": [("La pantalla de mi {device} parpadea y se pone negra.", 1), ("Se me ha caído el café en el teclado del {device}.", 1),
               ("La batería del {device} no carga.", 1), ("Mi {device} no enciende desde esta mañana.", 2),
               ("Necesito un segundo monitor para mi puesto.", 0)],
        "en": [("The screen on my {device} flickers and goes black.", 1), ("I spilled coffee on my {device} keyboard.", 1),
               ("My {device} battery will not charge.", 1), ("My {device} won't turn on since this morning.", 2),
               ("Could I get a second monitor for my desk?", 0)],
        "pt": [("A tela do meu {device} pisca e fica preta.", 1), ("Derramei café no teclado do {device}.", 1),
               ("A bateria do {device} não carrega.", 1), ("Meu {device} não liga desde hoje de manhã.", 2),
               ("Preciso de um segundo monitor para minha mesa.", 0)],
    },
    "printer": {
        "es": [("La impresora de {place} atasca el papel.", 1), ("No puedo imprimir, la cola se queda en pausa.", 1),
               ("La impresora de {place} imprime todo con rayas.", 0), ("Hay que cambiar el tóner de la impresora de {place}.", 0)],
        "en": [("The printer in {place} keeps jamming.", 1), ("I can't print, the queue just says paused.", 1),
               ("The {place} printer prints streaks on every page.", 0), ("The toner in the {place} printer needs replacing.", 0)],
        "pt": [("A impressora da {place} está atolando papel.", 1), ("Não consigo imprimir, a fila fica pausada.", 1),
               ("A impressora da {place} imprime tudo com listras.", 0), ("Precisa trocar o toner da impressora da {place}.", 0)],
    },
    "access": {
        "es": [("Se me ha bloqueado la cuenta tras varios intentos.", 1), ("Olvidé mi contraseña de {app}, necesito un reset.", 1),
               ("No me llega el código MFA al móvil nuevo.", 1), ("Necesito permisos de lectura en la carpeta de {place}.", 0),
               ("{person} empieza el lunes y necesita usuario y accesos.", 1)],
        "en": [("My account got locked after a few tries.", 1), ("Forgot my {app} password, please reset it.", 1),
               ("The MFA code doesn't arrive on my new phone.", 1), ("I need read access to the {place} shared folder.", 0),
               ("{person} starts Monday and needs an account and access.", 1)],
        "pt": [("Minha conta foi bloqueada depois de algumas tentativas.", 1), ("Esqueci a senha do {app}, preciso resetar.", 1),
               ("O código MFA não chega no meu celular novo.", 1), ("Preciso de acesso de leitura na pasta de {place}.", 0),
               ("{person} começa segunda e precisa de usuário e acessos.", 1)],
    },
    "software": {
        "es": [("{app} se cierra solo al abrir archivos grandes.", 1), ("¿Me podéis instalar {app} en el portátil?", 0),
               ("{app} dice que la licencia ha caducado.", 1), ("Tras la actualización, {app} no arranca (error {code}).", 2)],
        "en": [("{app} crashes when I open large files.", 1), ("Can you install {app} on my laptop?", 0),
               ("{app} says the license has expired.", 1), ("After the update {app} won't start (error {code}).", 2)],
        "pt": [("O {app} fecha sozinho ao abrir arquivos grandes.", 1), ("Vocês podem instalar o {app} no meu notebook?", 0),
               ("O {app} diz que a licença expirou.", 1), ("Depois da atualização o {app} não abre (erro {code}).", 2)],
    },
    "email": {
        "es": [("No recibo correos externos desde ayer.", 1), ("Outlook no sincroniza la bandeja de entrada.", 1),
               ("Necesito una lista de distribución para el equipo de {place}.", 0), ("Mi buzón está lleno y no puedo enviar.", 2)],
        "en": [("I'm not receiving external emails since yesterday.", 1), ("Outlook won't sync my inbox.", 1),
               ("Please create a distribution list for the {place} team.", 0), ("My mailbox is full and I can't send anything.", 2)],
        "pt": [("Não recebo e-mails externos desde ontem.", 1), ("O Outlook não sincroniza a caixa de entrada.", 1),
               ("Preciso de uma lista de distribuição para a equipe de {place}.", 0), ("Minha caixa está cheia e não consigo enviar.", 2)],
    },
    "security": {
        "es": [("He recibido un correo de phishing que pide mi contraseña.", 2), ("He hecho clic en un enlace sospechoso, ¿qué hago?", 2),
               ("El antivirus ha detectado malware en mi {device}.", 2), ("Los archivos del servidor aparecen cifrados con extensión rara, posible ransomware.", 3)],
        "en": [("Got a phishing email asking for my password.", 2), ("I clicked a suspicious link, what should I do?", 2),
               ("Antivirus flagged malware on my {device}.", 2), ("Files on the shared server are encrypted with a weird extension, maybe ransomware.", 3)],
        "pt": [("Recebi um e-mail de phishing pedindo minha senha.", 2), ("Cliquei num link suspeito, o que faço?", 2),
               ("O antivírus detectou malware no meu {device}.", 2), ("Os arquivos do servidor estão criptografados com extensão estranha, talvez ransomware.", 3)],
    },
}

SLOTS = {
    "app": ["Excel", "SAP", "Teams", "Salesforce", "AutoCAD", "Zoom", "Power BI", "Slack", "Jira"],
    "device": ["portátil", "laptop", "notebook", "PC", "MacBook", "ThinkPad"],
    "place": {"es": ["Madrid", "Bogotá", "recepción", "la planta 3", "Monterrey", "contabilidad"],
              "en": ["London", "reception", "floor 3", "Austin", "accounting", "the warehouse"],
              "pt": ["filial de Campinas", "recepção", "sala 3", "Lisboa", "contabilidade", "Porto Alegre"]},
    "code": ["809", "0x80070005", "691", "ERR_CONN_TIMEOUT", "1603", "720"],
    "person": ["Lucía Gómez", "Carlos Ruiz", "Ana Souza", "John Miller", "João Pereira", "María Fernández"],
}
GREETINGS = {"es": ["Hola,", "Buenos días.", "Hola equipo de IT,", ""], "en": ["Hi,", "Hello team,", "Morning,", ""],
             "pt": ["Olá,", "Bom dia.", "Oi pessoal do TI,", ""]}
URGENT = {"es": ["Es urgente, no puedo trabajar.", "Tengo una reunión con cliente en 30 minutos."],
          "en": ["Urgent, I can't work at all.", "I have a client call in 30 minutes."],
          "pt": ["É urgente, não consigo trabalhar.", "Tenho reunião com cliente em 30 minutos."]}
RELAXED = {"es": ["Sin prisa, cuando podáis.", "No es urgente."], "en": ["No rush, whenever you can.", "Not urgent."],
           "pt": ["Sem pressa, quando puderem.", "Não é urgente."]}
ANGRY = {"es": ["¡Es la tercera vez este mes!", "Esto ya pasó la semana pasada y nadie lo arregló."],
         "en": ["This is the third time this month!!", "Same thing happened last week and nobody fixed it."],
         "pt": ["É a terceira vez este mês!", "Isso já aconteceu semana passada e ninguém resolveu."]}
CONTEXT = {"es": ["Ya he reiniciado el equipo.", "Estoy teletrabajando hoy.", "Le pasa también a mi compañero."],
           "en": ["I already restarted it.", "Working from home today.", "My colleague has the same problem."],
           "pt": ["Já reiniciei o computador.", "Estou em home office hoje.", "Meu colega tem o mesmo problema."]}
SIGN = {"es": ["Gracias, Marta", "Saludos.", "Un saludo, Pedro", ""], "en": ["Thanks, Sam", "Cheers", "Best, Priya", ""],
        "pt": ["Obrigado, Rafael", "Abraço.", "Valeu, Beatriz", ""]}
ENGLISH_TECH = [("conexión", "connection"), ("contraseña", "password"), ("senha", "password"), ("correos", "emails"),
                ("pantalla", "screen"), ("tela", "screen"), ("impresora", "printer"), ("impressora", "printer")]


def add_typos(text: str, rng: random.Random, rate: float) -> str:
    chars = list(text)
    for i in range(len(chars) - 1):
        if chars[i].isalpha() and chars[i + 1].isalpha() and rng.random() < rate:
            chars[i], chars[i + 1] = chars[i + 1], chars[i]
    return "".join(chars)


def make_ticket(rng: random.Random) -> dict:
    category = rng.choice(list(ISSUES))
    lang = rng.choices(["es", "en", "pt"], weights=[4, 3, 3])[0]
    template, priority = rng.choice(ISSUES[category][lang])
    slots = {key: rng.choice(values[lang] if isinstance(values, dict) else values) for key, values in SLOTS.items()}
    body = template.format(**slots)
    mood = rng.random()
    parts = [rng.choice(GREETINGS[lang]), body]
    if rng.random() < 0.4:
        parts.append(rng.choice(CONTEXT[lang]))
    if mood < 0.25 and priority < 3:  # a user who cannot work raises the priority one level
        parts.append(rng.choice(URGENT[lang]))
        priority += 1
    elif mood < 0.4 and 0 < priority < 2 and category != "security":
        parts.append(rng.choice(RELAXED[lang]))
        priority -= 1
    elif mood < 0.5:
        parts.append(rng.choice(ANGRY[lang]))
    parts.append(rng.choice(SIGN[lang]))
    text = " ".join(p for p in parts if p)
    if lang != "en" and rng.random() < 0.25:  # Spanglish / Portuglês
        for local, english in ENGLISH_TECH:
            text = text.replace(local, english)
    if rng.random() < 0.3:
        text = add_typos(text, rng, 0.03)
    if rng.random() < 0.1:
        text = text.lower()
    answer = {"category": category, "priority": PRIORITIES[priority], "team": TEAMS[category]}
    return {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text},
                         {"role": "assistant", "content": json.dumps(answer, ensure_ascii=False)}]}


def generate_tickets(count: int = 600, seed: int = 7) -> list[dict]:
    rng = random.Random(seed)
    return [make_ticket(rng) for _ in range(count)]


if __name__ == "__main__":
    target = Path(__file__).with_name("tickets.jsonl")
    rows = generate_tickets()
    target.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    print(f"wrote {len(rows)} tickets to {target}")
