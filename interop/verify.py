"""Verifies tokens from a running token-exchange with PyJWT, which fetches
the live JWKS itself (PyJWKClient). Reads cases as JSON on stdin:

  {"jwks_url": "...", "cases": [{"token": "...", "audience": "integration",
   "expect": "valid" | "expired", "claims": {...}, "lifetime": 20}]}

For a valid case, the claim set must be exactly `claims` plus iat, nbf, exp
and jti, with the right types. Prints "ok N" or exits non-zero with why.
"""

import json
import re
import sys

import jwt
from jwt import PyJWKClient

UUID4 = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


def fail(msg):
    print(msg, file=sys.stderr)
    sys.exit(1)


def check_claims(got, case):
    want = case["claims"]
    names = set(want) | {"iat", "nbf", "exp", "jti"}
    if set(got) != names:
        fail(f"claim names {sorted(got)} != {sorted(names)}")
    for name, value in want.items():
        if got[name] != value or type(got[name]) is not type(value):
            fail(f"claim {name}: {got[name]!r} ({type(got[name]).__name__}) != {value!r}")
    for name in ("iat", "nbf", "exp"):
        if type(got[name]) is not int:
            fail(f"{name} is not an integer: {got[name]!r}")
    if got["nbf"] != got["iat"] or got["exp"] - got["iat"] != case["lifetime"]:
        fail(f"times: iat {got['iat']} nbf {got['nbf']} exp {got['exp']}")
    if not isinstance(got["jti"], str) or not UUID4.match(got["jti"]):
        fail(f"jti is not a UUID v4: {got['jti']!r}")
    if not isinstance(got["aud"], str):
        fail("aud is not a plain string")


def main():
    spec = json.load(sys.stdin)
    client = PyJWKClient(spec["jwks_url"], cache_keys=False)
    for case in spec["cases"]:
        token = case["token"]
        header = jwt.get_unverified_header(token)
        if "typ" in header or set(header) != {"alg", "kid"}:
            fail(f"unexpected header {header}")
        key = client.get_signing_key_from_jwt(token)
        options = {"require": ["exp", "iat", "nbf", "iss", "aud"]}
        try:
            claims = jwt.decode(
                token,
                key.key,
                algorithms=[header["alg"]],
                audience=case["audience"],
                issuer="token-exchange",
                options=options,
            )
        except jwt.ExpiredSignatureError:
            if case["expect"] == "expired":
                continue
            fail("a fresh token was refused as expired")
        except jwt.PyJWTError as e:
            fail(f"{header['alg']} token refused: {e!r}")
        if case["expect"] == "expired":
            fail("an expired token was accepted")
        check_claims(claims, case)
    print(f"ok {len(spec['cases'])}")


if __name__ == "__main__":
    main()
