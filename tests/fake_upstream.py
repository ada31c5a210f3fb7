"""The fakes as a process, for the benchmark and the end-to-end tests: `python tests/fake_upstream.py --port N` is
the fake site (fake_site.py; `--site k2think` the older one), `--api` the fake of IFM's API (fake_api.py; with
`--self-hosted` a vLLM/SGLang server). Tests steer it through its /_fake routes."""

import argparse

from aiohttp import web
from fake_api import DAILY_BUDGET, FakeIFM
from fake_site import SITES, FakeK2Think, details_snapshot, make_jwt, output_items

__all__ = ["details_snapshot", "make_jwt", "output_items"]  # what tests/test_replicas.py and site_grammar.py import


def main():
    parser = argparse.ArgumentParser(description="Fake K2Think upstream for tests and benchmarks")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8101)
    parser.add_argument("--site", choices=sorted(SITES), default="k2horizon", help="which site to be")
    parser.add_argument("--api", action="store_true", help="be the official IFM API (api.ifm.ai/v1), not the site")
    parser.add_argument("--keys", help="with --api: the accepted keys, comma-separated (default: any key or none)")
    parser.add_argument("--refused", default="", help="with --api: keys answered 403, comma-separated")
    parser.add_argument("--self-hosted", action="store_true", help="with --api: be a vLLM/SGLang server instead")
    parser.add_argument("--blanking", action="store_true",
                        help="with --api: blank list content (no --chat-template-content-format string)")
    parser.add_argument("--empty-followups", action=argparse.BooleanOptionalAction, default=None,
                        help="with --api: low/medium follow-ups come back all reasoning (default: only self-hosted)")
    parser.add_argument("--daily-budget", type=int, default=DAILY_BUDGET, help="with --api: tokens a key has a day")
    args = parser.parse_args()
    if args.api:
        app = FakeIFM(keys=args.keys.split(",") if args.keys is not None else None,
                      refused=[key for key in args.refused.split(",") if key], self_hosted=args.self_hosted,
                      blanking=args.blanking, empty_followups=args.empty_followups,
                      daily_budget=args.daily_budget).app
    else:
        app = FakeK2Think(args.site).app
    web.run_app(app, host=args.host, port=args.port, access_log=None, print=None, handler_cancellation=True)


if __name__ == "__main__":
    main()
