"""The ``math`` domain: DeepMind-Mathematics-style questions with exactly computed answers."""

from __future__ import annotations

import ast
import math
import random
from decimal import ROUND_HALF_UP, Decimal
from fractions import Fraction
from typing import Iterator

from .base import Document, Item

def _fmt(x) -> str:
    """DM-mathematics style numbers: integers plain, fractions as p/q, exact decimals."""
    if isinstance(x, Fraction):
        return str(x.numerator) if x.denominator == 1 else f"{x.numerator}/{x.denominator}"
    if isinstance(x, Decimal):
        s = format(x.normalize(), "f")
        return "0" if s in ("-0", "0") else s
    return str(x)


def _poly_str(coeffs: dict[int, int], var: str) -> str:
    """``{2: 3, 1: -1, 0: 5}`` -> ``3*x**2 - x + 5`` (Python syntax, as in DM maths)."""
    parts = []
    for power in sorted(coeffs, reverse=True):
        c = coeffs[power]
        if c == 0:
            continue
        mono = "" if power == 0 else var if power == 1 else f"{var}**{power}"
        mag = abs(c)
        body = str(mag) if not mono else (mono if mag == 1 else f"{mag}*{mono}")
        sign = "-" if c < 0 else "+"
        parts.append(f"-{body}" if not parts and c < 0 else body if not parts else f"{sign} {body}")
    return " ".join(parts) or "0"


def _linear(a: int, var: str, b: int) -> str:
    return _poly_str({1: a, 0: b}, var)


_VARS = "abcdfghjklmnpqrstuvwxyz"


def _eval_expr(expr: str) -> Fraction:
    """Exact evaluation of + - * / ( ) over integers/decimals (no ``eval``)."""
    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return Fraction(str(node.value))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            return -ev(node.operand) if isinstance(node.op, ast.USub) else ev(node.operand)
        if isinstance(node, ast.BinOp):
            a, b = ev(node.left), ev(node.right)
            ops = {ast.Add: a.__add__, ast.Sub: a.__sub__, ast.Mult: a.__mul__, ast.Div: a.__truediv__}
            if type(node.op) in ops:
                return ops[type(node.op)](b)
            if isinstance(node.op, ast.Pow):
                return a ** int(b)
        raise ValueError(f"unsupported expression: {expr}")
    return ev(ast.parse(expr, mode="eval"))


def _rand_decimal(rng: random.Random, lo: int, hi: int, places: int) -> Decimal:
    return Decimal(rng.randint(lo * 10**places, hi * 10**places)).scaleb(-places)


def _rand_number(rng: random.Random, big: bool = False) -> int | Decimal:
    if rng.random() < 0.25:
        return _rand_decimal(rng, -50 if big else -9, 500 if big else 9, rng.choice([1, 1, 2, 3]))
    return rng.randint(-(10 ** rng.randint(1, 4)), 10 ** rng.randint(1, 4)) if big else rng.randint(-30, 30)


def _q_add_sub(rng):
    a, b = _rand_number(rng, True), _rand_number(rng, True)
    form = rng.randrange(8)
    if form == 0:
        return f"What is {_fmt(a)} + {_fmt(b)}?", a + b
    if form == 1:
        return f"Calculate {_fmt(a)} - {_fmt(b)}.", a - b
    if form == 2:
        return f"Add {_fmt(a)} and {_fmt(b)}.", a + b
    if form == 3:
        return f"Subtract {_fmt(b)} from {_fmt(a)}.", a - b
    if form == 4:
        return f"What is {_fmt(a)} minus {_fmt(b)}?", a - b
    if form == 5:
        return f"Sum {_fmt(a)} and {_fmt(b)}.", a + b
    if form == 6:
        return f"What is {_fmt(b)} less than {_fmt(a)}?", a - b
    return f"Total of {_fmt(a)} and {_fmt(b)}.", a + b


def _q_mul_div(rng):
    if rng.random() < 0.5:
        a, b = _rand_number(rng), _rand_number(rng, rng.random() < 0.3)
        form = rng.randrange(4)
        text = [f"What is {_fmt(a)} * {_fmt(b)}?", f"Multiply {_fmt(a)} and {_fmt(b)}.",
                f"Calculate {_fmt(a)}*{_fmt(b)}.", f"What is the product of {_fmt(a)} and {_fmt(b)}?"][form]
        return text, a * b
    b = rng.choice([i for i in range(-25, 26) if i not in (0, 1)])
    q = rng.randint(-300, 300)
    a = b * q
    form = rng.randrange(4)
    text = [f"Divide {a} by {b}.", f"What is {a} divided by {b}?", f"Calculate {a}/{b}.",
            f"Evaluate {a}/{b}."][form]
    return text, q


