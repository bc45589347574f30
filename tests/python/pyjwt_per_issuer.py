"""A relying party using PyJWT with one cache's discovery document.

Usage: pyjwt_per_issuer.py DISCOVERY_URL ROOT_PEM AUDIENCE OWN_TOKEN OTHER_TOKEN

Trusts only ROOT_PEM (hostname checks on), reads `issuer` and `jwks_uri`
from the discovery document, and verifies OWN_TOKEN (must pass) and
OTHER_TOKEN, signed by another cache (must be refused). Prints one line per
token; exits 0 only when both come out as expected.
"""
import json
import ssl
import sys
import urllib.request

import jwt

discovery_url, root_pem, audience, own, other = sys.argv[1:6]
ctx = ssl.create_default_context(cafile=root_pem)
with urllib.request.urlopen(discovery_url, context=ctx, timeout=20) as r:
    doc = json.load(r)
client = jwt.PyJWKClient(doc["jwks_uri"], ssl_context=ctx, cache_keys=False)


def verify(token):
    key = client.get_signing_key_from_jwt(token)
    return jwt.decode(
        token, key, algorithms=["EdDSA"], audience=audience, issuer=doc["issuer"]
    )


claims = verify(own)
print("own: verified, sub", claims["sub"])
try:
    verify(other)
except jwt.exceptions.PyJWTError as e:
    print("other: refused:", e)
else:
    print("other: VERIFIED (a token of another cache)")
    sys.exit(1)
