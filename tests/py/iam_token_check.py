#!/usr/bin/env python3
"""Checks an RDS IAM authentication token as RDS does, for PostgreSQL's PAM login.

PostgreSQL (auth method `pam`) runs this through pam_exec with `expose_authtok`: the
password the client sent is on stdin, the database user in PAM_USER. Exit 0 accepts the
login. The check is written from AWS's SigV4 specification with the standard library,
independently of walshore's signer: the signature over `GET /?Action=connect&DBUser=...`
for service rds-db, the access key, region, host, user, and that the token is within its
lifetime (X-Amz-Date + X-Amz-Expires) and not from the future.

Each attempt appends one JSON line to --log: {"ok": bool, "why": ..., "date": ..., "signature": ...}.
"""

import argparse
import datetime
import hashlib
import hmac
import json
import os
import sys
import urllib.parse


def hmac_sha256(key, msg):
    return hmac.new(key, msg.encode(), hashlib.sha256).digest()


def check(token, args, user, now):
    host, sep, query = token.partition("/?")
    if not sep:
        return False, "not a token", {}
    params = urllib.parse.parse_qsl(query, keep_blank_values=True, strict_parsing=True)
    p = dict(params)
    if host != args.host:
        return False, f"signed for host {host}, not {args.host}", p
    if p.get("Action") != "connect" or p.get("DBUser") != user:
        return False, f"not a connect token for {user}", p
    if p.get("X-Amz-Algorithm") != "AWS4-HMAC-SHA256" or p.get("X-Amz-SignedHeaders") != "host":
        return False, "not SigV4 over the host header", p
    access, day, region, service, term = p.get("X-Amz-Credential", "").split("/")
    if (access, region, service, term) != (args.access_key, args.region, "rds-db", "aws4_request"):
        return False, f"credential scope {p.get('X-Amz-Credential')}", p
    signed_at = datetime.datetime.strptime(p["X-Amz-Date"], "%Y%m%dT%H%M%SZ").replace(tzinfo=datetime.timezone.utc)
    if day != signed_at.strftime("%Y%m%d"):
        return False, "scope date differs from X-Amz-Date", p
    expires = int(p["X-Amz-Expires"])
    if expires > 900:
        return False, "lifetime over 15 minutes", p
    if now > signed_at + datetime.timedelta(seconds=expires):
        return False, "expired", p
    if signed_at > now + datetime.timedelta(seconds=60):
        return False, "signed in the future", p

    def enc(s):
        return urllib.parse.quote(s, safe="-_.~")

    canonical_query = "&".join(
        f"{k}={v}" for k, v in sorted((enc(k), enc(v)) for k, v in params if k != "X-Amz-Signature")
    )
    canonical_request = "\n".join(
        ["GET", "/", canonical_query, f"host:{host}", "", "host", hashlib.sha256(b"").hexdigest()]
    )
    scope = f"{day}/{region}/rds-db/aws4_request"
    string_to_sign = "\n".join(
        ["AWS4-HMAC-SHA256", p["X-Amz-Date"], scope, hashlib.sha256(canonical_request.encode()).hexdigest()]
    )
    key = ("AWS4" + args.secret_key).encode()
    for part in (day, region, "rds-db", "aws4_request"):
        key = hmac_sha256(key, part)
    expected = hmac.new(key, string_to_sign.encode(), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, p.get("X-Amz-Signature", "")):
        return False, "signature does not match", p
    return True, "ok", p


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--access-key", required=True)
    ap.add_argument("--secret-key", required=True)
    ap.add_argument("--region", required=True)
    ap.add_argument("--host", required=True, help="host:port the token must be signed for")
    ap.add_argument("--log", required=True)
    args = ap.parse_args()
    token = sys.stdin.buffer.read().split(b"\0")[0].decode().strip()
    user = os.environ.get("PAM_USER", "")
    now = datetime.datetime.now(datetime.timezone.utc)
    try:
        ok, why, p = check(token, args, user, now)
    except Exception as e:  # a malformed token is a refusal, not a crash
        ok, why, p = False, f"malformed: {e}", {}
    with open(args.log, "a") as log:
        log.write(
            json.dumps(
                {
                    "ok": ok,
                    "why": why,
                    "user": user,
                    "date": p.get("X-Amz-Date"),
                    "signature": p.get("X-Amz-Signature"),
                    "checked_at": now.isoformat(),
                }
            )
            + "\n"
        )
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