def _q_mixed(rng):
    r = lambda: rng.randint(-20, 20)  # noqa: E731
    a, b, c, e = r(), r(), r(), r()
    d = rng.choice([2, 3, 4, 5, 6, 7, -2, -3, -4])
    y = r()
    x = d * rng.randint(-9, 9) + y  # (x - y) is divisible by d
    expr = rng.choice([
        f"{a} + {b} - {c}", f"{a} - ({b} - {c})", f"({a} + {b})*{c}", f"{a}*{b} + {c}",
        f"({x} - {y})/{d}", f"{a} + ({x} - {y})/{d}", f"{a}*({b} + {c}) - {e}", f"-{abs(a)} + {b}*{c}",
        f"{a} - {b} + {c} - {e}", f"({a} - {b})*({c} + {e})", f"{Fraction(a, d)} + {Fraction(b, abs(d) + 1)}",
    ])
    value = _eval_expr(expr)
    template = rng.choice(["What is {}?", "Evaluate {}.", "Calculate {}.", "What is the value of {}?", "Compute {}."])
    return template.format(expr), value


def _q_linear(rng):
    v = rng.choice(_VARS)
    s = rng.randint(-12, 12)
    a = rng.choice([i for i in range(-9, 10) if i])
    b = rng.randint(-40, 40)
    if rng.random() < 0.5:
        if rng.random() < 0.5:
            return f"Solve {_linear(a, v, b)} = {a * s + b} for {v}.", s
        return f"Solve 0 = {_linear(a, v, -a * s)} for {v}.", s
    c = rng.choice([i for i in range(-9, 10) if i not in (0, a)])
    d = (a - c) * s + b
    return f"Solve {_linear(a, v, b)} = {_linear(c, v, d)} for {v}.", s


def _q_linear_2d(rng):
    v, w = rng.sample(_VARS, 2)
    sv, sw = rng.randint(-9, 9), rng.randint(-9, 9)
    while True:
        a, b, c, d = (rng.choice([i for i in range(-6, 7) if i]) for _ in range(4))
        if a * d - b * c:
            break
    eq1 = f"{_poly_str({1: a}, v)} + {_poly_str({1: b}, w)} = {a * sv + b * sw}".replace("+ -", "- ")
    eq2 = f"{_poly_str({1: c}, v)} + {_poly_str({1: d}, w)} = {c * sv + d * sw}".replace("+ -", "- ")
    return f"Solve {eq1}, {eq2} for {v}.", sv


def _rand_poly(rng, max_degree=5) -> dict[int, int]:
    deg = rng.randint(2, max_degree)
    coeffs = {p: rng.randint(-9, 9) for p in range(deg + 1)}
    coeffs[deg] = rng.choice([i for i in range(-9, 10) if i])
    return coeffs


def poly_derivative(coeffs: dict[int, int], times: int = 1) -> dict[int, int]:
    for _ in range(times):
        coeffs = {p - 1: c * p for p, c in coeffs.items() if p > 0}
    return coeffs


def _q_calculus(rng):
    v = rng.choice("xyzabcdfghjklmnpqrstw")
    coeffs = _rand_poly(rng)
    poly = _poly_str(coeffs, v)
    k = rng.choice([1, 1, 1, 2, 2, 3])
    order = {1: "", 2: "second ", 3: "third "}[k]
    if k == 1 and rng.random() < 0.4:
        return f"Differentiate {poly} with respect to {v}.", _poly_str(poly_derivative(coeffs), v)
    if rng.random() < 0.3:
        f = rng.choice("fghjkmnpqrstuvw")
        return (f"Let {f}({v}) = {poly}. What is the {order}derivative of {f}({v}) wrt {v}?",
                _poly_str(poly_derivative(coeffs, k), v))
    return f"Find the {order}derivative of {poly} wrt {v}.", _poly_str(poly_derivative(coeffs, k), v)


