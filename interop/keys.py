"""Key files both ways, with jwcrypto.

  keys.py check KEYFILE JWKS_URL  -- our private key file loads in jwcrypto,
                                     and its public part equals our JWKS entry.
  keys.py generate DIR            -- writes RS256, ES256 and EdDSA private keys
                                     made by jwcrypto, in the jose-util layout
                                     (use, kty, kid = padded RFC 7638
                                     thumbprint, alg), to DIR/<alg>.json.
"""

import base64
import json
import sys
import urllib.request

from jwcrypto import jwk


def check(path, jwks_url):
    with open(path) as f:
        text = f.read()
    key = jwk.JWK.from_json(text)
    if not key.has_private:
        sys.exit("jwcrypto sees no private key")
    public = json.loads(key.export_public())
    ours = json.loads(text)
    with urllib.request.urlopen(jwks_url) as r:
        published = json.load(r)["keys"]
    entry = next((k for k in published if k["kid"] == ours["kid"]), None)
    if entry is None:
        sys.exit("the key is not in the JWKS")
    for member in ("kty", "n", "e", "crv", "x", "y"):
        if public.get(member) != entry.get(member):
            sys.exit(f"member {member}: jwcrypto {public.get(member)!r} != JWKS {entry.get(member)!r}")
    # jwcrypto's own RFC 7638 thumbprint is the kid, as jose-util makes it.
    thumb = key.thumbprint()
    padded = thumb + "=" * (-len(thumb) % 4)
    if padded != ours["kid"]:
        sys.exit(f"kid {ours['kid']} is not the padded thumbprint {padded}")
    print("ok")


def generate(directory):
    specs = {
        "RS256": dict(kty="RSA", size=2048),
        "ES256": dict(kty="EC", crv="P-256"),
        "EdDSA": dict(kty="OKP", crv="Ed25519"),
    }
    for alg, params in specs.items():
        key = jwk.JWK.generate(**params)
        members = json.loads(key.export_private())
        thumb = key.thumbprint()
        layout = {"use": "sig", "kty": members["kty"], "kid": thumb + "=" * (-len(thumb) % 4), "alg": alg}
        for name in ("crv", "n", "e", "x", "y", "d", "p", "q", "dp", "dq", "qi"):
            if name in members:
                layout[name] = members[name]
        with open(f"{directory}/{alg}.json", "w") as f:
            json.dump(layout, f)
    print("ok")


if __name__ == "__main__":
    if sys.argv[1] == "check":
        check(sys.argv[2], sys.argv[3])
    elif sys.argv[1] == "generate":
        generate(sys.argv[2])
    else:
        sys.exit(__doc__)
