"""The built-in corpus ``builtin:arithmetic``: arithmetic word problems with worked solutions
(GSM8K style), generated offline.

Every step of a solution is written "a op b = c" with the true value of c, and the document ends
with "#### answer", so a model trained on it sees correct multi-step arithmetic and the answer
can be parsed back exactly as for GSM8K.
"""

from __future__ import annotations

import random
from typing import Callable

_NAMES = [
    "Ava", "Ben", "Carlos", "Dana", "Elif", "Farah", "George", "Hana", "Ivan", "Jamal", "Keiko",
    "Liam", "Maya", "Noor", "Omar", "Priya", "Quinn", "Rosa", "Sam", "Tariq", "Uma", "Victor",
    "Wen", "Ximena", "Yusuf", "Zoe", "Amara", "Bruno", "Chloe", "Diego", "Emma", "Felix", "Grace",
    "Hiro", "Isla", "Jonas", "Kofi", "Lena", "Mateo", "Nia",
]
_OPENERS = [
    "It was a busy morning.",
    "{name} had been planning this for a while.",
    "The weather was perfect that day.",
    "{name} likes to keep track of everything in a small notebook.",
    "Something came up that needed a bit of math.",
    "{name} wanted to get the numbers exactly right.",
    "",
    "",
]
_DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
_SHOP_ITEMS = [  # (plural noun, store, price range in dollars)
    ("notebooks", "stationery store", (2, 6)), ("pens", "stationery store", (1, 4)),
    ("apples", "farmers market", (1, 3)), ("melons", "farmers market", (3, 7)),
    ("comic books", "bookshop", (4, 9)), ("paperbacks", "bookshop", (6, 12)),
    ("tennis balls", "sports shop", (2, 5)), ("water bottles", "sports shop", (5, 11)),
    ("flower pots", "garden center", (3, 8)), ("seed packets", "garden center", (1, 4)),
    ("candles", "gift shop", (2, 7)), ("postcards", "gift shop", (1, 3)),
]
_BAKED = ["cookies", "cupcakes", "muffins", "brownies", "pretzels", "dumplings"]
_WORKS = [  # (worker, place, verb phrase, plural thing)
    ("baker", "bakery", "bake", "loaves of bread"), ("potter", "studio", "make", "mugs"),
    ("tailor", "shop", "sew", "shirts"), ("carpenter", "workshop", "build", "stools"),
    ("jeweler", "store", "make", "bracelets"), ("printer", "print shop", "print", "posters"),
]
_RELATIVES = ["grandmother", "uncle", "aunt", "cousin", "old friend", "grandfather"]
_TOWNS = ["Riverton", "Maple Falls", "Oakridge", "Port Ellis", "Cedar Hill", "Brookside"]
_SAVINGS = [  # (thing, chore)
    ("bicycle", "walking the neighbor's dog"), ("guitar", "mowing lawns"),
    ("video game", "washing cars"), ("telescope", "helping at the bakery"),
    ("skateboard", "tutoring younger students"), ("pair of headphones", "babysitting"),
]
_DISHES = ["banana bread", "pancakes", "pizza dough", "sugar cookies", "apple pie", "flatbread"]
_EVENTS = ["school fair", "birthday party", "family reunion", "bake sale", "picnic"]
_VEGETABLES = ["tomato", "pepper", "lettuce", "bean", "cabbage", "carrot"]
_SIBLINGS = ["brother", "sister", "cousin"]
_PARENTS = ["mother", "father", "aunt", "uncle"]
_STORES = ["clothing store", "toy store", "bookshop", "shoe store", "hardware store"]
_SALE_ITEMS = {"clothing store": "sweaters", "toy store": "puzzles", "bookshop": "atlases",
               "shoe store": "pairs of sandals", "hardware store": "hammers"}
_MEALS = ["dinner", "lunch", "brunch", "a pizza night"]


