"""The ``latex`` domain: small LaTeX documents whose displayed mathematics is computed, hence correct."""

from __future__ import annotations

import math
import random
from fractions import Fraction
from typing import Iterator

from .base import Document, Item
from .mathematics import poly_derivative

def _tex_poly(coeffs: dict[int, int | Fraction], var: str = "x") -> str:
    parts = []
    for p in sorted(coeffs, reverse=True):
        c = Fraction(coeffs[p])
        if c == 0:
            continue
        mag = abs(c)
        num = str(mag) if mag.denominator == 1 else rf"\frac{{{mag.numerator}}}{{{mag.denominator}}}"
        mono = "" if p == 0 else var if p == 1 else f"{var}^{{{p}}}"
        body = num if not mono else (mono if mag == 1 else f"{num}{mono}")
        parts.append(("-" if c < 0 else "") + body if not parts else ("- " if c < 0 else "+ ") + body)
    return " ".join(parts) or "0"


def _tex_frac(f: Fraction) -> str:
    if f.denominator == 1:
        return str(f.numerator)
    sign = "-" if f < 0 else ""
    return rf"{sign}\frac{{{abs(f.numerator)}}}{{{f.denominator}}}"


def _tex_matrix(m: list[list[int]], env: str) -> str:
    rows = r" \\ ".join(" & ".join(str(v) for v in row) for row in m)
    return rf"\begin{{{env}}} {rows} \end{{{env}}}"


_TEX_TOPICS = ["Polynomials", "Linear Algebra", "Calculus", "Sequences and Series", "Number Theory",
               "Inequalities", "Quadratic Equations", "Limits", "Matrices", "Combinatorics"]