def _q_evaluate(rng):
    v = rng.choice("xyzabcdfghjklmnpqrstw")
    f = rng.choice("fghjkmnpqrstuvw")
    coeffs = _rand_poly(rng, 3)
    x0 = rng.randint(-6, 6)
    value = sum(c * x0**p for p, c in coeffs.items())
    return f"Let {f}({v}) = {_poly_str(coeffs, v)}. What is {f}({x0})?", value


def _is_prime(n: int) -> bool:
    return n > 1 and all(n % p for p in range(2, math.isqrt(n) + 1))


def _q_numbers(rng):
    form = rng.randrange(9)
    if form in (0, 1):
        g = rng.randint(2, 60)
        m, n = rng.sample(range(1, 40), 2)
        a, b = g * m, g * n
        if form == 0:
            text = rng.choice(["What is the greatest common divisor of {} and {}?",
                               "Calculate the highest common factor of {} and {}.",
                               "What is the greatest common factor of {} and {}?"])
            return text.format(a, b), math.gcd(a, b)
        text = rng.choice(["What is the lowest common multiple of {} and {}?",
                           "Calculate the least common multiple of {} and {}.",
                           "What is the smallest common multiple of {} and {}?"])
        return text.format(a, b), a * b // math.gcd(a, b)
    if form == 2:
        a, b = rng.randint(10, 5000), rng.randint(2, 60)
        text = rng.choice(["What is the remainder when {} is divided by {}?",
                           "Calculate the remainder when {} is divided by {}."])
        return text.format(a, b), a % b
    if form == 3:
        n = rng.randint(2, 20000)
        if rng.random() < 0.5:
            while not _is_prime(n):
                n += 1
        return rng.choice(["Is {} a prime number?", "Is {} prime?"]).format(n), _is_prime(n)
    if form == 4:
        n = rng.randint(12, 20000)
        factors = [p for p in range(2, n + 1) if n % p == 0 and _is_prime(p)]
        if rng.random() < 0.5:
            return f"List the prime factors of {n}.", ", ".join(map(str, factors))
        return f"What is the smallest prime factor of {n}?", factors[0]
    if form == 5:
        b = rng.randint(2, 40)
        a = b * rng.randint(2, 300) + (0 if rng.random() < 0.5 else rng.randint(1, b - 1))
        text = rng.choice(["Is {a} a multiple of {b}?", "Does {b} divide {a}?", "Is {a} divisible by {b}?"])
        return text.format(a=a, b=b), a % b == 0
    if form == 6:
        n = rng.randint(1000, 9_999_999)
        place = rng.randrange(4)
        name = ["units", "tens", "hundreds", "thousands"][place]
        return f"What is the {name} digit of {n}?", (n // 10**place) % 10
    if form == 7:
        start, step = rng.randint(-50, 50), rng.choice([i for i in range(-15, 16) if i])
        if rng.random() < 0.5:
            seq = [start + step * i for i in range(5)]
            nxt = start + step * 5
        else:  # quadratic: second differences constant
            c2 = rng.choice([-3, -2, -1, 1, 2, 3])
            seq = [start + step * i + c2 * i * i for i in range(6)]
            nxt, seq = seq[5], seq[:5]
        text = rng.choice(["What is the next term in: {}?", "What comes next: {}?"])
        return text.format(", ".join(map(str, seq))), nxt
    p, q, r, s = rng.randint(1, 9), rng.randint(2, 12), rng.randint(1, 9), rng.randint(2, 12)
    op = rng.choice(["+", "-", "*"])
    value = _eval_expr(f"{p}/{q} {op} {r}/{s}")
    return f"Calculate {p}/{q} {op} {r}/{s}.", value


def _rand_comparable(rng) -> tuple[str, Fraction]:
    kind = rng.randrange(3)
    if kind == 0:
        n = rng.randint(-100, 100)
        return str(n), Fraction(n)
    if kind == 1:
        d = _rand_decimal(rng, -10, 10, rng.choice([1, 2]))
        return _fmt(d), Fraction(d)
    f = Fraction(rng.randint(-20, 20), rng.randint(2, 15))
    return _fmt(f), f


def _q_compare(rng):
    form = rng.randrange(4)
    if form == 0:
        while True:
            (sa, a), (sb, b) = _rand_comparable(rng), _rand_comparable(rng)
            if a != b:
                break
        big = rng.random() < 0.5
        word = "bigger" if big else "smaller"
        return f"Which is {word}: {sa} or {sb}?", (sa if (a > b) == big else sb)
    if form == 1:
        (sa, a), (sb, b) = _rand_comparable(rng), _rand_comparable(rng)
        rel = rng.choice(["greater than", "less than", "at least", "at most"])
        truth = {"greater than": a > b, "less than": a < b, "at least": a >= b, "at most": a <= b}[rel]
        return f"Is {sa} {rel} {sb}?", truth
    vals = {}
    while len(vals) < rng.randint(3, 5):
        s, v = _rand_comparable(rng)
        vals.setdefault(v, s)
    items = list(vals.items())
    rng.shuffle(items)
    listing = ", ".join(s for _, s in items)
    if form == 2:
        word = rng.choice(["biggest", "smallest"])
        pick = (max if word == "biggest" else min)(items)[1]
        return f"What is the {word} value in {listing}?", pick
    order = rng.choice(["increasing", "decreasing"])
    ordered = sorted(items, reverse=order == "decreasing")
    return f"Sort {listing} in {order} order.", ", ".join(s for _, s in ordered)


def _q_round(rng):
    x = _rand_decimal(rng, -5000, 5000, rng.randint(2, 5))
    form = rng.randrange(3)
    if form == 0:
        k = rng.randint(0, 2)
        target = "the nearest integer" if k == 0 else f"{k} decimal place{'s' if k > 1 else ''}"
        return f"Round {_fmt(x)} to {target}.", x.quantize(Decimal(1).scaleb(-k), rounding=ROUND_HALF_UP)
    unit = rng.choice([10, 100, 1000])
    name = {10: "ten", 100: "hundred", 1000: "thousand"}[unit]
    rounded = (x / unit).quantize(Decimal(1), rounding=ROUND_HALF_UP) * unit
    return f"What is {_fmt(x)} rounded to the nearest {name}?", rounded


_UNITS = [("minutes", "hours", 60), ("seconds", "minutes", 60), ("grams", "kilograms", 1000),
          ("millilitres", "litres", 1000), ("centimetres", "metres", 100), ("metres", "kilometres", 1000),
          ("hours", "days", 24), ("months", "years", 12), ("millimetres", "centimetres", 10)]


def _q_units(rng):
    small, big, factor = rng.choice(_UNITS)
    x = _rand_decimal(rng, 0, 30, rng.choice([0, 1, 2]))
    if rng.random() < 0.5:
        text = rng.choice(["How many {s} are there in {x} {b}?", "Convert {x} {b} to {s}."])
        return text.format(s=small, b=big, x=_fmt(x)), x * factor
    y = Decimal(rng.randint(1, 40 * factor))
    text = rng.choice(["How many {b} are there in {y} {s}?", "Convert {y} {s} to {b}."])
    value = Fraction(int(y), factor)
    terminating = all(p in (2, 5) for p in range(2, value.denominator + 1) if value.denominator % p == 0 and _is_prime(p))
    return text.format(s=small, b=big, y=y), Decimal(value.numerator) / value.denominator if terminating else value


def _q_composed(rng):
    v, w = rng.sample(_VARS, 2)
    a, b, c, d = (rng.randint(-15, 15) for _ in range(4))
    first = a - b
    if rng.random() < 0.5:
        return f"Let {v} = {a} - {b}. What is {v} * {c}?", first * c
    return f"Let {v} = {a} - {b}. Let {w} = {v} * {c}. What is {w} + {d}?", first * c + d


_MATH_KINDS = [(_q_add_sub, 3), (_q_mul_div, 3), (_q_mixed, 3), (_q_linear, 3), (_q_linear_2d, 1),
               (_q_calculus, 2), (_q_evaluate, 1), (_q_numbers, 3), (_q_compare, 2), (_q_round, 1),
               (_q_units, 1), (_q_composed, 1)]


def math_item(rng: random.Random) -> tuple[str, str]:
    """One DeepMind-Mathematics-style (question, answer) pair."""
    kinds, weights = zip(*_MATH_KINDS)
    question, answer = rng.choices(kinds, weights)[0](rng)
    return question, answer if isinstance(answer, str) else _fmt(answer)


def math_docs(rng: random.Random) -> Iterator[Item]:
    for i in range(10**9):
        items = [math_item(rng) for _ in range(rng.randint(12, 24))]
        text = "\n\n".join(f"Question: {q}\nAnswer: {a}" for q, a in items)
        yield Document("math", f"gen/{i:06d}", text), "generated-dm-math-style", "generated (Apache-2.0, this project)"