def _shopping(rng: random.Random, name: str) -> tuple[str, list[str], int]:
    store = rng.choice(sorted({s for _, s, _ in _SHOP_ITEMS}))
    (item1, _, (lo1, hi1)), (item2, _, (lo2, hi2)) = rng.sample(
        [it for it in _SHOP_ITEMS if it[1] == store], 2)
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    p, q = rng.randint(lo1, hi1), rng.randint(lo2, hi2)
    cost1, cost2 = a * p, b * q
    total = cost1 + cost2
    bill = next(x for x in (20, 50, 100, 200) if x >= total)
    change = bill - total
    question = (f"{name} went to the {store} with a ${bill} bill. {name} bought {a} {item1} that "
                f"cost ${p} each and {b} {item2} that cost ${q} each. How much money did {name} "
                f"get back in change?")
    steps = [f"The {item1} cost {a} * {p} = {cost1} dollars.",
             f"The {item2} cost {b} * {q} = {cost2} dollars.",
             f"Altogether {name} spent {cost1} + {cost2} = {total} dollars.",
             f"So the change was {bill} - {total} = {change} dollars."]
    return question, steps, change


def _sharing(rng: random.Random, name: str) -> tuple[str, list[str], int]:
    item = rng.choice(_BAKED)
    friends, share, kept = rng.randint(2, 8), rng.randint(3, 12), rng.randint(2, 10)
    ate = rng.randint(1, share - 1)
    made = kept + friends * share
    rest, left = made - kept, share - ate
    question = (f"{name} baked {made} {item} for a {rng.choice(_EVENTS)}. {name} kept {kept} for "
                f"the family and shared the rest equally among {friends} friends. Each friend then "
                f"ate {ate} of their share right away. How many {item} did each friend have left?")
    steps = [f"After keeping {kept}, {name} had {made} - {kept} = {rest} {item} to share.",
             f"Each friend got {rest} / {friends} = {share} {item}.",
             f"After eating {ate}, each friend had {share} - {ate} = {left} {item} left."]
    return question, steps, left


def _rates(rng: random.Random, name: str) -> tuple[str, list[str], int]:
    worker, place, verb, things = rng.choice(_WORKS)
    rate, price = rng.randint(2, 9), rng.randint(3, 15)
    h1, h2 = rng.randint(2, 5), rng.randint(2, 5)
    day = rng.choice(_DAYS)
    hours, made = h1 + h2, rate * (h1 + h2)
    money = made * price
    question = (f"{name} works as a {worker} at a small {place} and can {verb} {rate} {things} "
                f"every hour. On {day}, {name} worked {h1} hours in the morning and {h2} hours in "
                f"the afternoon. Each one sells for ${price}. How much money will {name} earn by "
                f"selling everything made on {day}?")
    steps = [f"{name} worked {h1} + {h2} = {hours} hours in total.",
             f"In that time {name} made {rate} * {hours} = {made} {things}.",
             f"Selling them brings in {made} * {price} = {money} dollars."]
    return question, steps, money


def _travel(rng: random.Random, name: str) -> tuple[str, list[str], int]:
    s1, s2 = rng.choice(range(30, 75, 5)), rng.choice(range(25, 70, 5))
    t1, t2 = rng.randint(2, 5), rng.randint(1, 4)
    d1, d2 = s1 * t1, s2 * t2
    question = (f"{name} drove to visit a {rng.choice(_RELATIVES)} who lives in "
                f"{rng.choice(_TOWNS)}. For the first part of the trip, {name} drove at {s1} miles "
                f"per hour for {t1} hours. After a short break for lunch, the road got busier and "
                f"{name} drove at {s2} miles per hour for another {t2} hours. How many miles did "
                f"{name} drive in total?")
    steps = [f"The first part was {s1} * {t1} = {d1} miles.",
             f"The second part was {s2} * {t2} = {d2} miles.",
             f"In total {name} drove {d1} + {d2} = {d1 + d2} miles."]
    return question, steps, d1 + d2