class LatexGen:
    """Small LaTeX documents whose displayed mathematics is computed, hence correct."""

    def __init__(self, rng: random.Random):
        self.rng = rng

    def derivative(self) -> str:
        r = self.rng
        c = {p: r.randint(-9, 9) for p in range(r.randint(2, 5) + 1)}
        c[max(c)] = r.choice([1, 2, 3, -1, -2, 5])
        return (f"Let $f(x) = {_tex_poly(c)}$. Differentiating term by term gives\n"
                f"\\begin{{equation}}\n  f'(x) = {_tex_poly(poly_derivative(c))}.\n\\end{{equation}}\n"
                f"In particular $f'(0) = {poly_derivative(c).get(0, 0)}$.")

    def integral(self) -> str:
        r = self.rng
        c = {p: r.randint(-6, 6) for p in range(r.randint(1, 3) + 1)}
        a, b = sorted(r.sample(range(-3, 5), 2))
        anti = {p + 1: Fraction(v, p + 1) for p, v in c.items()}
        value = sum(v * (Fraction(b) ** p - Fraction(a) ** p) for p, v in anti.items())
        return ("We evaluate the definite integral using the fundamental theorem of calculus:\n"
                "\\begin{align*}\n"
                f"  \\int_{{{a}}}^{{{b}}} \\left({_tex_poly(c)}\\right) \\, dx\n"
                f"    &= \\left[ {_tex_poly(anti)} \\right]_{{{a}}}^{{{b}}} \\\\\n"
                f"    &= {_tex_frac(value)}.\n\\end{{align*}}")

    def series(self) -> str:
        n, k = self.rng.randint(5, 40), self.rng.choice([1, 2, 3])
        value = sum(i**k for i in range(1, n + 1))
        closed = {1: r"\frac{n(n+1)}{2}", 2: r"\frac{n(n+1)(2n+1)}{6}", 3: r"\left(\frac{n(n+1)}{2}\right)^{2}"}[k]
        power = "" if k == 1 else f"^{{{k}}}"
        return (f"\\begin{{lemma}}\nFor every integer $n \\geq 1$ we have $\\sum_{{k=1}}^{{n}} k{power} = {closed}$.\n"
                f"\\end{{lemma}}\n\\begin{{proof}}\nBy induction on $n$; the case $n = 1$ is immediate and the "
                f"inductive step follows by adding $(n+1){power}$ to both sides.\n\\end{{proof}}\n"
                f"For example, with $n = {n}$ the sum equals ${value}$.")

    def matrix(self) -> str:
        r = self.rng
        A = [[r.randint(-5, 5) for _ in range(2)] for _ in range(2)]
        B = [[r.randint(-5, 5) for _ in range(2)] for _ in range(2)]
        AB = [[sum(A[i][k] * B[k][j] for k in range(2)) for j in range(2)] for i in range(2)]
        det = A[0][0] * A[1][1] - A[0][1] * A[1][0]
        env = r.choice(["pmatrix", "bmatrix"])
        return (f"Consider the matrices $A = {_tex_matrix(A, env)}$ and $B = {_tex_matrix(B, env)}$. Then\n"
                f"\\[\n  AB = {_tex_matrix(AB, env)}, \\qquad \\det A = {det}.\n\\]\n"
                + ("Since $\\det A \\neq 0$, the matrix $A$ is invertible." if det else
                   "Since $\\det A = 0$, the matrix $A$ is singular."))

    def quadratic(self) -> str:
        r = self.rng
        p, q = r.randint(-9, 9), r.randint(-9, 9)
        b, c = -(p + q), p * q
        poly = _tex_poly({2: 1, 1: b, 0: c})
        return (f"\\begin{{example}}\nSolve ${poly} = 0$.\n\\end{{example}}\n"
                f"The discriminant is $\\Delta = b^{{2}} - 4ac = {b * b - 4 * c}$, and the polynomial factors as\n"
                f"\\begin{{equation*}}\n  {poly} = (x {'-' if p >= 0 else '+'} {abs(p)})(x {'-' if q >= 0 else '+'} {abs(q)}),\n"
                "\\end{equation*}\n" + (f"so the only solution is $x = {p}$." if p == q else
                                      f"so the solutions are $x = {min(p, q)}$ and $x = {max(p, q)}$."))

    def limit(self) -> str:
        a = self.rng.choice([i for i in range(-9, 10) if i])
        minus, plus = _tex_poly({1: 1, 0: -a}), _tex_poly({1: 1, 0: a})  # "x - a", "x + a"
        return (f"\\begin{{proposition}}\n$\\displaystyle \\lim_{{x \\to {a}}} \\frac{{x^{{2}} - {a * a}}}{{{minus}}} = {2 * a}$.\n"
                f"\\end{{proposition}}\n\\begin{{proof}}\nFor $x \\neq {a}$ the fraction simplifies to ${plus}$, "
                f"which is continuous at $x = {a}$, so the limit equals ${2 * a}$.\n\\end{{proof}}")

    def binomial(self) -> str:
        n = self.rng.randint(2, 7)
        terms = " + ".join((f"{math.comb(n, k)} " if math.comb(n, k) > 1 else "")
                           + (f"a^{{{n - k}}}" if n - k > 1 else "a" if n - k == 1 else "")
                           + (f"b^{{{k}}}" if k > 1 else "b" if k == 1 else "") for k in range(n + 1))
        return (f"By the binomial theorem, $(a + b)^{{n}} = \\sum_{{k=0}}^{{n}} \\binom{{n}}{{k}} a^{{n-k}} b^{{k}}$. "
                f"For $n = {n}$ this reads\n\\begin{{equation}}\n  (a + b)^{{{n}}} = {terms}.\n\\end{{equation}}")

    def inequality(self) -> str:
        x, y = self.rng.randint(1, 20), self.rng.randint(1, 20)
        return ("\\begin{theorem}[AM--GM]\nFor all real numbers $x, y \\geq 0$ we have "
                "$\\frac{x + y}{2} \\geq \\sqrt{xy}$, with equality if and only if $x = y$.\n\\end{theorem}\n"
                "\\begin{proof}\nThis follows from $(\\sqrt{x} - \\sqrt{y})^{2} \\geq 0$.\n\\end{proof}\n"
                f"For instance, with $x = {x}$ and $y = {y}$ we get ${_tex_frac(Fraction(x + y, 2))} \\geq \\sqrt{{{x * y}}}$.")

    def gcd(self) -> str:
        a, b = self.rng.randint(20, 500), self.rng.randint(20, 500)
        steps, (u, v) = [], (max(a, b), min(a, b))
        while v:
            steps.append(f"  {u} &= {u // v} \\cdot {v} + {u % v}")
            u, v = v, u % v
        return ("The Euclidean algorithm computes the greatest common divisor by repeated division:\n"
                "\\begin{align*}\n" + " \\\\\n".join(steps) + "\n\\end{align*}\n"
                f"Hence $\\gcd({a}, {b}) = {u}$.")

    def itemize(self) -> str:
        items = self.rng.sample([r"$f$ is continuous on $[a, b]$", r"$f$ is differentiable on $(a, b)$",
                                 r"$f(a) = f(b)$", r"the sequence $(a_n)$ is bounded",
                                 r"$\sum_{n} |a_n| < \infty$", r"$A$ is symmetric, i.e.\ $A = A^{T}$",
                                 r"$p$ is a prime number", r"$G$ is a finite group"], 3)
        body = "\n".join(f"  \\item {it};" for it in items)
        return f"Throughout this section we assume that\n\\begin{{itemize}}\n{body}\n\\end{{itemize}}"

    def document(self) -> str:
        r = self.rng
        blocks = [self.derivative, self.integral, self.series, self.matrix, self.quadratic, self.limit,
                  self.binomial, self.inequality, self.gcd, self.itemize]
        topic = r.choice(_TEX_TOPICS)
        parts = ["\\documentclass{" + r.choice(["article", "amsart", "report"]) + "}",
                 "\\usepackage{amsmath, amssymb, amsthm" + r.choice(["", ", mathtools", ", geometry"]) + "}",
                 "\\newtheorem{theorem}{Theorem}", "\\newtheorem{lemma}[theorem]{Lemma}",
                 "\\newtheorem{proposition}[theorem]{Proposition}", "\\newtheorem{example}{Example}",
                 "", f"\\title{{Exercises on {topic}}}", "\\begin{document}", "\\maketitle", ""]
        for s in range(r.randint(1, 3)):
            parts.append(f"\\section{{{r.choice(_TEX_TOPICS)}}}\n\\label{{sec:{s + 1}}}")
            parts.extend(block() + "\n" for block in r.sample(blocks, r.randint(2, 4)))
        parts.append("\\end{document}")
        return "\n".join(parts)


def latex_docs(rng: random.Random) -> Iterator[Item]:
    gen = LatexGen(rng)
    for i in range(10**9):
        yield Document("latex", f"gen/{i:06d}", gen.document()), "generated-latex", "generated (Apache-2.0, this project)"

