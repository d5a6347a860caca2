"""The ``data`` domain: JSON and CSV records (generated with Faker) and JSON files shipped by packages."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import random
from typing import Iterator

try:  # the `corpus` extra; build_corpus names the install command when it is missing
    from faker import Faker
except ImportError:  # pragma: no cover - exercised through build.check_extra
    Faker = None

from .base import Document, Item, dist_license, package_dir, package_dist, rel_files

#: Modules (of the ``corpus`` extra) this domain needs.
REQUIRES = ("faker",)

_STATUSES = ["pending", "paid", "shipped", "delivered", "cancelled", "refunded"]
_PRODUCTS = ["USB-C cable", "wireless mouse", "mechanical keyboard", "27-inch monitor", "laptop stand",
             "noise-cancelling headphones", "webcam", "desk lamp", "office chair", "external SSD 1TB",
             "coffee grinder", "water bottle", "backpack", "running shoes", "yoga mat", "notebook A5"]
_DEPARTMENTS = ["Engineering", "Sales", "Marketing", "Finance", "Support", "Operations", "Research", "Legal"]
_CURRENCIES = ["USD", "EUR", "GBP", "JPY", "CHF", "CAD"]


class RecordGen:
    """Realistic-looking structured records; values come from a seeded RNG and Faker."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.fk = Faker("en_US")
        self.fk.seed_instance(rng.randrange(2**32))

    def _ts(self) -> str:
        base = dt.datetime(2019, 1, 1) + dt.timedelta(seconds=self.rng.randrange(7 * 365 * 86400))
        return base.isoformat() + "Z"

    def _date(self) -> str:
        return (dt.date(2015, 1, 1) + dt.timedelta(days=self.rng.randrange(4000))).isoformat()

    def user(self) -> dict:
        r, fk = self.rng, self.fk
        return {"id": r.randint(1, 10**6), "name": fk.name(), "email": fk.email(), "age": r.randint(18, 90),
                "address": {"street": fk.street_address(), "city": fk.city(), "state": fk.state_abbr(),
                            "zip": fk.postcode()},
                "signup_date": self._date(), "is_active": r.random() < 0.8,
                "tags": r.sample(["admin", "beta", "premium", "newsletter", "trial", "staff"], r.randint(0, 3))}

    def order(self) -> dict:
        r = self.rng
        items = [{"sku": f"SKU-{r.randint(10000, 99999)}", "name": r.choice(_PRODUCTS), "quantity": r.randint(1, 5),
                  "unit_price": round(r.uniform(2, 500), 2)} for _ in range(r.randint(1, 5))]
        total = round(sum(i["quantity"] * i["unit_price"] for i in items), 2)
        return {"order_id": f"ORD-{r.randint(10**6, 10**7 - 1)}", "customer_id": r.randint(1, 10**6),
                "created_at": self._ts(), "status": r.choice(_STATUSES), "currency": r.choice(_CURRENCIES),
                "items": items, "total": total}

    def sensor(self) -> dict:
        r = self.rng
        start = dt.datetime(2023, 1, 1) + dt.timedelta(minutes=r.randrange(500_000))
        t0 = r.uniform(-5, 30)
        return {"device_id": f"sensor-{r.randint(1, 999):03d}", "firmware": f"{r.randint(1, 4)}.{r.randint(0, 12)}.{r.randint(0, 30)}",
                "location": {"lat": round(r.uniform(-60, 70), 5), "lon": round(r.uniform(-180, 180), 5)},
                "readings": [{"timestamp": (start + dt.timedelta(minutes=15 * k)).isoformat() + "Z",
                              "temperature_c": round(t0 + r.gauss(0, 0.8), 2),
                              "humidity_pct": round(r.uniform(20, 95), 1),
                              "battery": round(1 - 0.001 * k - r.random() * 0.01, 3)} for k in range(r.randint(3, 8))]}

    def config(self) -> dict:
        r = self.rng
        return {"version": f"{r.randint(1, 3)}.{r.randint(0, 9)}", "server": {"host": self.fk.ipv4_private(),
                "port": r.choice([80, 443, 8000, 8080, 5432, 6379]), "workers": r.choice([1, 2, 4, 8, 16])},
                "logging": {"level": r.choice(["DEBUG", "INFO", "WARNING", "ERROR"]), "format": "json",
                            "file": f"/var/log/{self.fk.word()}.log"},
                "features": {w: r.random() < 0.5 for w in sorted(set(self.fk.words(r.randint(2, 5))))},
                "retry": {"max_attempts": r.randint(1, 10), "backoff_seconds": round(r.uniform(0.1, 5), 2)}}

    def api_response(self) -> dict:
        r = self.rng
        data = [{"id": r.randint(1, 10**5), "title": self.fk.sentence(nb_words=r.randint(3, 7)).rstrip("."),
                 "author": self.fk.user_name(), "score": r.randint(0, 5000), "published": self._date()}
                for _ in range(r.randint(2, 6))]
        page = r.randint(1, 20)
        return {"status": 200, "data": data, "pagination": {"page": page, "per_page": len(data),
                "total": r.randint(page * len(data), 5000), "next": f"/api/v1/items?page={page + 1}"}}

    def employee_csv(self) -> list[list]:
        r = self.rng
        rows = [["employee_id", "name", "department", "job_title", "hire_date", "salary"]]
        for _ in range(r.randint(8, 40)):
            rows.append([r.randint(1000, 99999), self.fk.name(), r.choice(_DEPARTMENTS), self.fk.job(),
                         self._date(), r.randrange(35_000, 220_000, 500)])
        return rows

    def sales_csv(self) -> list[list]:
        r = self.rng
        rows = [["date", "region", "product", "units", "unit_price", "revenue"]]
        day = dt.date(2020, 1, 1) + dt.timedelta(days=r.randrange(1500))
        for k in range(r.randint(8, 40)):
            units, price = r.randint(1, 300), round(r.uniform(1, 400), 2)
            rows.append([(day + dt.timedelta(days=k // 3)).isoformat(), r.choice(["north", "south", "east", "west"]),
                         r.choice(_PRODUCTS), units, f"{price:.2f}", f"{units * price:.2f}"])
        return rows

    def weather_csv(self) -> list[list]:
        r = self.rng
        rows = [["station", "date", "t_min", "t_max", "precip_mm", "wind_kmh"]]
        station, day = self.fk.city(), dt.date(2018, 1, 1) + dt.timedelta(days=r.randrange(2500))
        for k in range(r.randint(8, 40)):
            lo = round(r.uniform(-10, 20), 1)
            rows.append([station, (day + dt.timedelta(days=k)).isoformat(), lo, round(lo + r.uniform(2, 15), 1),
                         round(max(0.0, r.gauss(1, 4)), 1), r.randint(0, 80)])
        return rows

    def experiment_csv(self) -> list[list]:
        r = self.rng
        rows = [["run", "learning_rate", "batch_size", "epoch", "train_loss", "val_loss", "val_accuracy"]]
        for run in range(r.randint(1, 4)):
            lr, bs, loss = r.choice([1e-4, 3e-4, 1e-3, 3e-3]), r.choice([16, 32, 64, 128]), r.uniform(2, 3)
            for epoch in range(1, r.randint(4, 12)):
                loss *= r.uniform(0.75, 0.97)
                rows.append([f"run-{run}", lr, bs, epoch, f"{loss:.4f}", f"{loss * r.uniform(1.0, 1.2):.4f}",
                             f"{min(0.99, 1 - loss / 3 + r.uniform(-0.02, 0.02)):.4f}"])
        return rows

    def document(self) -> tuple[str, str]:
        r = self.rng
        if r.random() < 0.55:
            kind = r.choice(["user", "order", "sensor", "config", "api_response"])
            make = getattr(self, kind)
            shape = r.choice(["object", "array", "jsonl"])
            if shape == "object":
                return kind, json.dumps(make(), indent=r.choice([2, 4]), ensure_ascii=False)
            records = [make() for _ in range(r.randint(2, 5))]
            if shape == "array":
                return kind, json.dumps(records, indent=2, ensure_ascii=False)
            return kind, "\n".join(json.dumps(x, ensure_ascii=False) for x in records)
        kind = r.choice(["employee_csv", "sales_csv", "weather_csv", "experiment_csv"])
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerows(getattr(self, kind)())
        return kind, buf.getvalue().rstrip("\n")


#: Packages whose shipped JSON files (schemas, templates) are mixed into the data domain.
_JSON_PACKAGES = ("plotly", "jsonschema_specifications", "nbformat", "jupyterlab", "jupyterlab_server", "ipywidgets")


def _shipped_json() -> Iterator[Item]:
    for pkg in _JSON_PACKAGES:
        root, dist = package_dir(pkg), package_dist(pkg)
        if root is None or dist is None:
            continue
        label, licence = f"pypi:{dist.metadata['Name'].lower()}", dist_license(dist)
        for path in rel_files(root, "*.json"):
            if not 200 <= path.stat().st_size <= 12_000:
                continue
            try:
                text = path.read_text(encoding="utf-8")
                obj = json.loads(text)
            except (OSError, UnicodeDecodeError, ValueError):
                continue
            if "\n" not in text.strip():  # minified: re-indent so it reads like a file people write
                text = json.dumps(obj, indent=2, ensure_ascii=False)
            yield Document("data", f"shipped/{pkg}/{path.relative_to(root).as_posix()}", text.strip()), label, licence


def records_docs(rng: random.Random) -> Iterator[Item]:
    gen = RecordGen(rng)

    def generated() -> Iterator[Item]:
        for i in range(10**9):
            kind, text = gen.document()
            yield Document("data", f"gen/{kind}/{i:06d}", text), "generated-json-csv", "generated (Apache-2.0, this project)"

    # roughly one shipped file per four generated ones, until the shipped files run out
    gens = generated()
    shipped = _shipped_json()
    for item in shipped:
        yield item
        for _ in range(4):
            yield next(gens)
    yield from gens