def _library(rng: random.Random, name: str) -> tuple[str, list[str], int]:
    start, boxes, per_box = rng.randint(120, 900), rng.randint(2, 9), rng.randint(6, 25)
    donated = boxes * per_box
    lost = rng.randint(5, 60)
    mid = start + donated
    question = (f"The library at {name}'s school had {start} books at the start of the year. In "
                f"the spring, it received {boxes} boxes of donated books with {per_box} books in "
                f"each box. Over the summer, {lost} old books were too damaged to keep and were "
                f"recycled. {name} helps out in the library. How many books does the library have "
                f"now?")
    steps = [f"The donations added {boxes} * {per_box} = {donated} books.",
             f"After the donations there were {start} + {donated} = {mid} books.",
             f"After recycling, the library has {mid} - {lost} = {mid - lost} books."]
    return question, steps, mid - lost


def _savings(rng: random.Random, name: str) -> tuple[str, list[str], int]:
    thing, chore = rng.choice(_SAVINGS)
    have, weekly, weeks = rng.randint(5, 60), rng.randint(5, 25), rng.randint(3, 12)
    earned = weekly * weeks
    total = have + earned
    price = rng.randint(max(10, total // 2), total)
    question = (f"{name} wants to buy a {thing} that costs ${price}. {name} already has ${have} "
                f"saved and earns ${weekly} each week by {chore}. After saving for {weeks} weeks, "
                f"{name} buys the {thing}. How much money does {name} have left?")
    steps = [f"In {weeks} weeks {name} earns {weekly} * {weeks} = {earned} dollars.",
             f"Then {name} has {have} + {earned} = {total} dollars.",
             f"After buying the {thing}, {name} has {total} - {price} = {total - price} dollars "
             f"left."]
    return question, steps, total - price


def _baking(rng: random.Random, name: str) -> tuple[str, list[str], int]:
    dish, event = rng.choice(_DISHES), rng.choice(_EVENTS)
    cups, batches, bag = rng.randint(2, 5), rng.randint(3, 8), rng.randint(2, 4)
    need = cups * batches
    if (need - 1) // bag < 2:  # keep room for at least 2 bags and some flour at home
        bag = 2
    bags = rng.randint(2, (need - 1) // bag)
    missing = bags * bag
    have = need - missing
    question = (f"A recipe for {dish} needs {cups} cups of flour for each batch. {name} wants to "
                f"make {batches} batches for the {event}, but only has {have} cups of flour at "
                f"home. Flour is sold in bags that each hold {bag} cups. How many bags of flour "
                f"does {name} need to buy?")
    steps = [f"{batches} batches need {cups} * {batches} = {need} cups of flour.",
             f"{name} is short by {need} - {have} = {missing} cups.",
             f"That is {missing} / {bag} = {bags} bags of flour."]
    return question, steps, bags


def _garden(rng: random.Random, name: str) -> tuple[str, list[str], int]:
    veg = rng.choice(_VEGETABLES)
    rows, per_row, trays, per_tray = (rng.randint(3, 9), rng.randint(4, 12), rng.randint(2, 5),
                                      rng.randint(3, 8))
    planted = rows * per_row
    died = rng.randint(2, planted // 3)
    alive, added = planted - died, trays * per_tray
    question = (f"{name} planted a vegetable garden with {rows} rows of {veg} plants, with "
                f"{per_row} plants in each row. A late frost killed {died} of the plants. The next "
                f"weekend, {name} bought {trays} trays of seedlings with {per_tray} plants in each "
                f"tray and planted all of them. How many {veg} plants are in the garden now?")
    steps = [f"{name} first planted {rows} * {per_row} = {planted} plants.",
             f"After the frost, {planted} - {died} = {alive} plants were left.",
             f"The trays held {trays} * {per_tray} = {added} seedlings.",
             f"Now there are {alive} + {added} = {alive + added} plants."]
    return question, steps, alive + added


def _ages(rng: random.Random, name: str) -> tuple[str, list[str], int]:
    other = rng.choice([n for n in _NAMES if n != name])
    sibling, parent = rng.choice(_SIBLINGS), rng.choice(_PARENTS)
    age, older, times = rng.randint(3, 12), rng.randint(1, 6), rng.randint(2, 4)
    other_age = age + older
    parent_age = other_age * times
    total = age + other_age + parent_age
    question = (f"{name} is {age} years old. {name}'s {sibling} {other} is {older} years older "
                f"than {name}. Their {parent} is {times} times as old as {other}. What is the sum "
                f"of the ages of all three of them?")
    steps = [f"{other} is {age} + {older} = {other_age} years old.",
             f"Their {parent} is {other_age} * {times} = {parent_age} years old.",
             f"Together they are {age} + {other_age} + {parent_age} = {total} years old."]
    return question, steps, total


def _discount(rng: random.Random, name: str) -> tuple[str, list[str], int]:
    store = rng.choice(_STORES)
    items = _SALE_ITEMS[store]
    pct = rng.choice([10, 20, 25, 50])
    unit = 100 // pct  # prices are multiples of this, so the discount is a whole number
    price, count = unit * rng.randint(max(1, 6 // unit), 60 // unit), rng.randint(2, 6)
    full = count * price
    off = full * pct // 100
    question = (f"A {store} is having a sale where everything is {pct}% off. {name} wants to buy "
                f"{count} {items} that normally cost ${price} each. How much will {name} pay "
                f"after the discount?")
    steps = [f"Without the sale, {count} {items} cost {count} * {price} = {full} dollars.",
             f"The discount is {full} * {pct} / 100 = {off} dollars.",
             f"So {name} pays {full} - {off} = {full - off} dollars."]
    return question, steps, full - off


def _split_bill(rng: random.Random, name: str) -> tuple[str, list[str], int]:
    people, each = rng.randint(2, 6), rng.randint(8, 30)
    total = people * each
    tip = rng.randint(2, total // 4)
    meal = total - tip
    question = (f"{name} and {people - 1} friends went out for {rng.choice(_MEALS)}. The food "
                f"cost ${meal}, and they added a tip of ${tip}. They agreed to split the whole "
                f"bill equally. How much did each person pay?")
    steps = [f"The whole bill was {meal} + {tip} = {total} dollars.",
             f"Split among {people} people, each paid {total} / {people} = {each} dollars."]
    return question, steps, each


_TEMPLATES: list[Callable[[random.Random, str], tuple[str, list[str], int]]] = [
    _shopping, _sharing, _rates, _travel, _library, _savings, _baking, _garden, _ages,
    _discount, _split_bill,
]
_SOLUTION_LEADS = ["", "", "Let's work it out step by step.", "We can solve this in steps."]


def arithmetic_corpus(num_documents: int, seed: int) -> list[str]:
    """Return ``num_documents`` arithmetic word problems with worked solutions.

    Each document is "Question: ...\\nAnswer: <steps, one per line>\\n#### <answer>" (the same
    layout ``load_texts`` gives GSM8K question/answer records) and contains no blank line, so a
    corpus written out with "\\n\\n" between documents reads back unchanged as a .txt file.
    Deterministic per ``seed`` (a private ``random.Random``; the global RNG is never touched).
    """
    rng = random.Random(seed)
    docs = []
    for _ in range(num_documents):
        name = rng.choice(_NAMES)
        question, steps, answer = rng.choice(_TEMPLATES)(rng, name)
        opener = rng.choice(_OPENERS).format(name=name)
        lead = rng.choice(_SOLUTION_LEADS)
        question = f"{opener} {question}".strip()
        solution = "\n".join(([lead] if lead else []) + steps)
        docs.append(f"Question: {question}\nAnswer: {solution}\n#### {answer}")
    return docs
