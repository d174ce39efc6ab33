"""The `shop` app of docs/your-app.md: a Flask app made by an application factory, whose prices
load from prices.json at import (in the uWSGI master, once per generation).

`tests/test_docs.py` runs the page's session against a copy of this folder; the page's own
commands make each release (a sed on RELEASE or BROKEN, an emptied prices.json).
"""

import json
from pathlib import Path

from flask import Flask, jsonify

RELEASE = "2026.11.1"
BROKEN = False  # a release that imports fine and raises on /price/<name>
PRICES_FILE = Path(__file__).resolve().parents[1] / "prices.json"


def load_prices() -> dict[str, int]:
    prices = json.loads(PRICES_FILE.read_text())
    if not prices:
        raise ValueError("prices.json holds no prices")  # raise on bad data: never served
    return prices


PRICES = load_prices()  # at import: the workers share it, and a bad file fails the release


def create_app() -> Flask:
    app = Flask(__name__)

    @app.get("/price/<name>")
    def price(name: str):
        if name not in PRICES:
            return jsonify(error=f"no {name}"), 404
        if BROKEN:
            raise TypeError(f"price() got {name!r}")
        return jsonify(name=name, price=PRICES[name], release=RELEASE)

    return app
