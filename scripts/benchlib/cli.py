"""The command line of scripts/bench: options, the run, the JSON file and the Markdown table."""

from __future__ import annotations

import argparse
import json
import sys

from benchlib.common import TPOPS, log
from benchlib.report import markdown
from benchlib.run import OPT_IN, SECTIONS, Bench


def main(doc: str) -> int:
    """Run the bench as ``scripts/bench`` (whose docstring ``doc`` is the help); the exit status."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small and short: a smoke test")
    parser.add_argument("--out", default="bench-results.json", help="JSON output (default bench-results.json)")
    parser.add_argument("--no-dovecot", action="store_true", help="do not run the Dovecot baseline")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (Maildirs, configs, logs)")
    parser.add_argument("--tmpdir", default=None, help="where to make the temp dir (default: system temp dir)")
    parser.add_argument("--only", default=None,
                        help="comma-separated sections to run: " + ",".join(SECTIONS) + " (default: all but "
                             + ", ".join(OPT_IN) + "; --large, --million, --cluster and --tls add theirs)")
    parser.add_argument("--large", action="store_true",
                        help="also the growth curve: first and later logins at 1k, 20k and 100k messages")
    parser.add_argument("--million", action="store_true",
                        help="also the user-base rows: a 1,000,000-user passwd-file against a 100-user one")
    parser.add_argument("--cluster", action="store_true",
                        help="also logins/s through a private HAProxy over two tpops nodes (127.0.0.2, "
                             "127.0.0.3) against one node directly")
    parser.add_argument("--tpops-setting", action="append", default=[], metavar="NAME=VALUE",
                        help="a tpops.conf setting for the main tpops servers, e.g. post_login_workers=0 "
                             "(to measure an alternative; repeatable; recorded in the JSON)")
    parser.add_argument("--tls", action="store_true",
                        help="also the TLS rows: logins/s over implicit TLS at 1, 8, 32 clients (full and "
                             "resumed handshakes) and RETR 50 x 1 MiB over TLS, Dovecot with the same certificate")
    args = parser.parse_args()
    if args.only:
        wanted = [x.strip() for x in args.only.split(",") if x.strip()]
        unknown = sorted(set(wanted) - set(SECTIONS))
        if unknown:
            parser.error(f"--only: unknown section(s) {', '.join(unknown)}; known: {', '.join(SECTIONS)}")
        args.sections = wanted
    else:
        args.sections = [x for x in SECTIONS if x not in OPT_IN]
        for flag, section in (("large", "curve"), ("million", "million"), ("cluster", "cluster"), ("tls", "tls")):
            if getattr(args, flag):
                args.sections.append(section)
    if not TPOPS.exists():
        print(f"bench: {TPOPS} not found; run scripts/test or scripts/demo first", file=sys.stderr)
        return 1
    bench = Bench(args)
    result = bench.run()
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2, ensure_ascii=False)
        f.write("\n")
    print(markdown(result))
    log(f"wrote {args.out} in {result['duration_s']} s")
    return 0
