"""What a compliance officer expects of screening against the shipped sample
lists (sdn_sample.csv, alt_sample.csv): each variant of a listed name must
be a hit or a possible match of its entry, and no common name may be either.
The tests hold the matcher to it and `make bench ONLY=policy` reports the
counts (sanctions_variant_hits_total of sanctions_variants_total,
sanctions_false_positives_total of sanctions_common_names_total).

Every listed name is fictitious; the common names are ordinary names chosen
to share parts with listed ones (a given name, a family name, a word of an
entity's name), which is where a loose matcher errs.
"""

from __future__ import annotations

# (how the name is written, the entry it must match, what the variant tries)
VARIANTS: tuple[tuple[str, str, str], ...] = (
    # VOLKOV, Dmitri Arkadyevich (aka VOLKOV, Dmitry; WOLKOW, Dimitri)
    ("Dmitri Volkov", "90001", "given name first, patronymic left out"),
    ("Volkov Dmitri Arkadyevich", "90001", "family name first, no comma"),
    ("Dmitri Arkadyevich Volkov", "90001", "reordered three-part name"),
    ("Дмитрий Волков", "90001", "Cyrillic"),
    ("Дмитрий Аркадьевич Волков", "90001", "Cyrillic, with the patronymic"),
    ("Dmitry Volkoff", "90001", "-off for -ov, y for i"),
    ("Dimitri Wolkow", "90001", "w for v, an alias's spelling"),
    ("Dmitriy Volkov", "90001", "-iy transliteration"),
    ("VOLKOV, Dmitri", "90001", "list style"),
    # AL-RASHID, Karim Hassan (aka RASHID, Kareem)
    ("Karim Hassan Al-Rashid", "90003", "family name last"),
    ("Karim Hassan Alrashid", "90003", "particle joined"),
    ("Karim Hassan Al Rashid", "90003", "particle split"),
    ("Hassan Karim Al-Rashid", "90003", "reordered three-part name"),
    ("Al-Rashid Karim Hassan", "90003", "family name first"),
    ("Kareem Hasan Al Rashid", "90003", "vowel and doubled-letter spellings"),
    ("كريم حسن الرشيد", "90003", "Arabic script"),
    ("Карим Хасан Аль-Рашид", "90003", "Cyrillic, kh for h"),
    ("Qarim Al-Rashid", "90003", "q for k, middle name left out"),
    ("Karim Rashid", "90003", "particle dropped"),
    # MENDOZA QUINTERO, Jorge Luis
    ("Jorge Luis Mendoza Quintero", "90007", "Hispanic order, both family names"),
    ("Mendoza Quintero Jorge Luis", "90007", "family names first"),
    ("Jorge Mendoza Quintero", "90007", "second given name left out"),
    ("Jorge Luis Mendosa Kintero", "90007", "z/s and qu/k spellings"),
    ("Jorge Mendoza", "90007", "first given name and paternal family name only"),
    # ZHAO, Wei Ming
    ("Zhao Weiming", "90008", "Chinese order, given name as one word"),
    ("Weiming Zhao", "90008", "Western order, given name as one word"),
    ("Wei-Ming Zhao", "90008", "hyphenated given name"),
    ("赵伟明", "90008", "Chinese characters"),
    ("Zhào Wěimíng", "90008", "pinyin with tone marks"),
    ("Zhao Wei Ming", "90008", "family name first"),
    # PETRENKO, Olena
    ("Olena Petrenko", "90005", "given name first"),
    ("Олена Петренко", "90005", "Ukrainian Cyrillic"),
    ("Петренко Олена", "90005", "Cyrillic, family name first"),
    ("Elena Petrenko", "90005", "the Russian form of the given name"),
    # Entities and a vessel
    ("Golden Crescent Exchange LLC", "90004", "another legal form"),
    ("Golden Crescent Money Transfer", "90004", "an alias"),
    ("Northwind Maritime Trading Co", "90002", "another legal form"),
    ("Northwind Maritime Trading Limited", "90002", "legal form written out"),
    ("Black Star Shipping Company", "90006", "one word split in two"),
    ("Blackstar Shipping", "90006", "legal form left out"),
)

COMMON_NAMES: tuple[str, ...] = (
    "John Smith",
    "Maria Garcia",
    "James Johnson",
    "Wei Zhang",
    "Zhang Wei",
    "Li Na",
    "Wang Fang",
    "Liu Yang",
    "Zhao Ming",
    "Mohammed Ali",
    "Ahmed Hassan",
    "Fatima Khan",
    "Omar Abdullah",
    "Karim Mansour",
    "Hassan Ali",
    "Karim Hassan",
    "Mohammad Rashidi",
    "Dmitri Ivanov",
    "Sergei Volkov",
    "Dmitri Volkonsky",
    "Olga Petrova",
    "Olena Petrova",
    "Ivan Petrenko",
    "Jose Mendoza",
    "Maria Quintero",
    "Luis Hernandez",
    "Juan Carlos Rodriguez",
    "Nguyen Van An",
    "Priya Sharma",
    "Golden Bakery",
    "Golden Gate Exchange",
    "Northwind Traders",
    "Crescent Moon Cafe",
    "Star Shipping Lines",
)
