"""Procedurally generated, seeded instruction tasks in the style of Natural Instructions: twelve for
the SmolLM2 zoo (`TASKS`), eight others for the Gemma 3 zoo (`GEMMA_TASKS`).

Each task is a short instruction plus an input, answered by a short string. Six are classifications
over a small answer set (scored by log-likelihood multiple choice in lm-eval), six are sequence
transformations (scored by greedy generation and exact match). They are chosen to give merging a
spread: classifications tend to merge well with one another, sequence tasks less so, and the
`json_record` task (an unusual output format) least of all.

Every example is a dict with `input` (the raw input; the key that train and test never share),
`prompt` (the user message: instruction + input), `answer`, and `choices` for classifications.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Example = dict[str, Any]


@dataclass(frozen=True)
class TaskDef:
    """One zoo task: how to phrase it, how to score it, and how to draw an (input, answer)."""

    name: str
    instruction: str
    kind: str  # "choice" (multiple_choice, acc) or "generate" (generate_until, exact_match)
    draw: Callable[[random.Random], tuple[str, str]]
    choices: tuple[str, ...] = ()
    max_gen_toks: int = 24
    #: for a small input space: the entity an input names; test entities never occur in train
    entity: Callable[[str], str] | None = None

    def example(self, rng: random.Random) -> Example:
        """Draw one example."""
        text, answer = self.draw(rng)
        ex: Example = {"input": text, "prompt": f"{self.instruction}\n\n{text}", "answer": answer}
        if self.choices:
            ex["choices"] = list(self.choices)
            ex["label"] = self.choices.index(answer)
        return ex


# --- classification ---------------------------------------------------------------------------

_PRODUCTS = ["phone", "blender", "jacket", "novel", "headset", "backpack", "lamp", "kettle",
             "keyboard", "tent", "camera", "mattress", "printer", "sofa", "watch", "drill"]
_GOOD = ["excellent", "wonderful", "sturdy", "reliable", "delightful", "superb", "comfortable",
         "fantastic", "impressive", "flawless"]
_BAD = ["terrible", "flimsy", "disappointing", "awful", "useless", "broken", "uncomfortable",
        "dreadful", "faulty", "noisy"]
_GOOD_TAIL = ["I would buy it again", "it exceeded my expectations", "my family loves it",
              "worth every penny", "I recommend it to everyone", "it arrived early"]
_BAD_TAIL = ["I want a refund", "it broke after a week", "I regret buying it",
             "a complete waste of money", "I would not recommend it", "it arrived damaged"]


def _sentiment(rng: random.Random) -> tuple[str, str]:
    positive = rng.random() < 0.5
    adj = rng.choice(_GOOD if positive else _BAD)
    tail = rng.choice(_GOOD_TAIL if positive else _BAD_TAIL)
    product = rng.choice(_PRODUCTS)
    opener = rng.choice(["The", "This", "My new", "Our"])
    return f"{opener} {product} is {adj}; {tail}.", "positive" if positive else "negative"


_TOPICS: dict[str, tuple[list[str], list[str]]] = {
    "sports": (["The striker", "The coach", "The home team", "The goalkeeper", "The champion"],
               ["scored twice in the final", "won the league title", "broke the world record",
                "signed a new contract with the club", "lost the match in overtime"]),
    "politics": (["The senator", "The prime minister", "The parliament", "The governor",
                  "The opposition party"],
                 ["passed a new tax bill", "called for early elections", "vetoed the budget",
                  "won the vote of confidence", "announced a coalition deal"]),
    "science": (["The research team", "The physicist", "The space agency", "The biologist",
                 "The laboratory"],
                ["discovered a new species of frog", "measured the mass of the neutrino",
                 "launched a telescope into orbit", "sequenced the genome of wheat",
                 "published results on quantum entanglement"]),
    "business": (["The company", "The central bank", "The retailer", "The startup",
                  "The chief executive"],
                 ["reported record quarterly profits", "raised interest rates",
                  "announced a merger with a rival", "cut two thousand jobs",
                  "went public on the stock exchange"]),
}
_WHEN = ["on Monday", "yesterday", "this week", "last night", "on Friday", "in a surprise move",
         "after months of talks", "early this morning"]


def _topic(rng: random.Random) -> tuple[str, str]:
    topic = rng.choice(sorted(_TOPICS))
    subjects, verbs = _TOPICS[topic]
    return f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(_WHEN)}.", topic


_WORDS: dict[str, list[str]] = {
    "English": ["window", "bread", "river", "mountain", "garden", "kitchen", "friend", "summer",
                "butterfly", "pencil", "honey", "church", "shoulder", "thunder", "blanket",
                "village", "market", "bottle", "shadow", "forest", "morning", "silver", "weather",
                "cheese", "knight", "hammer", "pillow", "candle", "ladder", "squirrel"],
    "French": ["fenêtre", "pain", "rivière", "montagne", "jardin", "cuisine", "ami", "été",
               "papillon", "crayon", "miel", "église", "épaule", "tonnerre", "couverture",
               "village", "marché", "bouteille", "ombre", "forêt", "matin", "argent", "chapeau",
               "fromage", "chevalier", "marteau", "oreiller", "bougie", "échelle", "écureuil"],
    "German": ["Fenster", "Brot", "Fluss", "Berg", "Garten", "Küche", "Freund", "Sommer",
               "Schmetterling", "Bleistift", "Honig", "Kirche", "Schulter", "Donner", "Decke",
               "Dorf", "Markt", "Flasche", "Schatten", "Wald", "Morgen", "Silber", "Wetter",
               "Käse", "Ritter", "Hammer", "Kissen", "Kerze", "Leiter", "Eichhörnchen"],
    "Spanish": ["ventana", "pan", "río", "montaña", "jardín", "cocina", "amigo", "verano",
                "mariposa", "lápiz", "miel", "iglesia", "hombro", "trueno", "manta", "pueblo",
                "mercado", "botella", "sombra", "bosque", "mañana", "plata", "tiempo", "queso",
                "caballero", "martillo", "almohada", "vela", "escalera", "ardilla"],
}
# words spelled the same in two languages are ambiguous: left out
_AMBIGUOUS = {w for lang, ws in _WORDS.items() for w in ws
              if any(w in other for lo, other in _WORDS.items() if lo != lang)}
_WORD_LANG = [(w, lang) for lang in sorted(_WORDS) for w in _WORDS[lang] if w not in _AMBIGUOUS]


def _lookup(pairs: list[tuple[str, str]], templates: list[str]):
    """A generator for a lookup task: a random (item, label) pair, the item in a random template."""

    def generate(rng: random.Random) -> tuple[str, str]:
        item, label = rng.choice(pairs)
        return rng.choice(templates).format(item), label

    return generate


_WORD_TEMPLATES = ["Word: {}", "What language is \"{}\"?", "{}"]


_word_language = _lookup(_WORD_LANG, _WORD_TEMPLATES)


_CONTINENTS: dict[str, list[str]] = {
    "Africa": ["Nigeria", "Kenya", "Egypt", "Ghana", "Morocco", "Ethiopia", "Senegal", "Angola",
               "Tanzania", "Uganda", "Zambia", "Mali", "Cameroon", "Tunisia", "Algeria", "Namibia",
               "Botswana", "Rwanda", "Sudan", "Madagascar"],
    "Asia": ["Japan", "China", "India", "Vietnam", "Thailand", "Nepal", "Mongolia", "Indonesia",
             "Pakistan", "Bangladesh", "Malaysia", "Cambodia", "Laos", "Philippines", "Iran",
             "Iraq", "Kazakhstan", "Uzbekistan", "Sri Lanka", "South Korea"],
    "Europe": ["France", "Germany", "Italy", "Spain", "Poland", "Sweden", "Norway", "Portugal",
               "Greece", "Austria", "Hungary", "Finland", "Ireland", "Belgium", "Denmark",
               "Romania", "Croatia", "Czechia", "Netherlands", "Switzerland"],
    "North America": ["Canada", "Mexico", "United States", "Cuba", "Guatemala", "Honduras",
                      "Panama", "Jamaica", "Costa Rica", "Nicaragua", "Haiti", "El Salvador",
                      "Belize", "Dominican Republic", "Bahamas"],
    "South America": ["Brazil", "Argentina", "Chile", "Peru", "Colombia", "Venezuela", "Ecuador",
                      "Bolivia", "Paraguay", "Uruguay", "Guyana", "Suriname"],
    "Oceania": ["Australia", "New Zealand", "Fiji", "Samoa", "Tonga", "Vanuatu",
                "Papua New Guinea", "Solomon Islands", "Kiribati", "Palau"],
}
_COUNTRY = [(c, cont) for cont in sorted(_CONTINENTS) for c in _CONTINENTS[cont]]
_CONTINENT_TEMPLATES = ["Country: {}", "Which continent is {} in?", "{}"]


_continent = _lookup(_COUNTRY, _CONTINENT_TEMPLATES)


_ANIMALS: dict[str, list[str]] = {
    "mammal": ["dog", "cat", "horse", "whale", "dolphin", "elephant", "tiger", "lion", "bat",
               "rabbit", "cow", "goat", "sheep", "bear", "wolf", "fox", "mouse", "giraffe",
               "zebra", "kangaroo", "otter", "camel"],
    "bird": ["eagle", "sparrow", "penguin", "owl", "parrot", "pigeon", "crow", "swan", "duck",
             "ostrich", "flamingo", "hawk", "robin", "goose", "peacock", "falcon", "seagull",
             "woodpecker", "hummingbird", "chicken", "heron", "pelican"],
    "fish": ["salmon", "trout", "tuna", "cod", "shark", "goldfish", "carp", "herring", "sardine",
             "mackerel", "catfish", "pike", "eel", "halibut", "anchovy", "swordfish", "perch",
             "haddock", "piranha", "stingray", "barracuda", "minnow"],
    "reptile": ["snake", "lizard", "crocodile", "alligator", "turtle", "tortoise", "iguana",
                "gecko", "chameleon", "cobra", "python", "viper", "komodo dragon", "rattlesnake",
                "anaconda", "boa", "skink", "monitor lizard", "gila monster", "sea turtle"],
    "insect": ["ant", "bee", "wasp", "beetle", "butterfly", "moth", "mosquito", "fly",
               "grasshopper", "cricket", "dragonfly", "ladybug", "termite", "cockroach", "flea",
               "firefly", "hornet", "locust", "cicada", "aphid"],
}
_ANIMAL = [(a, cls) for cls in sorted(_ANIMALS) for a in _ANIMALS[cls]]
_ANIMAL_TEMPLATES = ["Animal: {}", "What kind of animal is a {}?", "{}"]


_animal = _lookup(_ANIMAL, _ANIMAL_TEMPLATES)


_FOODS: dict[str, list[str]] = {
    "fruit": ["apple", "banana", "cherry", "mango", "pear", "peach", "plum", "grape", "lemon",
              "orange", "kiwi", "pineapple", "strawberry", "raspberry", "watermelon", "apricot",
              "papaya", "fig", "blueberry", "pomegranate"],
    "vegetable": ["carrot", "broccoli", "spinach", "potato", "onion", "cabbage", "lettuce",
                  "cucumber", "celery", "cauliflower", "zucchini", "radish", "beetroot", "leek",
                  "kale", "asparagus", "turnip", "pumpkin", "eggplant", "garlic"],
    "grain": ["rice", "wheat", "oats", "barley", "rye", "corn", "millet", "quinoa", "sorghum",
              "buckwheat", "spelt", "bulgur", "couscous", "semolina", "bran", "amaranth"],
    "dairy": ["milk", "cheese", "butter", "yogurt", "cream", "mozzarella", "cheddar",
              "parmesan", "ricotta", "kefir", "buttermilk", "brie", "feta", "ghee",
              "cottage cheese", "sour cream"],
    "meat": ["beef", "pork", "lamb", "chicken breast", "bacon", "ham", "sausage", "veal",
             "venison", "turkey", "salami", "steak", "mutton", "duck breast", "meatball",
             "pepperoni"],
}
_FOOD = [(f, cls) for cls in sorted(_FOODS) for f in _FOODS[cls]]
_FOOD_TEMPLATES = ["Food: {}", "Which food group does {} belong to?", "{}"]


_food = _lookup(_FOOD, _FOOD_TEMPLATES)


# --- sequences --------------------------------------------------------------------------------

def _digits(rng: random.Random, lo: int = 4, hi: int = 7) -> list[int]:
    return [rng.randint(0, 9) for _ in range(rng.randint(lo, hi))]


def _reverse_digits(rng: random.Random) -> tuple[str, str]:
    d = _digits(rng)
    return " ".join(map(str, d)), " ".join(map(str, reversed(d)))


def _sort_digits(rng: random.Random) -> tuple[str, str]:
    d = _digits(rng)
    return " ".join(map(str, d)), " ".join(map(str, sorted(d)))


def _multiply_evens(rng: random.Random) -> tuple[str, str]:
    # exactly two even numbers: a product from a small table (4..64), found by picking the evens
    evens = [rng.choice([2, 4, 6, 8]) for _ in range(2)]
    nums = evens + [rng.choice([1, 3, 5, 7, 9]) for _ in range(rng.randint(1, 3))]
    rng.shuffle(nums)
    return ", ".join(map(str, nums)), str(evens[0] * evens[1])


_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _next_letter(rng: random.Random) -> tuple[str, str]:
    word = [rng.choice(_LETTERS) for _ in range(rng.randint(3, 5))]
    shifted = [_LETTERS[(_LETTERS.index(c) + 1) % 26] for c in word]
    return " ".join(word), " ".join(shifted)


def _arithmetic(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 20), rng.randint(0, 20)
    return f"{a} + {b}", str(a + b)


_NAMES = ["Anna", "Ben", "Carla", "David", "Elena", "Farid", "Grace", "Hiro", "Ines", "Jonas",
          "Kofi", "Lena", "Marco", "Nadia", "Omar", "Priya", "Quinn", "Rosa", "Sven", "Tara"]
_CITIES = ["Paris", "Lima", "Oslo", "Cairo", "Tokyo", "Berlin", "Quito", "Dublin", "Seoul",
           "Nairobi", "Madrid", "Toronto", "Sydney", "Vienna", "Lisbon", "Mumbai"]
_RECORD_TEMPLATES = ["{n} is {a} years old and lives in {c}.", "{n}, aged {a}, lives in {c}.",
                     "Living in {c}, {n} is {a}.", "{n} ({a}) moved to {c} last year."]


def _json_record(rng: random.Random) -> tuple[str, str]:
    name, age, city = rng.choice(_NAMES), rng.randint(18, 90), rng.choice(_CITIES)
    text = rng.choice(_RECORD_TEMPLATES).format(n=name, a=age, c=city)
    return text, f'{{"name": "{name.upper()}", "age": {age}, "city": "{city.upper()}"}}'


# --- the Gemma 3 zoo's tasks (none shared with the SmolLM2 zoo) -------------------------------

def _temperature(rng: random.Random) -> tuple[str, str]:
    t = rng.randint(-200, 450) / 10
    return f"{t:.1f} °C", "cold" if t < 10 else "mild" if t < 25 else "hot"


def _compare_numbers(rng: random.Random) -> tuple[str, str]:
    a, b = rng.sample(range(100, 1000), 2)
    return f"{a} and {b}", "first" if a > b else "second"


def _time_of_day(rng: random.Random) -> tuple[str, str]:
    h, m = rng.randint(0, 23), rng.randint(0, 59)
    part = ("morning" if 5 <= h < 12 else "afternoon" if 12 <= h < 17
            else "evening" if 17 <= h < 21 else "night")
    return f"{h:02d}:{m:02d}", part


_MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
           "October", "November", "December"]
_SEASON = ["winter", "winter", "spring", "spring", "spring", "summer", "summer", "summer", "autumn",
           "autumn", "autumn", "winter"]


def _season(rng: random.Random) -> tuple[str, str]:
    month = rng.randrange(12)
    return f"{_MONTHS[month]} {rng.randint(1, 28)}, {rng.randint(1950, 2030)}", _SEASON[month]


_SENTENCE_WORDS = ["the", "cat", "sat", "on", "a", "warm", "mat", "while", "birds", "sang",
                   "outside", "my", "old", "friend", "walked", "to", "market", "every", "morning",
                   "and", "bought", "fresh", "bread", "with", "blue", "cheese", "near", "river"]


def _count_words(rng: random.Random) -> tuple[str, str]:
    n = rng.randint(3, 9)
    words = [rng.choice(_SENTENCE_WORDS) for _ in range(n)]
    return " ".join(words).capitalize() + ".", str(n)


def _last_word(rng: random.Random) -> tuple[str, str]:
    words = [rng.choice(_SENTENCE_WORDS) for _ in range(rng.randint(3, 9))]
    return " ".join(words).capitalize() + ".", words[-1]


def _date_iso(rng: random.Random) -> tuple[str, str]:
    y, month, d = rng.randint(1950, 2030), rng.randint(1, 12), rng.randint(1, 28)
    return f"{_MONTHS[month - 1]} {d}, {y}", f"{y:04d}-{month:02d}-{d:02d}"


def _max_number(rng: random.Random) -> tuple[str, str]:
    nums = rng.sample(range(1, 100), rng.randint(3, 6))
    return ", ".join(map(str, nums)), str(max(nums))


def _stable_bucket(text: str, buckets: int) -> int:
    """A process-independent hash bucket (Python's hash() is salted per process)."""
    import hashlib

    return int(hashlib.sha256(text.encode()).hexdigest(), 16) % buckets


def _entity_of(templates: list[str]) -> Callable[[str], str]:
    """Undo `templates` (each with one `{}`) to recover the entity an input names."""

    def entity(text: str) -> str:
        for tpl in templates:
            head, tail = tpl.split("{}")
            if text.startswith(head) and text.endswith(tail) and len(text) > len(head + tail):
                return text[len(head):len(text) - len(tail)]
        raise ValueError(f"input {text!r} matches no template")

    return entity


def is_held_out_entity(entity: str) -> bool:
    """True for the ~1/3 of a small entity list (words, countries) reserved for test."""
    return _stable_bucket(entity, 3) == 0


TASKS_DEF: dict[str, TaskDef] = {t.name: t for t in [
    TaskDef("sentiment", "Classify the sentiment of the product review as positive or negative.",
            "choice", _sentiment, choices=("positive", "negative")),
    TaskDef("topic", "Classify the news headline into one of: sports, politics, science, business.",
            "choice", _topic, choices=("sports", "politics", "science", "business")),
    TaskDef("word_language", "Which language is the word from: English, French, German or Spanish?",
            "choice", _word_language, choices=("English", "French", "German", "Spanish"),
            entity=_entity_of(_WORD_TEMPLATES)),
    TaskDef("continent", "Name the continent the country is located in.", "choice", _continent,
            choices=("Africa", "Asia", "Europe", "North America", "South America", "Oceania"),
            entity=_entity_of(_CONTINENT_TEMPLATES)),
    TaskDef("animal", "Is the animal a mammal, bird, fish, reptile or insect?", "choice", _animal,
            choices=("mammal", "bird", "fish", "reptile", "insect"),
            entity=_entity_of(_ANIMAL_TEMPLATES)),
    TaskDef("food", "Name the food group: fruit, vegetable, grain, dairy or meat.", "choice", _food,
            choices=("fruit", "vegetable", "grain", "dairy", "meat"),
            entity=_entity_of(_FOOD_TEMPLATES)),
    TaskDef("reverse_digits", "Reverse the order of the digits. Keep them separated by spaces.",
            "generate", _reverse_digits),
    TaskDef("sort_digits", "Sort the digits in ascending order. Keep them separated by spaces.",
            "generate", _sort_digits),
    TaskDef("multiply_evens", "Multiply the even numbers in the list and give only the product.",
            "generate", _multiply_evens, max_gen_toks=8),
    TaskDef("next_letter", "Replace every letter by the next letter of the alphabet (z becomes a).",
            "generate", _next_letter),
    TaskDef("arithmetic", "Compute the value of the expression. Give only the number.",
            "generate", _arithmetic, max_gen_toks=8),
    TaskDef("json_record", "Extract the person as a JSON object with keys name, age and city; "
            "write name and city in capital letters.", "generate", _json_record, max_gen_toks=40),
    # the Gemma 3 zoo
    TaskDef("temperature", "Is the temperature cold, mild or hot?", "choice", _temperature,
            choices=("cold", "mild", "hot")),
    TaskDef("compare_numbers", "Which number is larger: the first or the second?", "choice",
            _compare_numbers, choices=("first", "second")),
    TaskDef("time_of_day", "Is the time in the morning, afternoon, evening or night?", "choice",
            _time_of_day, choices=("morning", "afternoon", "evening", "night")),
    TaskDef("season", "In which season of the northern hemisphere is the date: winter, spring, "
            "summer or autumn?", "choice", _season,
            choices=("winter", "spring", "summer", "autumn")),
    TaskDef("last_word", "Give the last word of the sentence, without the full stop.", "generate",
            _last_word, max_gen_toks=8),
    TaskDef("count_words", "How many words are in the sentence? Give only the number.", "generate",
            _count_words, max_gen_toks=8),
    TaskDef("date_iso", "Write the date in the format YYYY-MM-DD.", "generate", _date_iso,
            max_gen_toks=16),
    TaskDef("max_number", "Give the largest number in the list.", "generate", _max_number,
            max_gen_toks=8),
]}

#: The SmolLM2 zoo's twelve tasks, in a fixed order.
TASKS: tuple[str, ...] = tuple(TASKS_DEF)[:12]
#: The Gemma 3 zoo's eight tasks (chosen to differ from the SmolLM2 zoo's).
GEMMA_TASKS: tuple[str, ...] = tuple(TASKS_DEF)[12:]
#: Every task of either zoo.
ALL_TASKS: tuple[str, ...] = tuple(TASKS_DEF)


def generate(task: str, *, n_train: int, n_test: int, seed: int = 0) -> tuple[list[Example],
                                                                               list[Example]]:
    """Draw a task's train and test examples; no test input ever occurs in train.

    Test examples are drawn first (unique inputs); train examples are drawn from the rest of the
    input space. Tasks over a small entity list (`word_language`, `continent`) reserve a fixed third
    of the entities for test, so test inputs are unseen entities, not only unseen phrasings.

    Args:
        task: a name from `TASKS`.
        n_train: train examples (inputs may repeat where the input space is small).
        n_test: test examples (unique inputs).
        seed: the random seed; the same seed gives the same data.

    Returns:
        (train, test) lists of examples.

    Raises:
        KeyError: unknown task.
    """
    t = TASKS_DEF[task]
    rng = random.Random(f"{task}:{seed}")
    test: list[Example] = []
    seen: set[str] = set()
    for _ in range(200 * n_test):
        if len(test) == n_test:  # small input spaces give fewer
            break
        ex = t.example(rng)
        if ex["input"] in seen or (t.entity and not is_held_out_entity(t.entity(ex["input"]))):
            continue
        seen.add(ex["input"])
        test.append(ex)
    train: list[Example] = []
    while len(train) < n_train:
        ex = t.example(rng)
        if ex["input"] in seen or (t.entity and is_held_out_entity(t.entity(ex["input"]))):
            continue
        train.append(ex)
    assert not {e["input"] for e in train} & {e["input"] for e in test}, task
    if t.entity:
        assert not {t.entity(e["input"]) for e in train} & {t.entity(e["input"]) for e in test}
    return train, test
