"""Made-up people: names, cities, e-mail addresses and phone numbers by language, and what they type."""

from __future__ import annotations

import random

_NAMES = {
    "en": ("Olivia Carter", "Liam Brooks", "Emma Hughes", "Noah Patel", "Ava Thompson", "Mason Reed", "Sophia Kim",
           "Ethan Rivera", "Isabella Ward", "Lucas Bennett", "Mia Foster", "Jack Collins", "Amelia Grant",
           "Harper Lee", "Priya Shah", "Daniel O'Neill", "Chloe Martin", "Grace Walker", "Sam", "Jo"),
    "es": ("María García", "José Martínez", "Lucía Fernández", "Carlos López", "Sofía Romero", "Javier Ruiz",
           "Valentina Torres", "Diego Navarro", "Camila Herrera", "Alejandro Díaz", "Paula Jiménez",
           "Mateo Morales", "Daniela Castro", "Andrés Ortega", "Elena Vázquez", "Iñaki Etxeberria"),
}
_CITIES = {
    "en": ("London", "Manchester", "New York", "Austin", "Seattle", "Toronto", "Dublin", "Chicago", "Denver"),
    "es": ("Madrid", "Barcelona", "Sevilla", "Valencia", "Bilbao", "Ciudad de México", "Guadalajara", "Bogotá",
           "Málaga", "A Coruña"),
}
_DOMAINS = ("gmail.com", "outlook.com", "yahoo.com", "icloud.com", "hotmail.com", "proton.me")
_GREETINGS: dict[str, dict[str, tuple[str, ...]]] = {
    "lead_qualification": {"en": ("Hi", "Hello!", "Hi, I saw your ad", "hey", "Hi! Can you tell me more?"),
                           "es": ("Hola", "Hola! Vi vuestro anuncio", "Buenas", "Hola, quiero información")},
    "service_booking": {"en": ("Hi", "Hi, I'd like to book", "hello", "Hey! Do you have space this week?"),
                        "es": ("Hola", "Hola, quiero pedir cita", "Buenas tardes", "Hola! Tenéis hueco?")},
}
_RESET = {"en": ("start over", "RESTART"), "es": ("reiniciar", "empezar de nuevo")}
_STOP = {"en": ("STOP", "stop", "Unsubscribe"), "es": ("BAJA", "baja")}
_BAD_TIME = {"en": ("half past ten", "10h30", "tomorrow morning", "21:00"),
             "es": ("a las diez y media", "por la tarde")}
_UNSUPPORTED = ("poll_update", "event", "view_once")


def _email_for(name: str, rng: random.Random) -> str:
    ascii_name = name.encode("ascii", "ignore").decode().lower().replace("'", "")
    parts = ascii_name.split() or ["user"]
    local = ".".join(parts) if rng.random() < 0.6 else parts[0] + str(rng.randint(1, 99))
    return f"{local}@{rng.choice(_DOMAINS)}"


def _phone(rng: random.Random, language: str) -> str:
    # Spain / Mexico mobiles for Spanish speakers; US 555 and UK drama-range numbers for the others.
    prefix, digits = rng.choice((("346", 8), ("5215", 9))) if language == "es" else rng.choice(
        (("1415555", 4), ("1206555", 4), ("447700900", 3))
    )
    return prefix + "".join(str(rng.randint(0, 9)) for _ in range(digits))
